"""Limits through the v1 controllers of this hybrid host, and what is reported when they bite."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cgroup_dir, wait_until, write

DEFAULT_PIDS = 2048  # the default process limit of every service (README; sandboxd.spec.model.DEFAULT_PIDS)

ANSWER = r'''
import socket
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(b"alive\n")
    c.close()
'''


def _ask(path: Path) -> str:
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(str(path))
    answer = c.makefile().readline().strip()
    c.close()
    return answer


def _bystander(spec_dir: Path, socket_dir: Path) -> None:
    write(spec_dir, "answer.py", ANSWER)
    write(
        spec_dir,
        "bystander.yaml",
        f"""
        kind: service
        command: [python3, /t/answer.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/bystander.sock
        """,
    )


def test_memory_hog_is_oom_killed_reported_and_restarted_while_others_answer(run_stack, spec_dir: Path, socket_dir: Path):
    _bystander(spec_dir, socket_dir)
    write(
        spec_dir,
        "hog.yaml",
        """
        kind: service
        limits: {memory: 64M, swap: 0}
        restart_delay: 200ms
        command: [python3, -c, "blocks = []\\nwhile True: blocks.append(bytearray(8 << 20))"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("hog: running -> backoff: oom-killed; killed by SIGKILL", "err")
    stack.wait_for("hog: backoff -> starting: restart #1", "err")
    assert _ask(socket_dir / "bystander.sock") == "alive"
    limit = cgroup_dir("hog", controller="memory") / "memory.limit_in_bytes"
    assert int(limit.read_text()) == 64 << 20
    assert stack.stop() == 0


def test_fork_bomb_is_held_at_the_pids_limit_while_others_answer(run_stack, spec_dir: Path, socket_dir: Path):
    _bystander(spec_dir, socket_dir)
    write(
        spec_dir,
        "bomb.yaml",
        """
        kind: service
        limits: {pids: 64}
        stop_timeout: 500ms
        command: [sh, -c, "bomb() { bomb | bomb & }; bomb; sleep 1000"]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    procs = cgroup_dir("bomb") / "cgroup.procs"
    events = cgroup_dir("bomb", controller="pids") / "pids.events"
    wait_until(lambda: "max 0" not in events.read_text(), "the fork bomb to hit its pids limit")  # the limit was hit
    assert len(procs.read_text().split()) <= 64
    assert _ask(socket_dir / "bystander.sock") == "alive"
    assert stack.stop() == 0
    assert "bomb: stopping -> stopped: pids limit reached" in stack.err


def test_cpu_limit_and_weight_are_written_to_the_cpu_controller(run_stack, spec_dir: Path):
    write(spec_dir, "busy.yaml", "kind: service\nlimits: {cpu: 0.25, cpu_weight: 50}\ncommand: sleep 1000\n")
    stack = run_stack(spec_dir)
    stack.wait_up()
    cgroup = cgroup_dir("busy", controller="cpu")
    assert (cgroup / "cpu.cfs_quota_us").read_text().strip() == "25000"
    assert (cgroup / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (cgroup / "cpu.shares").read_text().strip() == "512"
    pid = (cgroup_dir("busy") / "cgroup.procs").read_text().split()[0]
    assert pid in (cgroup / "cgroup.procs").read_text().split()
    assert stack.stop() == 0


# ── nothing unbounded by default: tmpfs caps, memory accounting, the default process limit ──

FILL = r'''
import errno, os, sys
CHUNK = 64 << 10
block = b"x" * CHUNK
for path in sys.argv[1:]:
    written, error, bound = 0, "none", (1 << 30)  # bounded: without a cap it stops at 1 GiB
    fd = os.open(path + "/fill", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while written < bound:
            written += os.write(fd, block)
    except OSError as e:
        error = errno.errorcode[e.errno]
    os.close(fd)
    os.unlink(path + "/fill")  # the next one gets the memory back
    print(f"{path} {written} {error}", flush=True)
print("filled", flush=True)
'''


def _filled(stack, paths: list[str]) -> dict[str, tuple[int, str]]:
    stack.wait_for("filled", "out", timeout=60)
    found = {}
    for line in stack.lines("fill"):
        path, written, error = (line.split() + ["", "", ""])[:3]
        if path in paths:
            found[path] = (int(written), error)
    return found


def test_tmp_run_and_dev_shm_stop_at_64m_with_enospc(run_stack, spec_dir: Path):
    write(spec_dir, "fill.py", FILL)
    write(spec_dir, "fill.yaml", "kind: service\nrestart: no\ncommand: [python3, /t/fill.py, /tmp, /run, /dev/shm]\nmounts: [{source: ., target: /t}]\n")
    stack = run_stack(spec_dir)
    cap = 64 << 20
    assert _filled(stack, ["/tmp", "/run", "/dev/shm"]) == {"/tmp": (cap, "ENOSPC"), "/run": (cap, "ENOSPC"), "/dev/shm": (cap, "ENOSPC")}
    assert stack.stop() == 0


@pytest.mark.parametrize("userns", [False, True])
def test_sizes_from_the_spec_are_honoured_per_mount(run_stack, spec_dir: Path, userns: bool):
    write(spec_dir, "fill.py", FILL)
    write(
        spec_dir,
        "fill.yaml",
        f"""
        kind: service
        restart: no
        userns: {str(userns).lower()}
        tmpfs_size: 3M
        shm_size: 2M
        tmpfs: [/scratch, {{path: /cache, size: 5M}}, {{path: /tmp, size: 6M}}]
        command: [python3, /t/fill.py, /tmp, /run, /dev/shm, /scratch, /cache]
        mounts: [{{source: ., target: /t}}]
        """,
    )
    stack = run_stack(spec_dir)
    found = _filled(stack, ["/tmp", "/run", "/dev/shm", "/scratch", "/cache"])
    sizes = {"/tmp": 6, "/run": 3, "/dev/shm": 2, "/scratch": 3, "/cache": 5}
    assert found == {path: (mib << 20, "ENOSPC") for path, mib in sizes.items()}
    assert stack.stop() == 0


def _ps_memory(service: str) -> int:
    """What `sandboxd ps --json` says the service uses."""
    out = subprocess.run([sys.executable, "-m", "sandboxd", "ps", "--json", "-p", "stack"], capture_output=True, text=True, check=True).stdout
    return next(int(s["memory"]) for s in json.loads(out)["services"] if s["name"] == service)


SHM_ON_REQUEST = r'''
import os, socket, sys
size = int(sys.argv[1])
s = socket.socket(fileno=3)
block = b"x" * (1 << 20)
while True:
    c, _ = s.accept()
    fd = os.open(f"/dev/shm/{c.fileno()}-{os.getpid()}", os.O_WRONLY | os.O_CREAT)
    written = 0
    try:
        while written < size:
            written += os.write(fd, block)
        answer = f"wrote {written}"
    except OSError as e:
        answer = f"wrote {written}, then {e.strerror}"
    c.sendall(answer.encode() + b"\n")
    c.recv(1)  # the client closes when it has looked
    c.close()
'''


def test_what_a_service_writes_to_dev_shm_is_in_its_memory(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "shm.py", SHM_ON_REQUEST)
    write(
        spec_dir,
        "shm.yaml",
        f"""
        kind: service
        command: [python3, /t/shm.py, "{32 << 20}"]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/shm.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    before = _ps_memory("shm")
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(30)
    c.connect(str(socket_dir / "shm.sock"))
    assert c.makefile().readline().strip() == f"wrote {32 << 20}"
    after = _ps_memory("shm")
    c.close()
    # The 32 MiB are pages of the sandbox's /dev/shm, in no process's RSS: only a memory cgroup of
    # the service's own counts them (a margin for the kernel's per-CPU batching of charges).
    assert after - before >= 30 << 20, (before, after)
    assert stack.stop() == 0


SHM_PER_CONNECTION = r'''
import os, socket
c = socket.socket(fileno=3)  # the connection (accept: true)
size = int(c.makefile().readline())
block = b"x" * (1 << 20)
fd = os.open("/dev/shm/fill", os.O_WRONLY | os.O_CREAT)
written = 0
try:
    while written < size:
        written += os.write(fd, block)
    answer = f"wrote {written}"
except OSError as e:
    answer = f"wrote {written}, then {e.strerror}"
c.sendall(answer.encode() + b"\n")
c.recv(1)  # the client closes when it has looked
'''


def _ask_to_write(path: Path, size: int) -> tuple[socket.socket, str]:
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(30)
    c.connect(str(path))
    c.sendall(f"{size}\n".encode())
    return c, c.makefile().readline().strip()


def test_per_connection_instances_are_accounted_and_held_by_their_services_memory_limit(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "shm.py", SHM_PER_CONNECTION)
    write(
        spec_dir,
        "shm.yaml",
        f"""
        kind: service
        limits: {{memory: 48M, swap: 0}}
        command: [python3, /t/shm.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/shm.sock
        accept: true
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    c, answer = _ask_to_write(socket_dir / "shm.sock", 16 << 20)
    assert answer == f"wrote {16 << 20}"
    usage = cgroup_dir("shm", "shm@1", controller="memory") / "memory.usage_in_bytes"
    assert int(usage.read_text()) >= 15 << 20  # the instance's own memory cgroup holds its /dev/shm pages
    c.close()
    # Twice the service's limit (and below the 64M cap of /dev/shm): its memory cgroup, which
    # holds every instance of it, stops the writer.
    c, answer = _ask_to_write(socket_dir / "shm.sock", 96 << 20)
    c.close()
    assert answer != f"wrote {96 << 20}"
    peak = cgroup_dir("shm", controller="memory") / "memory.max_usage_in_bytes"
    assert 40 << 20 <= int(peak.read_text()) <= 48 << 20
    assert stack.stop() == 0


# Forks until fork fails, each child stopping at once; bounded, so that without a limit it ends
# too (and says so). Reports how many forks it made, and why it stopped.
BOMB = r'''
import errno, os, signal, socket, sys
count, why = 0, "no limit"
if "stubborn" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped only by the kill of its cgroup
while count < int(sys.argv[1]):
    try:
        pid = os.fork()
    except OSError as e:
        why = errno.errorcode[e.errno]
        break
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    count += 1
report = f"forked {count}: {why}"
if os.environ.get("LISTEN_FDNAMES") == "connection":
    socket.socket(fileno=3).sendall(report.encode() + b"\n")
else:
    print(report, flush=True)
    signal.pause()
'''


@pytest.mark.parametrize("start", ["eager", "on-demand"])
def test_fork_bomb_in_a_default_sandbox_is_held_at_the_default_process_limit(run_stack, spec_dir: Path, socket_dir: Path, start: str):
    write(spec_dir, "bomb.py", BOMB)
    write(
        spec_dir,
        "bomb.yaml",
        f"""
        kind: service
        start: {start}
        stop_timeout: 500ms
        command: [python3, /t/bomb.py, "{DEFAULT_PIDS + 100}"]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/bomb.sock
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    if start == "on-demand":
        socket.socket(socket.AF_UNIX).connect(str(socket_dir / "bomb.sock"))  # starts it
    stack.wait_for("forked", "out", timeout=120)
    # The sandbox's init and the bomb itself are two of the service's tasks.
    assert stack.lines("bomb") == [f"forked {DEFAULT_PIDS - 2}: EAGAIN"]
    assert stack.stop() == 0
    assert "bomb: stopping -> stopped: pids limit reached" in stack.err


def test_the_default_process_limit_holds_per_connection_instances_together(run_stack, spec_dir: Path, socket_dir: Path):
    write(spec_dir, "bomb.py", BOMB)
    write(
        spec_dir,
        "bomb.yaml",
        f"""
        kind: service
        command: [python3, /t/bomb.py, "{DEFAULT_PIDS + 100}"]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/bomb.sock
        accept: true
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_up()
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(120)
    c.connect(str(socket_dir / "bomb.sock"))
    assert c.makefile().readline().strip() == f"forked {DEFAULT_PIDS - 2}: EAGAIN"
    limit = cgroup_dir("bomb", controller="pids") / "pids.max"
    assert limit.read_text().strip() == str(DEFAULT_PIDS)
    c.close()
    assert stack.stop() == 0


def test_limits_pids_replaces_the_default(run_stack, spec_dir: Path):
    write(spec_dir, "bomb.py", BOMB)
    write(spec_dir, "bomb.yaml", "kind: service\nlimits: {pids: 40}\nstop_timeout: 500ms\ncommand: [python3, /t/bomb.py, '100']\nmounts: [{source: ., target: /t}]\n")
    stack = run_stack(spec_dir)
    stack.wait_for("forked", "out", timeout=60)
    assert stack.lines("bomb") == ["forked 38: EAGAIN"]
    assert stack.stop() == 0


def test_the_process_limit_holds_again_after_the_cgroup_was_killed_and_the_service_restarted(run_stack, spec_dir: Path):
    write(spec_dir, "bomb.py", BOMB)
    write(spec_dir, "bomb.yaml", "kind: service\nlimits: {pids: 40}\nstop_timeout: 200ms\ncommand: [python3, /t/bomb.py, '100', stubborn]\nmounts: [{source: ., target: /t}]\n")
    stack = run_stack(spec_dir)
    stack.wait_for("forked", "out", timeout=60)
    subprocess.run([sys.executable, "-m", "sandboxd", "restart", "-p", "stack", "bomb"], check=True, capture_output=True)
    assert "bomb: did not stop within 0.2 s; killing its cgroup" in stack.err
    assert stack.wait_lines("bomb", 2, timeout=60) == ["forked 38: EAGAIN", "forked 38: EAGAIN"], stack.err
    assert stack.stop() == 0
