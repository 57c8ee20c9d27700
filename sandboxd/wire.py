"""The control socket's messages, typed: what the command line (cli/), the Python API (testing/)
and `sandboxd exec` (sandbox/execute.py) say to a running stack's supervisor (daemon/control.py,
daemon/operations.py), and what it answers. JSON on the wire, one object a line each way; these
TypedDicts name its keys and the types of their values, nothing more (the bytes are the same).

    CLI, Stack API                          supervisor (control.py -> operations.py)
    ──────────────                          ────────────────────────────────────────
    StatusRequest   {"cmd": "status", "services"?: [NAME…]}
                 ◀─────────────────────── StatusAnswer: {"ok": true} + StackStatus:
                                            stack, folder, pid, started, userns,
                                            services: [ServiceStatus (sockets: [SocketStatus])]
    ServicesRequest {"cmd": "stop"|"start"|"restart"|"reload", "services": [NAME…]}
    KillRequest     {"cmd": "kill", "services": [NAME…], "signal"?: "SIGHUP"}
    DownRequest     {"cmd": "down"}
    UpgradeRequest  {"cmd": "upgrade", "token": TEXT}: the exec follows; its outcome is in
                    the runtime directory's upgrade.json, with the token (daemon/upgrade.py)
                 ◀─────────────────────── Done: {"ok": true}
    ApplyRequest    {"cmd": "apply", "folder": DIR, "env": ["SVC:KEY=VALUE"…], "variables"?: {NAME: VALUE},
                     "listen"?: ["SOCKET=ADDRESS"…]}
                 ◀─────────────────────── ApplyAnswer: {"ok": true} + ApplyResult:
                                            added, removed, changed, sockets_replaced
    UsageRequest    {"cmd": "usage", "services"?: [NAME…]}
                 ◀─────────────────────── UsageAnswer: {"ok": true, "services": [ServiceUsage]}:
                                            I/O bytes (cgroup), network bytes (its netns)
    QueuesRequest   {"cmd": "queues", "sockets"?: [NAME…]}
                 ◀─────────────────────── QueuesAnswer: {"ok": true, "sockets": [SocketQueue]}:
                                            each listening socket's accept queue (host/queues.py)
    ExecInfoRequest {"cmd": "exec_info", "services": [NAME], "user"?: "USER[:GROUP]", "session"?: true}
                 ◀─────────────────────── ExecInfoAnswer: {"ok": true} + ExecInfo: init_pid,
                                            cgroup, cgroup_tasks, capabilities, seccomp_filter,
                                            uid, gid, env, workdir; with session, exec_cgroup
    any request  ◀─────────────────────── Refusal: {"ok": false, "error": TEXT}

`sandboxd ps --json` prints the StatusAnswer without its "ok" (a StackStatus), and `Stack.status()`
(testing/stack.py) returns that. `conforms` checks a decoded answer against its TypedDict, so that
the CLI refuses a malformed answer where it reads it, not with a KeyError three calls later.

The last part types what the CLI prints with `--json` (logs, stats, ls, volume ls, up -d, down):
a script reads those shapes, and the unit tests check them with `conforms`.

Typing only, and no import of sandboxd's: the CLI's quick verbs import this module, and so does
every layer that speaks the protocol (its place in pyproject.toml's layers: below sandbox).
"""

# No `from __future__ import annotations`: a TypedDict compiles each string annotation (a ForwardRef),
# which makes importing this module some 2 ms slower than with its types evaluated at once.

import typing
from typing import Literal, NotRequired, TypedDict

# ── requests ──


class StatusRequest(TypedDict):
    cmd: Literal["status"]
    services: NotRequired[list[str]]  # absent or empty: every service


class ServicesRequest(TypedDict):
    cmd: Literal["stop", "start", "restart", "reload"]
    services: list[str]


class KillRequest(TypedDict):
    cmd: Literal["kill"]
    services: list[str]
    signal: NotRequired[str]  # SIGTERM when absent; "HUP" and "SIGHUP" both name SIGHUP


class DownRequest(TypedDict):
    cmd: Literal["down"]


class UpgradeRequest(TypedDict):
    cmd: Literal["upgrade"]
    token: str  # names the outcome the CLI waits for
    format: NotRequired[int]  # tests only: the record is written with this format number


