"""Benchmark part for user namespaces, run by scripts/bench.py (section 10 there; alone with
`scripts/bench --only userns`).

10. What the default user namespace costs per launch. One stack of two services, both `true` on
    the host's root with one read-only bind mount (of the spec folder, at /tmp/b), the same but
    for `userns: false` on one of them. Their plans are made as `sandboxd up` makes them (the
    stack leases its block of ids) and sent to a fork server started for this, one launch at a
    time, the two alternating (after WARMUP unrecorded launches of each); each launch is timed
    from the request to the sandbox's report that it is about to exec its init, the interval
    sandboxd's own "median launch" covers (the clone, the namespaces, the mounts, the maps). Each
    launch waits for the one before it to have exited. Reported: both medians and their
    difference, the cost of the user namespace (target under 0.5 ms), and the difference of the
    means beside it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RUNS = 200
QUICK_RUNS = 60
WARMUP = 10
TARGET_MS = 0.5
_launch_ids = itertools.count(1)  # request ids, as the supervisor's link numbers them (forks.py)


def _launch_ms(fork_server: object, plan: object, cgroup: object, root: Path) -> float:
    from sandboxd.sandbox.handle import ForkServer, read_status
    from sandboxd.sandbox.protocol import Exited, ForkFailed

    assert isinstance(fork_server, ForkServer)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    launch_id = next(_launch_ids)
    started = time.monotonic_ns()
    # The bind's source, held as the supervisor holds it (pins.py).
    sources = [os.open(op.source, os.O_PATH | os.O_CLOEXEC) for op in plan.mounts if op.kind == "bind"]  # type: ignore[attr-defined]
    channel = fork_server.send_launch(launch_id, plan, str(cgroup.path), cgroup.v1_tasks_files, str(root), out_w, [], source_fds=sources)  # type: ignore[arg-type, attr-defined]
    os.close(out_w)
    for fd in sources:
        os.close(fd)
    exec_ns = 0
    try:
        while True:
            select.select([channel], [], [], 10)
            kind, launched = read_status(channel, "bench")
            if launched is not None:
                exec_ns = launched.exec_ns
                if launched.pidfd >= 0:
                    os.close(launched.pidfd)
            if kind == "done":
                break
        while True:  # its exit, before the next launch
            reply = fork_server.receive()
            if isinstance(reply, ForkFailed) and reply.id == launch_id:
                raise RuntimeError(f"a launch failed: {reply.detail}")
            if isinstance(reply, Exited) and reply.id == launch_id:
                break
    finally:
        channel.close()
        os.close(out_r)
    if not exec_ns:
        raise RuntimeError("a sandbox did not report its exec")
    return (exec_ns - started) / 1e6


def userns_section(root: Path, quick: bool, problem: Callable[[str], None]) -> list[str]:
    from sandboxd.daemon.runtimes import write_hostname_file
    from sandboxd.host.cgroups import cgroup_manager, detect
    from sandboxd.sandbox.handle import ForkServer
    from sandboxd.host.prepare import make_plans
    from sandboxd.spec.load import load_stack
    from sandboxd.host.subids import lease

    runs = QUICK_RUNS if quick else RUNS
    folder = Path(tempfile.mkdtemp(prefix="sbdbench-userns-", dir=root))
    (folder / "default.yaml").write_text("kind: service\ncommand: ['true']\nmounts: [{source: ., target: /tmp/b}]\n")
    (folder / "host.yaml").write_text("kind: service\ncommand: ['true']\nuserns: false\nmounts: [{source: ., target: /tmp/b}]\n")
    instance = "sbdbench-userns"
    runtime_dir = Path(f"/run/sandboxd/{instance}")
    ids = lease(instance)
    cgroups = cgroup_manager(detect(), instance)
    fork_server = ForkServer.start()
    times: dict[str, list[float]] = {"host": [], "default": []}
    try:
        stack = load_stack(folder)
        plans = make_plans(stack, str(runtime_dir), echo=False, userns=ids.userns)
        for service in stack.services:  # what the supervisor writes for each service (its /etc/hostname)
            write_hostname_file(runtime_dir / "etc" / service.name, service.hostname)
        cgroups.setup()
        groups = {name: cgroups.create(name) for name in times}
        for round_ in range(WARMUP + runs):
            for name in ("host", "default") if round_ % 2 else ("default", "host"):
                took = _launch_ms(fork_server, plans[name], groups[name], folder)
                if round_ >= WARMUP:
                    times[name].append(took)
    except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        problem(f"user namespace launches failed: {e!r}")
        return ["user namespace cost per launch: not measured (see problems)"]
    finally:
        fork_server.stop()
        cgroups.teardown()
        ids.release()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            runtime_dir.parent.rmdir()  # /run/sandboxd, unless a stack runs
    host, default = (statistics.median(times[n]) for n in ("host", "default"))
    cost = default - host
    mean_cost = statistics.fmean(times["default"]) - statistics.fmean(times["host"])

    def row(label: str, values: list[float]) -> str:
        return f"  {label:<34}{statistics.median(values):7.2f} ms   {min(values):.2f}–{max(values):.2f}"

    return [
        f"user namespace cost per launch (request to exec by a fork server, {runs} launches each, alternating; true with one bind mount)",
        "  case                              median     min–max ms",
        row("userns: false", times["host"]),
        row("default (a user namespace)", times["default"]),
        f"  cost of the user namespace        {cost:+7.2f} ms   (difference of the means {mean_cost:+.2f} ms)   target < {TARGET_MS:g} ms",
    ]
