"""The control plane: detached stacks and every verb against a running one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import HANG, wait_until, write

SERVER = r'''
import os, socket, sys
s = socket.socket(fileno=3)
print("serving", os.environ.get("GREETING", "hello"), flush=True)
while True:
    c, _ = s.accept()
    c.sendall((os.environ.get("GREETING", "hello") + "\n").encode())
    c.close()
'''


def sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _stack(folder: Path) -> None:
    write(folder, "server.py", SERVER)
    write(
        folder,
        "api.yaml",
        """
        kind: service
        command: [python3, /t/server.py]
        mounts: [{source: ., target: /t}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:0
        """,
    )
    write(folder, "worker.yaml", "kind: service\ncommand: sleep 1000\n")


def _ask(address: str) -> str:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as c:
        return c.makefile().readline().strip()


def _service(stack: str, name: str, verb: str = "ps") -> dict[str, Any]:
    found: dict[str, Any] = json.loads(sbd(verb, "--json", "-p", stack, name).stdout)["services"][0]
    return found


def _settled(stack: str, name: str) -> dict[str, Any]:
    """The service's status once it is no longer starting."""

    def settled() -> dict[str, Any] | None:
        status = _service(stack, name)
        return status if status["state"] != "starting" else None

    return wait_until(settled, f"{name} to leave 'starting'")


def _logs_with(stack: str, name: str, line: str, count: int) -> list[str] | None:
    logs = sbd("logs", "-p", stack, name).stdout.splitlines()
    return logs if logs.count(line) >= count else None


def test_every_verb_against_a_detached_stack(spec_dir: Path) -> None:
    _stack(spec_dir)
    up = sbd("up", "-d", "-p", "ctl", str(spec_dir))
    assert "api" in up.stdout and "worker" in up.stdout
    try:
        status = json.loads(sbd("ps", "--json", "-p", "ctl").stdout)
        assert status["stack"] == "ctl"
        services = {s["name"]: s for s in status["services"]}
        assert services["api"]["state"] == "running" and services["api"]["pid"] > 0
        address = services["api"]["sockets"][0]["address"]
        assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")
        assert _ask(address) == "hello"
        assert {"uptime", "restarts", "ready", "status_text", "memory", "cpu_seconds"} <= set(services["api"])

        sbd("stop", "-p", "ctl", "worker")
        assert _service("ctl", "worker", "status")["state"] == "stopped"
        # start and restart answer once the launch is under way, not once it is done: wait for
        # the service to leave "starting" (see the report of issue 11's speed audit).
        sbd("start", "-p", "ctl", "worker")
        assert _settled("ctl", "worker")["state"] == "running"

        old_pid = services["api"]["pid"]
        sbd("restart", "-p", "ctl", "api")
        after = _settled("ctl", "api")
        assert after["state"] == "running" and after["pid"] > 0 and after["pid"] != old_pid
        assert _ask(address) == "hello"  # the same socket, a new sandbox

        sbd("kill", "-s", "SIGKILL", "-p", "ctl", "api")
        wait_until(lambda: _service("ctl", "api")["restarts"] >= 1, "api to be restarted after SIGKILL")
        assert _ask(address) == "hello"

        # Three sandboxes printed the line; sandboxd reads their output on its own time.
        logs = wait_until(lambda: _logs_with("ctl", "api", "api | serving hello", 3), "three 'serving hello' lines in api's log")
        assert logs.count("api | serving hello") >= 3  # kept across restarts
        assert sbd("logs", "-p", "ctl", "--tail", "1", "api").stdout.strip() == "api | serving hello"
        assert "api" in sbd("stats", "--once", "-p", "ctl").stdout
        assert [s["name"] for s in json.loads(sbd("ls", "--json").stdout)] == ["ctl"]
    finally:
        sbd("down", "-p", "ctl")
    assert not Path("/run/sandboxd/ctl").exists()


def test_two_stacks_from_one_folder_under_different_names(spec_dir: Path) -> None:
    _stack(spec_dir)
    sbd("up", "-d", "-p", "one", "-e", "api:GREETING=one", str(spec_dir))
    sbd("up", "-d", "-p", "two", "-e", "api:GREETING=two", str(spec_dir))
    try:
        for name in ("one", "two"):
            status = json.loads(sbd("ps", "--json", "-p", name, "api").stdout)
            assert _ask(status["services"][0]["sockets"][0]["address"]) == name
        assert sorted(s["name"] for s in json.loads(sbd("ls", "--json").stdout)) == ["one", "two"]
        again = sbd("up", "-d", "-p", "one", "-e", "api:GREETING=one", str(spec_dir))  # a reload: nothing to do
        assert again.stdout.strip() == "stack 'one' reloaded: nothing changed"
    finally:
        sbd("down", "-p", "one")
        sbd("down", "-p", "two")


def test_sigkill_of_a_detached_stack_then_down_leaves_nothing(spec_dir: Path) -> None:
    _stack(spec_dir)
    sbd("up", "-d", "-p", "doomed", str(spec_dir))
    status = json.loads(sbd("ps", "--json", "-p", "doomed").stdout)
    service_pids = [s["pid"] for s in status["services"]]
    os.kill(status["pid"], signal.SIGKILL)
    # no service outlives sandboxd
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in [status["pid"], *service_pids]), "sandboxd and its services to end")
    result = sbd("down", "-p", "doomed")
    assert "removed what it left behind" in result.stdout


