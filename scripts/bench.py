"""Benchmark sandboxd against the same services without isolation and under its peers, in one invocation.

This is a benchmark, not a test: it prints figures, ratios and the targets beside them, and
asserts nothing. It needs root, as `sandboxd up` does. Standard library only. The peers
(bubblewrap, unshare(1), nsjail, systemd-socket-activate) and exactly how each is run:
scripts/bench_peers.py; a peer that is not installed is left out, and said so.

What is measured, and how:

1. Parallel start, side by side. For each N (10, 50, 100, 1000) a temporary spec folder gets N
   services, each `python3 /b/svc.py` (the folder mounted read-only at /b) fed by its own unix
   socket unit. svc.py sleeps 0.2 s, then accepts on its socket and sends every client one byte.
   From N = 1000 (SMALL_FROM) the program is `perl /b/svc.pl` instead, the same steps in perl
   (Debian's perl-base, always installed; measured by hand on the development machine, one copy
   alone: 3.1 MiB PSS against 5.1 MiB for python3 with svc.py's imports, and a whole `perl -e 1`
   2.4 ms against 27 ms), so that 1000 of them fit beside the other work on the machine; every
   tool runs the same program at a given N. The clock starts just before `sandboxd up DIR` is
   spawned and stops when all N sockets have delivered their byte to a client: the client connects
   as soon as a socket file exists (checked with a stat every 2 ms; a connect failing with
   ECONNREFUSED/EAGAIN is retried as often) and waits for the bytes with selectors. Then sandboxd
   gets SIGINT; the time until it exits is the "stop" figure, and it must exit 0. At the moment
   all answered, the CPU time of `sandboxd up` and its fork server is read: "cpu/svc" is their sum
   / N, sandboxd's start-up included (every `sandboxd up` of the bench runs with its bytecode
   cached, PYTHONPYCACHEPREFIX a temporary dir, as an install has it: an editable checkout under
   PYTHONDONTWRITEBYTECODE=1 would compile all of sandboxd at every start). "cpu/launch" is the
   rise of that sum from one N to the next over the rise of N: what one more service costs them,
   the start-up excluded (the figure the issue's 1 ms target is for). Of each, the larger of two lower bounds is taken: utime +
   stime + cutime + cstime (the children it reaped) from /proc/PID/stat, which counts whole ticks
   (10 ms here) and rounds each field down, and the run time of its live threads from
   /proc/PID/task/*/schedstat, to the nanosecond but without ended threads and reaped children.
   "init/svc" is the run time (schedstat) of the sandboxes' inits (the children of the fork
   server: the set-up, then sbd-setup as the init) / N. Baseline ("no isolation") and
   peers: bench_peers.LAUNCHER, a small Python launcher spawned the same way (so every tool pays
   one interpreter start), binds the N sockets itself and starts the N programs one after another,
   each with its socket at fd 3 (SVC_FD=3, LISTEN_FDS=1, LISTEN_FDNAMES, not LISTEN_PID: svc.py
   does not read it), under nothing for the baseline, else under bwrap, unshare or nsjail; same
   clock, same client. Each peer's launcher is stopped by killing what runs below each wrapper
   (its stop is not timed), and every process that was below it must be gone afterwards. Each
   round runs baseline, sandboxd, bubblewrap, unshare, nsjail, then sandboxd on a network (see 2),
   with a pause of 0.3 s + 1 ms per service after each run (the kernel frees network namespaces in
   the background, 1000 of them take a while); the median of the rounds is reported, after one
   unrecorded warm-up of each (page cache). Two tables: sandboxd against the baseline (with stop,
   sandboxd's own "launched in", cpu/svc and init/svc), and every tool side by side with its ratio
   to no isolation and sandboxd's ratio to it, and to the fastest isolating peer. The services run
   the same interpreter in all: the one found on the PATH sandboxd gives its sandboxes. Before an
   N runs, the bench checks that the host has room for it (RLIMIT_NOFILE, which it raises for
   itself and its children, pid_max and threads-max against the tasks running, MemAvailable); an N
   without room is left out, and said so.
2. Services on a network, and teardown. In each round of 1 up to N = 100 (NETWORK_MAX_N), after
   the peers, the same N services are brought up once more, all attached to one `kind: network`
   unit `net` (each gets a veth into the network's bridge; the sockets stay unix sockets bound on
   the host, so the clients and the "until all accept" clock are the same). Reported beside the
   private run of 1 (every service in a network namespace of its own, no link), with the ratio
   network/private. Teardown:
   the clock starts at the SIGINT to sandboxd and stops when sandboxd has exited and both its
   runtime dir (/run/sandboxd/STACK) and its cgroup dir (CGROUP/sandboxd/STACK) are gone, polled
   every 2 ms for up to 5 s ("gone"); it is taken for every sandboxd run and reported for the
   network runs, beside the private runs' stop (SIGINT to exit), a stand-in for the services' own
   stop time; "beyond" is the difference.
3. Launch latency (request to exec): sandboxd prints `N services launched in T ms, median
   launch M ms` on stderr; a 1-service stack is brought up and stopped repeatedly and the median
   of M is reported. Beside it, whole processes, spawn to reaped (subprocess.run, output
   captured), 3 of each after every one of those runs, after one unrecorded warm-up: /bin/true,
   `unshare -fpmnui --mount-proc /bin/true`, bwrap and `nsjail -Mo` with the isolation options of
   1 running /bin/true; with sandboxd's median over each one's. (sandboxd's figure is its own
   clock from the launch request to the exec; theirs includes the spawn, the exec of /bin/true
   and its exit: they are not the same span, the issue's target compares them as they are.)
4. Memory with 100 services running (sandboxd, then separately the baseline and each peer, each
   until all 100 accept, then after a 1 s settle): sandboxd's own RSS (VmRSS) and PSS
   (smaps_rollup), of `sandboxd up` (the supervisor) and of its fork server (its direct child, a
   fork of it that is pid 1 of a pid namespace of its own) each, and both
   together. Extra memory per sandbox: the mean PSS of the sandbox inits (sbd-setup, the children
   of the fork server), and the sum of PSS of every process in the stack's service cgroups / N
   minus the sum of PSS of the baseline's N programs / N; for each peer, the sum of PSS of every
   process below its launcher (its wrappers and the programs) / N minus the same baseline.
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
6. Connections per second in accept mode, one sandbox per connection, side by side. sandboxd:
   a service fed by a tcp socket on 127.0.0.1 with `accept: true`, `max_connections: 64`, its
   program `sh -c 'echo ok >&3'` (each connection gets a sandbox and a cgroup of its own, the
   connection at fd 3, and the answer "ok"). Beside it, at the same time, each on a port of its
   own: `nsjail -Ml` and `systemd-socket-activate --inetd -a` with bwrap, running
   `sh -c 'echo ok'` with the connection as stdin and stdout (bench_peers.accept_argv); all
   three servers run through the whole section. Clients connect over tcp, read until EOF and
   close (each answer must be "ok\n"), one client sequentially, then 8 client threads at once,
   each phase for a fixed time or a number of connections, whichever comes first; rate =
   answered connections / seconds from the first connect to the last EOF. After 20 unrecorded
   connections to each, every round runs, per client count, one phase against sandboxd, nsjail,
   systemd-socket-activate in turn; medians of the rounds. During sandboxd's concurrent phases
   the stack's cgroup dir is polled for per-connection cgroups (the most seen at once is
   reported), and afterwards none may remain; nor may any peer's per-connection process.

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
11. The cost per sandbox of the ways to run its set-up (a fork of the fork server's heap and the
    Python walk, the exec of the static interpreter, a vfork): see scripts/bench_setup.py.
12. sandboxd's own start-up (exec to its first launch request, N = 10 and 100) and the control
    verbs ls, ps --json and down, beside `python -c pass`: see scripts/bench_startup.py.

Every sandboxd's stderr is scanned for lines that look like trouble (tracebacks, errors, "could
not", warnings, SIGKILL); every line a peer or its launcher writes on stderr is kept too, the
tool's name in front; they are listed at the end, numbers folded, with a count.

`--only SECTIONS` runs some of these (start = 1 and 2, latency, memory, on-demand, accept,
control, proxy, images, userns, setup, startup; peers = start, latency, memory, accept); --quick runs N = 10 and 50
only.

Every process started is stopped in a finally (SIGINT, then SIGKILL after 30 s), only by its
pid (a launcher or peer that did not exit 0 also by its own process group); temporary folders are
removed. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import resource
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import bench_peers as peers  # scripts/ is on sys.path: this file runs as a script

SANDBOXD = Path(sys.executable).parent / "sandboxd"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what a sandbox gets
SERVICE_PYTHON = shutil.which("python3", path=SANDBOX_PATH) or "/usr/bin/python3"
SERVICE_PERL = shutil.which("perl", path=SANDBOX_PATH) or "/usr/bin/perl"
RUNTIME_ROOT = Path("/run/sandboxd")
CGROUP_V2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() else Path("/sys/fs/cgroup")

STOP_GRACE = 30.0  # SIGINT, then SIGKILL after this long
READY_TIMEOUT = 120.0
CONNECT_RETRY = 0.002
WATCH_EVERY = 2.0  # how often a launcher's programs are checked while the clients wait (1000 reads of /proc)
SETTLE = 1.0  # before reading memory figures
MEMORY_N = 100
MIB = 1024.0
SMALL_FROM = 1000  # from this N on, every tool runs the small service (svc.pl) instead of svc.py
NETWORK_MAX_N = 100  # the network variant of the parallel start runs up to this N
NOFILE_WANTED = 65536  # RLIMIT_NOFILE the bench asks for itself (sandboxd and the launchers inherit it)
FDS_PER_SERVICE = 8  # what a parallel start may hold open per service in one process, at most (a guess with room)
TASKS_PER_SERVICE = 4  # processes a parallel start runs per service, at most (bwrap: 3)
MEMORY_PER_SERVICE_KIB = 8 * 1024  # MemAvailable wanted per service before a parallel start
TRUE_PER_ROUND = 3  # whole-process runs of each peer per launch-latency run
PAUSE_S, PAUSE_PER_SERVICE_S = 0.3, 0.001  # between two parallel starts: 0.3 s, 1.3 s at N = 1000

GONE_TIMEOUT = 5.0  # after sandboxd exited, for its runtime and cgroup dirs to vanish
GONE_POLL = 0.002

TARGET_RATIO = {50: 1.10}
TARGET_PEER_RATIO = {50: 1.00, 100: 1.00}  # sandboxd / the best isolating peer
TARGET_NONE_RATIO = {1000: 1.20}  # sandboxd / no isolation, in the side-by-side table
TARGET_CPU_MS = 1.0  # the supervisor's CPU per launched service
TARGET_NETWORK_RATIO = {100: 1.30}  # network / private
TARGET_TEARDOWN_S = 1.0  # gone (network) beyond stop (private)
TARGET_LATENCY_MS = 9.0
TARGET_RSS_MIB = 30.0  # sandboxd's own (supervisor and fork server), with MEMORY_N services
TARGET_PER_SANDBOX_MIB = 0.2
TARGET_ON_DEMAND_MS = 15.0  # on-demand first connection minus the program's own start
TARGET_ACCEPT_RATIO = 1.00  # sandboxd's connections/s over nsjail -Ml's, both client counts

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
ACCEPT_WARM_UP = 20  # connections to each accept-mode server before the rounds, not counted

SUMMARY = re.compile(r"services? launched in (\d+) ms(?:, median launch ([0-9.]+) ms)?")

SVC = """\
import os, socket, time
time.sleep(0.2)
sock = socket.socket(fileno=int(os.environ.get("SVC_FD", "3")))
while True:
    conn, _ = sock.accept()
    conn.sendall(b"!")
    conn.close()
