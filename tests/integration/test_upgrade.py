"""Upgrade in place (`sandboxd upgrade`): the supervisor executes sandboxd anew in its own process,
and every sandbox, socket, restart count and state is carried over; a record the new code cannot
read is refused and the old supervisor goes on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from conftest import cgroup_dir, wait_until, write

SERVER = r'''
import os, socket
s = socket.socket(fileno=3)
print("serving", flush=True)
while True:
    c, _ = s.accept()
    c.sendall((os.environ["REPLY"] + "\n").encode())
    c.close()
'''

INSTANCE = r'''
import socket
socket.socket(fileno=3).sendall(b"conn\n")
'''

STORE = r'''
import os, time
from systemd import daemon
if "kept" in os.environ.get("LISTEN_FDNAMES", "").split(":"):
    print("resumed with " + os.environ["LISTEN_FDNAMES"], flush=True)
    time.sleep(1000)
fd = os.open("/tmp/kept", os.O_RDWR | os.O_CREAT)
daemon.notify("FDSTORE=1\nFDNAME=kept", fds=[fd])
barrier_r, barrier_w = os.pipe()
daemon.notify("BARRIER=1", fds=[barrier_w])
os.close(barrier_w)
assert os.read(barrier_r, 1) == b""
print("stored", flush=True)
time.sleep(1000)
'''

SERVICES = """
kind: service
name: api
environment: {REPLY: api}
command: [python3, /t/server.py]
mounts: [{source: ., target: /t}]
---
kind: socket
name: api
service: api
listen: tcp:127.0.0.1:0
---
kind: service
name: lazy
start: on-demand
environment: {REPLY: lazy}
command: [python3, /t/server.py]
mounts: [{source: ., target: /t}]
---
kind: socket
name: lazy
service: lazy
listen: tcp:127.0.0.1:0
---
kind: service
name: conn
command: [python3, /t/instance.py]
mounts: [{source: ., target: /t}]
---
kind: socket
name: conn
service: conn
listen: tcp:127.0.0.1:0
accept: true
---
kind: service
name: beat
ready: notify
notify_access: all
watchdog: 2s
command: [sh, -c, 'systemd-notify --ready; while true; do systemd-notify WATCHDOG=1; sleep 0.1; done']
---
kind: service
name: store
fdstore_max: 2
command: [python3, /t/store.py]
mounts: [{source: ., target: /t}]
"""


def sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _status(stack: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(sbd("ps", "--json", "-p", stack).stdout)
    return status


def _what_ps_says(stack: str) -> dict[str, tuple[object, ...]]:
    """Each service's state, pid, restarts, readiness, status text and sockets (not its uptime,
    memory or CPU, which move on)."""
    return {s["name"]: (s["state"], s["pid"], s["restarts"], s["ready"], s["status_text"], json.dumps(s["sockets"])) for s in _status(stack)["services"]}


def _port(status: dict[str, Any], name: str) -> int:
    service = next(s for s in status["services"] if s["name"] == name)
    return int(service["sockets"][0]["address"].rsplit(":", 1)[1])


def _ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        return c.makefile().readline().strip()


class Load:
    """One client thread per port, each making connections one after another, counting replies
    and keeping every error (a refusal, a reset, a wrong reply)."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.replies = {name: 0 for name in ports}
        self.errors: list[str] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(name, port)) for name, port in ports.items()]
        for thread in self.threads:
            thread.start()

    def _client(self, name: str, port: int) -> None:
        while not self.done.is_set():
            try:
                reply = _ask(port)
            except OSError as e:
                self.errors.append(f"{name}: {e!r}")
                continue
            if reply != name:
                self.errors.append(f"{name}: replied {reply!r}")
            else:
                self.replies[name] += 1

    def at_least(self, more: int) -> None:
        """Wait until every client has had `more` replies more than it has now."""
        goal = {name: count + more for name, count in self.replies.items()}
        wait_until(lambda: all(self.replies[n] >= goal[n] for n in goal) or self.errors, f"{more} more replies on every socket")

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join()


def _log_has(stack: str, name: str, line: str) -> bool:
    return line in sbd("logs", "-p", stack, name).stdout.splitlines()


