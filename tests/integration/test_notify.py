"""Readiness and the watchdog over sd_notify, with real programs that speak the protocol."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import cgroup_dir, wait_until, write


def test_systemd_notify_marks_the_service_ready_with_its_status(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        notify_access: all  # systemd-notify is a child of the shell, not the main process
        command: [sh, -c, 'sleep 0.2; systemd-notify --ready --status="warmed up"; exec sleep 1000']
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("svc: running -> ready: READY=1", "err")
    assert "svc: status: warmed up" in stack.err
    assert stack.stop() == 0


PY_SYSTEMD = r'''
import os, socket
from systemd import daemon
fds = daemon.listen_fds()  # checks LISTEN_PID against getpid(), as libsystemd does
sock = socket.socket(fileno=fds[0])
daemon.notify("READY=1\nSTATUS=serving on fd %d" % fds[0])
while True:
    c, _ = sock.accept()
    c.sendall(b"ok from python-systemd\n")
    c.close()
'''


def test_python_systemd_receives_its_sockets_and_notifies(run_stack, spec_dir: Path, socket_dir: Path):
    if subprocess.run(["/usr/bin/python3", "-c", "import systemd.daemon"], capture_output=True).returncode:
        pytest.fail("python3-systemd is missing: scripts/test installs it (apt-get install python3-systemd)")
    write(spec_dir, "app.py", PY_SYSTEMD)
    write(
        spec_dir,
        "svc.yaml",
        f"""
        kind: service
        ready: notify
        command: [python3, /t/app.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/svc.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("svc: running -> ready: READY=1", "err")
    assert "svc: status: serving on fd 3" in stack.err
    import socket

    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect(str(socket_dir / "svc.sock"))
    assert c.makefile().readline() == "ok from python-systemd\n"
    c.close()
    assert stack.stop() == 0


# A child of the main process says READY=1 (ignored with notify_access: main); then the main
# process itself says STATUS=..., which sandboxd reads after the child's message (one socket, in
# order). So once that status is logged, the child's READY=1 was read and ignored, whatever the
# machine's speed; and the main process's EXTEND_TIMEOUT_USEC lets the start timeout fire soon
# after, instead of a short start_timeout that could fire before the child ever spoke.
CHILD_NOTIFIES = r'''
import os, time
from systemd import daemon
child = os.fork()
if child == 0:
    daemon.notify("READY=1")
    os._exit(0)
os.waitpid(child, 0)
daemon.notify("STATUS=my child said READY=1\nEXTEND_TIMEOUT_USEC=300000")
time.sleep(1000)
'''


def test_notifications_from_other_processes_are_ignored_with_notify_access_main(run_stack, spec_dir: Path):
    write(spec_dir, "svc.py", CHILD_NOTIFIES)
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        start_timeout: 60s
        restart: "no"
        command: [python3, /t/svc.py]
        mounts: [{source: ., target: /t}]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("svc: status: my child said READY=1", "err")
    assert "-> ready" not in stack.err  # the child's READY=1 was read before this status, and ignored
    assert stack.wait_exit() == 1
    assert "svc: not ready within start_timeout (60 s); sending SIGTERM" in stack.err
    assert "-> failed: not ready within start_timeout (60 s); killed by SIGTERM" in stack.err
    assert "-> ready" not in stack.err


def test_missed_watchdog_fails_the_service_and_restarts_it(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        notify_access: all
        watchdog: 60s
        restart: on-watchdog
        restart_delay: 50ms
        start_limit: {burst: 1000, interval: 10s}
        command: [sh, -c, 'systemd-notify --ready; echo "watchdog every $$WATCHDOG_USEC us"; systemd-notify WATCHDOG_USEC=300000 WATCHDOG=1; exec sleep 1000']
        """,
    )
    # The spec's watchdog leaves any machine time to get ready; once ready, the service shortens
    # it to 0.3 s itself (WATCHDOG_USEC=, read after its READY=1) and never pings again. The start
    # limit is out of reach: the stack is still up when the test stops it.
    stack = run_stack(spec_dir)
    stack.wait_for("svc | watchdog every 60000000 us", "out")
    stack.wait_for("restart #1", "err")
    assert "svc: watchdog timeout: no WATCHDOG=1 within 0.3 s; sending SIGABRT" in stack.err
    assert "svc: ready -> backoff: watchdog timeout: no WATCHDOG=1 within 0.3 s; killed by SIGABRT; restarting" in stack.err
    assert stack.stop() == 0


def test_watchdog_kept_alive_by_the_service_never_fires(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        notify_access: all
        watchdog: 2s
        command: [sh, -c, 'systemd-notify --ready; for i in $(seq 30); do systemd-notify WATCHDOG=1; sleep 0.1; done; echo survived; exec sleep 1000']
        """,
    )
    # A ping every 0.1 s against a 2 s watchdog: even a busy machine keeps the gaps shorter. It
    # survives at least 3 s (thirty sleeps), longer than the watchdog, so the pings did count.
    stack = run_stack(spec_dir)
    stack.wait_for("svc | survived", "out")
    assert "watchdog timeout" not in stack.err
    assert stack.stop() == 0


FDSTORE_SERVICE = r'''
import os, socket, sys, time
from systemd import daemon
names = os.environ["LISTEN_FDNAMES"].split(":")
if "client" in names:
    conn = socket.socket(fileno=3 + names.index("client"))
    conn.sendall(b"second life, same connection\n")
    print("resumed with " + os.environ["LISTEN_FDNAMES"], flush=True)
    time.sleep(1000)
listener = socket.socket(fileno=3)
conn, _ = listener.accept()
conn.sendall(b"first life\n")
daemon.notify("FDSTORE=1\nFDNAME=client", fds=[conn.fileno()])
# BARRIER=1 (sd_notify_barrier): sandboxd closes the descriptor once it has read every message
# before it, so the FDSTORE=1 was taken before this process ends, however long sandboxd took.
barrier_r, barrier_w = os.pipe()
daemon.notify("BARRIER=1", fds=[barrier_w])
os.close(barrier_w)
assert os.read(barrier_r, 1) == b""
print("stored", flush=True)
sys.exit(1)  # a crash: the connection lives on in sandboxd's fd store
'''


def test_fd_store_keeps_a_clients_connection_open_across_a_restart(run_stack, spec_dir: Path):
    write(spec_dir, "svc.py", FDSTORE_SERVICE)
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        fdstore_max: 4
        restart_delay: 50ms
        command: [python3, /t/svc.py]
        mounts: [{source: ., target: /t}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:0
        """,
    )
    stack = run_stack(spec_dir)
    port = int(stack.wait_for("tcp:127.0.0.1:", "err").split("tcp:127.0.0.1:")[1].split()[0])
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        reader = c.makefile()
        assert reader.readline() == "first life\n"
        assert reader.readline() == "second life, same connection\n"  # after the crash and restart
    assert stack.wait_lines("svc", 2) == ["stored", "resumed with svc:client"]
    assert "svc: running -> backoff: exited with code 1" in stack.err
    assert stack.stop() == 0


def test_health_check_runs_inside_the_sandbox_and_restarts_an_unhealthy_service(run_stack, spec_dir: Path, tmp_path: Path):
    # The service removes /tmp/ready only when the test opens the gate, after the check has passed:
    # no window of time that a busy machine could miss. The check's timeout is far longer than a
    # check takes, so each failure is the check's own answer.
    gate = tmp_path / "gate"
    gate.mkdir()
    write(
        spec_dir,
        "svc.yaml",
        f"""
        kind: service
        ready: {{exec: [test, -f, /tmp/ready], interval: 200ms, timeout: 30s, retries: 2}}
        restart_delay: 50ms
        mounts: [{{source: {gate}, target: /gate}}]
        command: [sh, -c, "sleep 0.3; touch /tmp/ready; echo touched; while [ ! -e /gate/remove ]; do sleep 0.05; done; rm /tmp/ready; echo removed; exec sleep 1000"]
        """,
    )
    stack = run_stack(spec_dir)
    # /tmp/ready exists only in the sandbox's private /tmp: the check ran inside it.
    stack.wait_for("svc: running -> ready: health check passed", "err")
    assert not Path("/tmp/ready").exists()
    (gate / "remove").touch()
    stack.wait_for("unhealthy: health check failed 2 times in a row", "err")
    stack.wait_for("restart #1", "err")
    assert "svc: health check failed (exited with code 1), 1 of 2" in stack.err
    assert "-> backoff: unhealthy: health check failed 2 times in a row; killed by SIGTERM" in stack.err
    assert stack.stop() == 0


def _nspids(cgroup: Path) -> dict[int, int]:
    """Host pid -> pid as its own pid namespace sees it, for the processes of a cgroup."""
    found = {}
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue  # it ended meanwhile
        found[int(pid)] = int(line.split()[-1])
    return found


def test_a_health_check_that_outlives_its_timeout_is_killed(run_stack, spec_dir: Path):
    # Each check notes its pid in the sandbox's /tmp and then would sleep for 1000 s. Checks never
    # overlap, so a second check means the first one timed out; its process must then be gone,
    # which it could only be if it was killed. Events, not samples taken in a 200 ms window.
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: {exec: [sh, -c, "echo $$$$ >> /tmp/checks; exec sleep 1000"], interval: 10s, timeout: 200ms}
        command: [sleep, "1000"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    cgroup = cgroup_dir("svc")
    init = wait_until(lambda: next((pid for pid, nspid in _nspids(cgroup).items() if nspid == 1), 0), "the sandbox's init")
    checks = Path(f"/proc/{init}/root/tmp/checks")

    def started() -> list[int]:
        return [int(line) for line in checks.read_text().split()] if checks.exists() else []

    first = wait_until(lambda: started()[:1], "a first health check")[0]
    wait_until(lambda: len(started()) >= 2, "a second health check, which starts only once the first has ended")
    wait_until(lambda: first not in _nspids(cgroup).values(), "the first check's process to be gone")
    assert "-> ready" not in stack.err
    assert stack.stop() == 0