"""

SVC_SMALL = """\
select(undef, undef, undef, 0.2);
open(my $sock, "+<&=", $ENV{SVC_FD} // 3) or die "svc.pl: fd: $!";
while (accept(my $conn, $sock)) { syswrite($conn, "!"); close($conn); }
die "svc.pl: accept: $!";
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
    small: bool = False  # the services run svc.pl (perl) instead of svc.py

    @property
    def script(self) -> Path:
        return self.spec_dir / ("svc.pl" if self.small else "svc.py")

    @property
    def interpreter(self) -> str:
        """The program's interpreter outside sandboxd (sandboxd finds the same one on its PATH)."""
        return SERVICE_PERL if self.small else SERVICE_PYTHON


def make_stack(root: Path, n: int, network: bool = False) -> Stack:
    """A spec folder of n services s0..s{n-1}, each fed by the socket root/sock-n/sI.sock.

    With `network`, a network unit `net` too, and every service attached to it (a veth each).
    From SMALL_FROM services on, the program is svc.pl instead of svc.py.
    """
    tag = f"net-{n}" if network else str(n)
    small = n >= SMALL_FROM
    spec_dir, sock_dir = root / f"stack-{tag}", root / f"sock-{tag}"
    spec_dir.mkdir()
    sock_dir.mkdir()
    (spec_dir / "svc.py").write_text(SVC)
    (spec_dir / "svc.pl").write_text(SVC_SMALL)
    command = "perl /b/svc.pl" if small else "python3 /b/svc.py"
    attach = "network: [net]\n" if network else ""
    if network:
        (spec_dir / "net.yaml").write_text("kind: network\nname: net\n")
    paths = []
    for i in range(n):
        path = f"{sock_dir}/s{i}.sock"
        paths.append(path)
        (spec_dir / f"s{i}.yaml").write_text(
            f"kind: service\ncommand: {command}\nmounts: [{{source: ., target: /b}}]\n{attach}"
            f"---\nkind: socket\nlisten: unix:{path}\n"
        )
    return Stack(f"sbdbench-{tag}", spec_dir, tuple(paths), network, small)


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


def spawn(kind: str, argv: Sequence[str], logs: Path, extra_env: dict[str, str] | None = None) -> Running:
    """Start argv in a session of its own, stdin from /dev/null, output to files in `logs`."""
    logs.mkdir(exist_ok=True)
    stamp = f"{kind}-{time.monotonic_ns()}"
    env = {**os.environ, "NO_COLOR": "1", "PATH": SANDBOX_PATH, **(extra_env or {})}
    with open(logs / f"{stamp}.out", "wb") as out, open(logs / f"{stamp}.err", "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True)
    return Running(kind, proc, started, logs / f"{stamp}.err")


def spawn_sandboxd(stack: Stack, logs: Path) -> Running:
    """`sandboxd up` of the stack, its bytecode cached as an install has it (installing compiles
    it): under PYTHONDONTWRITEBYTECODE=1 an editable checkout without __pycache__ would compile
    every module of sandboxd at every start, which its CPU and start-up figures would count."""
    cache = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(logs.parent / "pycache")}
    return spawn("sandboxd", [str(SANDBOXD), "up", str(stack.spec_dir), "-p", stack.name], logs, cache)


def spawn_launcher(tool: str, stack: Stack, logs: Path) -> Running:
    """The launcher of bench_peers: binds the stack's sockets, starts its N programs under `tool`
    ("none": without isolation, the baseline), each with its socket at fd 3."""
    launcher = logs.parent / "launcher.py"
    if not launcher.exists():
        launcher.write_text(peers.LAUNCHER)
    argv = peers.service_argv(tool, stack.interpreter, stack.script)
    stop_mode = "term" if tool == "none" else "kill-inside"
    kind = "baseline" if tool == "none" else tool
    return spawn(kind, [SERVICE_PYTHON, str(launcher), json.dumps(argv), stop_mode, *stack.paths], logs)


def spawn_baseline(stack: Stack, logs: Path) -> Running:
    return spawn_launcher("none", stack, logs)


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
    if run.kind != "sandboxd" and code != 0:
        kill_group(run.proc.pid)  # a launcher or peer that could not reap its programs: kill them by its group
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
    if not os.path.lexists(path):
        return None  # not bound yet: a stat is cheaper than a socket and a failed connect, times N
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
        sock.close()
        return None
    return sock


def wait_accepting(run: Running, paths: Sequence[str], watch: Callable[[], None] | None = None) -> float:
    """Seconds from the spawn of `run` until every socket in `paths` has sent a client its byte.

    `watch`, called every WATCH_EVERY s while waiting, raises to give up early."""
    selector = selectors.DefaultSelector()
    pending, remaining = list(paths), len(paths)
    deadline = run.started + READY_TIMEOUT
    watched = time.monotonic()
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
            if watch is not None and time.monotonic() - watched > WATCH_EVERY:
                watch()
                watched = time.monotonic()
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


# ───────────────────────────── /proc ─────────────────────────────

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: index 0 is field 3 (state) of proc(5)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, all its threads, and cutime + cstime (the children it has waited
    for), each in whole clock ticks (1/CLK_TCK s)."""
    fields = stat_fields(pid)
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS


def run_seconds(pid: int) -> float:
    """Time the live threads of `pid` have run on a CPU, to the nanosecond (schedstat): not the
    threads that have ended, nor reaped children, but without cpu_seconds' rounding."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except FileNotFoundError:
            continue
    return total / 1e9


def own_cpu_seconds(pid: int) -> float:
    """The CPU time of `pid`, the larger of two lower bounds: cpu_seconds, each field rounded
    down to a tick (up to 40 ms low here), and run_seconds, exact but for ended threads and
    reaped children."""
    return max(cpu_seconds(pid), run_seconds(pid))


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time): a process that is still this one, not a reuse of its pid."""
    try:
        return pid, int(stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(who: tuple[int, int]) -> bool:
    return identity(who[0]) == who


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
    """The children of every thread of `parent` (/proc/PID/task/TID/children)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            found += [int(pid) for pid in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def descendants(parent: int) -> list[int]:
    found: list[int] = []
    todo = [parent]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def is_fork_server(pid: int, sandboxd: int) -> bool:
    """A child of sandboxd that is its fork server: a fork of it (the same command line) that is
    pid 1 of a pid namespace of its own (sandboxd.sandbox.handle.ForkServer.start)."""
    if cmdline(pid) != cmdline(sandboxd):
        return False
    status = Path(f"/proc/{pid}/status").read_text()
    nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
    return len(nspid) > 1 and nspid[-1] == "1"


def sandboxd_processes(run: Running) -> list[int]:
    """`sandboxd up` and its fork server: sandboxd's own processes."""
    return [run.proc.pid, *(c for c in children(run.proc.pid) if is_fork_server(c, run.proc.pid))]


def cgroup_pids(stack: Stack) -> list[int]:
    pids = []
    for procs in sorted(instance_cgroup(stack).glob("*/cgroup.procs")):
        pids += [int(p) for p in procs.read_text().split()]
    return pids


def tasks_now() -> int:
    """Tasks (threads included) on the machine now: the 4th field of /proc/loadavg."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE (sandboxd and the launchers inherit it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    for wanted in (max(hard, min(NOFILE_WANTED, nr_open)), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            continue
    return soft


def room_for(n: int) -> str | None:
    """Why a parallel start of n services would hit a limit of this host, or None if it fits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < FDS_PER_SERVICE * n + 256:
        return f"RLIMIT_NOFILE is {nofile}, below {FDS_PER_SERVICE * n + 256}"
    tasks_max = min(int(Path("/proc/sys/kernel/pid_max").read_text()), int(Path("/proc/sys/kernel/threads-max").read_text()))
    if tasks_now() + TASKS_PER_SERVICE * n + 1000 > tasks_max:
        return f"{tasks_now()} tasks running, {TASKS_PER_SERVICE * n} more would come near the limit of {tasks_max}"
    available = meminfo_kib("MemAvailable")
    if available < MEMORY_PER_SERVICE_KIB * n:
        return f"MemAvailable {available // 1024} MiB, below {MEMORY_PER_SERVICE_KIB * n // 1024} MiB"
    return None


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ───────────────────────────── parallel start ─────────────────────────────


@dataclass(frozen=True)
class StartRun:
    seconds: float
    stop_seconds: float
    launch_all_ms: float | None = None
    gone_seconds: float | None = None  # SIGINT until exited and the stack's dirs are gone
    supervisor_cpu: float | None = None  # s, sandboxd up and its fork server, until all answered
    init_cpu: float | None = None  # s, all sandbox inits (the set-up, then sbd-setup as the init)
    server_cpu: float | None = None  # s, the fork server's part of supervisor_cpu (with the spawners it reaped)


def start_sandboxd(stack: Stack, logs: Path) -> StartRun:
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        seconds = wait_accepting(run, stack.paths)
        own = sandboxd_processes(run)
        cpus = [own_cpu_seconds(pid) for pid in own]
        supervisor_cpu, server_cpu = sum(cpus), sum(cpus[1:])
        init_cpu = sum(run_seconds(pid) for server in own[1:] for pid in children(server))
        if len(own) != 2:
            problem(f"expected sandboxd and one fork server, found pids {own}")
        try:
            match: re.Match[str] | None = wait_summary(run)  # with many services it may come after the last answer
        except TimeoutError:
            match = None
        stop_seconds, code = stop(run)
        after_exit = wait_gone(stack)
    gone = stop_seconds + after_exit if after_exit is not None else None
    check_clean_after(stack, code)
    return StartRun(seconds, stop_seconds, float(match[1]) if match else None, gone, supervisor_cpu, init_cpu, server_cpu)


def start_baseline(stack: Stack, logs: Path) -> StartRun:
    with running(lambda: spawn_baseline(stack, logs)) as run:
        seconds = wait_accepting(run, stack.paths)
        stop_seconds, code = stop(run)
    if code != 0:
        problem(f"baseline launcher exited {code}:\n{run.tail()}")
    return StartRun(seconds, stop_seconds)


def start_peer(tool: str, stack: Stack, logs: Path) -> StartRun | None:
    """The launcher with every service under `tool`, until all answered; then stopped, and every
    process that was below it must be gone. None (and a problem) if the peer failed."""
    seconds: float | None = None
    with running(lambda: spawn_launcher(tool, stack, logs)) as run:
        try:
            seconds = wait_accepting(run, stack.paths, lambda: check_programs(run))
        except (RuntimeError, TimeoutError) as e:
            problem(f"{tool}, N={len(stack.paths)}: {e}")
        finally:
            said = len(run.stderr())  # what a wrapper says once its child is killed is not worth a look
            below = [who for pid in descendants(run.proc.pid) if (who := identity(pid)) is not None]
            stop_seconds, code = stop(run)
            check_peer_gone(tool, below)
    if code != 0:
        problem(f"{tool} launcher exited {code}:\n{run.tail()}")
    scan_peer_stderr(tool, run.stderr()[:said])
    return StartRun(seconds, stop_seconds) if seconds is not None else None


def check_programs(run: Running) -> None:
    """A program (or the peer in front of it) of the launcher that has exited is a zombie until
    the launcher's stop: one is enough to say the run failed."""
    for pid in children(run.proc.pid):
        try:
            if stat_fields(pid)[0] == "Z":
                raise RuntimeError(f"pid {pid} ({run.kind}) exited before all answered:\n{run.tail()}")
        except FileNotFoundError:
            continue


def check_peer_gone(tool: str, below: list[tuple[int, int]]) -> None:
    """After a peer's launcher exited: none of the processes that were below it may remain."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while (left := [who for who in below if alive(who)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        problem(f"{tool}: {len(left)} process(es) outlived the launcher; SIGKILL to pids {[pid for pid, _ in left]}")
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def scan_peer_stderr(tool: str, text: str) -> None:
    """A peer's lines worth a look (all it says), with the tool's name in front, among sandboxd's."""
    for line in text.splitlines():
        if line.strip():
            key = f"[{tool}] " + re.sub(r"\d+", "N", line.strip())
            odd_lines[key] = odd_lines.get(key, 0) + 1


@dataclass(frozen=True)
class StartRow:
    n: int
    runs: dict[str, list[StartRun]]  # by tool: "none", "sandboxd", "network" (sandboxd on a network), the peers

    @property
    def sandboxd(self) -> list[StartRun]:
        return self.runs["sandboxd"]

    @property
    def baseline(self) -> list[StartRun]:
        return self.runs["none"]

    @property
    def network(self) -> list[StartRun]:
        return self.runs.get("network", [])

    def median(self, runs: list[StartRun], pick: Callable[[StartRun], float | None]) -> float | None:
        values = [v for v in map(pick, runs) if v is not None]
        return statistics.median(values) if values else None

    def seconds(self, tool: str) -> float | None:
        return self.median(self.runs.get(tool, []), lambda r: r.seconds)


def parallel_start(stack: Stack, net_stack: Stack | None, tools: Sequence[str], reps: int, logs: Path) -> StartRow:
    """Per repetition: baseline, sandboxd (private), each peer, sandboxd with every service on a network."""
    row = StartRow(len(stack.paths), {"none": [], "sandboxd": [], **{tool: [] for tool in tools}})
    pause = PAUSE_S + row.n * PAUSE_PER_SERVICE_S  # the kernel frees the last run's namespaces in the background
    if net_stack is not None:
        row.runs["network"] = []
    for rep in range(reps):
        row.runs["none"].append(start_baseline(stack, logs))
        time.sleep(pause)
        row.runs["sandboxd"].append(start_sandboxd(stack, logs))
        time.sleep(pause)
        this_round: dict[str, StartRun | None] = {}
        for tool in tools:
            this_round[tool] = start_peer(tool, stack, logs)
            if (peer := this_round[tool]) is not None:
                row.runs[tool].append(peer)
            time.sleep(pause)
        if net_stack is not None:
            row.runs["network"].append(start_sandboxd(net_stack, logs))
            time.sleep(pause)
        s, b = row.sandboxd[-1], row.baseline[-1]
        cpu = f", cpu {s.supervisor_cpu * 1000 / row.n:.1f} ms/svc" if s.supervisor_cpu is not None else ""
        others = "".join(f", {tool} {fmt_s(r.seconds, 3) if (r := this_round[tool]) else 'failed'}" for tool in tools)
        net = ""
        if net_stack is not None:
            n = row.network[-1]
            net = f", network {n.seconds:.3f} s (stop {n.stop_seconds:.3f} s, gone {fmt_s(n.gone_seconds, 3)})"
        note(f"  N={row.n} #{rep + 1}: baseline {b.seconds:.3f} s, sandboxd {s.seconds:.3f} s (stop {s.stop_seconds:.3f} s{cpu}){others}{net}")
    return row


# ───────────────────────────── launch latency ─────────────────────────────


@dataclass(frozen=True)
class Latency:
    launches: list[float]  # ms, sandboxd's own median launch, one per 1-service stack
    runs: int
    whole: dict[str, list[float]]  # ms, whole processes by label (bench_peers.TRUE_ARGV)


def launch_latency(stack: Stack, runs: int, logs: Path) -> Latency:
    """Median request→exec of a 1-service stack, as sandboxd reports it, once per run; after each
    run, TRUE_PER_ROUND of each whole-process peer run (spawn to reaped)."""
    whole = {label: argv for label in peers.TRUE_ARGV if (argv := peers.true_argv(label)) is not None}
    for label in peers.TRUE_ARGV:
        if label not in whole:
            problem(f"launch latency: {label} not run, its tool is not installed")
    found = Latency([], runs, {label: [] for label in whole})
    for argv in whole.values():
        process_ms(argv)  # warm-up, not counted
    for _ in range(runs):
        with running(lambda: spawn_sandboxd(stack, logs)) as run:
            match = wait_summary(run)
            _, code = stop(run)
        check_clean_after(stack, code)
        if match[2] is not None:
            found.launches.append(float(match[2]))
        else:
            problem(f"the summary line has no median launch figure: {match[0]!r}")
        for _ in range(TRUE_PER_ROUND):
            for label, argv in whole.items():
                try:
                    found.whole[label].append(process_ms(argv))
                except RuntimeError as e:
                    problem(f"launch latency: {e}")
    return found


# ───────────────────────────── memory ─────────────────────────────


@dataclass(frozen=True)
class Memory:
    rss_kib: int  # sandboxd's own processes
    pss_kib: int
    supervisor_kib: tuple[int, int]  # (RSS, PSS) of `sandboxd up`
    fork_server_kib: tuple[int, int]  # (RSS, PSS) of its fork server
    init_pss_kib: float
    sandbox_pss_kib: float  # all processes of all sandboxes / N
    baseline_pss_kib: float  # the baseline's N programs / N
    peer_pss_kib: dict[str, float]  # tool -> all processes below its launcher / N


def sandboxd_memory(stack: Stack, logs: Path) -> tuple[list[tuple[int, int]], float, float]:
    """[(RSS, PSS) of sandboxd, of its fork server], init PSS, all processes of the sandboxes / N."""
    n = len(stack.paths)
    with running(lambda: spawn_sandboxd(stack, logs)) as run:
        wait_accepting(run, stack.paths)
        time.sleep(SETTLE)
        own = sandboxd_processes(run)
        if len(own) != 2:
            problem(f"expected sandboxd and one fork server, found pids {own}")
        in_sandboxes = cgroup_pids(stack)
        # The fork server's children: the sandboxes' inits (in the stack's cgroups) and its resident
        # spawner (sbd-setup serve, not in them), whose memory is the fork server's to account for.
        below = [pid for server in own[1:] for pid in children(server)]
        inits = [pid for pid in below if pid in in_sandboxes]
        spawners = [pid for pid in below if pid not in in_sandboxes]
        if len(inits) != n or len(spawners) > 1:
            problem(f"expected {n} sandbox inits and at most one spawner under the fork server, found {len(inits)} and {len(spawners)}")
        if len(in_sandboxes) != 2 * n:
            problem(f"expected {2 * n} processes (init and service) in the stack's cgroups, found {len(in_sandboxes)}")
        each = [(status_kib(pid), pss_kib(pid)) for pid in own]
        if len(each) == 2 and spawners:  # the fork server's figure with its spawner's
            each[1] = (each[1][0] + sum(map(status_kib, spawners)), each[1][1] + sum(map(pss_kib, spawners)))
        init_pss = statistics.mean(map(pss_kib, inits)) if inits else float("nan")
        all_pss = sum(map(pss_kib, in_sandboxes)) / n
        _, code = stop(run)
    check_clean_after(stack, code)
    return each, init_pss, all_pss


def launcher_memory(tool: str, stack: Stack, logs: Path) -> float:
    """PSS of every process below the launcher / N: the baseline's programs, or each peer's
    programs with the peer's own processes in front of them."""
    n = len(stack.paths)
    with running(lambda: spawn_launcher(tool, stack, logs)) as run:
        try:
            wait_accepting(run, stack.paths)
            time.sleep(SETTLE)
            pids = children(run.proc.pid) if tool == "none" else descendants(run.proc.pid)
            if tool == "none" and len(pids) != n:
                problem(f"expected {n} baseline programs, found {len(pids)}")
            per = sum(map(pss_kib, pids)) / n
        finally:
            below = [who for pid in descendants(run.proc.pid) if (who := identity(pid)) is not None]
            stop(run)
            check_peer_gone(tool, below)
    return per


def memory(stack: Stack, tools: Sequence[str], logs: Path) -> Memory:
    each, init_pss, all_pss = sandboxd_memory(stack, logs)
    time.sleep(0.3)
    baseline = launcher_memory("none", stack, logs)
    found: dict[str, float] = {}
    for tool in tools:
        time.sleep(0.3)
        found[tool] = launcher_memory(tool, stack, logs)
    supervisor = each[0] if each else (0, 0)
    fork_server = each[1] if len(each) > 1 else (0, 0)
    rss, pss = sum(r for r, _ in each), sum(p for _, p in each)
    return Memory(rss, pss, supervisor, fork_server, init_pss, all_pss, baseline, found)


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


def make_accept_stack(root: Path, port: int) -> Stack:
    """One service `sh -c 'echo ok >&3'` fed by a tcp socket on 127.0.0.1:port with accept: true."""
    spec_dir = root / "stack-accept"
    spec_dir.mkdir()
    (spec_dir / "ok.yaml").write_text(
        'kind: service\ncommand: [sh, -c, "echo ok >&3"]\n'
        f"---\nkind: socket\nlisten: tcp:127.0.0.1:{port}\naccept: true\nmax_connections: {ACCEPT_MAX_CONNECTIONS}\n"
    )
    return Stack("sbdbench-accept", spec_dir, ())


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
    peak_cgroups: int | None = None  # per-connection cgroups seen at once (sandboxd's concurrent phase only)
    tool: str = "sandboxd"

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def accept_one(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as sock:
        return read_to_eof(sock)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ClientPhase:
    """Connections to `address` from some client threads until a deadline or a connection budget."""

    def __init__(self, address: tuple[str, int], seconds: float, budget: int) -> None:
        self.address, self.seconds, self.budget = address, seconds, budget
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
                answer = accept_one(self.address)
                error = None if answer == ACCEPT_ANSWER else f"answer {answer!r}"
            except OSError as e:  # socket.timeout included
                error = f"{type(e).__name__}: {e}"
            with self.lock:
                if error is None:
                    self.answered += 1
                else:
                    self.failed += 1
                    self.errors.append(error)

    def run(self, clients: int, tool: str, stack: Stack | None = None) -> AcceptRun:
        """With `stack` (sandboxd's) and more than one client, its per-connection cgroups are counted."""
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        started = time.monotonic()
        self.deadline = started + self.seconds
        for thread in threads:
            thread.start()
        peak: int | None = None
        if clients > 1 and stack is not None:
            peak = 0
            while any(thread.is_alive() for thread in threads):
                peak = max(peak, len(instance_cgroups(stack)))
                time.sleep(0.01)
        hard_deadline = self.deadline + CLIENT_TIMEOUT + 5
        for thread in threads:
            thread.join(max(0.0, hard_deadline - time.monotonic()))
        elapsed = time.monotonic() - started
        if any(thread.is_alive() for thread in threads):
            problem(f"accept mode, {tool}: a client thread still runs {elapsed:.0f} s after the phase began")
        for error in sorted(set(self.errors)):
            problem(f"accept mode, {tool}, {clients} client(s): {self.errors.count(error)} connection(s) failed: {error}")
        return AcceptRun(clients, self.answered, self.failed, elapsed, peak, tool)


def instance_cgroups(stack: Stack) -> list[str]:
    """The per-connection cgroups (SERVICE@N) of the stack now: below their service's cgroup
    (STACK/SERVICE/SERVICE@N, where they share its limits)."""
    found: list[str] = []
    try:
        services = [entry.path for entry in os.scandir(instance_cgroup(stack)) if entry.is_dir()]
    except FileNotFoundError:
        return found
    for service in services:
        try:
            found += [entry.name for entry in os.scandir(service) if "@" in entry.name and entry.is_dir()]
        except FileNotFoundError:
            continue
    return found


def wait_listening(run: Running, port: int, timeout: float = 10.0) -> None:
    """Until a connection to 127.0.0.1:port is accepted (and answered: it runs a sandbox too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            accept_one(("127.0.0.1", port))
            return
        except ConnectionRefusedError:
            check_alive(run)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run.kind}: nothing listens on 127.0.0.1:{port} after {timeout:g} s:\n{run.tail()}") from None
            time.sleep(0.01)


def wait_no_children(tool: str, run: Running) -> None:
    """A peer's per-connection sandboxes must end once the clients are done."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while (left := children(run.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        problem(f"accept mode, {tool}: {len(left)} per-connection process(es) still there {GONE_TIMEOUT:g} s after the last client")


def accept_mode(root: Path, seconds: float, budgets: dict[int, int], rounds: int, tools: Sequence[str], logs: Path) -> list[AcceptRun]:
    """sandboxd and each accept-mode peer serve at once, each on a port of its own; per round and
    client count, one phase against each in turn."""
    ports = {tool: free_port() for tool in ("sandboxd", *tools)}
    stack = make_accept_stack(root, ports["sandboxd"])
    quiet = {"SYSTEMD_LOG_LEVEL": "warning"}  # systemd-socket-activate: no line per connection
    results = []
    with ExitStack() as servers:
        sandboxd = servers.enter_context(running(lambda: spawn_sandboxd(stack, logs)))
        wait_summary(sandboxd)
        time.sleep(ON_DEMAND_SETTLE)
        runs = {"sandboxd": sandboxd}
        for tool in tools:
            argv = peers.accept_argv(tool, ports[tool])
            runs[tool] = servers.enter_context(running(functools.partial(spawn, f"accept-{tool}", argv, logs, quiet)))
            wait_listening(runs[tool], ports[tool])
        for tool, port in ports.items():
            ClientPhase(("127.0.0.1", port), seconds, ACCEPT_WARM_UP).run(1, tool)  # warm-up, not counted
        for round_ in range(rounds):
            for clients, budget in budgets.items():
                for tool, port in ports.items():
                    time.sleep(0.3)
                    result = ClientPhase(("127.0.0.1", port), seconds, budget).run(clients, tool, stack if tool == "sandboxd" else None)
                    results.append(result)
                    check_alive(runs[tool])
                    peak = f", at most {result.peak_cgroups} per-connection cgroups at once" if result.peak_cgroups is not None else ""
                    note(
                        f"  #{round_ + 1} {tool}, {clients} client(s): {result.answered} answered, {result.failed} failed"
                        f" in {result.seconds:.2f} s, {result.rate:.0f}/s{peak}"
                    )
        deadline = time.monotonic() + GONE_TIMEOUT
        while (remaining := instance_cgroups(stack)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if remaining:
            problem(f"accept mode: {len(remaining)} per-connection cgroups still there {GONE_TIMEOUT:g} s after the last client")
        _, code = stop(sandboxd)
        for tool in tools:
            wait_no_children(tool, runs[tool])
            _, peer_code = stop(runs[tool])
            scan_peer_stderr(tool, runs[tool].stderr())
            if peer_code not in (0, -signal.SIGINT):
                problem(f"accept mode, {tool} exited {peer_code} after SIGINT:\n{runs[tool].tail()}")
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
        "  cpu/svc = CPU of sandboxd up and its fork server until all N answered, start-up included (bytecode cached), / N;",
        f"  cpu/launch = what one more service costs them: the rise of that CPU from the row above, / the rise of N (start-up excluded; target ≤ {TARGET_CPU_MS:g} ms),",
        "    and in brackets the supervisor's part + the fork server's (with the spawners it reaped);",
        "  init/svc = run time of the sandboxes' inits by then (the set-up, then sbd-setup as the init) / N",
        f"  {'N':<6}{'sandboxd':<11}{'baseline':<11}{'ratio':<8}{'stop':<9}{'base stop':<11}{'launch':<10}{'cpu/svc':<10}{'cpu/launch':<24}{'init/svc':<10}target",
    ]
    before: tuple[int, float, float] | None = None  # (N, CPU, the fork server's part) of the row above
    for row in rows:
        s = row.median(row.sandboxd, lambda r: r.seconds)
        b = row.median(row.baseline, lambda r: r.seconds)
        stop_s = row.median(row.sandboxd, lambda r: r.stop_seconds)
        stop_b = row.median(row.baseline, lambda r: r.stop_seconds)
        launch = row.median(row.sandboxd, lambda r: r.launch_all_ms)
        cpu = row.median(row.sandboxd, lambda r: r.supervisor_cpu)
        init = row.median(row.sandboxd, lambda r: r.init_cpu)
        ratio = ratio_text(s, b)
        target = f"≤ {TARGET_RATIO[row.n]:.2f}x" if row.n in TARGET_RATIO else ""
        launch_text = f"{launch:.0f} ms" if launch is not None else "—"
        cpu_text = f"{cpu * 1000 / row.n:.2f} ms" if cpu is not None else "—"
        server = row.median(row.sandboxd, lambda r: r.server_cpu)
        marginal = "—"
        if cpu is not None and server is not None and before is not None:
            per = [(now - then) * 1000 / (row.n - before[0]) for now, then in ((cpu, before[1]), (cpu - server, before[1] - before[2]), (server, before[2]))]
            marginal = f"{per[0]:.2f} ms ({per[1]:.2f}+{per[2]:.2f})"
        before = (row.n, cpu, server) if cpu is not None and server is not None else None
        init_text = f"{init * 1000 / row.n:.2f} ms" if init is not None else "—"
        cells = f"  {row.n:<6}{fmt_s(s):<11}{fmt_s(b):<11}{ratio:<8}{fmt_s(stop_s):<9}{fmt_s(stop_b):<11}{launch_text:<10}"
        lines.append((cells + f"{cpu_text:<10}{marginal:<24}{init_text:<10}" + target).rstrip())
    return lines


def peers_table(rows: list[StartRow], reps: int, tools: Sequence[str], absent: dict[str, str]) -> list[str]:
    """Every tool at every N: its time, over no isolation's, and sandboxd's over it."""
    what = f"median of {reps} rounds" if reps > 1 else "1 round"
    order = " → ".join(peers.LABEL[t] for t in ("none", "sandboxd", *tools))
    lines = [
        f"side by side: the same N services started at once, until every one has answered ({what}; each round {order})",
        f"  program: python3 svc.py; from N = {SMALL_FROM} perl svc.pl; sockets bound first, the socket at fd 3;"
        + " how each peer is run: scripts/bench_peers.py",
        f"  {'N':<6}{'tool':<15}{'time':<10}{'vs none':<9}{'sandboxd ÷ it':<36}target",
    ]
    for row in rows:
        base, ours = row.seconds("none"), row.seconds("sandboxd")
        timed = {tool: row.seconds(tool) for tool in tools}
        best = min((t for t in tools if timed[t] is not None), key=lambda t: timed[t] or 0.0, default=None)
        for index, tool in enumerate(("none", *tools, "sandboxd")):
            seconds = row.seconds(tool)
            n_text = str(row.n) if index == 0 else ""
            over = ratio_text(ours, seconds) if tool != "sandboxd" else ""
            target = ""
            if tool == "sandboxd":
                if best is not None:
                    over = f"{ratio_text(ours, timed[best])} ÷ best peer ({peers.LABEL[best]})"
                if row.n in TARGET_PEER_RATIO:
                    target = f"≤ {TARGET_PEER_RATIO[row.n]:.2f}x ÷ best peer"
                elif row.n in TARGET_NONE_RATIO:
                    target = f"≤ {TARGET_NONE_RATIO[row.n]:.2f}x vs none"
            text = f"  {n_text:<6}{peers.LABEL[tool]:<15}{fmt_s(seconds, 3):<10}{ratio_text(seconds, base):<9}"
            lines.append((text + f"{over:<36}" + target).rstrip())
    for tool, hint in absent.items():
        lines.append(f"  ({peers.LABEL.get(tool, tool)}: not run, not installed: {hint})")
    return lines


def network_table(rows: list[StartRow], reps: int) -> list[str]:
    """Private vs network start, and the network stack's teardown beside the private stop."""
    what = f"median of {reps}" if reps > 1 else "1 run"
    lines = [
        f"services on one network (a veth each) vs private namespaces (until all N accept, {what}; private = the runs above;"
        + f" up to N = {NETWORK_MAX_N})",
        f"  teardown: gone = SIGINT until sandboxd exited and /run/sandboxd/STACK and {CGROUP_V2}/sandboxd/STACK are gone",
        f"  {'N':<5}{'private':<10}{'network':<10}{'ratio':<8}{'target':<9}{'stop priv':<11}{'stop net':<10}"
        + f"{'gone net':<10}{'beyond':<9}target",
    ]
    lines += [network_line(row) for row in rows if row.network]
    if not any(row.n in TARGET_NETWORK_RATIO and row.network for row in rows):
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


def latency_lines(found: Latency) -> list[str]:
    latencies = found.launches
    if not latencies:
        return ["launch latency: no figures"]
    spread = f"min {min(latencies):.1f}, max {max(latencies):.1f}"
    ours = statistics.median(latencies)
    lines = [
        f"launch latency (request to exec, median of {len(latencies)} of {found.runs} runs): "
        f"{ours:.1f} ms ({spread})   target ≤ {TARGET_LATENCY_MS:g} ms",
        f"  beside it, whole processes (spawn to reaped, {TRUE_PER_ROUND} of each after every run above; options as in the side-by-side table):",
        f"  {'process':<40}{'median':<11}{'runs':<6}{'sandboxd ÷ it':<15}target",
    ]
    for label, values in found.whole.items():
        median = statistics.median(values) if values else None
        target = "≤ 1.00x" if label.startswith("unshare") else ""
        over = ratio_text(ours, median)
        lines.append(f"  {label:<40}{ms_stats(values):<11}{len(values):<6}{over:<15}{target}".rstrip())
    return lines


def memory_lines(mem: Memory) -> list[str]:
    extra = (mem.sandbox_pss_kib - mem.baseline_pss_kib) / MIB
    own = f"sandboxd RSS {mem.rss_kib / MIB:.1f} MiB (PSS {mem.pss_kib / MIB:.1f} MiB), supervisor and fork server"
    supervisor = f"supervisor (sandboxd up) RSS {mem.supervisor_kib[0] / MIB:.1f} MiB (PSS {mem.supervisor_kib[1] / MIB:.1f} MiB)"
    fork_server = f"fork server and its spawner RSS {mem.fork_server_kib[0] / MIB:.1f} MiB (PSS {mem.fork_server_kib[1] / MIB:.1f} MiB)"
    parts = f"{mem.sandbox_pss_kib / MIB:.2f} sandboxed - {mem.baseline_pss_kib / MIB:.2f} baseline, PSS per service"
    per = f"init PSS {mem.init_pss_kib / MIB:.2f} MiB, all-in {extra:.2f} MiB ({parts})"
    lines = [
        f"memory with {MEMORY_N} running: {own}   target ≤ {TARGET_RSS_MIB:g} MiB RSS",
        f"  {supervisor}",
        f"  {fork_server}: what the fork server adds",
        f"  per sandbox: {per}   target ≤ {TARGET_PER_SANDBOX_MIB:g} MiB",
    ]
    if mem.peer_pss_kib:
        each = ", ".join(f"{peers.LABEL[tool]} {(pss - mem.baseline_pss_kib) / MIB:.2f} MiB" for tool, pss in mem.peer_pss_kib.items())
        lines.append(f"  per sandbox, the peers (PSS of every process below the launcher / N - baseline): {each}")
    return lines


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


def accept_lines(runs: list[AcceptRun], seconds: float, budgets: dict[int, int], absent: dict[str, str]) -> list[str]:
    rounds = max((sum(1 for r in runs if r.tool == "sandboxd" and r.clients == c) for c in budgets), default=0)
    what = (
        f"sh's builtin echo writes ok, on 127.0.0.1 over tcp; up to {seconds:g} s or "
        + " / ".join(str(b) for b in budgets.values())
        + f" connections a phase; median of {rounds} round(s), interleaved"
    )
    lines = [
        f"accept mode (connections per second, a sandbox of its own each, for sandboxd also a cgroup; {what})",
        f"  sandboxd: accept: true, max_connections {ACCEPT_MAX_CONNECTIONS}, the connection at fd 3; the peers: as stdin and stdout",
        f"  {'clients':<9}{'tool':<34}{'answered':<10}{'failed':<8}{'per second':<12}{'sandboxd ÷ it':<17}{'peak cgroups':<14}target",
    ]
    for clients in budgets:
        mine = [r for r in runs if r.clients == clients]
        rate = {tool: statistics.median([r.rate for r in mine if r.tool == tool]) for tool in dict.fromkeys(r.tool for r in mine)}
        for index, tool in enumerate(rate):
            of_tool = [r for r in mine if r.tool == tool]
            peaks = [r.peak_cgroups for r in of_tool if r.peak_cgroups is not None]
            peak = str(max(peaks)) if peaks else "—"
            over = ratio_text(rate.get("sandboxd"), rate[tool]) if tool != "sandboxd" else ""
            target = f"≥ {TARGET_ACCEPT_RATIO:.2f}x nsjail" if tool == "sandboxd" else ""
            if tool == "sandboxd" and "nsjail" in rate:
                over = f"{ratio_text(rate['sandboxd'], rate['nsjail'])} ÷ nsjail"
            clients_text = str(clients) if index == 0 else ""
            answered, failed = sum(r.answered for r in of_tool), sum(r.failed for r in of_tool)
            per_second = f"{rate[tool]:.0f}/s"
            cells = f"  {clients_text:<9}{peers.ACCEPT_LABEL[tool]:<34}{answered:<10}{failed:<8}{per_second:<12}"
            lines.append((cells + f"{over:<17}{peak:<14}{target}").rstrip())
    for tool, hint in absent.items():
        lines.append(f"  ({peers.ACCEPT_LABEL[tool]}: not run, not installed: {hint})")
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


SECTIONS = ("start", "latency", "memory", "on-demand", "accept", "control", "proxy", "images", "userns", "setup", "startup")
PEER_SECTIONS = ("start", "latency", "memory", "accept")  # `--only peers`: where the peers run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N = 10 and 50 only, 1 repetition, 5 latency runs, 3 on-demand runs, 2 s accept-mode phases (1 round), 2 API runs",
    )
    parser.add_argument("--sizes", help=f"comma-separated service counts (default 10,50,100,{SMALL_FROM})")
    parser.add_argument("--reps", type=int, help="repetitions (rounds) of each parallel start and accept-mode phase (default 3)")
    parser.add_argument("--latency-runs", type=int, help="runs of the 1-service stack (default 15)")
    parser.add_argument(
        "--only",
        help=f"comma-separated sections to run: {', '.join(SECTIONS)}, or peers ({', '.join(PEER_SECTIONS)}); default all",
    )
    args = parser.parse_args(argv)
    default_sizes = [10, 50] if args.quick else [10, 50, 100, SMALL_FROM]
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    args.reps = args.reps or (1 if args.quick else 3)
    args.latency_runs = args.latency_runs or (5 if args.quick else 15)
    args.on_demand_runs = 3 if args.quick else 10
    args.eager_runs = 20 if args.quick else 50
    args.accept_seconds = 2.0 if args.quick else 5.0
    args.accept_budgets = {1: 200, ACCEPT_CLIENTS: 800} if args.quick else {1: 500, ACCEPT_CLIENTS: 2000}
    args.ps_runs = 20
    args.api_runs = 2 if args.quick else 5
    chosen = [name.strip() for name in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [name for name in chosen if name not in (*SECTIONS, "peers")]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}, peers")
    args.sections = {section for name in chosen for section in (PEER_SECTIONS if name == "peers" else (name,))}
    return args


def bench(args: argparse.Namespace, root: Path) -> list[str]:
    import bench_userns  # section 10: what the default user namespace costs per launch

    logs = root / "logs"
    on = args.sections
    absent = peers.missing(peers.PEERS)
    tools = [tool for tool in peers.PEERS if tool not in absent]
    accept_absent = peers.missing(peers.ACCEPT_PEERS)
    accept_tools = [tool for tool in peers.ACCEPT_PEERS if tool not in accept_absent]
    for tool, hint in {**absent, **accept_absent}.items():
        problem(f"{tool} is not installed ({hint}): not run")
    sizes = []
    for n in args.sizes:
        if (why := room_for(n)) is not None:
            problem(f"parallel start of {n} not run: {why}")
        else:
            sizes.append(n)
    stacks = {n: make_stack(root, n) for n in sorted({*sizes, 1, MEMORY_N})}
    net_stacks = {n: make_stack(root, n, network=True) for n in sizes if n <= NETWORK_MAX_N}
    lines = [header()]
    if "start" in on and sizes:
        warm = min(sizes)
        note(f"warm-up (N={warm}, not counted)")
        start_baseline(stacks[warm], logs)
        start_sandboxd(stacks[warm], logs)
        for tool in tools:
            start_peer(tool, stacks[warm], logs)
        if warm in net_stacks:
            start_sandboxd(net_stacks[warm], logs)
        rows = []
        for n in sizes:
            note(f"parallel start, N={n}: baseline, sandboxd, {', '.join(tools)}{', network' if n in net_stacks else ''}")
            rows.append(parallel_start(stacks[n], net_stacks.get(n), tools, args.reps, logs))
        lines += [*start_table(rows, args.reps), *peers_table(rows, args.reps, tools, absent), *network_table(rows, args.reps)]
    if "latency" in on:
        note(f"launch latency, {args.latency_runs} runs, whole processes beside it")
        lines += latency_lines(launch_latency(stacks[1], args.latency_runs, logs))
    if "memory" in on:
        note(f"memory, N={MEMORY_N}: sandboxd, baseline, {', '.join(tools)}")
        lines += memory_lines(memory(stacks[MEMORY_N], tools, logs))
    if "on-demand" in on:
        note(f"first connection: on-demand and own start, {args.on_demand_runs} runs; eager, {args.eager_runs} connections")
        lines += on_demand_lines(on_demand(root, args.on_demand_runs, args.eager_runs, logs))
    if "accept" in on:
        note(f"accept mode: sandboxd, {', '.join(accept_tools)}; 1 client, then {ACCEPT_CLIENTS}, up to {args.accept_seconds:g} s each, {args.reps} round(s)")
        accepted = accept_mode(root, args.accept_seconds, args.accept_budgets, args.reps, accept_tools, logs)
        lines += accept_lines(accepted, args.accept_seconds, args.accept_budgets, accept_absent)
    if "control" in on:
        note(f"control plane: ps --json, {args.ps_runs} runs; Python API up and down, {args.api_runs} runs")
        lines += control_lines(control_plane(root, args.ps_runs, args.api_runs))
    if "proxy" in on or "images" in on:
        import bench_real  # sections 8 and 9: the proxy and images (see its docstring)

        if "proxy" in on:
            note("proxy overhead: nginx direct vs through the proxy, ab")
            lines += bench_real.proxy_section(root, args.quick, problem)
        if "images" in on:
            note("images: build and launch on an image")
            lines += bench_real.image_section(root, args.quick, problem)
    if "userns" in on:
        note("user namespaces: launches with and without, alternating")
        lines += bench_userns.userns_section(root, args.quick, problem)
    if "setup" in on:
        import bench_setup  # section 11: the ways to run a sandbox's set-up (see its docstring)

        note("set-up: fork and the Python walk, exec of sbd-setup, vfork; interleaved")
        lines += bench_setup.setup_section(root, args.quick, problem)
    if "startup" in on:
        import bench_startup  # section 12: sandboxd's own start-up and the control verbs (see its docstring)

        note("start-up: exec to first launch request, ls, ps --json, down; beside python -c pass")
        lines += bench_startup.startup_section(root, args.quick, problem)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench needs root (sandboxd up creates namespaces and cgroups)", file=sys.stderr)
        return 2
    if before := leftovers():
        note(f"note: present before the bench started (another stack running?): {', '.join(before)}")
    nofile = raise_nofile()
    note(f"RLIMIT_NOFILE {nofile} (raised for the bench, sandboxd and the launchers)")
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
        print("stderr lines worth a look, sandboxd's and the peers' ([tool] in front), numbers folded to N:")
        print("\n".join(f"  {count}x {line}" for line, count in sorted(odd_lines.items(), key=lambda item: -item[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