def test_upgrade_keeps_every_sandbox_socket_and_count_and_refuses_an_unknown_record(spec_dir: Path) -> None:
    write(spec_dir, "server.py", SERVER)
    write(spec_dir, "instance.py", INSTANCE)
    write(spec_dir, "store.py", STORE)
    write(spec_dir, "stack.yaml", SERVICES)
    try:
        sbd("up", "-d", "--wait", "-p", "upg", str(spec_dir))
        status = _status("upg")
        supervisor = status["pid"]
        ports = {name: _port(status, name) for name in ("api", "lazy", "conn")}
        assert _ask(ports["lazy"]) == "lazy"  # activated: its sandbox runs from now on
        wait_until(lambda: _log_has("upg", "store", "store | stored"), "store to put a descriptor in its fd store")
        os.kill(next(s for s in status["services"] if s["name"] == "api")["pid"], signal.SIGKILL)
        wait_until(lambda: next(s for s in _status("upg")["services"] if s["name"] == "api")["restarts"] == 1, "api to be restarted once")
        wait_until(lambda: all(s["state"] in ("ready", "running", "waiting") for s in _status("upg")["services"]), "every service to settle")
        before = _what_ps_says("upg")
        assert before["lazy"][0] == "running" and before["conn"][0] == "waiting" and before["beat"][0] == "ready"

        load = Load(ports)
        try:
            load.at_least(3)
            refused = sbd("upgrade", "-p", "upg", "--test-record-format", "99", check=False)
            assert refused.returncode != 0
            assert "state record format 99: this sandboxd reads format 1 only" in refused.stderr
            load.at_least(3)
            assert _status("upg")["pid"] == supervisor and _what_ps_says("upg") == before  # the old one goes on

            for _ in range(2):  # and the upgraded one upgrades again
                done = sbd("upgrade", "upg")
                assert f"pid {supervisor} (unchanged)" in done.stdout
                load.at_least(5)
        finally:
            load.stop()
        assert load.errors == []
        assert all(count >= 16 for count in load.replies.values()), load.replies

        assert _status("upg")["pid"] == supervisor
        assert "sandboxd.daemon.reexec" in Path(f"/proc/{supervisor}/cmdline").read_text()
        assert _what_ps_says("upg") == before  # the same sandboxes, states, restarts and sockets
        assert sbd("logs", "-p", "upg", "sandboxd").stdout.count("upgraded in place from sandboxd") == 2

        # The fd store came over: the next sandbox of `store` gets the stored descriptor back.
        os.kill(before["store"][1], signal.SIGKILL)  # type: ignore[arg-type]
        wait_until(lambda: _log_has("upg", "store", "store | resumed with kept"), "store to be restarted with its stored descriptor")
        assert _ask(ports["api"]) == "api"
    finally:
        sbd("down", "-p", "upg")
    assert not Path("/run/sandboxd/upg").exists()


def test_a_foreground_stack_is_upgraded_and_still_stops_on_ctrl_c(run_stack, spec_dir: Path) -> None:
    write(spec_dir, "server.py", SERVER)
    write(
        spec_dir,
        "api.yaml",
        """
        kind: service
        environment: {REPLY: api}
        command: [python3, /t/server.py]
        mounts: [{source: ., target: /t}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:0
        """,
    )
    stack = run_stack(spec_dir, "-p", "fg")
    stack.wait_for("serving", "out")
    before = _what_ps_says("fg")
    port = _port(_status("fg"), "api")
    # A `sandboxd exec` running: its command ends with its control connection, which an exec
    # of the supervisor would cut; the upgrade is refused, and goes through once it has ended.
    cli = subprocess.Popen([sys.executable, "-m", "sandboxd", "exec", "-T", "-p", "fg", "api", "--", "sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: (cgroup_dir("api", "sbd-exec-1", stack="fg") / "cgroup.procs").exists(), "the exec's cgroup")
        refused = sbd("upgrade", "-p", "fg", check=False)
        assert refused.returncode != 0 and "a `sandboxd exec` is running (api: sbd-exec-1)" in refused.stderr
    finally:
        cli.send_signal(signal.SIGINT)
        cli.wait()
    wait_until(lambda: not cgroup_dir("api", "sbd-exec-1", stack="fg").exists(), "the exec's cgroup to be removed")
    assert "pid" in sbd("upgrade", "-p", "fg").stdout
    stack.wait_for("upgraded in place from sandboxd", "err")  # said on the same terminal
    assert _what_ps_says("fg") == before and _ask(port) == "api"
    assert stack.stop() == 0  # SIGINT, handled by the new code


OWN_BIND = r'''
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7000))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"cache\n")
    c.close()
'''


def _proxies(stack: str, service: str) -> list[int]:
    """The pids of the proxies running in the service's cgroup (systemd-socket-proxyd)."""
    pids = (cgroup_dir(service, stack=stack) / "cgroup.procs").read_text().split()
    return [int(pid) for pid in pids if _comm(pid) == "systemd-socket-"]


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_forwarding_proxy_forwards_on_across_an_upgrade_and_is_restarted_after_it(spec_dir: Path) -> None:
    write(spec_dir, "own.py", OWN_BIND)
    write(
        spec_dir,
        "cache.yaml",
        """
        kind: service
        command: [python3, /t/own.py]
        mounts: [{source: ., target: /t}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:0
        proxy: tcp:127.0.0.1:7000
        handoff: false
        """,
    )
    try:
        sbd("up", "-d", "--wait", "-p", "upgp", str(spec_dir))
        port = _port(_status("upgp"), "cache")
        assert _ask(port) == "cache"
        wait_until(lambda: len(_proxies("upgp", "cache")) == 1, "the proxy to run")
        [proxy] = _proxies("upgp", "cache")
        load = Load({"cache": port})
        try:
            load.at_least(3)
            assert "(unchanged)" in sbd("upgrade", "upgp").stdout
            load.at_least(5)
        finally:
            load.stop()
        assert load.errors == []
        assert _proxies("upgp", "cache") == [proxy]  # the same proxy forwarded throughout
        assert sbd("logs", "-p", "upgp", "sandboxd").stdout.count("upgraded in place from sandboxd") == 1

        # The new supervisor awaits the end of the proxy the old one started: killed, it is started again.
        os.kill(proxy, signal.SIGKILL)
        wait_until(lambda: _proxies("upgp", "cache") not in ([], [proxy]), "a new proxy")
        assert _ask(port) == "cache"
        assert sbd("logs", "-p", "upgp", "sandboxd").stdout.count("the proxy of socket cache ended") == 1
    finally:
        sbd("down", "-p", "upgp")
    assert not Path("/run/sandboxd/upgp").exists()