class ApplyRequest(TypedDict):
    cmd: Literal["apply"]
    folder: str  # the spec folder, absolute
    env: list[str]  # `up --env SVC:KEY=VALUE`
    variables: NotRequired[dict[str, str]]  # for ${VAR}: the caller's environment and .env (or --env-file)
    listen: NotRequired[list[str]]  # `up --listen SOCKET=ADDRESS`


class ExecInfoRequest(TypedDict):
    cmd: Literal["exec_info"]
    services: list[str]  # the one service the command joins
    user: NotRequired[str]  # `exec -u USER[:GROUP]`, looked up as the spec's user: is
    session: NotRequired[bool]  # a cgroup of the command's own, removed when the connection closes


class UsageRequest(TypedDict):
    cmd: Literal["usage"]
    services: NotRequired[list[str]]  # absent or empty: every service


class QueuesRequest(TypedDict):
    cmd: Literal["queues"]
    sockets: NotRequired[list[str]]  # socket units' names; absent or empty: every socket


Request = StatusRequest | ServicesRequest | KillRequest | DownRequest | UpgradeRequest | ApplyRequest | ExecInfoRequest | UsageRequest | QueuesRequest

# ── answers ──


class SocketStatus(TypedDict):
    socket: str  # the socket unit's name
    address: str  # the real address: "tcp:HOST:PORT", "udp:HOST:PORT", "unix:PATH"
    fdname: str
    netns: str  # "host", "service", or the service in whose network namespace it is bound
    proxy: NotRequired[str]  # the address the proxy forwards to, for a proxied socket


class ServiceStatus(TypedDict):
    name: str
    state: str  # a State's label (daemon/states.py)
    pid: int  # its init's pid as the host numbers it; 0 when not alive
    uptime: float  # seconds since its launch; 0 when not alive
    restarts: int
    ready: bool
    status_text: str  # its last STATUS= (sd_notify), its own text
    sockets: list[SocketStatus]
    memory: int  # bytes (memory.current)
    cpu_seconds: float
    processes: int
    instances: int  # active per-connection instances
    reason: str  # failed or backoff: why ("exited with code 3; restarting in 0.4 s"); else ""
    exit_code: NotRequired[int]  # failed or backoff after an exit: its code (absent when a signal killed it)
    signal: NotRequired[str]  # ... or the signal that killed it ("SIGKILL")


class StackStatus(TypedDict):
    stack: str
    folder: str
    pid: int  # the supervisor's
    started: float  # the supervisor's start, seconds since the epoch
    userns: dict[str, int]  # the block of subordinate ids held (host/subids.py); {} without one
    services: list[ServiceStatus]


