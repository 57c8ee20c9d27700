"""Benchmark part for sandboxd's own start-up, run by scripts/bench.py (section 12 there; alone
with `scripts/bench --only startup`).

12. Start-up and the control verbs, as whole processes beside the interpreter's own start.
    Every process runs with its bytecode cached (PYTHONDONTWRITEBYTECODE removed,
    PYTHONPYCACHEPREFIX a temporary dir filled by one unrecorded run of each), as an install has it.
    - floor: `python -c pass` with the same interpreter.
    - exec to first launch request: `sandboxd up DIR` of N services (N = 10 and 100; each
      `sleep 1000` fed by its own unix socket unit), run as `python -c CODE up DIR` where CODE
      wraps the fork server handle's send_launch to write the wall clock at its first call to a
      file, then runs the CLI's main (the same as the console script, with `-c` in place of its
      file). The clock starts just before the spawn. After the first request the stack is left
      to start; with N = 100, the supervisor's VmRSS is read once its services all run (its control
      socket answers ps with all of them running), then it gets SIGINT and must exit 0.
    - `sandboxd ls`, `sandboxd ps --json -p NAME` (a 10-service stack brought up with `up -d
      --wait`): spawn to exit, output captured.
    - `sandboxd down -p NAME`: spawn to exit, for a fresh 10-service stack each time; the
      runtime dir must be gone when it returns.
    The runs of pass, ls and ps are interleaved; medians are reported, and each one's excess over
    the floor.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SIZES = (10, 100)
RSS_N = 100
RSS_TARGET_MIB = 30.0
RUNTIME = Path(os.environ.get("SANDBOXD_RUNTIME_DIR", "/run/sandboxd"))

FIRST_LAUNCH = """
import os, sys, time
from sandboxd.sandbox.handle import ForkServer
send_launch = ForkServer.send_launch
def first_launch(self, *args, **kwargs):
    path = os.environ["SBD_BENCH_FIRST"]
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.rename(path + ".tmp", path)
    return send_launch(self, *args, **kwargs)
ForkServer.send_launch = first_launch
from sandboxd.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _stack(root: Path, n: int, tag: str) -> Path:
    folder = root / f"startup-{tag}"
    sockets = root / f"startup-{tag}-sockets"
    folder.mkdir()
    sockets.mkdir()
    for i in range(n):
        (folder / f"s{i}.yaml").write_text(f"kind: service\ncommand: sleep 1000\n---\nkind: socket\nlisten: unix:{sockets}/s{i}.sock\n")
    return folder


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    return (time.monotonic() - started) * 1000, done


def _vm_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _all_running(sbd: list[str], env: dict[str, str], name: str, n: int) -> bool:
    done = subprocess.run([*sbd, "ps", "--json", "-p", name], capture_output=True, text=True, env=env, timeout=60)
    if done.returncode != 0:
        return False
    services = json.loads(done.stdout)["services"]
    return len(services) == n and all(s["state"] == "running" and s["pid"] for s in services)


def _first_launch(folder: Path, n: int, env: dict[str, str], problem: Callable[[str], None]) -> tuple[float | None, float | None]:
    """ms from spawn to the first launch request; with RSS_N services, the supervisor's VmRSS
    (MiB) once they all run."""
    name = f"sbdbench-startup-{n}"
    mark = folder.parent / f"first-{n}"
    mark.unlink(missing_ok=True)
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", FIRST_LAUNCH, "up", "-p", name, str(folder)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**env, "SBD_BENCH_FIRST": str(mark)})
    took = rss = None
    try:
        deadline = time.monotonic() + 60
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if mark.exists():
            took = (float(mark.read_text()) - started) * 1000
        if n == RSS_N and took is not None:
            sbd = [sys.executable, "-m", "sandboxd"]
            while proc.poll() is None and time.monotonic() < deadline and not _all_running(sbd, env, name, n):
                time.sleep(0.1)
            rss = _vm_rss_mib(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if proc.returncode != 0 or took is None:
        problem(f"startup: up of {n} exited {proc.returncode} (first launch seen: {took is not None}): {err.decode(errors='replace')[-300:]}")
    return took, rss


def startup_section(root: Path, quick: bool, problem: Callable[[str], None]) -> list[str]:
    runs = 3 if quick else 7
    control_runs = 10 if quick else 20
    down_runs = 2 if quick else 5
    work = Path(tempfile.mkdtemp(prefix="sbdbench-startup-", dir=root))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(work / "pycache"), "NO_COLOR": "1"}
    sbd = [sys.executable, "-m", "sandboxd"]
    folders = {n: _stack(work, n, str(n)) for n in SIZES}
    control = _stack(work, 10, "control")  # the stack ps and down are timed against
    floor: list[float] = []
    first: dict[int, list[float]] = {n: [] for n in SIZES}
    rss: list[float] = []
    ls: list[float] = []
    ps: list[float] = []
    down: list[float] = []
    name = "sbdbench-startup-control"

    def up_detached() -> bool:
        done = subprocess.run([*sbd, "up", "-d", "--wait", "-p", name, str(control)], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            problem(f"startup: up -d exited {done.returncode}: {done.stderr[-300:]}")
        return done.returncode == 0

    try:
        _timed([sys.executable, "-c", "pass"], env)
        _timed([*sbd, "ls"], env)  # fills the bytecode cache of the CLI's modules
        for n in SIZES:
            _first_launch(folders[n], n, env, problem)  # unrecorded: the rest of the cache, the page cache
        for _ in range(runs):
            for n in SIZES:
                took, seen = _first_launch(folders[n], n, env, problem)
                if took is not None:
                    first[n].append(took)
                if seen is not None:
                    rss.append(seen)
        if up_detached():
            _timed([*sbd, "ps", "--json", "-p", name], env)
            for _ in range(control_runs):
                floor.append(_timed([sys.executable, "-c", "pass"], env)[0])
                ls.append(_timed([*sbd, "ls"], env)[0])
                took, done = _timed([*sbd, "ps", "--json", "-p", name], env)
                if done.returncode == 0:
                    ps.append(took)
            for i in range(down_runs):
                if i and not up_detached():
                    break
                took, done = _timed([*sbd, "down", "-p", name], env)
                if done.returncode != 0 or (RUNTIME / name).exists():
                    problem(f"startup: down exited {done.returncode}, runtime dir left: {(RUNTIME / name).exists()}: {done.stderr[-300:]}")
                else:
                    down.append(took)
    except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        problem(f"startup section: {type(e).__name__}: {e}")
    finally:
        if (RUNTIME / name).exists():
            subprocess.run([*sbd, "down", "-p", name], capture_output=True, env=env, timeout=120)
    base = statistics.median(floor) if floor else None

    def row(what: str, values: list[float]) -> str:
        if not values:
            return f"  {what:<44} -"
        median = statistics.median(values)
        over = f"   (+{median - base:.0f} ms over the floor)" if base is not None else ""
        return f"  {what:<44} {median:7.0f} ms  (min {min(values):.0f}, {len(values)} runs){over}"

    lines = ["", "12. start-up and the control verbs (whole processes, bytecode cached; medians)"]
    lines.append(row("floor: python -c pass", floor))
    for n in SIZES:
        lines.append(row(f"up of {n}: exec to first launch request", first[n]))
    lines += [row("ls", ls), row("ps --json (10 services)", ps), row("down (10 services, until it returned)", down)]
    if rss:
        lines.append(f"  supervisor VmRSS, {RSS_N} services running: {statistics.median(rss):.1f} MiB (target <= {RSS_TARGET_MIB:g} MiB)")
    return lines