def test_invalid_spec_is_reported_by_up_d_at_once(spec_dir: Path) -> None:
    write(spec_dir, "bad.yaml", "kind: service\ncommand: [sleep, 1]\nrestart: sometimes\n")
    result = sbd("up", "-d", str(spec_dir), check=False)
    assert result.returncode == 2 and "restart: expected one of" in result.stderr


# On SIGHUP it says RELOADING=1 and stays reloading until the test opens a gate (a file in its
# spec folder): the test sees `sandboxd reload` wait for READY=1 for as long as it takes.
RELOADER = r'''
import os, signal, socket, time
from systemd import daemon
generation = 0
def on_hup(*_):
    global generation
    daemon.notify("RELOADING=1")
    generation += 1
    while not os.path.exists("/t/reload-%d" % generation):
        time.sleep(0.01)
    daemon.notify("READY=1\nSTATUS=generation %d" % generation)
signal.signal(signal.SIGHUP, on_hup)
daemon.notify("READY=1\nSTATUS=generation 0")
while True:
    time.sleep(1)
'''


def test_exec_runs_inside_the_sandbox_and_reload_waits_for_ready(spec_dir: Path) -> None:
    write(spec_dir, "reloader.py", RELOADER)
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        ready: notify
        hostname: inside
        command: [python3, /t/reloader.py]
        mounts: [{source: ., target: /t}]
        """,
    )
    sbd("up", "-d", "--wait", "-p", "execs", str(spec_dir))
    try:
        inside = sbd("exec", "-p", "execs", "svc", "--", "sh", "-c", "hostname; ls /proc | grep -c '^[0-9]'; touch /etc/x 2>&1 || true")
        lines = inside.stdout.splitlines()
        assert lines[0] == "inside"
        assert int(lines[1]) <= 6  # its init, the service, and the command's own few: not the host's
        assert "Read-only file system" in lines[2]
        failed = sbd("exec", "-p", "execs", "svc", "--", "sh", "-c", "exit 7", check=False)
        assert failed.returncode == 7
        reload = subprocess.Popen([sys.executable, "-m", "sandboxd", "reload", "-p", "execs", "svc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: _service("execs", "svc")["state"] == "reloading", "svc to say RELOADING=1")
            assert reload.poll() is None  # still waiting: the service has not said READY=1 yet
            (spec_dir / "reload-1").touch()
            _, err = reload.communicate(timeout=HANG)
        finally:
            if reload.poll() is None:
                reload.kill()
                reload.wait()
        assert reload.returncode == 0, err
        status = _service("execs", "svc")
        assert status["state"] == "ready" and status["status_text"] == "generation 1"
    finally:
        sbd("down", "-p", "execs")


def test_reload_applies_only_the_difference_and_refuses_no_connection(spec_dir: Path) -> None:
    import threading

    _stack(spec_dir)
    write(spec_dir, "api.yaml", (spec_dir / "api.yaml").read_text().replace("command:", "environment: {GREETING: old}\ncommand:"))
    sbd("up", "-d", "--wait", "-p", "live", str(spec_dir))
    try:
        before = {s["name"]: s for s in json.loads(sbd("ps", "--json", "-p", "live").stdout)["services"]}
        address = before["api"]["sockets"][0]["address"]
        # Counted, not timed: the client asks until it has seen the new answer (or a bound on
        # the number of questions is reached, which the assertions then report), and the reload
        # starts only once it has been answered, whatever the machine's speed.
        first: list[str] = []
        last: list[str] = [""]
        asked = [0]
        errors: list[str] = []
        answered = threading.Event()

        def client() -> None:
            while last[0] != "new" and asked[0] < 1_000_000:
                asked[0] += 1
                try:
                    answer = _ask(address)
                except OSError as e:
                    errors.append(repr(e))
                    continue
                if not first:
                    first.append(answer)
                    answered.set()
                last[0] = answer

        thread = threading.Thread(target=client)
        thread.start()
        assert answered.wait(30)
        write(spec_dir, "api.yaml", (spec_dir / "api.yaml").read_text().replace("GREETING: old", "GREETING: new"))
        (spec_dir / "worker.yaml").unlink()
        write(spec_dir, "extra.yaml", "kind: service\ncommand: sleep 1000\n")
        result = sbd("up", "-d", "-p", "live", str(spec_dir))  # against a running stack: a reload
        assert "added: extra" in result.stdout and "removed: worker" in result.stdout and "changed: api" in result.stdout
        thread.join()
        assert errors == []  # no connection refused or reset during the reload
        assert first == ["old"] and last == ["new"]
        after = {s["name"]: s for s in json.loads(sbd("ps", "--json", "-p", "live").stdout)["services"]}
        assert sorted(after) == ["api", "extra"]
        assert after["api"]["sockets"][0]["address"] == address  # the same socket, kept
    finally:
        sbd("down", "-p", "live")


def test_reload_command_runs_inside_the_sandbox(spec_dir: Path) -> None:
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        reload: [sh, -c, "echo reloaded > /tmp/generation"]
        command: [sleep, "1000"]
        """,
    )
    sbd("up", "-d", "-p", "reloads", str(spec_dir))
    try:
        sbd("reload", "-p", "reloads", "svc")
        inside = sbd("exec", "-p", "reloads", "svc", "--", "cat", "/tmp/generation")
        assert inside.stdout.strip() == "reloaded"  # the sandbox's own /tmp: the command ran inside
        assert not Path("/tmp/generation").exists()
    finally:
        sbd("down", "-p", "reloads")


