"""Readiness and the watchdog over sd_notify, with real programs that speak the protocol."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import write


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


def test_notifications_from_other_processes_are_ignored_with_notify_access_main(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        start_timeout: 600ms
        restart: "no"
        command: [sh, -c, 'sh -c "systemd-notify --ready"; echo sent; exec sleep 1000']
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 1
    assert "svc: not ready within start_timeout (0.6 s); sending SIGTERM" in stack.err
    assert "-> failed: not ready within start_timeout (0.6 s); killed by SIGTERM" in stack.err
    assert "-> ready" not in stack.err


def test_missed_watchdog_fails_the_service_and_restarts_it(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        notify_access: all
        watchdog: 300ms
        restart: on-watchdog
        restart_delay: 50ms
        command: [sh, -c, 'systemd-notify --ready; echo "watchdog every $WATCHDOG_USEC us"; exec sleep 1000']
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("svc | watchdog every 300000 us", "out")
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
        watchdog: 300ms
        command: [sh, -c, 'systemd-notify --ready; for i in $(seq 12); do systemd-notify WATCHDOG=1; sleep 0.1; done; echo survived; exec sleep 1000']
        """,
    )
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
print("stored", flush=True)
time.sleep(0.2)
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


def test_health_check_runs_inside_the_sandbox_and_restarts_an_unhealthy_service(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: {exec: [test, -f, /tmp/ready], interval: 200ms, timeout: 2s, retries: 2}
        restart_delay: 50ms
        command: [sh, -c, "sleep 0.3; touch /tmp/ready; echo touched; sleep 1; rm /tmp/ready; echo removed; exec sleep 1000"]
        """,
    )
    stack = run_stack(spec_dir)
    # /tmp/ready exists only in the sandbox's private /tmp: the check ran inside it.
    stack.wait_for("svc: running -> ready: health check passed", "err")
    assert not Path("/tmp/ready").exists()
    stack.wait_for("unhealthy: health check failed 2 times in a row", "err")
    stack.wait_for("restart #1", "err")
    assert "svc: health check failed (exited with code 1), 1 of 2" in stack.err
    assert "-> backoff: unhealthy: health check failed 2 times in a row; killed by SIGTERM" in stack.err
    assert stack.stop() == 0


def test_a_health_check_that_outlives_its_timeout_is_killed(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: {exec: [sleep, "30"], interval: 10s, timeout: 200ms}
        command: [sleep, "1000"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    import time

    procs = Path("/sys/fs/cgroup/unified/sandboxd/stack/svc/cgroup.procs")
    deadline = time.monotonic() + 5
    seen_check = False
    while time.monotonic() < deadline:
        count = len(procs.read_text().split())
        seen_check = seen_check or count > 2  # the check ran: its helper and `sleep 30` joined the cgroup
        if seen_check and count == 2:
            break
        time.sleep(0.02)
    assert seen_check and len(procs.read_text().split()) == 2  # killed after 200 ms, not after 30 s
    assert "-> ready" not in stack.err
    assert stack.stop() == 0
