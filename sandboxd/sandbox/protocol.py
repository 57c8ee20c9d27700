"""The fork server's protocol: what the supervisor, the fork server and a sandbox say to each other.

Two kinds of channel, each a SOCK_SEQPACKET pair (one message per datagram, descriptors beside
it): the fork server's socket, for its life, and a status channel per request:

    supervisor (handle.py)                 fork server (forkserver.py)         child (child.py, join.py)
    ──────────────────────                 ───────────────────────────         ─────────────────────────
    ── the fork server's socket ──
    LaunchSandbox ───────────────────────▶ [status, output, sockets...,
      SCM_RIGHTS                            held bind sources..., netns?]
                                           copies the mounts, clones ─────────▶ run_sandbox
    RunCommand ──────────────────────────▶ [status, output?] ── clone3 ───────▶ run_in_sandbox
    StartProxy ──────────────────────────▶ [status, output, pidfd,
                                            unix target?, sockets...] ─clone3─▶ run_proxy
                 ◀─────────────────────── ForkFailed(id, detail)
                                           what failed before the fork
                 ◀─────────────────────── Exited(id, status)
                                           waitpid of any child it forked
    ── a launch's status channel (one per request; "status" above is its far end) ──
                 ◀─────────────────────────────────────────────────────────── Executing(exec_ns)
                   SCM_CREDENTIALS: the child's pid as the host numbers it;
                   SCM_RIGHTS: its bind() listener, with the plan's intercept_bind
                 ◀─────────────────────────────────────────────────────────── EOF: it executed
                   (close-on-exec; a sandbox's init closes its own once the command executed)
                 ◀─────────────────────────────────────────────────────────── SetupFailed(step, detail,
                                                                                path, exit); _exit(exit)

`sandboxd exec` (execute.py) has no fork server between the CLI and its command; its command
reports on a channel of its own with the same Executing-less exchange: EOF, or SetupFailed.

A message on the wire is one JSON object, `{"type": kind, "arg": fields}` (runc's syncT has the
same shape), made and read by codec.py from the message's dataclass and its type hints. A
launch's plan is written last, as its JSON text was kept (`_plan_text`), and the fork server
decodes the text of a plan once (`_decode_launch`): a service's plan is the same at every launch,
and a connection's (accept mode) is its service's beside the `Connection` of its own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TypeGuard

from sandboxd.plan.launch import LaunchPlan, MountOp, UserNamespace
from sandboxd.sandbox.codec import WIRE_SCALARS, Wire, decode_fields, decoder, field_names
from sandboxd.sandbox.codec import ProtocolError as ProtocolError
from sandboxd.sandbox.codec import from_wire as from_wire
from sandboxd.sandbox.codec import to_wire as to_wire


# ── requests: supervisor -> fork server ──


@dataclass(frozen=True)
class Connection:
    """What a connection's sandbox (accept mode) has of its own: its name and its environment,
    in place of its plan's. The rest of its plan is the same for every connection, and so is its
    text on the wire: the fork server decodes and compiles it once (`LaunchSandbox.launched`)."""

    service: str
    env: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LaunchSandbox:
    """Make a sandbox from `plan`, born in cgroup2 directory `cgroup` and joining `cgroup_tasks`
    (v1 hierarchies), its root built at `root`. Descriptors: status channel, output, the sockets
    (fds 3.. of the service), `sources` held bind sources (one per bind, in the plan's order)
    and, with `netns`, the network namespace to join. With `connection`, the sandbox is that
    connection's: `plan` with the connection's name and environment."""

    id: int
    plan: LaunchPlan
    cgroup: str
    cgroup_tasks: tuple[str, ...]
    root: str
    netns: bool
    sources: int
    connection: Connection | None = None

    def launched(self) -> LaunchPlan:
        """The plan of the sandbox this launches: `plan`, with a connection's name and environment."""
        if self.connection is None:
            return self.plan
        return dataclasses.replace(self.plan, service=self.connection.service, env=self.connection.env)


@dataclass(frozen=True)
class RunCommand:
    """Run `argv` in every namespace of the running sandbox whose init is `init_pid`, in its
    cgroup, confined as its service (health checks, `reload:`). Descriptors: status channel and,
    with `output`, where its stdout and stderr go (else the sandbox's own /dev/null)."""

    id: int
    init_pid: int
    cgroup: str
    cgroup_tasks: tuple[str, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    workdir: str
    capabilities: tuple[int, ...]
    seccomp_filter: str
    uid: int
    gid: int
    output: bool


@dataclass(frozen=True)
class StartProxy:
    """Start a proxy (proxy.py) in a running sandbox's cgroup and network namespace. Descriptors:
    status channel, output, the sandbox init's pidfd, with `unix_target` an O_PATH descriptor of
    the program's socket file, then the bound sockets."""

    id: int
    cgroup: str
    cgroup_tasks: tuple[str, ...]
    argv: tuple[str, ...]
    uid: int
    gid: int
    unix_target: bool


Request = LaunchSandbox | RunCommand | StartProxy


@dataclass(frozen=True)
class HoldDescriptors:
    """Keep the `count` descriptors sent with this open for the fork server's life, answering
    nothing: the stack's lease of subordinate ids (host/subids.py), taken after the fork server
    was forked, is then held until the last sandbox is gone."""

    count: int


@dataclass(frozen=True)
class PrepareStorage:
    """Make now, before any launch asks for it, the user namespace that the binds and volumes of
    a stack with these ids are idmapped through (detached.storage_userns), answering nothing:
    `up` sends it once the specs are planned, and the fork server makes it while the supervisor
    still sets up (cgroups, sockets, its event loop), rather than on the first launch's way. A
    failure here is left for that launch, which tries again and reports it as its own."""

    ids: UserNamespace


@dataclass(frozen=True)
class ExpectLaunches:
    """The plans of the launches that come first, answering nothing: `up` sends it once the
    specs are planned, and the fork server decodes each plan's text and compiles its program
    while the supervisor still sets up (forkserver.py, `_expect`), rather than on the first
    launches' way. Those launches send the same texts, so they get the plans decoded here, and
    their programs' walks kept (all but what names a launch's own descriptors). `root` is the
    stack's sandbox root (LaunchSandbox.root). On the wire, framed as a batch is: a head line with
    the texts' sizes, then the texts, each as a launch of its plan carries it."""

    root: str
    plans: tuple[LaunchPlan, ...]

    @staticmethod
    def first(root: str, plans: list[LaunchPlan]) -> ExpectLaunches:
        """The message for the first of `plans`, as many as one message holds (EXPECT_MAX, and
        about BATCH_BYTES of their texts)."""
        chosen: list[LaunchPlan] = []
        size = 0
        for plan in plans[:EXPECT_MAX]:
            size += len(_plan_text(plan))
            if size > BATCH_BYTES:
                break
            chosen.append(plan)
        return ExpectLaunches(root, tuple(chosen))


# ── replies: fork server -> supervisor ──

NOT_FORKED = 127 << 8  # the wait status of a request the fork server could not fork for (as a child that could not be set up)


@dataclass(frozen=True)
class Exited:
    """A child of request `id` exited with wait status `status`."""

    id: int
    status: int

    @property
    def wait_status(self) -> int:
        return self.status


@dataclass(frozen=True)
class ForkFailed:
    """Request `id` failed in the fork server, before any child existed."""

    id: int
    detail: str

    @property
    def wait_status(self) -> int:
        return NOT_FORKED


Reply = Exited | ForkFailed


# ── on a status channel: child -> supervisor (or the CLI) ──


@dataclass(frozen=True)
class Executing:
    """The child is set up and about to exec; `exec_ns` is CLOCK_MONOTONIC then."""

    exec_ns: int


@dataclass(frozen=True)
class SetupFailed:
    """Step `step` failed: `detail` says how (the errno's text and the path, as the user reads
    it), `path` names the file or mount involved ("" if none), `exit` is the child's exit code."""

    step: str
    detail: str
    path: str = ""
    exit: int = 127


Status = Executing | SetupFailed

_KINDS: dict[str, type] = {
    "launch": LaunchSandbox,
    "run": RunCommand,
    "proxy": StartProxy,
    "hold": HoldDescriptors,
    "prepare-storage": PrepareStorage,
    "exited": Exited,
    "fork-failed": ForkFailed,
    "executing": Executing,
    "setup-failed": SetupFailed,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def encode(message: Request | HoldDescriptors | PrepareStorage | ExpectLaunches | Reply | Status) -> bytes:
    if type(message) is LaunchSandbox:
        return _encode_launch(message)
    if type(message) is ExpectLaunches:
        return _encode_expect(message)
    return json.dumps({"type": _KIND_OF[type(message)], "arg": to_wire(message)}, separators=(",", ":")).encode()


def _encode_launch(message: LaunchSandbox) -> bytes:
    """A LaunchSandbox as encode makes any message, its plan's JSON text put in as _plan_text
    kept it (the object `plan` last among the fields)."""
    rest = {name: to_wire(getattr(message, name)) for name in field_names(LaunchSandbox) if name != "plan"}
    head = json.dumps({"type": "launch", "arg": rest}, separators=(",", ":"))
    return f'{head[:-2]},"plan":{_plan_text(message.plan)}}}}}'.encode()


_LAUNCH_HEAD = b'{"type":"launch","arg":{'
_PLAN_FIELD = b',"plan":'
# The plans decoded lately, by their text. A service's plan is sent unchanged at every launch
# (and a connection's is its service's: Connection), so its text is decoded once, and every
# launch of it gets the very same object (which the fork server's programs are kept by).
_PLANS: dict[bytes, LaunchPlan] = {}
_PLANS_MAX = 64
EXPECT_MAX = _PLANS_MAX // 4  # plans in one ExpectLaunches: the first launches', far from a full cache


def _decode_launch(data: bytes) -> LaunchSandbox | None:
    """A launch as `_encode_launch` wrote it (the plan's text last, compact JSON), its plan
    decoded once per text; None for any other form of it (the generic decoder then reads it).
    No string can hold the plan's key unescaped: its first `,"plan":` is where the plan begins."""
    cut = data.find(_PLAN_FIELD)
    if cut < 0 or not data.endswith(b"}}"):
        return None
    plan = _plan_of(data[cut + len(_PLAN_FIELD) : -2], "LaunchSandbox.plan")
    try:
        head = json.loads(data[:cut] + b"}}")
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(head, dict) or set(head) != {"type", "arg"}:
        raise ProtocolError("a message is {'type': ..., 'arg': ...}")
    message = decode_fields(LaunchSandbox, head["arg"], {"plan": plan})
    assert isinstance(message, LaunchSandbox)
    return message


def _plan_of(text: bytes, what: str) -> LaunchPlan:
    """The plan whose JSON text is `text`, decoded once per text (`_PLANS`)."""
    plan = _PLANS.get(text)
    if plan is None:
        try:
            wire = json.loads(text)
        except ValueError as e:
            raise ProtocolError(f"not JSON: {e}") from None
        try:
            plan = from_wire(LaunchPlan, wire)
        except ProtocolError as e:
            raise ProtocolError(f"{what}: {e}") from None
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[text] = plan
    return plan


_EXPECT_HEAD = b'{"type":"expect","arg":'


def _encode_expect(message: ExpectLaunches) -> bytes:
    texts = [_plan_text(plan).encode() for plan in message.plans]
    head = json.dumps({"type": "expect", "arg": {"root": message.root, "sizes": [len(text) for text in texts]}}, separators=(",", ":"))
    return b"".join([head.encode(), b"\n", *texts])


def _decode_expect(data: bytes) -> ExpectLaunches:
    arg, cut = _head_line(data)
    root, sizes = (arg.get("root"), arg.get("sizes")) if isinstance(arg, dict) and set(arg) == {"root", "sizes"} else (None, None)
    if not isinstance(root, str) or not _counts(sizes) or sum(sizes) != len(data) - cut - 1:
        raise ProtocolError("an ExpectLaunches is {'type': 'expect', 'arg': {'root': ..., 'sizes': [...]}} and the plans' texts")
    plans, offset = [], cut + 1
    for size in sizes:
        plans.append(_plan_of(data[offset : offset + size], "ExpectLaunches.plans"))
        offset += size
    return ExpectLaunches(root, tuple(plans))


# ── batches: many requests in one message ──
#
# A stack's `up` sends every eager service's launch at once: one message per launch would fill
# the socket's queue after some ten of them (net.unix.max_dgram_qlen) and the supervisor would
# wait in sendmsg for the fork server to read each. A batch is one message holding many
# requests, each as `encode` made it, their descriptors one after the other:
#
#     {"type":"batch","arg":{"sizes":[bytes of each],"fds":[descriptors of each]}}\n<each request>
#
# (compact JSON holds no raw newline, so the first ends the head). Each request is then served
# as if it had come alone: what fails, fails alone, with its own reply.

_BATCH_HEAD = b'{"type":"batch","arg":'
BATCH_FDS = 250  # descriptors in one message: under the kernel's SCM_MAX_FD (253)
BATCH_BYTES = 160_000  # bytes in one message: under the socket's send buffer (net.core.wmem_default, 208 KiB)


def encode_batch(parts: list[tuple[bytes, int]]) -> bytes:
    """One message of `parts`, each an encoded request and how many descriptors it has."""
    head = json.dumps({"type": "batch", "arg": {"sizes": [len(data) for data, _ in parts], "fds": [count for _, count in parts]}}, separators=(",", ":"))
    return b"".join([head.encode(), b"\n", *(data for data, _ in parts)])


def unbatch(data: bytes, fds: list[int]) -> list[tuple[bytes, list[int]]]:
    """The requests a message holds, each with its own descriptors: a batch's (`encode_batch`),
    or the message itself, alone. ProtocolError if a batch's head does not match what it holds."""
    if not data.startswith(_BATCH_HEAD):
        return [(data, fds)]
    arg, cut = _head_line(data)
    sizes, counts = (arg.get("sizes"), arg.get("fds")) if isinstance(arg, dict) else (None, None)
    if not _counts(sizes) or not _counts(counts) or len(sizes) != len(counts):
        raise ProtocolError("a batch is {'type': 'batch', 'arg': {'sizes': [...], 'fds': [...]}}")
    if sum(sizes) != len(data) - cut - 1 or sum(counts) != len(fds):
        raise ProtocolError(f"a batch of {sum(sizes)} bytes and {sum(counts)} descriptors came with {len(data) - cut - 1} and {len(fds)}")
    parts: list[tuple[bytes, list[int]]] = []
    offset, first = cut + 1, 0
    for size, count in zip(sizes, counts):
        parts.append((data[offset : offset + size], fds[first : first + count]))
        offset, first = offset + size, first + count
    return parts


def _head_line(data: bytes) -> tuple[object, int]:
    """The "arg" of a message whose first line is its head (a batch, an ExpectLaunches), and
    where that line ends (None for a head of another shape)."""
    cut = data.find(b"\n")
    try:
        head = json.loads(data[:cut]) if cut >= 0 else None
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    return (head.get("arg") if isinstance(head, dict) and set(head) == {"type", "arg"} else None), cut


def _counts(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


def _decode(data: bytes, accepted: tuple[type, ...]) -> object:
    try:
        wire = json.loads(data)
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(wire, dict) or set(wire) != {"type", "arg"}:
        raise ProtocolError("a message is {'type': ..., 'arg': ...}")
    cls = _KINDS.get(wire["type"]) if isinstance(wire["type"], str) else None
    if cls is None or cls not in accepted:
        raise ProtocolError(f"unexpected message type {wire['type']!r}")
    return from_wire(cls, wire["arg"])


def decode_request(data: bytes) -> Request | HoldDescriptors | PrepareStorage | ExpectLaunches:
    if data.startswith(_LAUNCH_HEAD) and (launch := _decode_launch(data)) is not None:
        return launch
    if data.startswith(_EXPECT_HEAD):
        return _decode_expect(data)
    message = _decode(data, (LaunchSandbox, RunCommand, StartProxy, HoldDescriptors, PrepareStorage))
    assert isinstance(message, LaunchSandbox | RunCommand | StartProxy | HoldDescriptors | PrepareStorage)
    return message


def decode_reply(data: bytes) -> Reply:
    message = _decode(data, (Exited, ForkFailed))
    assert isinstance(message, Exited | ForkFailed)
    return message


def decode_status(data: bytes) -> Status:
    message = _decode(data, (Executing, SetupFailed))
    assert isinstance(message, Executing | SetupFailed)
    return message


def make_decoders() -> None:
    """Make every message's decoder now, rather than at the first message of its type (the fork
    server is forked with them made)."""
    for cls in _KINDS.values():
        decoder(cls)


# The JSON text of the plans encoded lately, and of their fields that are no scalars, by
# identity. A plan is frozen and a service's is sent unchanged at every launch; a connection's
# (accept mode) is its service's with another name and environment, its other fields the very
# same objects. Encoding them is most of the work of a launch request. Each entry holds what it
# is the text of, so no other object takes its id while it is here.
_TEXTS: dict[int, tuple[object, str]] = {}
_TEXTS_MAX = 8192


def _plan_text(plan: LaunchPlan) -> str:
    known = _TEXTS.get(id(plan))
    if known is not None and known[0] is plan:
        return known[1]
    scalars: dict[str, Wire] = {}
    parts = []
    for name in field_names(LaunchPlan):
        value = getattr(plan, name)
        if type(value) in WIRE_SCALARS:
            scalars[name] = value
        else:
            parts.append(f'"{name}":{_kept_text(value)}')
    head = json.dumps(scalars, separators=(",", ":"))  # "{...}": the other fields go before its "}"
    text = head[:-1] + ("," if scalars and parts else "") + ",".join(parts) + "}"
    _keep(plan, text)
    return text


def _kept_text(value: object) -> str:
    """The JSON text of an immutable value (a tuple, a frozen dataclass), kept; of others, made."""
    known = _TEXTS.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    if type(value) is tuple and value and all(type(item) is MountOp for item in value):
        # A plan's mounts: mostly the same ops in every service's plan, made anew for each.
        text = "[" + ",".join(_mount_text(item) for item in value) + "]"
    else:
        text = json.dumps(to_wire(value), separators=(",", ":"))
    if type(value) is tuple or _is_frozen(value):
        _keep(value, text)
    return text


def _is_frozen(value: object) -> bool:
    params = getattr(type(value), "__dataclass_params__", None)
    return params is not None and bool(params.frozen)


# The JSON text of mount ops by value: equal ones (their fields are strings and a bool) have
# the same text.
_MOUNT_TEXTS: dict[MountOp, str] = {}


def _mount_text(op: MountOp) -> str:
    text = _MOUNT_TEXTS.get(op)
    if text is None:
        if len(_MOUNT_TEXTS) >= _TEXTS_MAX:
            _MOUNT_TEXTS.clear()
        text = _MOUNT_TEXTS[op] = json.dumps(to_wire(op), separators=(",", ":"))
    return text


def _keep(value: object, text: str) -> None:
    if len(_TEXTS) >= _TEXTS_MAX:
        _TEXTS.clear()
    _TEXTS[id(value)] = (value, text)
