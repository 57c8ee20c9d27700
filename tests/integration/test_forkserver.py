"""The fork server goes on serving requests while its launches are under way (forkserver.py:
a launch waits for its spawner's reply in the selector, not in a blocking read): many launches
sent at once each end in their own service, and a sandbox that exits at once, maybe before its
spawner's reply was read, is reported once, to its own service, with its own exit code. The one
resident spawner (sbd-setup serve) hands each sandbox only its own descriptors, and once killed
with a launch in its queue, that launch fails with the reason and the next one gets a new one.

No wait here is timed: each ends on its event (a state in `ps`); the bound of every wait (HANG)
only ends a hang."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import HANG, wait_until, write


def sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=HANG * 2)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def services(stack: str) -> dict[str, dict[str, Any]]:
    return {svc["name"]: svc for svc in json.loads(sbd("ps", "--json", "-p", stack).stdout)["services"]}


@contextlib.contextmanager
def detached(spec_dir: Path, stack: str, up_fails: bool = False) -> Iterator[None]:
    """`up -d` of the folder (which fails when a service failed before it was ready, if
    `up_fails`); `down` afterwards, whatever happened."""
    try:
        up = sbd("up", "-d", "-p", stack, str(spec_dir), check=not up_fails)
        assert up.returncode == (1 if up_fails else 0), up.stdout + up.stderr
        yield
    finally:
        assert sbd("down", "-p", stack, check=False).returncode == 0


def settled(stack: str, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`ps` once every service named is in its wanted state."""

    def now() -> dict[str, dict[str, Any]] | None:
        seen = services(stack)
        return seen if all(seen[name]["state"] == state for name, state in wanted.items()) else None

    return wait_until(now, f"the states {wanted}")


QUITTERS = 12
STAYERS = 12


def test_many_launches_at_once_each_end_reaches_its_own_service(spec_dir: Path) -> None:
    """Two dozen launches sent together: those that exit at once, each with an exit code of its
    own, and with and without a user namespace; every exit goes to its own service, once."""
    for k in range(QUITTERS):
        userns = "true" if k % 2 else "false"
        write(spec_dir, f"quits{k}.yaml", f"kind: service\nrestart: 'no'\nuserns: {userns}\ncommand: [sh, -c, 'exit {k}']\n")
    for k in range(STAYERS):
        userns = "true" if k % 2 else "false"
        write(spec_dir, f"stays{k}.yaml", f"kind: service\nuserns: {userns}\ncommand: [sleep, '3600']\n")
    wanted = {f"quits{k}": "failed" if k else "exited" for k in range(QUITTERS)} | {f"stays{k}": "running" for k in range(STAYERS)}
    with detached(spec_dir, "pipelined", up_fails=True):
        now = settled("pipelined", wanted)
        for k in range(1, QUITTERS):
            assert now[f"quits{k}"]["exit_code"] == k, now[f"quits{k}"]
            assert now[f"quits{k}"]["restarts"] == 0
        pids = [now[f"stays{k}"]["pid"] for k in range(STAYERS)]
        assert len(set(pids)) == STAYERS and all(pid > 0 for pid in pids)
        log = sbd("logs", "-p", "pipelined", "sandboxd").stdout
        for k in range(1, QUITTERS):
            said = [line for line in log.splitlines() if f"quits{k}: " in line and f"exited with code {k}" in line]
            assert len(said) == 1, log


# ── the resident spawner (sbd-setup serve) ──

FDS = r"""
import os, sys
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass  # the listing's own descriptor, closed by now
print("FDS", sys.argv[1], sorted(fds), " ".join(fds[fd] for fd in sorted(fds) if fd > 2), flush=True)
import time; time.sleep(600)
"""


