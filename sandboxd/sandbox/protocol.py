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
                   (the channel is close-on-exec)
                 ◀─────────────────────────────────────────────────────────── SetupFailed(step, detail,
                                                                                path, exit); _exit(exit)

`sandboxd exec` (execute.py) has no fork server between the CLI and its command; its command
reports on a channel of its own with the same Executing-less exchange: EOF, or SetupFailed.

A message on the wire is one JSON object, `{"type": kind, "arg": fields}` (runc's syncT has the
same shape). The one encoder (`to_wire`) walks a dataclass's fields; the one decoder (`from_wire`)
is driven by their type hints, so a message type is its dataclass and nothing else: no field
list is written twice. A decoded message has exactly the types its hints say (tuples for
sequences, a nested dataclass for a nested object, a Literal's values only), or decoding fails
with ProtocolError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, Union

from sandboxd.plan.launch import LaunchPlan, MountOp

# JSON as the wire carries it.
Wire = Union[None, bool, int, float, str, list["Wire"], dict[str, "Wire"]]
T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that is not what the protocol says (not JSON, an unknown type, a field's type)."""


# ── requests: supervisor -> fork server ──


@dataclass(frozen=True)
class LaunchSandbox:
    """Make a sandbox from `plan`, born in cgroup2 directory `cgroup` and joining `cgroup_tasks`
    (v1 hierarchies), its root built at `root`. Descriptors: status channel, output, the sockets
    (fds 3.. of the service), `sources` held bind sources (one per bind, in the plan's order)
    and, with `netns`, the network namespace to join."""

    id: int
    plan: LaunchPlan
    cgroup: str
    cgroup_tasks: tuple[str, ...]
    root: str
    netns: bool
    sources: int


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
    "exited": Exited,
    "fork-failed": ForkFailed,
    "executing": Executing,
    "setup-failed": SetupFailed,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def encode(message: Request | HoldDescriptors | Reply | Status) -> bytes:
    if type(message) is LaunchSandbox:
        return _encode_launch(message)
    return json.dumps({"type": _KIND_OF[type(message)], "arg": to_wire(message)}, separators=(",", ":")).encode()


def _encode_launch(message: LaunchSandbox) -> bytes:
    """A LaunchSandbox as encode makes any message, its plan's JSON text put in as _plan_text
    kept it (the object `plan` last among the fields)."""
    rest = {name: to_wire(getattr(message, name)) for name, _form in _wire_forms(LaunchSandbox) if name != "plan"}
    head = json.dumps({"type": "launch", "arg": rest}, separators=(",", ":"))
    return f'{head[:-2]},"plan":{_plan_text(message.plan)}}}}}'.encode()


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


def decode_request(data: bytes) -> Request | HoldDescriptors:
    message = _decode(data, (LaunchSandbox, RunCommand, StartProxy, HoldDescriptors))
    assert isinstance(message, LaunchSandbox | RunCommand | StartProxy | HoldDescriptors)
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
        _decoder(cls)


# ── the generic codec ──


def to_wire(value: object) -> Wire:
    """A dataclass as a JSON object of its fields, recursively; tuples and lists as arrays."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [to_wire(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dataclass_wire(value)
    raise TypeError(f"{type(value).__name__} has no wire form")


def _dataclass_wire(value: object) -> Wire:
    cls: type = type(value)
    wire: dict[str, Wire] = {}
    for name, form in _wire_forms(cls):
        item = getattr(value, name)
        # What its hint says is a scalar, or a tuple of scalars, goes as it is: no call per value.
        if form is _AS_IS and type(item) in _WIRE_SCALARS:
            wire[name] = item
        elif form is _SCALARS_LIST and type(item) is tuple and all(type(v) in _WIRE_SCALARS for v in item):
            wire[name] = list(item)
        else:
            wire[name] = to_wire(item)
    return wire


_AS_IS, _SCALARS_LIST, _WALKED = "as is", "list of scalars", "walked"
_WIRE_SCALARS = frozenset((int, str, bool, float, type(None)))


@functools.cache
def _wire_forms(cls: type) -> tuple[tuple[str, str], ...]:
    """Each field of dataclass `cls` with how its value goes on the wire, by its type hint."""
    hints = typing.get_type_hints(cls)
    forms = []
    for f in dataclasses.fields(cls):
        hint, form = hints[f.name], _WALKED
        if hint in _SCALARS or typing.get_origin(hint) is Literal:
            form = _AS_IS
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,) and typing.get_args(hint)[0] in _SCALARS:
            form = _SCALARS_LIST
        forms.append((f.name, form))
    return tuple(forms)


def from_wire(cls: type[T], wire: Wire) -> T:
    """`wire` decoded as `cls` (a dataclass), each field as its type hint says."""
    hint: object = cls
    value = _decoder(hint)(wire)
    assert isinstance(value, cls)
    return value


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
    for name, _form in _wire_forms(LaunchPlan):
        value = getattr(plan, name)
        if type(value) in _WIRE_SCALARS:
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


Decoder = Callable[[Wire], object]


@functools.cache
def _decoder(hint: object) -> Decoder:
    """A decoder for values of type hint `hint`, made once per hint (the fork server decodes a
    plan per launch: no hint is looked at twice)."""
    if hint in _SCALARS:
        return _scalar(typing.cast(type, hint))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_decoder(args[0]), _scalar_type(args[0]))
    if origin is tuple:
        return _fixed_tuple(tuple(_decoder(a) for a in args), tuple(_scalar_type(a) for a in args))
    if origin is Literal:
        return _literal(args)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional(_decoder(next(a for a in args if a is not type(None))))
    raise TypeError(f"no wire form for {hint!r}")


_SCALARS = (int, str, bool, float, type(None))


def _scalar_type(hint: object) -> type | None:
    """The type a value of `hint` has on the wire exactly as decoded, if it is a scalar's: a
    decoder takes such a value as it is, without a call per value."""
    return typing.cast(type, hint) if hint in _SCALARS else None


def _scalar(cls: type) -> Decoder:
    def decode(wire: Wire) -> object:
        # bool is an int to Python, never to the protocol; a float may arrive as a whole number.
        if type(wire) is cls or (cls is float and type(wire) is int):
            return wire
        raise ProtocolError(f"expected {cls.__name__}, got {wire!r}")

    return decode


def _sequence(item: Decoder, scalar: type | None) -> Decoder:
    def decode(wire: Wire) -> object:
        if not isinstance(wire, list):
            raise ProtocolError(f"expected an array, got {wire!r}")
        return tuple(v if type(v) is scalar else item(v) for v in wire)

    return decode


def _fixed_tuple(items: tuple[Decoder, ...], scalars: tuple[type | None, ...]) -> Decoder:
    def decode(wire: Wire) -> object:
        if not isinstance(wire, list) or len(wire) != len(items):
            raise ProtocolError(f"expected an array of {len(items)}, got {wire!r}")
        return tuple(v if type(v) is scalar else item(v) for item, scalar, v in zip(items, scalars, wire))

    return decode


def _literal(values: tuple[object, ...]) -> Decoder:
    def decode(wire: Wire) -> object:
        if wire not in values or type(wire) is bool:
            raise ProtocolError(f"expected one of {values}, got {wire!r}")
        return wire

    return decode


def _optional(inner: Decoder) -> Decoder:
    def decode(wire: Wire) -> object:
        return None if wire is None else inner(wire)

    return decode


def _dataclass(cls: type) -> Decoder:
    hints = typing.get_type_hints(cls)
    fields = [
        (f.name, _scalar_type(hints[f.name]), _decoder(hints[f.name]), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    ]
    known = {name for name, _, _, _ in fields}

    def decode(wire: Wire) -> object:
        if not isinstance(wire, dict):
            raise ProtocolError(f"expected an object for {cls.__name__}, got {wire!r}")
        values: dict[str, object] = {}
        for name, scalar, field_decoder, required in fields:
            if name in wire:
                value = wire[name]
                if type(value) is scalar:
                    values[name] = value
                    continue
                try:
                    values[name] = field_decoder(value)
                except ProtocolError as e:
                    raise ProtocolError(f"{cls.__name__}.{name}: {e}") from None
            elif required:
                raise ProtocolError(f"{cls.__name__} lacks its field {name}")
        if len(values) != len(wire):
            raise ProtocolError(f"{cls.__name__} has no field {sorted(set(wire) - known)}")
        return cls(**values)

    return decode
