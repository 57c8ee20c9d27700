"""Escape attempts from a service with the default settings: each one must fail.

One sandbox runs a probe that tries everything and reports; each attempt is then a test of its
own, reading the probe's report (the probe's stack runs within the first test, so nothing outlives
a test). Not covered yet, and said so in the README: ptrace of the sandbox's own init and other
calls that a seccomp filter would refuse.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Stack, write

PROBE = r'''
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}

def attempt(name, fn):
    try:
        result = fn()
        out[name] = "ESCAPED: " + repr(result)[:80]
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
    except Exception as e:
        out[name] = type(e).__name__

def call(fn, *args):
    def run():
        if fn(*args) != 0:
            raise OSError(ctypes.get_errno(), "")
        return "returned 0"
    return run

def write(path, data="x"):
    def run():
        with open(path, "w") as f:
            f.write(data)
        return path
    return run

HOST_PID = int(sys.argv[1])
SPEC = sys.argv[2]
attempt("see_host_process", lambda: os.stat(f"/proc/{HOST_PID}") and HOST_PID)
attempt("signal_host_process", lambda: os.kill(HOST_PID, 0))
attempt("write_root", write("/escape"))
attempt("write_etc", write("/etc/escape"))
attempt("write_usr", write("/usr/escape"))
attempt("write_spec_folder", write(os.path.join(SPEC, "escape")))
attempt("mount_tmpfs", call(libc.mount, b"none", b"/mnt", b"tmpfs", 0, None))
attempt("umount_proc", call(libc.umount2, b"/proc", 2))
attempt("unshare_mount_ns", call(libc.unshare, 0x00020000))
attempt("unshare_user_ns", call(libc.unshare, 0x10000000))
def clone_userns():
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "")
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "cloned into a new user namespace"
attempt("clone_new_user_ns", clone_userns)
attempt("ptrace_the_init", call(libc.ptrace, 16, 1, None, None))
# The only namespaces it can name are its init's; being allowed to setns at all is the escape route.
attempt("setns_into_a_namespace", lambda: call(libc.setns, os.open("/proc/1/ns/mnt", os.O_RDONLY), 0)())
attempt("proc_1_root_escape", lambda: os.stat(f"/proc/1/root/proc/{HOST_PID}") and "host pid visible through /proc/1/root")
attempt("load_kernel_module", call(libc.syscall, 175, None, 0, b""))
attempt("reboot", call(libc.reboot, 0x4321FEDC))
attempt("sethostname_host", call(libc.sethostname, b"pwned", 5))
attempt("settime", lambda: call(libc.clock_settime, 0, ctypes.byref((ctypes.c_long * 2)(0, 0)))())
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("move_to_other_cgroup", write("/sys/fs/cgroup/unified/cgroup.procs", str(os.getpid())))
attempt("raise_own_limits", write("/sys/fs/cgroup/pids/pids.max", "max"))
attempt("read_kcore", lambda: len(open("/proc/kcore", "rb").read(16)) or (_ for _ in ()).throw(OSError(errno.ENODATA, "")))
attempt("write_sysrq_trigger", write("/proc/sysrq-trigger", "h"))
attempt("write_proc_sys", write("/proc/sys/kernel/domainname", "pwned"))
def ping():
    import shutil
    if not shutil.which("ping"):
        return "cannot check: ping is not installed (scripts/test installs iputils-ping)"
    if os.system("ping -c1 -W1 127.0.0.1 >/dev/null 2>&1") != 0:
        raise OSError(errno.EPERM, "ping could not open its raw socket")
    return "ping worked"
attempt("setuid_binary_gains_nothing", ping)
attempt("mknod_disk", lambda: os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0)) or "made a block device")
print("ESCAPE " + json.dumps(out), flush=True)
'''

ATTEMPTS = [
    "see_host_process",
    "signal_host_process",
    "write_root",
    "write_etc",
    "write_usr",
    "write_spec_folder",
    "mount_tmpfs",
    "umount_proc",
    "unshare_mount_ns",
    "unshare_user_ns",
    "clone_new_user_ns",
    "ptrace_the_init",
    "setns_into_a_namespace",
    "proc_1_root_escape",
    "load_kernel_module",
    "reboot",
    "sethostname_host",
    "settime",
    "raw_socket",
    "packet_socket",
    "move_to_other_cgroup",
    "raise_own_limits",
    "read_kcore",
    "write_sysrq_trigger",
    "write_proc_sys",
    "setuid_binary_gains_nothing",
    "mknod_disk",
]
_report: dict[str, str] = {}


def _probe(tmp_path: Path) -> dict[str, str]:
    if not _report:
        spec = tmp_path / "escape"
        spec.mkdir()
        write(spec, "probe.py", PROBE)
        write(
            spec,
            "probe.yaml",
            f"""
            kind: service
            restart: "no"
            command: [python3, /t/probe.py, "{os.getpid()}", "{spec}"]
            mounts: [{{source: ., target: /t}}]
            """,
        )
        stack = Stack(spec)
        assert stack.wait_exit() == 0, stack.err
        line = next(line for line in stack.lines("probe") if line.startswith("ESCAPE "))
        _report.update(json.loads(line[len("ESCAPE "):]))
    return _report


@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_escape_attempt_fails(attempt: str, tmp_path: Path) -> None:
    result = _probe(tmp_path)[attempt]
    assert not result.startswith("ESCAPED"), f"{attempt}: {result}"


def test_host_is_unchanged_after_the_escape_attempts(tmp_path: Path) -> None:
    _probe(tmp_path)
    assert os.uname().nodename != "pwned"
    assert not Path("/escape").exists() and not Path("/etc/escape").exists() and not Path("/usr/escape").exists()
    assert Path("/proc/sys/kernel/domainname").read_text().strip() != "pwned"
    assert subprocess.run(["true"]).returncode == 0


def test_the_seccomp_filter_is_what_refuses_user_namespaces(run_stack, spec_dir: Path) -> None:
    probe = "import ctypes, os\\nlibc = ctypes.CDLL(None, use_errno=True)\\nprint('unshare', libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))"
    write(spec_dir, "default.yaml", f'kind: service\nrestart: "no"\ncommand: [python3, -c, "{probe}"]\n')
    write(spec_dir, "loose.yaml", f'kind: service\nrestart: "no"\nseccomp: [unshare]\ncommand: [python3, -c, "{probe}"]\n')
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    assert stack.lines("default") == ["unshare -1 Operation not permitted"]
    assert stack.lines("loose") == ["unshare 0 Success"]


def test_unprivileged_user_keeps_exactly_the_capabilities_asked_for(run_stack, spec_dir: Path) -> None:
    write(
        spec_dir,
        "probe.py",
        """
        import os, socket
        caps = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Cap"))
        s = socket.socket()
        s.bind(("127.0.0.1", 80))  # a privileged port: needs NET_BIND_SERVICE
        open("/scratch/x", "w").write("ok")  # the tmpfs belongs to the service's user
        print(os.getuid(), os.getgid(), caps["CapEff"].strip(), caps["CapBnd"].strip(), caps["CapAmb"].strip(), "bound 80")
        """,
    )
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        restart: "no"
        user: nobody
        group: nogroup
        capabilities: [NET_BIND_SERVICE]
        tmpfs: [/scratch]
        command: [python3, /t/probe.py]
        mounts: [{source: ., target: /t}]
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    assert stack.lines("svc") == ["65534 65534 0000000000000400 0000000000000400 0000000000000400 bound 80"]


USERNS_PROBE = """
import os, socket
print("map", open("/proc/self/uid_map").read().split(), os.getuid(), flush=True)
open("/data/written", "w").write("by root inside")
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(b"served from a user namespace\\n")
    c.close()