class ApplyResult(TypedDict):
    """What a reload did: services by name."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    sockets_replaced: list[str]


class ExecInfo(TypedDict):
    """What `sandboxd exec` needs to run a command confined as the service is (execute.py)."""

    init_pid: int
    cgroup: str  # the service's cgroup2 directory
    cgroup_tasks: list[str]  # the v1 tasks files to join too (hybrid host)
    capabilities: list[int]
    seccomp_filter: str
    uid: int
    gid: int
    env: list[list[str]]  # [KEY, VALUE] pairs, in order
    workdir: str
    exec_cgroup: NotRequired[str]  # with session: the command's own cgroup, below the service's


class ServiceUsage(TypedDict):
    """What `stats` reads besides a status: bytes so far. A counter is absent where the host does
    not give it (no I/O accounting for the cgroup; a service in the host's network namespace)."""

    name: str
    io_read_bytes: NotRequired[int]  # the cgroup's io.stat (cgroup2) or blkio (v1), else its live processes' /proc/PID/io
    io_write_bytes: NotRequired[int]
    net_rx_bytes: NotRequired[int]  # /proc/PID/net/dev of its init (its own netns), all links but lo
    net_tx_bytes: NotRequired[int]


class SocketQueue(TypedDict):
    """One listening socket (one `listen` entry of a socket unit) and its accept queue."""

    socket: str  # the socket unit's name
    index: int  # which of its listen entries, from 0
    address: str  # the real address, as SocketStatus has it
    service: str  # the service it feeds
    queued: NotRequired[int]  # connections made and not yet accepted; absent for a datagram socket, or where the kernel does not say


class Done(TypedDict):
    ok: Literal[True]


class Refusal(TypedDict):
    ok: Literal[False]
    error: str


class StatusAnswer(StackStatus):
    ok: Literal[True]


class ApplyAnswer(ApplyResult):
    ok: Literal[True]


class ExecInfoAnswer(ExecInfo):
    ok: Literal[True]


class UsageAnswer(TypedDict):
    ok: Literal[True]
    services: list[ServiceUsage]


class QueuesAnswer(TypedDict):
    ok: Literal[True]
    sockets: list[SocketQueue]


Answer = Done | StatusAnswer | ApplyAnswer | ExecInfoAnswer | UsageAnswer | QueuesAnswer | Refusal

# ── what the CLI prints with --json ──


class LogLine(TypedDict):
    """`sandboxd logs --json`: one object a line."""

    time: str  # RFC 3339, UTC, microseconds: 2026-11-26T06:00:00.123456Z
    service: str
    stream: NotRequired[str]  # "stdout" or "stderr", where the log knows it
    text: str


class ServiceStats(TypedDict):
    """One service in `sandboxd stats --json`."""

    name: str
    state: str
    pid: int
    cpu_percent: float  # of one CPU, over the interval (200.0: two CPUs' worth)
    cpu_seconds: float
    memory: int  # bytes
    processes: int
    io_read_bytes: NotRequired[int]  # absent where the host does not count them (see ServiceUsage)
    io_write_bytes: NotRequired[int]
    net_rx_bytes: NotRequired[int]
    net_tx_bytes: NotRequired[int]


class StackStats(TypedDict):
    """`sandboxd stats --json`: one object per sample (with --once, one)."""

    stack: str
    time: str  # RFC 3339, UTC, when the sample ended
    interval: float  # seconds the CPU % was measured over
    services: list[ServiceStats]


class StackListing(TypedDict):
    """One stack in `sandboxd ls --json`."""

    name: str
    pid: int


class VolumeListing(TypedDict):
    """One volume in `sandboxd volume ls --json`."""

    name: str
    size: int  # bytes


class UpResult(TypedDict):
    """`sandboxd up -d --json` once the stack is up: what it started, and their status."""

    stack: str
    pid: int  # the supervisor's
    folder: str
    started: list[str]  # the services running (or ready) when up returned
    services: list[ServiceStatus]


class ReloadResult(ApplyResult):
    """`sandboxd up DIR --json` (or `reload --json`) against a running stack."""

    stack: str


class ServicesResult(TypedDict):
    """`sandboxd stop|start|restart|kill|reload SERVICE… --json`: what was done, to which services."""

    stack: str
    services: list[str]
    done: str  # "stopped", "started", "restarted", "reloaded", "sent SIGTERM"


class DownResult(TypedDict):
    """`sandboxd down --json`: the stack that ended and the services it stopped."""

    stack: str
    pid: int  # the supervisor that ended
    stopped: list[str]


def conforms(value: object, shape: object, where: str = "answer") -> str:
    """Why `value` (decoded JSON) is not a `shape` (a TypedDict, or a type built of list, dict,
    Literal and the JSON scalars), or "" if it is. Extra keys are allowed (a newer supervisor)."""
    if isinstance(shape, type) and typing.is_typeddict(shape):
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {value!r}"
        hints = typing.get_type_hints(shape)
        required: frozenset[str] = getattr(shape, "__required_keys__")
        missing = sorted(required - value.keys())
        if missing:
            return f"{where}: no {', '.join(missing)}"
        return next((why for key in hints if key in value if (why := conforms(value[key], hints[key], f"{where}.{key}"))), "")
    origin, args = typing.get_origin(shape), typing.get_args(shape)
    if origin is NotRequired:
        return conforms(value, args[0], where)
    if origin is Literal:
        return "" if value in args else f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}"
    if origin is list:
        if not isinstance(value, list):
            return f"{where}: expected a list, got {value!r}"
        return next((why for i, item in enumerate(value) if (why := conforms(item, args[0], f"{where}[{i}]"))), "")
    if origin is dict:
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {value!r}"
        return next((why for key, item in value.items() if (why := conforms(item, args[1], f"{where}.{key}"))), "")
    expected = (int, float) if shape is float else shape  # JSON has one number; a float may be 0
    assert isinstance(expected, (type, tuple)), shape
    if isinstance(value, bool) and shape is not bool or not isinstance(value, expected):
        return f"{where}: expected {getattr(shape, '__name__', shape)}, got {value!r}"
    return ""
