"""Under load: 2,000 connections while the service is stopped and restarted 20 times, none lost."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from conftest import cgroup_dir, wait_until, write

GRACEFUL = r'''
import os, select, signal, socket, sys
listener = socket.socket(fileno=3)
listener.setblocking(False)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGTERM, lambda *_: None)
served = 0
while True:
    ready, _, _ = select.select([listener, wake_r], [], [])
    if wake_r in ready:
        sys.exit(0)  # between connections: whatever waits in the queue is the next instance's
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        continue
    conn.setblocking(True)
    served += 1
    conn.sendall(b"ok %d %d\n" % (os.getpid(), served))
    conn.close()
'''


def _init_pid(cgroup: Path) -> int:
    """The host pid of the sandbox's init: the process that is pid 1 in its own namespace."""
    for pid in cgroup.joinpath("cgroup.procs").read_text().split():
        try:
            nspid = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid.split()[-1] == "1":
            return int(pid)
    return 0


def test_two_thousand_connections_while_the_service_restarts_twenty_times(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "server.py", GRACEFUL)
    write(
        spec_dir,
        "srv.yaml",
        f"""
        kind: service
        restart: always
        restart_delay: 0
        start_limit: {{burst: 100, interval: 10s}}
        command: [python3, /t/server.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/srv.sock
        backlog: 1024
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    path = str(socket_dir / "srv.sock")
    replies: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    kills_done = threading.Event()

    def client(minimum: int) -> None:
        # Counted, not timed: each client makes at least `minimum` connections and goes on until
        # the killer is done (all its kills made, and the instance after the last one has
        # answered), so on any machine the kills fall among the connections.
        made = 0
        while made < minimum or not kills_done.is_set():
            made += 1
            try:
                with socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(20)
                    c.connect(path)
                    line = c.makefile().readline()
                with lock:
                    (replies if line.startswith("ok ") else errors).append(line)
            except OSError as e:
                with lock:
                    errors.append(repr(e))
            if made > 20 * minimum:
                break  # bounded: the killer is stuck; the assertions below say so

    def killer() -> None:
        cgroup = cgroup_dir("srv")
        kills = 0
        try:
            while True:
                with lock:
                    progress = len(replies) + len(errors)
                    served_by = sum(1 for line in replies if line.split()[2] == "1")  # instances that answered
                    if progress > 20 * 2000:
                        break
                if kills == 20:
                    if served_by > kills:
                        break  # the instance started after the last kill has answered too
                # Kill again only once the instance started after the last kill has answered
                # someone, and every 90 connections: the restarts are spread over the load.
                elif progress >= (kills + 1) * 90 and served_by > kills:
                    pid = _init_pid(cgroup)
                    if pid:
                        os.kill(pid, signal.SIGTERM)  # the init forwards it to the service
                        kills += 1
                time.sleep(0.002)
        finally:
            killed.append(kills)
            kills_done.set()

    killed: list[int] = []
    threads = [threading.Thread(target=client, args=(250,)) for _ in range(8)] + [threading.Thread(target=killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(replies) >= 2000
    assert killed == [20]
    # Each instance counts from 1: at least 21 instances served (the first and one per restart).
    assert sum(1 for line in replies if line.split()[2] == "1") >= 21
    # The last instance's end may reach sandboxd's log a moment after the clients are done.
    restarted = "srv: running -> backoff: exited with code 0; restarting"
    wait_until(lambda: stack.err.count(restarted) >= 20, "twenty restarts in sandboxd's log")
    assert stack.err.count(restarted) >= 20
    assert stack.stop() == 0
