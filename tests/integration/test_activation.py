"""Start on the first connection, scale to zero, and one sandbox per connection."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from conftest import write

SERVER = r'''
import os, socket, sys, time
s = socket.socket(fileno=3)
print("started", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello\n")
    c.close()
'''


def _connect_all(path: str, count: int) -> list[str]:
    answers: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(20)
        c.connect(path)
        line = c.makefile().readline().strip()
        c.close()
        with lock:
            answers.append(line)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_on_demand_service_starts_once_for_fifty_clients_that_connect_before_it_exists(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "server.py", SERVER)
    write(
        spec_dir,
        "lazy.yaml",
        f"""
        kind: service
        start: on-demand
        command: [python3, /t/server.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/lazy.sock
        backlog: 128
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert "lazy: waiting" in stack.err and "lazy | started" not in stack.out  # nothing runs yet
    answers = _connect_all(str(socket_dir / "lazy.sock"), 50)
    assert answers == ["hello"] * 50
    assert stack.err.count("lazy: activated by") == 1
    assert stack.wait_lines("lazy", 1) == ["started"]
    assert stack.stop() == 0


def test_idle_service_is_stopped_and_started_again_by_the_next_connection(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "server.py", SERVER)
    write(
        spec_dir,
        "lazy.yaml",
        f"""
        kind: service
        start: on-demand
        idle_stop: 400ms
        command: [python3, /t/server.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/lazy.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert _connect_all(str(socket_dir / "lazy.sock"), 1) == ["hello"]
    stack.wait_for("lazy: running -> stopping: idle for 0.4 s", "err")
    stack.wait_for("waiting for the next connection", "err")
    assert _connect_all(str(socket_dir / "lazy.sock"), 1) == ["hello"]
    assert stack.err.count("lazy: activated by") == 2
    assert stack.wait_lines("lazy", 2) == ["started", "started"]
    assert stack.stop() == 0


def test_service_failing_on_every_activation_hits_the_trigger_limit(run_stack, spec_dir: Path, socket_dir: Path):
    write(
        spec_dir,
        "broken.yaml",
        f"""
        kind: service
        start: on-demand
        restart: "no"
        start_limit: {{burst: 5, interval: 1h}}  # longer than five activations take on any machine
        command: [sh, -c, "exit 1"]
        ---
        kind: socket
        listen: unix:{socket_dir}/broken.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(socket_dir / "broken.sock"))  # stays in the queue: nobody ever accepts it
    stack.wait_for("no longer activated (trigger limit)", "err")
    assert stack.err.count("broken: activated by") == 5
    c.close()
    assert stack.wait_exit() == 1  # its only service failed for good


INSTANCE = r'''
import json, os, socket, time
c = socket.socket(fileno=3)
start = time.monotonic()
time.sleep(0.3)
c.sendall(json.dumps({
    "names": os.environ["LISTEN_FDNAMES"], "fds": os.environ["LISTEN_FDS"], "pid": os.environ["LISTEN_PID"] == str(os.getpid()),
    "remote": [os.environ.get("REMOTE_ADDR"), os.environ.get("REMOTE_PORT")], "start": start, "end": time.monotonic(),
    "cgroup": open("/proc/self/cgroup").read().strip().split("\n")[-1],
}).encode() + b"\n")
'''


def test_accept_mode_runs_one_bounded_sandbox_per_connection(run_stack, spec_dir: Path):
    write(spec_dir, "instance.py", INSTANCE)
    write(
        spec_dir,
        "echo.yaml",
        """
        kind: service
        command: [python3, /t/instance.py]
        mounts: [{source: ., target: /t}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:0
        accept: true
        max_connections: 2
        """,
    )
    stack = run_stack(spec_dir)
    port = int(stack.wait_for("tcp:127.0.0.1:", "err").split("tcp:127.0.0.1:")[1].split()[0])
    results: list[tuple[int, dict[str, object]]] = []
    lock = threading.Lock()

    def one() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            line = c.makefile().readline()
            with lock:
                results.append((c.getsockname()[1], json.loads(line)))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    for client_port, seen in results:
        assert seen["names"] == "connection" and seen["fds"] == "1" and seen["pid"] is True
        assert seen["remote"] == ["127.0.0.1", str(client_port)]
    assert len({seen["cgroup"] for _, seen in results}) == 6  # a cgroup of its own each
    # Never more than two at once: count overlapping [start, end] intervals.
    events = sorted([(float(s["start"]), 1) for _, s in results] + [(float(s["end"]), -1) for _, s in results])
    alive = peak = 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    assert peak <= 2
    assert stack.stop() == 0
