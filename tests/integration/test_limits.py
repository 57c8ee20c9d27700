"""Limits through the v1 controllers of this hybrid host, and what is reported when they bite."""

from __future__ import annotations

import socket
from pathlib import Path

from conftest import wait_until, write

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
    limit = next(Path("/sys/fs/cgroup/memory").glob("**/sandboxd/stack/hog/memory.limit_in_bytes"))
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
    procs = Path("/sys/fs/cgroup/unified/sandboxd/stack/bomb/cgroup.procs")
    events = next(Path("/sys/fs/cgroup/pids").glob("**/sandboxd/stack/bomb/pids.events"))
    wait_until(lambda: "max 0" not in events.read_text(), "the fork bomb to hit its pids limit")  # the limit was hit
    assert len(procs.read_text().split()) <= 64
    assert _ask(socket_dir / "bystander.sock") == "alive"
    assert stack.stop() == 0
    assert "bomb: stopping -> stopped: pids limit reached" in stack.err


def test_cpu_limit_and_weight_are_written_to_the_cpu_controller(run_stack, spec_dir: Path):
    write(spec_dir, "busy.yaml", "kind: service\nlimits: {cpu: 0.25, cpu_weight: 50}\ncommand: sleep 1000\n")
    stack = run_stack(spec_dir)
    stack.wait_up()
    cgroup = next(Path("/sys/fs/cgroup/cpu").glob("**/sandboxd/stack/busy"))
    assert (cgroup / "cpu.cfs_quota_us").read_text().strip() == "25000"
    assert (cgroup / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (cgroup / "cpu.shares").read_text().strip() == "512"
    pid = Path("/sys/fs/cgroup/unified/sandboxd/stack/busy/cgroup.procs").read_text().split()[0]
    assert pid in (cgroup / "cgroup.procs").read_text().split()
    assert stack.stop() == 0