"""


def test_user_namespace_maps_root_inside_to_an_unprivileged_host_uid(run_stack, spec_dir: Path, socket_dir: Path, tmp_path: Path) -> None:
    import socket

    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    write(spec_dir, "probe.py", USERNS_PROBE)
    write(
        spec_dir,
        "svc.yaml",
        f"""
        kind: service
        userns: true
        command: [python3, /t/probe.py]
        mounts: [{{source: ., target: /t}}, {{source: {data}, target: /data, readonly: false}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/svc.sock
        """,
    )
    stack = run_stack(spec_dir)
    lines = stack.wait_lines("svc", 1)
    assert lines, stack.err
    line = lines[0]
    # The stack's block of the sandboxd user's range (see test_userns.py); what it writes to a
    # bind is stored as the range's first ids, whatever block it runs as.
    first = next(int(l.split(":")[1]) for l in Path("/etc/subuid").read_text().splitlines() if l.startswith("sandboxd:"))
    block = json.loads(Path("/run/sandboxd/stack/state.json").read_text())["userns"]["uid"]
    assert block >= first
    assert line == f"map ['0', '{block}', '65536'] 0"
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(str(socket_dir / "svc.sock"))
    assert c.makefile().readline() == "served from a user namespace\n"  # sockets are still passed in
    c.close()
    assert (data / "written").stat().st_uid == first  # root inside is nobody special outside
    service_pids = Path("/sys/fs/cgroup/unified/sandboxd/stack/svc/cgroup.procs").read_text().split()
    uids = {next(l.split()[1] for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("Uid:")) for pid in service_pids}
    assert uids == {str(block)}
    assert stack.stop() == 0
