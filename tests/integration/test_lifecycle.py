"""Sockets, parallel start, restarts and stop, against real sandboxes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from conftest import HANG, Stack, cgroup_dir, stored_ids, wait_until, write

ACTIVATION_PROBE = r'''
import json, os, socket
open_fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
fds, keep = [], []
for i in range(int(os.environ["LISTEN_FDS"])):
    s = socket.socket(fileno=3 + i)
    keep.append(s)
    fds.append({"fd": 3 + i, "family": s.family.name, "type": s.type.name, "name": str(s.getsockname())})
print("ACTIVATION " + json.dumps({
    "getpid": os.getpid(),
    "LISTEN_PID": os.environ.get("LISTEN_PID"),
    "LISTEN_FDS": os.environ.get("LISTEN_FDS"),
    "LISTEN_FDNAMES": os.environ.get("LISTEN_FDNAMES"),
    "fds": fds,
    "open": open_fds,
}), flush=True)
import time; time.sleep(600)
'''


def test_socket_activation_protocol_as_libsystemd_checks_it(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "probe.py", ACTIVATION_PROBE)
    write(
        spec_dir,
        "svc.yaml",
        f"""
        kind: service
        command: [python3, /t/probe.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        name: svc
        listen: [tcp:127.0.0.1:0, "udp:[::1]:0"]
        ---
        kind: socket
        name: admin
        service: svc
        fdname: control
        listen: unix:{socket_dir}/admin.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("ACTIVATION ", "out")
    seen = json.loads(next(l for l in stack.lines("svc") if l.startswith("ACTIVATION "))[len("ACTIVATION "):])
    assert stack.stop() == 0
    # sd_listen_fds(3): LISTEN_PID must equal getpid() as the service sees it.
    assert seen["LISTEN_PID"] == str(seen["getpid"])
    assert seen["LISTEN_FDS"] == "3"
    # Documented order: socket units by name (admin < svc), then listen entries as written.
    assert seen["LISTEN_FDNAMES"] == "control:svc:svc"
    assert [(f["fd"], f["family"], f["type"]) for f in seen["fds"]] == [
        (3, "AF_UNIX", "SOCK_STREAM"),
        (4, "AF_INET", "SOCK_STREAM"),
        (5, "AF_INET6", "SOCK_DGRAM"),
    ]
    assert seen["fds"][0]["name"] == f"{socket_dir}/admin.sock"
    # Nothing else leaks into the service: 0-2, the three sockets, and the one listdir opened.
    assert seen["open"] == [0, 1, 2, 3, 4, 5, 6]


CRASHY = r'''
import os, socket, sys
sock = socket.socket(fileno=3)
for served in range(3):
    conn, _ = sock.accept()
    conn.sendall(b"served by %d\n" % os.getpid())
    conn.close()
sys.exit(1)  # crash after every third connection
'''


def test_socket_survives_service_crash_and_every_connection_is_answered(run_stack, spec_dir: Path):
    write(spec_dir, "crashy.py", CRASHY)
    write(
        spec_dir,
        "crashy.yaml",
        """
        kind: service
        command: [python3, /t/crashy.py]
        restart: on-failure
        restart_delay: 50ms
        mounts: [{source: ., target: /t}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:0
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    port = int(stack.wait_for("tcp:127.0.0.1:", "err").split("tcp:127.0.0.1:")[1].split()[0])
    answers = []
    for _ in range(9):  # three crashes; connections made while the service is down wait in the queue
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            answers.append(c.makefile().readline())
    assert all(a.startswith("served by") for a in answers), answers
    stack.wait_for("restart #2", "err")
    assert stack.stop() == 0
    assert "crashy: running -> backoff: exited with code 1" in stack.err


# Each service says it started, then becomes ready only once all six have started: each one leaves
# a mark in a shared folder and waits for six marks (a barrier). If sandboxd held back any launch
# until another service made progress, the barrier would never open; no sleep is assumed to be
# long enough for the others to start.
BARRIER_LOGGER = r'''
import os, socket, sys, time
print("start", time.monotonic(), flush=True)
open(os.path.join("/marks", socket.gethostname()), "w").close()
deadline = time.monotonic() + 60
while len(os.listdir("/marks")) < 6:
    if time.monotonic() > deadline:
        sys.exit("the six services never ran at the same time")
    time.sleep(0.01)
sock = socket.socket(fileno=3)
print("ready", time.monotonic(), flush=True)
while True:
    conn, _ = sock.accept()
    conn.sendall(b"ok\n")
    conn.close()
'''

# Becomes ready (calls accept) only once a client waits in its queue: the client is sure to have
# connected before the service was ready, however fast or slow the machine.
QUEUE_LOGGER = r'''
import select, socket, time
sock = socket.socket(fileno=3)
print("start", time.monotonic(), flush=True)
select.select([sock], [], [])
print("ready", time.monotonic(), flush=True)
while True:
    conn, _ = sock.accept()
    conn.sendall(b"ok\n")
    conn.close()
'''


def test_all_services_launched_before_any_became_ready(run_stack, spec_dir: Path, socket_dir: Path, tmp_path: Path):
    write(spec_dir, "svc.py", BARRIER_LOGGER)
    marks = tmp_path / "marks"
    marks.mkdir()
    os.chown(marks, *stored_ids())  # root inside may write where its stored ids may
    for i in range(6):
        write(
            spec_dir,
            f"s{i}.yaml",
            f"""
            kind: service
            command: [python3, /t/svc.py]
            mounts: [{{source: ., target: /t}}, {{source: {marks}, target: /marks, readonly: false}}]
            ---
            kind: socket
            listen: unix:{socket_dir}/s{i}.sock
            """,
        )
    stack = run_stack(spec_dir)
    for i in range(6):
        stack.wait_for(f"s{i} | ready", "out")
    starts = [float(l.split()[1]) for i in range(6) for l in stack.lines(f"s{i}") if l.startswith("start")]
    readies = [float(l.split()[1]) for i in range(6) for l in stack.lines(f"s{i}") if l.startswith("ready")]
    assert len(starts) == 6 and len(readies) == 6
    # Structural, not a timing threshold: every service had started before the first was ready.
    assert max(starts) < min(readies)
    assert sorted(p.name for p in marks.iterdir()) == [f"s{i}" for i in range(6)]
    assert stack.stop() == 0


def test_client_connecting_before_service_is_ready_waits_and_is_answered(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "svc.py", QUEUE_LOGGER)
    write(
        spec_dir,
        "slow.yaml",
        f"""
        kind: service
        command: [python3, /t/svc.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/slow.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(HANG)
    connecting_at = time.monotonic()  # before connect(): the service may wake the moment it returns
    c.connect(str(socket_dir / "slow.sock"))  # before the service called accept
    assert c.makefile().readline() == "ok\n"
    c.close()
    ready_at = float(next(l for l in stack.wait_lines("slow", 2) if l.startswith("ready")).split()[1])
    assert connecting_at < ready_at
    assert stack.stop() == 0


def test_program_with_default_signal_handling_stops_on_sigterm(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "sleeper.yaml",
        """
        kind: service
        command: sleep 1000
        stop_timeout: 60
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert stack.stop() == 0
    assert "sleeper: stopping -> stopped: killed by SIGTERM" in stack.err
    assert "did not stop within" not in stack.err


def test_service_that_forks_many_processes_is_killed_as_one(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "forker.yaml",
        """
        kind: service
        command: [sh, -c, "trap '' TERM; for i in $(seq 20); do sleep 1000 & done; echo forked; wait"]
        stop_timeout: 300ms
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("forker | forked", "out")
    procs = cgroup_dir("forker") / "cgroup.procs"
    pids = procs.read_text().split()
    assert len(pids) == 22  # init, sh and twenty sleeps, all in the service's cgroup
    assert stack.stop() == 0
    assert "forker: did not stop within 0.3 s; killing its cgroup" in stack.err
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_restarts_give_up_after_five_failures_while_others_keep_running(run_stack, spec_dir: Path):
    # The interval is far longer than five starts can take on any machine, so exactly the fifth
    # start is the last (the default of 10 s is checked in tests/unit/test_spec.py).
    write(spec_dir, "bad.yaml", "kind: service\ncommand: [sh, -c, 'exit 3']\nrestart_delay: 10ms\nstart_limit: {burst: 5, interval: 1h}\n")
    write(spec_dir, "good.yaml", "kind: service\ncommand: [sh, -c, 'echo alive; exec sleep 1000']\n")
    stack = run_stack(spec_dir)
    stack.wait_for("gave up after 5 starts within 3600 s", "err")
    assert stack.proc.poll() is None  # good still runs, so the stack stays up
    assert "good: running ->" not in stack.err
    assert stack.wait_lines("good", 1) == ["alive"]  # printed by now, or a moment later
    assert stack.stop() == 0
    assert stack.err.count("bad: backoff -> starting: restart #") == 4  # the first start and four restarts
    assert "-> failed: exited with code 3; gave up after 5 starts within 3600 s (start_limit; the others keep running)" in stack.err


def test_stack_exits_when_every_service_is_done(run_stack, spec_dir: Path):
    write(spec_dir, "once.yaml", "kind: service\ncommand: [echo, done once]\nrestart: 'no'\n")
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    assert "once | done once" in stack.out


def test_sandboxd_killed_takes_its_services_with_it_and_next_run_cleans_up(run_stack, spec_dir: Path, tmp_path: Path):
    write(spec_dir, "sleeper.yaml", "kind: service\ncommand: sleep 1000\n")
    stack = run_stack(spec_dir)
    stack.wait_up()
    pids = (cgroup_dir("sleeper") / "cgroup.procs").read_text().split()
    assert pids
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait()
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), "the services to end with sandboxd (a service outlived it)")
    assert Path("/run/sandboxd/stack/state.json").exists()  # what the dead run left, recorded
    other = tmp_path / "other"
    other.mkdir()
    write(other, "once.yaml", "kind: service\ncommand: 'true'\nrestart: 'no'\n")
    assert Stack(other).wait_exit() == 0  # a later run removes what the dead one left


def test_invalid_spec_exits_2_and_creates_nothing(spec_dir: Path):
    import subprocess
    import sys

    write(spec_dir, "bad.yaml", "kind: service\ncomand: [true]\n")
    result = subprocess.run([sys.executable, "-m", "sandboxd", "up", str(spec_dir)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "bad.yaml:2: comand: unknown key 'comand'; did you mean 'command'?" in result.stderr
    assert not Path("/run/sandboxd").exists()


def test_unix_socket_is_visible_to_its_client_through_uses(run_stack, spec_dir: Path, socket_dir: Path):
    write(
        spec_dir,
        "server.yaml",
        f"""
        kind: service
        command: [python3, -c, "import socket; s = socket.socket(fileno=3)\\nwhile True:\\n c, _ = s.accept(); c.sendall(b'pong'); c.close()"]
        ---
        kind: socket
        listen: unix:{socket_dir}/server.sock
        """,
    )
    write(
        spec_dir,
        "client.yaml",
        f"""
        kind: service
        uses: [server]
        restart: 'no'
        command: [python3, -c, "import socket; c = socket.socket(socket.AF_UNIX); c.connect('{socket_dir}/server.sock'); print('got', c.recv(10).decode())"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("client | got pong", "out")
    assert stack.stop() == 0


def _held_until_up(spec_dir: Path, units: str) -> Path:
    """The stack's units with a folder `/hold` bound in (read-only); UNTIL_GO in a command waits there
    until the test says go. The test says it once the start-up summary is out, so that every start is
    logged (until the summary, starts are quiet: the summary says them) and the log's order is the
    order of the transitions, whatever the machine's speed."""
    hold = spec_dir.parent / "hold"
    hold.mkdir()
    hold.chmod(0o755)
    write(spec_dir, "stack.yaml", units.replace("MOUNT", f"mounts: [{{source: {hold}, target: /hold}}]"))
    return hold / "go"


UNTIL_GO = "until test -e /hold/go; do sleep 0.01; done"


def test_after_waits_for_a_migration_to_complete_and_for_readiness(run_stack, spec_dir: Path):
    go = _held_until_up(
        spec_dir,
        f"""
        kind: service
        name: migrate
        restart: "no"
        MOUNT
        command: [sh, -c, "{UNTIL_GO}; echo migrated"]
        ---
        kind: service
        name: db
        ready: notify
        notify_access: all
        MOUNT
        command: [sh, -c, "{UNTIL_GO}; systemd-notify --ready; exec sleep 1000"]
        ---
        kind: service
        name: app
        after: [{{service: migrate, condition: completed}}, {{service: db, condition: ready}}]
        command: [sh, -c, "echo app starts; exec sleep 1000"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert "app: stopped -> starting" not in stack.err, "app started before migrate completed and db was ready"
    go.touch()
    assert stack.wait_lines("app", 1) == ["app starts"], stack.err
    err = stack.err
    assert "app: waits for migrate (completed), db (ready)" in err
    assert err.index("migrate: running -> exited") < err.index("app: stopped -> starting"), err
    assert err.index("db: running -> ready") < err.index("app: stopped -> starting"), err
    assert stack.stop() == 0


def test_a_chain_of_after_starts_link_by_link_whatever_the_order_of_the_units(run_stack, spec_dir: Path):
    """web after app (started), app after migrate (completed), listed web first: web waits for
    app while app itself waits (it used to fail at once, "app will never be started")."""
    go = _held_until_up(
        spec_dir,
        f"""
        kind: service
        name: web
        after: [{{service: app, condition: started}}]
        command: [sh, -c, "echo web starts; exec sleep 1000"]
        ---
        kind: service
        name: app
        after: [{{service: migrate, condition: completed}}]
        command: [sh, -c, "echo app starts; exec sleep 1000"]
        ---
        kind: service
        name: migrate
        restart: "no"
        MOUNT
        command: [sh, -c, "{UNTIL_GO}; echo migrated"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert "will never be" not in stack.err
    assert "app: stopped -> starting" not in stack.err and "web: stopped -> starting" not in stack.err, stack.err
    go.touch()
    assert stack.wait_lines("web", 1) == ["web starts"], stack.err
    err = stack.err
    assert "will never be" not in err
    assert err.index("migrate: running -> exited") < err.index("app: stopped -> starting") < err.index("web: stopped -> starting"), err
    assert stack.stop() == 0


def test_dependent_of_a_failed_service_fails_with_the_reason(run_stack, spec_dir: Path):
    write(
        spec_dir,
        "stack.yaml",
        """
        kind: service
        name: migrate
        restart: "no"
        command: [sh, -c, "exit 4"]
        ---
        kind: service
        name: app
        after: [{service: migrate, condition: completed}]
        command: [sleep, "1000"]
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 1
    assert "app: stopped -> failed: migrate will never be completed (it is failed)" in stack.err