def test_a_second_up_with_the_same_name_leaves_the_running_stack_alone(spec_dir: Path) -> None:
    _stack(spec_dir)
    sbd("up", "-d", "-p", "dup", str(spec_dir))
    try:
        second = sbd("up", "--daemon", "-p", "dup", str(spec_dir), check=False)  # bypasses the reload path
        assert second.returncode == 1 and "a stack named 'dup' exists already" in second.stderr
        status = json.loads(sbd("ps", "--json", "-p", "dup").stdout)  # still reachable: nothing of it was removed
        assert {s["state"] for s in status["services"]} == {"running"}
    finally:
        sbd("down", "-p", "dup")


def test_exec_is_confined_like_the_service_in_a_user_namespace_with_limits(spec_dir: Path) -> None:
    write(spec_dir, "svc.yaml", "kind: service\nuserns: true\nlimits: {pids: 50}\ncommand: [sleep, '1000']\n")
    sbd("up", "-d", "-p", "confined", str(spec_dir))
    try:
        inside = sbd("exec", "-p", "confined", "svc", "--", "sh", "-c", "cat /proc/self/uid_map; cat /proc/self/cgroup; id -u")
        block = json.loads(Path("/run/sandboxd/confined/state.json").read_text())["userns"]["uid"]  # the stack's ids
        lines = inside.stdout.split()
        assert lines[:3] == ["0", str(block), "65536"]  # the service's user namespace, not the host's
        assert any(":pids:/" in l and l.endswith("/sandboxd/confined/svc") for l in inside.stdout.splitlines())
        assert lines[-1] == "0"
    finally:
        sbd("down", "-p", "confined")


def test_restarting_the_only_service_of_a_foreground_stack_does_not_end_the_stack(run_stack, spec_dir: Path):
    """Between the stop and the start of `sandboxd restart`, every service of a one-service stack
    is stopped, and a foreground stack ends once all its services are: it must not end then. The
    race lost now and then in CI; restarted 15 times, a stack that ended is seen at once."""
    write(spec_dir, "one.yaml", "kind: service\ncommand: [sh, -c, 'echo started; exec sleep 600']\n")
    stack = run_stack(spec_dir)
    stack.wait_lines("one", 1)
    for n in range(2, 17):
        sbd("restart", "-p", "stack", "one")
        assert stack.wait_lines("one", n) == ["started"] * n, stack.err
        assert stack.proc.poll() is None, stack.err
    assert "stopping all services" not in stack.err
    assert stack.stop() == 0
