"""Benchmark part for the sandbox's set-up, run by scripts/bench.py (section 11 there; alone with
`scripts/bench --only setup`).

11. What the ways of running a sandbox's set-up cost per sandbox, in one run, interleaved round
    by round. A fork server is started to read its RSS (VmRSS); then a helper process (this file
    run with --measure) grows its Python heap to that size, freezes it as the fork server does
    (gc.freeze), and times, RUNS times each (after WARMUP), from before the fork to the child
    reaped:
      fork + _exit           os.fork() of that heap, the child exits at once: the floor of a fork
      fork + Python walk     the same, the child runs the launch's set-up program in Python
                             (reference.py, one Kernel call per op, against the recording fake:
                             the Python steps and the pages they touch, without the syscalls),
                             as the child did before sandboxd/sandbox/setup/sbd-setup existed
      fork + exec sbd-setup  the same fork, the child executes the sealed static interpreter by
                             descriptor with a program of one op that fails (it reads the program,
                             moves the channel, reports SetupFailed and exits 127)
      vfork + exec sbd-setup os.posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK)) of the same
      vfork + sbd-setup spawn what the fork server does: os.posix_spawn of `sbd-setup spawn`,
                             which clones the init from itself (CLONE_PARENT|CLONE_NEWPID|
                             CLONE_PIDFD; no cgroup, no user namespace here) and sends its pid and
                             pidfd back; the init runs the same one-op program; both reaped
    The syscalls of a real set-up (namespaces, mounts) cost the same whichever way runs them and
    are not in these figures; request to exec of whole launches is the `latency` section.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RUNS = 200
QUICK_RUNS = 50
WARMUP = 10
CASES = ("fork + _exit", "fork + Python walk", "fork + exec sbd-setup", "vfork + exec sbd-setup", "vfork + sbd-setup spawn")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _fork_server_rss_kib() -> int:
    from sandboxd.sandbox.handle import ForkServer

    server = ForkServer.start()
    try:
        time.sleep(0.2)
        return _rss_kib(server.pid)
    finally:
        server.stop()


def _grow_heap(kib: int) -> list[object]:
    """Python objects (small ones, as a heap of modules and dicts is) until this process's RSS is `kib`."""
    ballast: list[object] = []
    while _rss_kib(os.getpid()) < kib:
        ballast.append([{"k": str(n), "v": (n, n + 1)} for n in range(2000)])
    return ballast


def _walk_program() -> tuple[object, ...]:
    """The set-up program of a typical launch (the host's root in place, /proc, /sys, /dev, the
    tmpfs, one bind), as the fork server compiles it, and what the reference run needs."""
    from sandboxd.kernel.fake import RecordingKernel
    from sandboxd.plan.launch import LaunchPlan, MountOp
    from sandboxd.sandbox.program import Descriptors, HostView, Trees, compile_launch
    from sandboxd.sandbox.protocol import LaunchSandbox

    mounts = (
        MountOp("rbind-root", "/", "/", options="in-place"), MountOp("proc", "/proc"), MountOp("sysfs", "/sys"), MountOp("dev", "/dev"),
        MountOp("tmpfs", "/dev/shm", options="size=65536"), MountOp("tmpfs", "/tmp", options="size=65536"), MountOp("tmpfs", "/run", options="size=65536"),
        MountOp("mask", "/proc/kcore"), MountOp("readonly", "/proc/sys"), MountOp("bind", "/tmp/b", "/srv"),
    )  # fmt: skip
    plan = LaunchPlan("svc", ("/init", "--", "/bin/true"), (("PATH", "/bin"),), "svc", "/", 0x6C020000, mounts, (), seccomp_filter="06000000ff7f0000")
    request = LaunchSandbox(1, plan, "/sys/fs/cgroup/x", (), "/run/x", False, 1)
    ops = compile_launch(request, Descriptors(5, (6,), 80), Trees((60,), -1, -1, 90), HostView((True,)))

    def fake() -> RecordingKernel:
        return RecordingKernel(["/usr/", "/proc/sys/", "/proc/kcore", "/sys/", "/dev/", "/tmp/", "/run/", "/srv/"], {}, ["/proc", "/sys", "/dev", "/run"], {90: ["null"], 60: []})

    return ops, fake


