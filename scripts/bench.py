"""Benchmark sandboxd against the same services started without isolation, in one invocation.

This is a benchmark, not a test: it prints figures, ratios and the targets beside them, and
asserts nothing. It needs root, as `sandboxd up` does. Standard library only.

What is measured, and how:

1. Parallel start. For each N (10, 50, 100) a temporary spec folder gets N services, each
   `python3 /b/svc.py` (svc.py mounted read-only at /b) fed by its own unix socket unit. svc.py
   sleeps 0.2 s, then accepts on its socket and sends every client one byte. The clock starts
   just before `sandboxd up DIR` is spawned and stops when all N sockets have delivered their
   byte to a client: the client connects as soon as a socket file exists (a connect failing with
   ENOENT/ECONNREFUSED/EAGAIN is retried every 2 ms) and waits for the bytes with selectors. Then
   sandboxd gets SIGINT; the time until it exits is the "stop" figure, and it must exit 0.
   Baseline: a small Python launcher, spawned the same way (so both pay one interpreter start),
   binds the N sockets itself and starts the N programs with subprocess.Popen(pass_fds), no
   isolation. svc.py takes its socket from the fd named by SVC_FD (default 3, what sandboxd
   gives); the launcher sets SVC_FD, LISTEN_FDS=1 and LISTEN_FDNAMES, but not LISTEN_PID, which
   cannot be known before the spawn without a preexec_fn (svc.py does not read it). Runs
   alternate sandboxd, baseline, sandboxd on a network (see 2), ... and the median of the
   repetitions is reported, after one unrecorded warm-up of each (page cache). The services run
   the same interpreter in all: the `python3` found on the PATH sandboxd gives its sandboxes.
2. Services on a network, and teardown. In each repetition of 1, after the baseline, the same N
   services are brought up once more, all attached to one `kind: network` unit `net` (each gets a
   veth into the network's bridge; the sockets stay unix sockets bound on the host, so the clients
   and the "until all accept" clock are the same). Reported beside the private run of 1 (every
   service in a network namespace of its own, no link), with the ratio network/private. Teardown:
   the clock starts at the SIGINT to sandboxd and stops when sandboxd has exited and both its
   runtime dir (/run/sandboxd/STACK) and its cgroup dir (CGROUP/sandboxd/STACK) are gone, polled
   every 2 ms for up to 5 s ("gone"); it is taken for every sandboxd run and reported for the
   network runs, beside the private runs' stop (SIGINT to exit), a stand-in for the services' own
   stop time; "beyond" is the difference.
3. Launch latency (request to exec): sandboxd prints `N services launched in T ms, median
   launch M ms` on stderr; a 1-service stack is brought up and stopped repeatedly and the median
   of M is reported.
4. Memory with 100 services running (sandboxd, then separately the baseline, each until all
   100 accept, then after a 1 s settle): sandboxd's own RSS (VmRSS of `sandboxd up` plus its fork
   server, the direct child running sandboxd.launcher's serve_fd) and PSS (smaps_rollup). Extra
   memory per sandbox: the mean PSS of the sandbox inits (dumb-init, the children of the fork
   server), and the sum of PSS of every process in the stack's service cgroups / N minus the sum
   of PSS of the baseline's N programs / N.
5. First-connection latency of an on-demand service. The program is first.py, run as
   `python3 -S /b/first.py` in every case: it accepts on its socket (fd 3, or SVC_FD) and sends
   every client one byte, with no sleep. The clock starts just before a client connects to the
   unix socket and stops when the first byte has arrived. On-demand: a stack with the service
   `start: on-demand` is brought up afresh for every run (the service starts once per stack);
   once sandboxd has printed its summary and 0.2 s have passed, one connection is timed (the
   service's start included), then the stack is stopped. Eager: the same service without
   `start:`, already answering, timed over many connections of one stack. The program's own
   start: the bench binds a unix socket itself, connects to it, then starts the same program
   with subprocess.Popen(pass_fds) and no sandbox, and times until the byte. Runs alternate
   on-demand and own start; medians are reported, after one unrecorded warm-up of each.
   sandboxd's part = median on-demand - median own start.
6. Connections per second in accept mode: a service fed by a unix socket with `accept: true`,
   `max_connections: 64`, its program `sh -c 'echo ok >&3'` (each connection gets a sandbox and
   a cgroup of its own and the answer "ok"). Clients connect, read until EOF and close (each
   answer must be "ok\n"), one client sequentially, then 8 client threads at once, each phase
   for a fixed time or a number of connections, whichever comes first; rate = answered
   connections / seconds from the first connect to the last EOF. During the concurrent phase the
   stack's cgroup dir is polled for per-connection cgroups (the most seen at once is reported),
   and afterwards none may remain.

7. The control plane. A 10-service stack (each service `sleep 1000` fed by its own unix socket
   unit) is brought up detached with `sandboxd up -d --wait -p NAME`; then `sandboxd ps --json -p
   NAME` is timed as a whole process, the venv's `sandboxd` console script run by subprocess.run
   (output captured), 20 times, in the environment the bench was given; then the same with
   bytecode cached (PYTHONDONTWRITEBYTECODE removed, PYTHONPYCACHEPREFIX a temporary dir filled by
   one unrecorded run), as an installed copy would have it (an editable checkout without
   __pycache__ under PYTHONDONTWRITEBYTECODE=1 compiles sandboxd's modules every run); beside
   them, the floor: `python -c pass` with the same interpreter, as often; interleaved. Where the
   time of ps goes: `python -X importtime -m sandboxd ps --json -p NAME`, 3 runs, the 5 imports
   with the largest median cumulative time. The stack is brought down with `sandboxd down -p
   NAME`, and its runtime and cgroup dirs must be gone when that returns. Then the Python API:
   `with sandboxd.testing.Stack(folder, name=unique) as stack: stack.wait_ready()` and leaving the
   block, for the same 10 services; up = entering the block through wait_ready, down = leaving it
   (its `sandboxd down`); medians of 5 runs, after one unrecorded warm-up. The import of
   sandboxd.testing (it imports pytest) is timed once and not counted. sandboxd.log of each of
   these stacks is read before the down and scanned as below.

8. The proxy, and 9. images: see scripts/bench_real.py.
10. The cost of the default user namespace per launch: see scripts/bench_userns.py.

Every sandboxd's stderr is scanned for lines that look like trouble (tracebacks, errors, "could
not", warnings, SIGKILL); they are listed at the end, numbers folded, with a count.

Every process started is stopped in a finally (SIGINT, then SIGKILL after 30 s), only by its
pid (the baseline launcher also by its own process group); temporary folders are removed.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

SANDBOXD = Path(sys.executable).parent / "sandboxd"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what a sandbox gets
SERVICE_PYTHON = shutil.which("python3", path=SANDBOX_PATH) or "/usr/bin/python3"
RUNTIME_ROOT = Path("/run/sandboxd")
CGROUP_V2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() else Path("/sys/fs/cgroup")

STOP_GRACE = 30.0  # SIGINT, then SIGKILL after this long
READY_TIMEOUT = 120.0
CONNECT_RETRY = 0.002
SETTLE = 1.0  # before reading memory figures
MEMORY_N = 100
MIB = 1024.0

GONE_TIMEOUT = 5.0  # after sandboxd exited, for its runtime and cgroup dirs to vanish
GONE_POLL = 0.002

TARGET_RATIO = {50: 1.10}
TARGET_NETWORK_RATIO = {100: 1.30}  # network / private
TARGET_TEARDOWN_S = 1.0  # gone (network) beyond stop (private)
TARGET_LATENCY_MS = 9.0
TARGET_RSS_MIB = 40.0
TARGET_PER_SANDBOX_MIB = 2.0
TARGET_ON_DEMAND_MS = 15.0  # on-demand first connection minus the program's own start
TARGET_ACCEPT_RATE = {1: 300.0, 8: 500.0}  # connections/s in accept mode, by client count
ACCEPT_COMPARISON = "nsjail 228/s sequential; systemd-socket-activate + unshare(1) 238 and 447; + bubblewrap 105 and 184"

CLIENT_TIMEOUT = 30.0  # any one client connection, connect to EOF

CONTROL_N = 10  # services in the control-plane stacks
TARGET_PS_MS = 100.0  # `sandboxd ps --json`, the whole process
TARGET_API_S = 0.5  # Stack up, wait_ready and down through the Python API
CONTROL_TIMEOUT = 60.0  # any one sandboxd CLI call of the control-plane part
IMPORTTIME_RUNS = 3
IMPORTTIME_TOP = 5
ON_DEMAND_SETTLE = 0.2  # after sandboxd's summary, before the timed connection
ACCEPT_CLIENTS = 8
ACCEPT_MAX_CONNECTIONS = 64
ACCEPT_ANSWER = b"ok\n"
ACCEPT_MAX_FAILURES = 5  # a client phase stops after this many failed connections

SUMMARY = re.compile(r"services launched in (\d+) ms(?:, median launch ([0-9.]+) ms)?")

SVC = """\
import os, socket, time
time.sleep(0.2)
sock = socket.socket(fileno=int(os.environ.get("SVC_FD", "3")))
while True:
    conn, _ = sock.accept()
    conn.sendall(b"!")
    conn.close()
