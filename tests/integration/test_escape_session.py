"""A hostile service against what changed lately, and beyond: the fork server's own session
and scheduling group, notify messages held while starting, batched launches; and what a service
can make the supervisor do on its behalf.

Each test is a hole found (it fails on the code it was written against): real sandboxes, no timed
assertion, every wait ends on an event (a line in a log, a state in `ps`) bounded by HANG.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import wait_until, write
from test_faults import detached, log_of, supervisor_pid

# bind() of a descriptor that is no socket, at the address of a `proxy:` socket handed off: the
# bind listener (handoff.py) takes a copy of the caller's descriptor to read its socket type.
NOT_A_SOCKET_BINDS = r"""
import ctypes, os, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
address = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 7000) + socket.inet_aton("127.0.0.1") + bytes(8)
r, w = os.pipe()
errors = set()
for _ in range(int(sys.argv[1])):
    if libc.bind(r, address, len(address)) != 0:
        errors.add(ctypes.get_errno())
print(f"pipe {os.fstat(r).st_ino} errors {sorted(errors)} done", flush=True)
time.sleep(3600)
"""


def _holds_pipe(pid: int, inode: int) -> int:
    """How many descriptors of process `pid` are the pipe `inode`."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == f"pipe:[{inode}]"
        except OSError:
            pass
    return count


def test_binds_of_a_non_socket_at_a_handed_off_address_leave_no_descriptor_in_the_supervisor(spec_dir: Path) -> None:
    """A service with a `proxy:` socket handed off (its bind() calls go to the supervisor) calls
    bind() on a pipe at the proxy's address, again and again. Each is refused (ENOTSOCK), and the
    supervisor must keep nothing of it. It kept one copy of the pipe per call (handoff.py's
    `_caller_type`: socket.socket(fileno=copy) raises for a non-socket, and the copy taken with
    pidfd_getfd is never closed): a service could fill the supervisor's descriptor table (its
    RLIMIT_NOFILE), and with it every stack operation that opens one (control connections,
    launches, restarts, the notify and output pipes of new sandboxes)."""
    binds = 300
    write(spec_dir, "leak.py", NOT_A_SOCKET_BINDS)
    write(spec_dir, "svc.yaml", f"""
        kind: service
        name: svc
        command: [python3, /t/leak.py, "{binds}"]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        name: svc
        listen: tcp:127.0.0.1:0
        proxy: tcp:127.0.0.1:7000
        handoff: true
        """)
    with detached(spec_dir, "leak"):
        line = wait_until(lambda: next((l for l in log_of("leak", "svc").splitlines() if l.endswith(" done")), None), "the service's binds")
        words = line.split("| ", 1)[-1].split()
        inode = int(words[1])
        assert "88" in line, line  # each bind was refused: ENOTSOCK
        held = _holds_pipe(supervisor_pid("leak"), inode)
        assert held == 0, f"the supervisor holds {held} copies of the service's pipe after {binds} binds"