def _measure(rss_kib: int, runs: int) -> dict[str, list[float]]:
    from sandboxd.kernel.fake import ProcessEnded
    from sandboxd.sandbox.child import SETUP_BINARY, SETUP_NAME
    from sandboxd.sandbox.detached import sealed_copy
    from sandboxd.sandbox.ops import Op, encode
    from sandboxd.sandbox.reference import run_program

    ops, fake = _walk_program()
    ballast = _grow_heap(rss_kib)
    gc.disable()
    gc.freeze()
    interpreter = sealed_copy(str(SETUP_BINARY))
    failing = encode([Op("bench", "fail", (1, "the bench's end", ""))], 3)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)

    def program() -> int:
        read_end, write_end = os.pipe()
        os.write(write_end, failing)
        os.close(write_end)
        return read_end

    def fork_exit() -> None:
        if os.fork() == 0:
            os._exit(0)

    def fork_walk() -> None:
        if os.fork() == 0:
            try:
                run_program(fake(), ops, theirs, {})  # type: ignore[arg-type, operator]
            except ProcessEnded:
                pass
            os._exit(0)

    def fork_exec() -> None:
        fd = program()
        if os.fork() == 0:
            os.execve(interpreter, [SETUP_NAME, str(fd), str(theirs.fileno()), "-1"], {})
        os.close(fd)

    def spawn_exec() -> None:
        fd = program()
        os.posix_spawn(f"/proc/self/fd/{interpreter}", [SETUP_NAME, str(fd), str(theirs.fileno()), "-1"], {})
        os.close(fd)

    def spawn_clone() -> None:
        fd = program()
        reply, reply_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reply_theirs.set_inheritable(True)
        numbers = (reply_theirs.fileno(), fd, theirs.fileno(), -1, 0, -1, 0, -1, -1, 0)
        os.posix_spawn(f"/proc/self/fd/{interpreter}", [SETUP_NAME, "spawn", *(str(n) for n in numbers), "-"], {})
        os.close(fd)
        reply_theirs.close()
        _msg, fds, _flags, _addr = socket.recv_fds(reply, 64, 1)
        reply.close()
        for pidfd in fds:
            os.close(pidfd)

    cases: dict[str, Callable[[], None]] = dict(zip(CASES, (fork_exit, fork_walk, fork_exec, spawn_exec, spawn_clone)))
    children = {name: 2 if name == "vfork + sbd-setup spawn" else 1 for name in CASES}  # the spawner and the init
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for round_ in range(WARMUP + runs):
        for name, case in cases.items():
            started = time.perf_counter_ns()
            case()
            for _ in range(children[name]):
                os.wait()
            took = (time.perf_counter_ns() - started) / 1e6
            ours.setblocking(False)
            try:
                while ours.recv(4096):
                    pass
            except BlockingIOError:
                pass
            if round_ >= WARMUP:
                times[name].append(took)
    del ballast
    return times


def setup_section(root: Path, quick: bool, problem: Callable[[str], None]) -> list[str]:
    runs = QUICK_RUNS if quick else RUNS
    try:
        rss = _fork_server_rss_kib()
        done = subprocess.run([sys.executable, __file__, "--measure", str(rss), str(runs)], capture_output=True, text=True, timeout=600, check=True)
        times = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        problem(f"set-up costs not measured: {e!r} {getattr(e, 'stderr', '')}")
        return ["set-up cost per sandbox: not measured (see problems)"]
    floor = statistics.median(times["fork + _exit"])
    lines = [
        f"set-up cost per sandbox (a process of the fork server's RSS, {rss / 1024:.1f} MiB, forked or spawned; to reaped; median of {runs}, interleaved)",
        "  way                         median     min–max ms      beyond fork + _exit",
    ]
    for name in CASES:
        values = times[name]
        lines.append(f"  {name:<26}{statistics.median(values):8.3f} ms  {min(values):.3f}–{max(values):.3f}   {statistics.median(values) - floor:+.3f} ms")
    walk, compiled = statistics.median(times["fork + Python walk"]), statistics.median(times["fork + exec sbd-setup"])
    lines.append(f"  fork + exec sbd-setup ÷ fork + Python walk: {compiled / walk:.2f}x (the syscalls of a real set-up are in neither)")
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(_measure(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print("\n".join(setup_section(Path("/tmp"), "--quick" in sys.argv, lambda text: print(text, file=sys.stderr))))