def fork_server_of(stack: str) -> int:
    supervisor = int(json.loads((Path("/run/sandboxd") / stack / "state.json").read_text())["pid"])
    [fork_server] = [int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    return fork_server


def spawner_of(stack: str) -> int:
    """The resident spawner's pid: the fork server's child that runs `sbd-setup serve`."""
    fork_server = fork_server_of(stack)

    def found() -> int:
        for pid in Path(f"/proc/{fork_server}/task/{fork_server}/children").read_text().split():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sbd-setup", b"serve"]:
                    return int(pid)
            except OSError:
                pass
        return 0

    return wait_until(found, "the resident spawner")


def test_each_sandbox_holds_only_the_descriptors_its_plan_hands_it(spec_dir: Path) -> None:
    """Sandboxes cloned one after the other by the one spawner, with more or fewer sockets and
    binds, with and without a user namespace: each holds 0, 1, 2 and its own sockets, nothing
    another launch handed the spawner, nor the spawner's own descriptors; its init none."""
    (spec_dir / "fds.py").write_text(FDS)
    for k in range(8):
        sockets = "".join(f"---\nkind: socket\nname: s{k}x{j}\nservice: many{k}\nlisten: tcp:127.0.0.1:0\n" for j in range(k % 4))
        binds = ", ".join(["{source: ., target: /t}"] + [f"{{source: ., target: /extra{j}}}" for j in range(k % 3)])
        write(spec_dir, f"many{k}.yaml", f"kind: service\nname: many{k}\nuserns: {'true' if k % 2 else 'false'}\nmounts: [{binds}]\ncommand: [python3, /t/fds.py, many{k}]\n{sockets}")
    with detached(spec_dir, "handed"):
        now = settled("handed", {f"many{k}": "running" for k in range(8)})
        for k in range(8):
            line = wait_until(lambda: next((line for line in sbd("logs", "-p", "handed", f"many{k}").stdout.splitlines() if "FDS " in line), None), f"many{k}'s descriptors")
            words = line[line.index("FDS ") :].split(" ", 2)
            numbers = [int(n) for n in words[2].split("]")[0].strip("[").split(",") if n.strip()]
            links = words[2].split("]", 1)[1].split()
            assert numbers == list(range(3 + k % 4)), line
            assert all(link.startswith("socket:") for link in links), line
            init = now[f"many{k}"]["pid"]
            assert os.listdir(f"/proc/{init}/fd") == [], f"the init of many{k}"  # sbd-setup holds nothing once the command runs
        spawner = spawner_of("handed")
        held = sorted(int(fd) for fd in os.listdir(f"/proc/{spawner}/fd"))
        assert len(held) == 5, [os.readlink(f"/proc/{spawner}/fd/{fd}") for fd in held]  # 0, 1, 2, its socket, its network namespace
        assert os.readlink(f"/proc/{spawner}/ns/net") == os.readlink(f"/proc/{fork_server_of('handed')}/ns/net")
        assert os.readlink(f"/proc/{spawner}/cwd") == os.readlink(f"/proc/{fork_server_of('handed')}/cwd")


def test_a_descriptor_ups_caller_left_open_reaches_no_process_of_the_stack(spec_dir: Path) -> None:
    """`up -d` run with the write end of a pipe open (a script that waits for the pipe's end):
    once it returned, no process of the stack holds it, so the pipe ends when the caller closes
    its own end (the supervisor and its fork server used to keep every descriptor `up` had, and
    the spawner the fork server executes the inheritable ones)."""
    (spec_dir / "fds.py").write_text(FDS)
    write(spec_dir, "one.yaml", "kind: service\nname: one\ncommand: [python3, /t/fds.py, one]\nmounts: [{source: ., target: /t}]\n")
    r, w = os.pipe()
    try:
        pipe = os.readlink(f"/proc/self/fd/{w}")
        up = subprocess.run([sys.executable, "-m", "sandboxd", "up", "-d", "-p", "callers", str(spec_dir)], capture_output=True, text=True, timeout=HANG * 2, pass_fds=[w])
        assert up.returncode == 0, up.stdout + up.stderr
        try:
            init = settled("callers", {"one": "running"})["one"]["pid"]
            line = wait_until(lambda: next((line for line in sbd("logs", "-p", "callers", "one").stdout.splitlines() if "FDS " in line), None), "one's descriptors")
            assert pipe not in line
            supervisor = int(json.loads((Path("/run/sandboxd") / "callers" / "state.json").read_text())["pid"])
            for who, pid in (("supervisor", supervisor), ("fork server", fork_server_of("callers")), ("spawner", spawner_of("callers")), ("init", init)):
                assert pipe not in _links(pid), who
            os.close(w)
            w = -1
            os.set_blocking(r, False)
            assert os.read(r, 1) == b""  # the pipe's end: no writer is left (BlockingIOError if one were)
        finally:
            assert sbd("down", "-p", "callers", check=False).returncode == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_the_fork_server_and_spawner_have_a_session_and_scheduling_group_of_their_own_and_each_sandbox_leaves_it(spec_dir: Path) -> None:
    """The fork server leaves `up`'s session (and terminal) for one of its own, whose autogroup
    (where the kernel has them) weighs as AUTOGROUP_NICE: its spawner is in it, each sandbox's
    init and command are not (a session each, nice 0), so a service cannot take its weight."""
    from sandboxd.sandbox.forkserver import AUTOGROUP_NICE

    write(spec_dir, "one.yaml", "kind: service\nname: one\ncommand: [sleep, '1000']\n")
    with detached(spec_dir, "group"):
        init = settled("group", {"one": "running"})["one"]["pid"]
        supervisor = int(json.loads((Path("/run/sandboxd") / "group" / "state.json").read_text())["pid"])
        fork_server, spawner = fork_server_of("group"), spawner_of("group")
        [command] = [int(p) for p in Path(f"/proc/{init}/task/{init}/children").read_text().split()]
        assert os.getsid(fork_server) == fork_server != os.getsid(supervisor)
        assert os.getsid(spawner) == fork_server
        assert os.getsid(init) == init and os.getsid(command) == command
        autogroup = Path(f"/proc/{fork_server}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-2:] == ["nice", str(AUTOGROUP_NICE)]
            assert Path(f"/proc/{spawner}/autogroup").read_text() == autogroup.read_text()
            for pid in (init, command):
                assert Path(f"/proc/{pid}/autogroup").read_text().split()[-2:] == ["nice", "0"]


def _links(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def queued(pid: int) -> bool:
    """Whether a message waits in the receive queue of a unix socket of process `pid` (ss -x)."""
    out = subprocess.run(["ss", "-xp"], capture_output=True, text=True, check=True).stdout
    return any(f"pid={pid}," in line and int(line.split()[2]) > 0 for line in out.splitlines()[1:] if len(line.split()) > 2 and line.split()[2].isdigit())


def test_a_spawner_killed_with_a_launch_in_its_queue_fails_that_launch_and_the_next_gets_a_new_one(spec_dir: Path) -> None:
    write(spec_dir, "svc.yaml", "kind: service\nrestart: 'no'\ncommand: [sleep, '3600']\n")
    write(spec_dir, "other.yaml", "kind: service\nrestart: 'no'\ncommand: [sleep, '3600']\n")
    with detached(spec_dir, "respawn"):
        settled("respawn", {"svc": "running", "other": "running"})
        spawner = spawner_of("respawn")
        os.kill(spawner, signal.SIGSTOP)
        restart = subprocess.Popen([sys.executable, "-m", "sandboxd", "restart", "-p", "respawn", "svc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: queued(spawner), "the launch in the stopped spawner's queue")
            os.kill(spawner, signal.SIGKILL)
            restart.communicate(timeout=HANG)
        finally:
            if restart.poll() is None:
                restart.kill()
                restart.wait()
        now = settled("respawn", {"svc": "failed", "other": "running"})
        assert "the set-up interpreter ended before it cloned the sandbox" in now["svc"]["reason"], now["svc"]
        sbd("start", "-p", "respawn", "svc")
        settled("respawn", {"svc": "running", "other": "running"})
        assert spawner_of("respawn") != spawner


# ── a stack's launches, batched ──

RECORD_MESSAGES = """
import json, os, socket, sys
send_fds = socket.send_fds
def recorded(sock, buffers, fds, *args):
    data = b"".join(buffers)
    with open(os.environ["SBD_TEST_MESSAGES"], "a") as f:
        f.write(json.dumps({"head": data.split(b"\\n", 1)[0][:2000].decode(errors="replace"), "fds": len(fds)}) + "\\n")
    return send_fds(sock, buffers, fds, *args)
socket.send_fds = recorded
from sandboxd.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

BATCHED = 10


def test_a_stacks_launches_go_to_the_fork_server_in_one_batch_and_one_that_fails_fails_alone(spec_dir: Path, tmp_path: Path) -> None:
    """`up` of eleven services sends their launches as one batch (the supervisor's messages to
    the fork server are recorded by a wrapper of socket.send_fds in its process); the one whose
    script's interpreter is missing fails on its own, with its own reason, and the ten others run."""
    for k in range(BATCHED):
        write(spec_dir, f"b{k}.yaml", f"kind: service\nuserns: {'true' if k % 2 else 'false'}\ncommand: [sleep, '3600']\n")
    (spec_dir / "bad.sh").write_text("#!/no/such/interpreter\n")
    (spec_dir / "bad.sh").chmod(0o755)
    write(spec_dir, "bad.yaml", "kind: service\nrestart: 'no'\nmounts: [{source: ., target: /t}]\ncommand: [/t/bad.sh]\n")
    record = tmp_path / "messages.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORD_MESSAGES, "up", "-p", "batched", str(spec_dir)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "up.log").open("w"),
        env={**os.environ, "SBD_TEST_MESSAGES": str(record), "NO_COLOR": "1"},
    )
    try:
        wait_until(lambda: Path("/run/sandboxd/batched/state.json").exists() or proc.poll() is not None, "the stack's state")
        now = settled("batched", {f"b{k}": "running" for k in range(BATCHED)} | {"bad": "failed"})
        assert "execute /t/bad.sh: No such file or directory" in now["bad"]["reason"], now["bad"]
        assert len({now[f"b{k}"]["pid"] for k in range(BATCHED)}) == BATCHED
        messages = [json.loads(line) for line in record.read_text().splitlines()]
        launches = [m for m in messages if m["head"].startswith('{"type":"launch"')]
        batches = [json.loads(m["head"]) for m in messages if m["head"].startswith('{"type":"batch"')]
        assert launches == [] and len(batches) == 1, messages
        assert len(batches[0]["arg"]["sizes"]) == BATCHED + 1, batches
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG)


def _user_namespaces(pid: int) -> set[str]:
    return {link for link in _links(pid) if link.startswith("user:[")}


def test_the_storage_user_namespace_is_made_before_the_first_launch_and_only_when_a_bind_needs_it(spec_dir: Path, tmp_path: Path) -> None:
    """`up` has the fork server make the user namespace that binds are idmapped through as soon
    as the specs are planned (PrepareStorage), not on the first launch's way: with only an
    on-demand service, nothing launched yet, the fork server holds it already, and the launch
    the first connection brings uses that one rather than making another. A stack whose
    services bind nothing gets none."""
    write(
        spec_dir,
        "lazy.yaml",
        f"""
        kind: service
        start: on-demand
        command: [python3, -c, "import socket; c, _ = socket.socket(fileno=3).accept(); c.send(open('/t/lazy.yaml').read()[:4].encode())"]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{tmp_path}/lazy.sock
        """,
    )
    with detached(spec_dir, "sbdstorage"):
        assert services("sbdstorage")["lazy"]["state"] == "waiting"
        fork_server = fork_server_of("sbdstorage")
        made = wait_until(lambda: _user_namespaces(fork_server), "the storage user namespace in the fork server")
        assert len(made) == 1
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "lazy.sock"))
            client.settimeout(HANG)
            assert client.recv(16) == b"kind"  # the bind is there, read through the idmap
        assert _user_namespaces(fork_server) == made
    bare = tmp_path / "bare"
    bare.mkdir()
    write(bare, "idle.yaml", "kind: service\ncommand: [sleep, '600']\n")
    with detached(bare, "sbdnostorage"):
        settled("sbdnostorage", {"idle": "running"})
        assert _user_namespaces(fork_server_of("sbdnostorage")) == set()