"""

FIRST = """\
import os, socket
sock = socket.socket(fileno=int(os.environ.get("SVC_FD", "3")))
while True:
    conn, _ = sock.accept()
    conn.sendall(b"!")
    conn.close()
"""
FIRST_COMMAND = ("python3", "-S", "/b/first.py")  # in the sandbox; without one: SERVICE_PYTHON -S first.py

ODD_LINE = re.compile(r"Traceback|[Ee]rror|[Ee]xception|could not|cannot|[Ww]arning|SIGKILL|second interrupt|leftover|stale")

LAUNCHER = """\
import os, signal, socket, subprocess, sys
python, script, *paths = sys.argv[1:]
signal.signal(signal.SIGTERM, signal.default_int_handler)
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (a background job)
socks, procs = [], []
try:
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
        socks.append(sock)
    for path, sock in zip(paths, socks):
        fd = sock.fileno()
        name = os.path.basename(path).removesuffix(".sock")
        env = {"PATH": os.environ["PATH"], "SVC_FD": str(fd), "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
        procs.append(subprocess.Popen([python, script], env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL))
    while True:
        signal.pause()
except KeyboardInterrupt:
    pass
finally:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
"""

problems: list[str] = []
odd_lines: dict[str, int] = {}  # sandboxd stderr lines worth a look, numbers folded, with a count


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def problem(text: str) -> None:
    problems.append(text)
    note(f"  PROBLEM: {text}")


# ───────────────────────────── stacks on disk ─────────────────────────────


@dataclass(frozen=True)
class Stack:
    name: str
    spec_dir: Path
    paths: tuple[str, ...]  # one unix socket per service, in service order
    network: bool = False  # all services attached to one network unit

    @property
    def script(self) -> Path:
        return self.spec_dir / "svc.py"


def make_stack(root: Path, n: int, network: bool = False) -> Stack:
    """A spec folder of n services s0..s{n-1}, each fed by the socket root/sock-n/sI.sock.

    With `network`, a network unit `net` too, and every service attached to it (a veth each).
    """
    tag = f"net-{n}" if network else str(n)
    spec_dir, sock_dir = root / f"stack-{tag}", root / f"sock-{tag}"
    spec_dir.mkdir()
    sock_dir.mkdir()
    (spec_dir / "svc.py").write_text(SVC)
    attach = "network: [net]\n" if network else ""
    if network:
        (spec_dir / "net.yaml").write_text("kind: network\nname: net\n")
    paths = []
    for i in range(n):
        path = f"{sock_dir}/s{i}.sock"
        paths.append(path)
        (spec_dir / f"s{i}.yaml").write_text(
            f"kind: service\ncommand: python3 /b/svc.py\nmounts: [{{source: ., target: /b}}]\n{attach}"
            f"---\nkind: socket\nlisten: unix:{path}\n"
        )
    return Stack(f"sbdbench-{tag}", spec_dir, tuple(paths), network)


# ───────────────────────────── processes ─────────────────────────────


@dataclass
class Running:
    kind: str  # "sandboxd" or "baseline"
    proc: subprocess.Popen[bytes]
    started: float
    err_file: Path
    scanned: bool = False

    def stderr(self) -> str:
        try:
            return self.err_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])


def spawn(kind: str, argv: Sequence[str], logs: Path) -> Running:
    """Start argv in a session of its own, stdin from /dev/null, output to files in `logs`."""
    logs.mkdir(exist_ok=True)
    stamp = f"{kind}-{time.monotonic_ns()}"
    env = {**os.environ, "NO_COLOR": "1", "PATH": SANDBOX_PATH}
    with open(logs / f"{stamp}.out", "wb") as out, open(logs / f"{stamp}.err", "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True)
    return Running(kind, proc, started, logs / f"{stamp}.err")


def spawn_sandboxd(stack: Stack, logs: Path) -> Running:
    return spawn("sandboxd", [str(SANDBOXD), "up", str(stack.spec_dir), "-p", stack.name], logs)


def spawn_baseline(stack: Stack, logs: Path) -> Running:
    launcher = logs.parent / "launcher.py"
    if not launcher.exists():
        launcher.write_text(LAUNCHER)
    return spawn("baseline", [SERVICE_PYTHON, str(launcher), SERVICE_PYTHON, str(stack.script), *stack.paths], logs)


def stop(run: Running) -> tuple[float, int]:
    """SIGINT, wait (SIGKILL after STOP_GRACE); returns (seconds to exit, exit code)."""
    started = time.monotonic()
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
    try:
        code = run.proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        problem(f"{run.kind} pid {run.proc.pid} did not exit within {STOP_GRACE:g} s of SIGINT; SIGKILL")
        run.proc.kill()
        code = run.proc.wait()
    elapsed = time.monotonic() - started
    if run.kind == "baseline" and code != 0:
        kill_group(run.proc.pid)  # the launcher could not reap its programs: kill them by its group
    if run.kind == "sandboxd" and not run.scanned:
        run.scanned = True
        scan_stderr(run)
    return elapsed, code


def scan_stderr(run: Running) -> None:
    for line in run.stderr().splitlines():
        if ODD_LINE.search(line):
            key = re.sub(r"\d+", "N", line.strip())
            odd_lines[key] = odd_lines.get(key, 0) + 1


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def running(start: Callable[[], Running]) -> Iterator[Running]:
    """Whatever happens inside, the process is stopped on the way out."""
    run = start()
    try:
        yield run
    finally:
        stop(run)  # returns at once if it already exited; kills a failed launcher's group


# ───────────────────────────── measuring ─────────────────────────────


def check_alive(run: Running) -> None:
    if run.proc.poll() is not None:
        raise RuntimeError(f"{run.kind} exited early with code {run.proc.returncode}:\n{run.tail()}")


def try_connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
        sock.close()
        return None
    return sock


def wait_accepting(run: Running, paths: Sequence[str]) -> float:
    """Seconds from the spawn of `run` until every socket in `paths` has sent a client its byte."""
    selector = selectors.DefaultSelector()
    pending, remaining = list(paths), len(paths)
    deadline = run.started + READY_TIMEOUT
    try:
        while remaining:
            pending = [path for path in pending if not register(selector, path)]
            for key, _ in selector.select(CONNECT_RETRY if pending else 0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                selector.unregister(sock)
                got = sock.recv(1)
                sock.close()
                if got:
                    remaining -= 1
                else:
                    pending.append(key.data)  # closed without a byte: ask again
            if remaining and time.monotonic() > deadline:
                raise TimeoutError(f"{run.kind}: {remaining} of {len(paths)} sockets silent after {READY_TIMEOUT:g} s")
            check_alive(run)
        return time.monotonic() - run.started
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()


def register(selector: selectors.BaseSelector, path: str) -> bool:
    sock = try_connect(path)
    if sock is None:
        return False
    selector.register(sock, selectors.EVENT_READ, path)
    return True


def wait_summary(run: Running, timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := SUMMARY.search(run.stderr()):
            return match
        check_alive(run)
        time.sleep(0.005)
    raise TimeoutError(f"no 'services launched' line within {timeout:g} s:\n{run.tail()}")


def own_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_V2 / line[3:].lstrip("/")
    return CGROUP_V2


def instance_cgroup(stack: Stack) -> Path:
    return own_cgroup() / "sandboxd" / stack.name


def stack_dirs(stack: Stack) -> tuple[Path, Path]:
    """What must be gone once the stack is: its runtime dir and its cgroup dir."""
    return RUNTIME_ROOT / stack.name, instance_cgroup(stack)


def wait_gone(stack: Stack) -> float | None:
    """Seconds from now until the stack's dirs are gone; None if they outlive GONE_TIMEOUT."""
    started = time.monotonic()
    while any(os.path.lexists(path) for path in stack_dirs(stack)):
        if time.monotonic() - started > GONE_TIMEOUT:
            return None
        time.sleep(GONE_POLL)
    return time.monotonic() - started


def check_clean_after(stack: Stack, code: int) -> None:
    """sandboxd exited: it must have said 0 and left nothing of this stack behind."""
    if code != 0:
        problem(f"sandboxd up {stack.name} exited {code}, expected 0 after SIGINT")
    for path in (*stack_dirs(stack), *map(Path, stack.paths)):
        if os.path.lexists(path):
            problem(f"left behind after sandboxd exited: {path}")


@dataclass(frozen=True)
class StartRun:
    seconds: float
    stop_seconds: float
    launch_all_ms: float | None = None
    gone_seconds: float | None = None  # SIGINT until exited and the stack's dirs are gone


def start_sandboxd(stack: Stack, logs: Path) -> StartRun:
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        seconds = wait_accepting(run, stack.paths)
        match = SUMMARY.search(run.stderr())
        stop_seconds, code = stop(run)
        after_exit = wait_gone(stack)
    gone = stop_seconds + after_exit if after_exit is not None else None
    check_clean_after(stack, code)
    return StartRun(seconds, stop_seconds, float(match[1]) if match else None, gone)


def start_baseline(stack: Stack, logs: Path) -> StartRun:
    with running(lambda: spawn_baseline(stack, logs)) as run:
        seconds = wait_accepting(run, stack.paths)
        stop_seconds, code = stop(run)
    if code != 0:
        problem(f"baseline launcher exited {code}:\n{run.tail()}")
    return StartRun(seconds, stop_seconds)


@dataclass(frozen=True)
class StartRow:
    n: int
    sandboxd: list[StartRun]
    baseline: list[StartRun]
    network: list[StartRun]  # the same services, all on one network

    def median(self, runs: list[StartRun], pick: Callable[[StartRun], float | None]) -> float | None:
        values = [v for v in map(pick, runs) if v is not None]
        return statistics.median(values) if values else None


def parallel_start(stack: Stack, net_stack: Stack, reps: int, logs: Path) -> StartRow:
    """Per repetition: sandboxd (private), baseline, sandboxd with every service on a network."""
    row = StartRow(len(stack.paths), [], [], [])
    for rep in range(reps):
        row.sandboxd.append(start_sandboxd(stack, logs))
        time.sleep(0.3)
        row.baseline.append(start_baseline(stack, logs))
        time.sleep(0.3)
        row.network.append(start_sandboxd(net_stack, logs))
        time.sleep(0.3)
        s, b, n = row.sandboxd[-1], row.baseline[-1], row.network[-1]
        note(
            f"  N={row.n} #{rep + 1}: sandboxd {s.seconds:.3f} s (stop {s.stop_seconds:.3f} s), baseline {b.seconds:.3f} s, "
            f"network {n.seconds:.3f} s (stop {n.stop_seconds:.3f} s, gone {fmt_s(n.gone_seconds, 3)})"
        )
    return row


def launch_latency(stack: Stack, runs: int, logs: Path) -> list[float]:
    """Median request→exec of a 1-service stack, as sandboxd reports it, once per run."""
    found = []
    for _ in range(runs):
        with running(lambda: spawn_sandboxd(stack, logs)) as run:
            match = wait_summary(run)
            _, code = stop(run)
        check_clean_after(stack, code)
        if match[2] is not None:
            found.append(float(match[2]))
        else:
            problem(f"the summary line has no median launch figure: {match[0]!r}")
    return found


# ───────────────────────────── memory ─────────────────────────────


def status_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def is_fork_server(pid: int, sandboxd: int) -> bool:
    """A child of sandboxd that is its fork server: a fork of it, or the lean interpreter running serve_fd."""
    own = cmdline(pid)
    return own == cmdline(sandboxd) or b"sandboxd.launcher import serve_fd" in own


def cgroup_pids(stack: Stack) -> list[int]:
    pids = []
    for procs in sorted(instance_cgroup(stack).glob("*/cgroup.procs")):
        pids += [int(p) for p in procs.read_text().split()]
    return pids


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    pss_kib: int
    init_pss_kib: float
    sandbox_pss_kib: float  # all processes of all sandboxes / N
    baseline_pss_kib: float  # the baseline's N programs / N


def sandboxd_memory(stack: Stack, logs: Path) -> tuple[int, int, float, float]:
    n = len(stack.paths)
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        wait_accepting(run, stack.paths)
        time.sleep(SETTLE)
        own = [run.proc.pid, *(c for c in children(run.proc.pid) if is_fork_server(c, run.proc.pid))]
        if len(own) != 2:
            problem(f"expected sandboxd and one fork server, found pids {own}")
        inits = [pid for server in own[1:] for pid in children(server)]
        if len(inits) != n:
            problem(f"expected {n} sandbox inits under the fork server, found {len(inits)}")
        in_sandboxes = cgroup_pids(stack)
        if len(in_sandboxes) != 2 * n:
            problem(f"expected {2 * n} processes (init and service) in the stack's cgroups, found {len(in_sandboxes)}")
        rss, pss = sum(map(status_kib, own)), sum(map(pss_kib, own))
        init_pss = statistics.mean(map(pss_kib, inits)) if inits else float("nan")
        all_pss = sum(map(pss_kib, in_sandboxes)) / n
        _, code = stop(run)
    check_clean_after(stack, code)
    return rss, pss, init_pss, all_pss


def baseline_memory(stack: Stack, logs: Path) -> float:
    n = len(stack.paths)
    with running(lambda: spawn_baseline(stack, logs)) as run:
        wait_accepting(run, stack.paths)
        time.sleep(SETTLE)
        programs = children(run.proc.pid)
        if len(programs) != n:
            problem(f"expected {n} baseline programs, found {len(programs)}")
        per = sum(map(pss_kib, programs)) / n
        stop(run)
    return per


def memory(stack: Stack, logs: Path) -> Memory:
    rss, pss, init_pss, all_pss = sandboxd_memory(stack, logs)
    time.sleep(0.3)
    return Memory(rss, pss, init_pss, all_pss, baseline_memory(stack, logs))


# ───────────────────────────── on-demand start and accept mode ─────────────────────────────


def make_first_stack(root: Path, on_demand: bool) -> Stack:
    """One service running first.py, fed by one unix socket; `start: on-demand` or eager."""
    tag = "on-demand" if on_demand else "eager"
    spec_dir, sock_dir = root / f"stack-{tag}", root / f"sock-{tag}"
    spec_dir.mkdir()
    sock_dir.mkdir()
    (spec_dir / "first.py").write_text(FIRST)
    path = f"{sock_dir}/first.sock"
    start = "start: on-demand\n" if on_demand else ""
    (spec_dir / "first.yaml").write_text(
        f"kind: service\n{start}command: [{', '.join(FIRST_COMMAND)}]\nmounts: [{{source: ., target: /b}}]\n"
        f"---\nkind: socket\nlisten: unix:{path}\n"
    )
    return Stack(f"sbdbench-{tag}", spec_dir, (path,))


def make_accept_stack(root: Path) -> Stack:
    spec_dir, sock_dir = root / "stack-accept", root / "sock-accept"
    spec_dir.mkdir()
    sock_dir.mkdir()
    path = f"{sock_dir}/ok.sock"
    (spec_dir / "ok.yaml").write_text(
        'kind: service\ncommand: [sh, -c, "echo ok >&3"]\n'
        f"---\nkind: socket\nlisten: unix:{path}\naccept: true\nmax_connections: {ACCEPT_MAX_CONNECTIONS}\n"
    )
    return Stack("sbdbench-accept", spec_dir, (path,))


def read_to_eof(sock: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def first_byte_ms(path: str) -> float:
    """Connect to `path` and wait for one byte: milliseconds, connect included."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        started = time.perf_counter()
        sock.connect(path)
        got = sock.recv(1)
        elapsed = time.perf_counter() - started
    if got != b"!":
        raise RuntimeError(f"{path}: expected one byte '!', got {got!r}")
    return elapsed * 1000


def on_demand_once(stack: Stack, logs: Path) -> float:
    """A fresh stack, one timed first connection (the service starts on it), stopped again."""
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        wait_summary(run)
        time.sleep(ON_DEMAND_SETTLE)
        if "activated by" in run.stderr():
            problem("on-demand service activated before any connection")
        ms = first_byte_ms(stack.paths[0])
        activations = run.stderr().count("activated by")
        if activations != 1:
            problem(f"on-demand: expected 1 'activated by' line after the first connection, found {activations}")
        _, code = stop(run)
    check_clean_after(stack, code)
    return ms


def own_start_once(script: Path, sock_dir: Path, logs: Path) -> float:
    """The same program without sandbox: bind, connect, then start it with the socket passed."""
    path = str(sock_dir / "plain.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proc: subprocess.Popen[bytes] | None = None
    try:
        listener.bind(path)
        listener.listen(socket.SOMAXCONN)
        fd = listener.fileno()
        env = {"PATH": SANDBOX_PATH, "SVC_FD": str(fd), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "first"}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client, open(logs / "plain.err", "ab") as err:
            client.settimeout(CLIENT_TIMEOUT)
            started = time.perf_counter()
            client.connect(path)
            proc = subprocess.Popen(
                [SERVICE_PYTHON, "-S", str(script)], env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
            got = client.recv(1)
            elapsed = time.perf_counter() - started
        if got != b"!":
            raise RuntimeError(f"program without sandbox: expected one byte '!', got {got!r}")
        return elapsed * 1000
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                problem(f"program without sandbox, pid {proc.pid}, ignored SIGTERM for {STOP_GRACE:g} s; SIGKILL")
                proc.kill()
                proc.wait()
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def eager_latencies(stack: Stack, count: int, logs: Path) -> list[float]:
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        wait_accepting(run, stack.paths)
        found = [first_byte_ms(stack.paths[0]) for _ in range(count)]
        _, code = stop(run)
    check_clean_after(stack, code)
    return found


@dataclass(frozen=True)
class OnDemand:
    on_demand: list[float]  # ms, one per fresh stack
    eager: list[float]  # ms, one per connection to a running copy
    own: list[float]  # ms, the program started without sandbox


def on_demand(root: Path, runs: int, eager_runs: int, logs: Path) -> OnDemand:
    lazy, eager = make_first_stack(root, on_demand=True), make_first_stack(root, on_demand=False)
    plain_dir = root / "sock-plain"
    plain_dir.mkdir()
    on_demand_once(lazy, logs)  # warm-up, not counted
    own_start_once(lazy.spec_dir / "first.py", plain_dir, logs)
    result = OnDemand([], [], [])
    for rep in range(runs):
        result.on_demand.append(on_demand_once(lazy, logs))
        time.sleep(0.3)
        result.own.append(own_start_once(lazy.spec_dir / "first.py", plain_dir, logs))
        time.sleep(0.3)
        note(f"  #{rep + 1}: on-demand {result.on_demand[-1]:.1f} ms, own start {result.own[-1]:.1f} ms")
    result.eager.extend(eager_latencies(eager, eager_runs, logs))
    note(f"  eager: median {statistics.median(result.eager):.2f} ms of {len(result.eager)}")
    return result


@dataclass(frozen=True)
class AcceptRun:
    clients: int
    answered: int
    failed: int
    seconds: float
    peak_cgroups: int | None = None  # per-connection cgroups seen at once (concurrent phase only)

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def accept_one(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        sock.connect(path)
        return read_to_eof(sock)


class ClientPhase:
    """Connections to `path` from some client threads until a deadline or a connection budget."""

    def __init__(self, path: str, seconds: float, budget: int) -> None:
        self.path, self.seconds, self.budget = path, seconds, budget
        self.lock = threading.Lock()
        self.claimed = self.answered = self.failed = 0
        self.errors: list[str] = []
        self.deadline = 0.0

    def claim(self) -> bool:
        with self.lock:
            if self.claimed >= self.budget or self.failed >= ACCEPT_MAX_FAILURES or time.monotonic() >= self.deadline:
                return False
            self.claimed += 1
            return True

    def client(self) -> None:
        while self.claim():
            try:
                answer = accept_one(self.path)
                error = None if answer == ACCEPT_ANSWER else f"answer {answer!r}"
            except OSError as e:  # socket.timeout included
                error = f"{type(e).__name__}: {e}"
            with self.lock:
                if error is None:
                    self.answered += 1
                else:
                    self.failed += 1
                    self.errors.append(error)

    def run(self, clients: int, stack: Stack) -> AcceptRun:
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        started = time.monotonic()
        self.deadline = started + self.seconds
        for thread in threads:
            thread.start()
        peak: int | None = None
        if clients > 1:
            peak = 0
            while any(thread.is_alive() for thread in threads):
                peak = max(peak, len(instance_cgroups(stack)))
                time.sleep(0.01)
        hard_deadline = self.deadline + CLIENT_TIMEOUT + 5
        for thread in threads:
            thread.join(max(0.0, hard_deadline - time.monotonic()))
        elapsed = time.monotonic() - started
        if any(thread.is_alive() for thread in threads):
            problem(f"accept mode: a client thread still runs {elapsed:.0f} s after the phase began")
        for error in sorted(set(self.errors)):
            problem(f"accept mode, {clients} client(s): {self.errors.count(error)} connection(s) failed: {error}")
        return AcceptRun(clients, self.answered, self.failed, elapsed, peak)


def instance_cgroups(stack: Stack) -> list[str]:
    """The per-connection cgroups (SERVICE@N) of the stack now."""
    try:
        return [entry.name for entry in os.scandir(instance_cgroup(stack)) if "@" in entry.name and entry.is_dir()]
    except FileNotFoundError:
        return []


def accept_mode(root: Path, seconds: float, budgets: dict[int, int], logs: Path) -> list[AcceptRun]:
    stack = make_accept_stack(root)
    results = []
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        wait_summary(run)
        time.sleep(ON_DEMAND_SETTLE)
        ClientPhase(stack.paths[0], seconds, 20).run(1, stack)  # warm-up, not counted
        for clients, budget in budgets.items():
            time.sleep(0.3)
            result = ClientPhase(stack.paths[0], seconds, budget).run(clients, stack)
            results.append(result)
            check_alive(run)
            peak = f", at most {result.peak_cgroups} per-connection cgroups at once" if result.peak_cgroups is not None else ""
            note(f"  {clients} client(s): {result.answered} answered, {result.failed} failed in {result.seconds:.2f} s{peak}")
        deadline = time.monotonic() + GONE_TIMEOUT
        while (remaining := instance_cgroups(stack)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if remaining:
            problem(f"accept mode: {len(remaining)} per-connection cgroups still there {GONE_TIMEOUT:g} s after the last client")
        _, code = stop(run)
    check_clean_after(stack, code)
    return results


# ───────────────────────────── control plane: ps and the Python API ─────────────────────────────


def make_sleep_stack(root: Path, tag: str, n: int = CONTROL_N) -> Stack:
    """n services `sleep 1000`, each fed by a unix socket of its own (the program never accepts)."""
    spec_dir, sock_dir = root / f"stack-{tag}", root / f"sock-{tag}"
    spec_dir.mkdir()
    sock_dir.mkdir()
    paths = []
    for i in range(n):
        path = f"{sock_dir}/s{i}.sock"
        paths.append(path)
        (spec_dir / f"s{i}.yaml").write_text(f"kind: service\ncommand: sleep 1000\n---\nkind: socket\nlisten: unix:{path}\n")
    return Stack(f"sbdbench-{tag}", spec_dir, tuple(paths))


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "PATH": SANDBOX_PATH}
    result = subprocess.run(
        [str(SANDBOXD), *args], check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=CONTROL_TIMEOUT
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"sandboxd {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def scan_log(stack: Stack) -> None:
    """A detached stack's own messages (logs/sandboxd.log), scanned like a foreground stderr."""
    try:
        text = (RUNTIME_ROOT / stack.name / "logs" / "sandboxd.log").read_text(errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if ODD_LINE.search(line):
            key = re.sub(r"\d+", "N", line.strip())
            odd_lines[key] = odd_lines.get(key, 0) + 1


def ensure_down(stack: Stack, what: str) -> None:
    """After a detached stack should be down: its dirs must be gone; if not, a problem, and down again."""
    if wait_gone(stack) is not None:
        for path in stack.paths:
            if os.path.lexists(path):
                problem(f"{what}: left behind after the down: {path}")
        return
    left = [str(path) for path in stack_dirs(stack) if os.path.lexists(path)]
    problem(f"{what}: still there {GONE_TIMEOUT:g} s after the down: {', '.join(left)}")
    if (RUNTIME_ROOT / stack.name).exists():
        result = cli("down", "-p", stack.name, check=False)
        if result.returncode != 0:
            problem(f"{what}: sandboxd down -p {stack.name} exited {result.returncode}: {result.stderr.strip()}")
        wait_gone(stack)


def process_ms(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one whole process, spawn to reaped, output captured; it must exit 0."""
    started = time.perf_counter()
    result = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, env=env)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr.decode(errors='replace')}")
    return elapsed


IMPORT_LINE = re.compile(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|( *)(\S+)")


def import_times(argv: Sequence[str], runs: int) -> list[tuple[str, int, float]]:
    """(module, nesting depth, median cumulative ms) of -X importtime over `runs` runs, largest first."""
    found: dict[tuple[str, int], list[int]] = {}
    for _ in range(runs):
        argv_x = [sys.executable, "-X", "importtime", *argv]
        result = subprocess.run(argv_x, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        for match in IMPORT_LINE.finditer(result.stderr):
            depth = (len(match[3]) - 1) // 2
            found.setdefault((match[4], depth), []).append(int(match[2]))
    ranked = [(name, depth, statistics.median(us) / 1000) for (name, depth), us in found.items()]
    return sorted(ranked, key=lambda item: -item[2])


@dataclass(frozen=True)
class Control:
    ps: list[float]  # ms, `sandboxd ps --json`
    ps_cached: list[float]  # ms, the same with bytecode cached (PYTHONPYCACHEPREFIX)
    floor: list[float]  # ms, `python -c pass`
    imports: list[tuple[str, int, float]]  # top cumulative imports of ps
    api_up: list[float]  # s, Stack entered through wait_ready
    api_down: list[float]  # s, leaving the block
    api_import: float  # s, import of sandboxd.testing


def ps_latency(stack: Stack, runs: int, pycache: Path) -> tuple[list[float], list[float], list[float], list[tuple[str, int, float]]]:
    """ps --json as the environment is, ps --json with bytecode cached under `pycache`, the floor (ms)."""
    ps_argv = [str(SANDBOXD), "ps", "--json", "-p", stack.name]
    floor_argv = [sys.executable, "-c", "pass"]
    cached_env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    cached_env["PYTHONPYCACHEPREFIX"] = str(pycache)
    try:
        cli("up", "-d", "--wait", "-p", stack.name, str(stack.spec_dir))
        check_ps = json.loads(cli("ps", "--json", "-p", stack.name).stdout)
        if len(check_ps["services"]) != len(stack.paths) or not all(s["ready"] for s in check_ps["services"]):
            problem(f"ps: expected {len(stack.paths)} ready services, got {[(s['name'], s['state']) for s in check_ps['services']]}")
        process_ms(ps_argv)  # warm-up, not counted
        process_ms(ps_argv, cached_env)  # writes the bytecode under `pycache`
        process_ms(floor_argv)
        ps, cached, floor = [], [], []
        for _ in range(runs):
            ps.append(process_ms(ps_argv))
            cached.append(process_ms(ps_argv, cached_env))
            floor.append(process_ms(floor_argv))
        imports = import_times(["-m", "sandboxd", "ps", "--json", "-p", stack.name], IMPORTTIME_RUNS)
        scan_log(stack)
    finally:
        if (RUNTIME_ROOT / stack.name).exists():
            result = cli("down", "-p", stack.name, check=False)
            if result.returncode != 0:
                problem(f"sandboxd down -p {stack.name} exited {result.returncode}: {result.stderr.strip()}")
        ensure_down(stack, f"ps stack {stack.name}")
    return ps, cached, floor, imports


def api_once(stack: Stack, testing: ModuleType) -> tuple[float, float]:
    """(up, down) seconds of one `with Stack(...) as s: s.wait_ready()` under a fresh name."""
    name = f"{stack.name}-{time.monotonic_ns() % 10**9}"
    named = Stack(name, stack.spec_dir, stack.paths)
    api = testing.Stack(stack.spec_dir, name=name)
    try:
        started = time.perf_counter()
        with api:
            api.wait_ready()
            up = time.perf_counter() - started
            scan_log(named)
            leaving = time.perf_counter()
        down = time.perf_counter() - leaving
    finally:
        ensure_down(named, f"API stack {name}")
    return up, down


def control_plane(root: Path, ps_runs: int, api_runs: int) -> Control:
    note(f"  ps --json: {CONTROL_N} services, {ps_runs} runs")
    ps, cached, floor, imports = ps_latency(make_sleep_stack(root, "ps"), ps_runs, root / "pycache")
    note(
        f"  ps --json: median {statistics.median(ps):.1f} ms, bytecode cached {statistics.median(cached):.1f} ms, "
        f"python -c pass {statistics.median(floor):.1f} ms"
    )
    started = time.perf_counter()
    from sandboxd import testing

    api_import = time.perf_counter() - started
    stack = make_sleep_stack(root, "api")
    api_once(stack, testing)  # warm-up, not counted
    ups, downs = [], []
    for rep in range(api_runs):
        time.sleep(0.3)
        up, down = api_once(stack, testing)
        ups.append(up)
        downs.append(down)
        note(f"  API #{rep + 1}: up {up:.3f} s, down {down:.3f} s")
    return Control(ps, cached, floor, imports, ups, downs, api_import)


# ───────────────────────────── report ─────────────────────────────


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def header() -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cores = len(os.sched_getaffinity(0))
    return f"sandboxd bench — {date}, {cpu_model()}, {cores} cores, kernel {platform.release()}, Python {platform.python_version()}"


def fmt_s(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f} s" if value is not None else "—"


def ratio_text(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "—"


def start_table(rows: list[StartRow], reps: int) -> list[str]:
    what = f"median of {reps}" if reps > 1 else "1 run"
    lines = [
        f"parallel start (until all N accept, {what}; stop = SIGINT to exit; launch = sandboxd's own 'launched in')",
        f"  {'N':<5}{'sandboxd':<11}{'baseline':<11}{'ratio':<8}{'stop':<9}{'base stop':<11}{'launch':<10}target",
    ]
    for row in rows:
        s = row.median(row.sandboxd, lambda r: r.seconds)
        b = row.median(row.baseline, lambda r: r.seconds)
        stop_s = row.median(row.sandboxd, lambda r: r.stop_seconds)
        stop_b = row.median(row.baseline, lambda r: r.stop_seconds)
        launch = row.median(row.sandboxd, lambda r: r.launch_all_ms)
        ratio = ratio_text(s, b)
        target = f"≤ {TARGET_RATIO[row.n]:.2f}x" if row.n in TARGET_RATIO else ""
        launch_text = f"{launch:.0f} ms" if launch is not None else "—"
        cells = f"  {row.n:<5}{fmt_s(s):<11}{fmt_s(b):<11}{ratio:<8}{fmt_s(stop_s):<9}{fmt_s(stop_b):<11}{launch_text:<10}"
        lines.append((cells + target).rstrip())
    return lines


def network_table(rows: list[StartRow], reps: int) -> list[str]:
    """Private vs network start, and the network stack's teardown beside the private stop."""
    what = f"median of {reps}" if reps > 1 else "1 run"
    lines = [
        f"services on one network (a veth each) vs private namespaces (until all N accept, {what}; private = the runs above)",
        f"  teardown: gone = SIGINT until sandboxd exited and /run/sandboxd/STACK and {CGROUP_V2}/sandboxd/STACK are gone",
        f"  {'N':<5}{'private':<10}{'network':<10}{'ratio':<8}{'target':<9}{'stop priv':<11}{'stop net':<10}"
        + f"{'gone net':<10}{'beyond':<9}target",
    ]
    lines += [network_line(row) for row in rows]
    if not any(row.n in TARGET_NETWORK_RATIO for row in rows):
        lines.append(f"  (targets at N = {', '.join(map(str, TARGET_NETWORK_RATIO))}: not measured in this run)")
    return lines


def network_line(row: StartRow) -> str:
    private = row.median(row.sandboxd, lambda r: r.seconds)
    network = row.median(row.network, lambda r: r.seconds)
    stop_priv = row.median(row.sandboxd, lambda r: r.stop_seconds)
    stop_net = row.median(row.network, lambda r: r.stop_seconds)
    gone = row.median(row.network, lambda r: r.gone_seconds)
    if len([r for r in row.network if r.gone_seconds is not None]) < len(row.network):
        gone = None  # some run's dirs were never gone: no median of the rest
    beyond = f"{gone - stop_priv:+.2f} s" if gone is not None and stop_priv is not None else "—"
    target = f"≤ {TARGET_NETWORK_RATIO[row.n]:.2f}x" if row.n in TARGET_NETWORK_RATIO else ""
    start = f"  {row.n:<5}{fmt_s(private):<10}{fmt_s(network):<10}{ratio_text(network, private):<8}{target:<9}"
    return start + f"{fmt_s(stop_priv):<11}{fmt_s(stop_net):<10}{fmt_s(gone):<10}{beyond:<9}< {TARGET_TEARDOWN_S:g} s"


def latency_line(latencies: list[float], runs: int) -> str:
    if not latencies:
        return "launch latency: no figures"
    spread = f"min {min(latencies):.1f}, max {max(latencies):.1f}"
    return (
        f"launch latency (request to exec, median of {len(latencies)} of {runs} runs): "
        f"{statistics.median(latencies):.1f} ms ({spread})   target ≤ {TARGET_LATENCY_MS:g} ms"
    )


def memory_lines(mem: Memory) -> list[str]:
    extra = (mem.sandbox_pss_kib - mem.baseline_pss_kib) / MIB
    own = f"sandboxd RSS {mem.rss_kib / MIB:.1f} MiB (PSS {mem.pss_kib / MIB:.1f} MiB)"
    parts = f"{mem.sandbox_pss_kib / MIB:.2f} sandboxed - {mem.baseline_pss_kib / MIB:.2f} baseline, PSS per service"
    per = f"init PSS {mem.init_pss_kib / MIB:.2f} MiB, all-in {extra:.2f} MiB ({parts})"
    return [
        f"memory with {MEMORY_N} running: {own}   target ≤ {TARGET_RSS_MIB:g} MiB",
        f"  per sandbox: {per}   target ≤ {TARGET_PER_SANDBOX_MIB:g} MiB",
    ]


def ms_stats(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ms" if values else "—"


def on_demand_lines(found: OnDemand) -> list[str]:
    def row(label: str, values: list[float], target: str = "") -> str:
        spread = f"{min(values):.2f}–{max(values):.2f}" if values else "—"
        return f"  {label:<40}{ms_stats(values):<11}{len(values):<6}{spread:<14}{target}".rstrip()

    part = statistics.median(found.on_demand) - statistics.median(found.own) if found.on_demand and found.own else None
    part_text = f"{part:.2f} ms" if part is not None else "—"
    return [
        f"first connection (connect to first byte, median; program: {' '.join(FIRST_COMMAND)} on a unix socket)",
        f"  {'case':<40}{'median':<11}{'runs':<6}{'min–max ms':<14}target",
        row("on-demand, first connection (fresh up)", found.on_demand),
        row("already running (eager)", found.eager),
        row("program's own start, no sandbox", found.own),
        f"  {'sandboxd part (on-demand - own start)':<40}{part_text:<31}≤ {TARGET_ON_DEMAND_MS:g} ms",
    ]


def accept_lines(runs: list[AcceptRun], seconds: float) -> list[str]:
    what = f"sh -c 'echo ok >&3' on a unix socket, max_connections {ACCEPT_MAX_CONNECTIONS}, up to {seconds:g} s a phase"
    lines = [
        f"accept mode (connections per second, a sandbox and cgroup of its own each; {what})",
        f"  {'clients':<9}{'answered':<10}{'failed':<8}{'seconds':<9}{'per second':<12}{'peak cgroups':<14}target",
    ]
    for run in runs:
        peak = str(run.peak_cgroups) if run.peak_cgroups is not None else "—"
        target = f"≥ {TARGET_ACCEPT_RATE[run.clients]:g}/s" if run.clients in TARGET_ACCEPT_RATE else ""
        rate = f"{run.rate:.0f}/s"
        lines.append(f"  {run.clients:<9}{run.answered:<10}{run.failed:<8}{run.seconds:<9.2f}{rate:<12}{peak:<14}{target}".rstrip())
    lines.append(f"  (for comparison: {ACCEPT_COMPARISON})")
    return lines


def control_lines(found: Control) -> list[str]:
    def spread(values: list[float]) -> str:
        return f"{min(values):.1f}–{max(values):.1f}" if values else "—"

    def med(values: list[float], unit: str = "ms", digits: int = 1) -> str:
        return f"{statistics.median(values):.{digits}f} {unit}" if values else "—"

    totals = [u + d for u, d in zip(found.api_up, found.api_down)]
    lines = [
        f"control plane ({CONTROL_N} services `sleep 1000`, a unix socket each; whole processes, wall clock)",
        f"  {'case':<40}{'median':<11}{'runs':<6}{'min–max ms':<14}target",
        f"  {'sandboxd ps --json -p NAME':<40}{med(found.ps):<11}{len(found.ps):<6}{spread(found.ps):<14}≤ {TARGET_PS_MS:g} ms",
        f"  {'  the same, bytecode cached (*)':<40}{med(found.ps_cached):<11}{len(found.ps_cached):<6}"
        + f"{spread(found.ps_cached):<14}≤ {TARGET_PS_MS:g} ms",
        f"  {'python -c pass (the floor)':<40}{med(found.floor):<11}{len(found.floor):<6}{spread(found.floor):<14}",
        f"  (*) PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r} here: with it set, an editable checkout"
        + " without __pycache__",
        "      compiles sandboxd's modules on every run; cached = PYTHONPYCACHEPREFIX in a temporary dir, as an install has it",
        f"  ps imports (-X importtime, environment as is, median of {IMPORTTIME_RUNS}, top {IMPORTTIME_TOP} cumulative;"
        + " depth 0 = top level):",
    ]
    lines += [f"    {ms:6.1f} ms  {'  ' * depth}{name} (depth {depth})" for name, depth, ms in found.imports[:IMPORTTIME_TOP]]
    lines += [
        f"  Python API: with Stack(...) as s: s.wait_ready(), then leaving the block (median of {len(totals)})",
        f"  {'up':<10}{'down':<10}{'total':<10}{'min–max total':<16}target",
        f"  {med(found.api_up, 's', 2):<10}{med(found.api_down, 's', 2):<10}{med(totals, 's', 2):<10}"
        + (f"{min(totals):.2f}–{max(totals):.2f} s" if totals else "—").ljust(16)
        + f"< {TARGET_API_S:g} s",
        f"  (import of sandboxd.testing, pytest included, once, not counted: {found.api_import * 1000:.0f} ms)",
    ]
    return lines


def leftovers() -> list[str]:
    places = dict.fromkeys([RUNTIME_ROOT, CGROUP_V2 / "sandboxd", own_cgroup() / "sandboxd"])
    return [str(path) for path in places if path.exists()]


# ───────────────────────────── main ─────────────────────────────


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N = 10 and 50 only, 1 repetition, 5 latency runs, 3 on-demand runs, 2 s accept-mode phases, 2 API runs",
    )
    parser.add_argument("--sizes", help="comma-separated service counts (default 10,50,100)")
    parser.add_argument("--reps", type=int, help="repetitions of each parallel start (default 3)")
    parser.add_argument("--latency-runs", type=int, help="runs of the 1-service stack (default 15)")
    parser.add_argument("--only", choices=["userns"], help="run this section alone")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([10, 50] if args.quick else [10, 50, 100])
    args.reps = args.reps or (1 if args.quick else 3)
    args.latency_runs = args.latency_runs or (5 if args.quick else 15)
    args.on_demand_runs = 3 if args.quick else 10
    args.eager_runs = 20 if args.quick else 50
    args.accept_seconds = 2.0 if args.quick else 5.0
    args.accept_budgets = {1: 200, ACCEPT_CLIENTS: 800} if args.quick else {1: 500, ACCEPT_CLIENTS: 2000}
    args.ps_runs = 20
    args.api_runs = 2 if args.quick else 5
    return args


def bench(args: argparse.Namespace, root: Path) -> list[str]:
    import bench_userns  # section 10: what the default user namespace costs per launch

    if args.only == "userns":
        note("user namespaces: launches with and without, alternating")
        return [header(), *bench_userns.userns_section(root, args.quick, problem)]
    logs = root / "logs"
    stacks = {n: make_stack(root, n) for n in sorted({*args.sizes, 1, MEMORY_N})}
    net_stacks = {n: make_stack(root, n, network=True) for n in args.sizes}
    warm = min(args.sizes)
    note(f"warm-up (N={warm}, not counted)")
    start_sandboxd(stacks[warm], logs)
    start_baseline(stacks[warm], logs)
    start_sandboxd(net_stacks[warm], logs)
    rows = []
    for n in args.sizes:
        note(f"parallel start, N={n}")
        rows.append(parallel_start(stacks[n], net_stacks[n], args.reps, logs))
    note(f"launch latency, {args.latency_runs} runs")
    latencies = launch_latency(stacks[1], args.latency_runs, logs)
    note(f"memory, N={MEMORY_N}")
    mem = memory(stacks[MEMORY_N], logs)
    note(f"first connection: on-demand and own start, {args.on_demand_runs} runs; eager, {args.eager_runs} connections")
    first = on_demand(root, args.on_demand_runs, args.eager_runs, logs)
    note(f"accept mode: 1 client, then {ACCEPT_CLIENTS}, up to {args.accept_seconds:g} s each")
    accepted = accept_mode(root, args.accept_seconds, args.accept_budgets, logs)
    note(f"control plane: ps --json, {args.ps_runs} runs; Python API up and down, {args.api_runs} runs")
    control = control_plane(root, args.ps_runs, args.api_runs)
    import bench_real  # sections 8 and 9: the proxy and images (see its docstring)

    note("proxy overhead: nginx direct vs through the proxy, ab")
    proxy = bench_real.proxy_section(root, args.quick, problem)
    note("images: build and launch on an image")
    image = bench_real.image_section(root, args.quick, problem)
    note("user namespaces: launches with and without, alternating")
    userns = bench_userns.userns_section(root, args.quick, problem)
    tables = [*start_table(rows, args.reps), *network_table(rows, args.reps)]
    return [
        header(),
        *tables,
        latency_line(latencies, args.latency_runs),
        *memory_lines(mem),
        *on_demand_lines(first),
        *accept_lines(accepted, args.accept_seconds),
        *control_lines(control),
        *proxy,
        *image,
        *userns,
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench needs root (sandboxd up creates namespaces and cgroups)", file=sys.stderr)
        return 2
    if before := leftovers():
        note(f"note: present before the bench started (another stack running?): {', '.join(before)}")
    root = Path(tempfile.mkdtemp(prefix="sbdbench-"))
    try:
        lines = bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(lines))
    after = leftovers()
    print(f"leftovers: {', '.join(after) if after else 'none'} (/run/sandboxd, the sandboxd cgroup)")
    if problems:
        print("problems seen:")
        print("\n".join(f"  - {p}" for p in problems))
    if odd_lines:
        print("sandboxd stderr lines worth a look (numbers folded to N):")
        print("\n".join(f"  {count}x {line}" for line, count in sorted(odd_lines.items(), key=lambda item: -item[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
