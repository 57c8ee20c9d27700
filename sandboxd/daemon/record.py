"""The state record an upgrade hands from the running supervisor to the sandboxd it executes
(upgrade.py writes it, reexec.py reads it), as systemd serialises itself across daemon-reexec.

One JSON object with a format version first. Every descriptor the new process inherits is named
in `descriptors` by its number, what it is and its kind (checked with fstat before anything is
handed over); the other fields refer to those numbers. The frozen spec and plans the stack runs
(a reload's changes and `-e` overrides included) travel as one pickled blob, checked field by
field against the new code's classes. Pure: encoding, decoding and the checks, no I/O.

    format 1
    ────────
    format, version, upgrades, token         the record's format; the sandboxd that wrote it
    instance, runtime_dir, detached, pid      the stack
    fork_server_pid/fd, last_request_id      the fork server's link, and the ids it has seen
    control_fd, lease_fd                      the control socket, the subordinate ids' lock
    state_*                                   the state file's lists (host/state.py)
    netns, sockets                            network namespaces and bound sockets, by descriptor
    services, instances                       each service's runtime (its running proxies by request id);
                                              each per-connection sandbox
    started_wall, exec_count                  what `ps` and `exec` count
    spec                                      base64 pickle of (stack, plans, limits, networks, userns)
    descriptors                               (fd, what, kind) of every inherited descriptor
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
from dataclasses import dataclass
from typing import Literal

from sandboxd.daemon.states import InstanceState, State
from sandboxd.sandbox.protocol import ProtocolError, from_wire, to_wire

FORMAT = 1  # the one format this sandboxd writes and reads

Kind = Literal["socket", "pipe", "pidfd", "netns", "file", "anon"]


class RecordRefused(ValueError):
    """This sandboxd cannot take over from the record: why, in words."""


@dataclass(frozen=True)
class Descriptor:
    fd: int
    what: str  # "fork server link", "socket web[0]", "web: output pipe (read end)" ...
    kind: Kind


@dataclass(frozen=True)
class LaunchRecord:
    id: int
    pid: int
    pidfd: int
    started_at: float  # CLOCK_MONOTONIC, the same clock in the new process
    requested_ns: int
    exec_ns: int
    exit_code: int | None
    exit_signal: str | None


@dataclass(frozen=True)
class StoredFdRecord:
    name: str
    fd: int
    poll: bool


@dataclass(frozen=True)
class ServiceRecord:
    name: str
    state: str  # a State's value
    reason: str
    was_ready: bool
    launch: LaunchRecord
    restarts: int
    starts: tuple[float, ...]  # the start limiter's starts (monotonic)
    restart_at: float | None  # in backoff: when it starts again (monotonic)
    output_r: int
    output_w: int
    partial: str  # base64 of the start of a line not ended yet
    notify_fd: int
    status_text: str
    main_pid: int
    listener: int
    handed_off: tuple[str, ...]
    fdstore: tuple[StoredFdRecord, ...]
    sources: tuple[tuple[str, int], ...]
    baseline: tuple[tuple[str, int], ...]
    connections: int  # per-connection instances counted so far (their names)
    active: int  # ... and running now
    proxies: tuple[tuple[str, int], ...]  # (socket, the fork server's request id) of each running proxy


@dataclass(frozen=True)
class InstanceRecord:
    id: int  # the fork server's request id
    service: str
    name: str
    pidfd: int
    state: str  # an InstanceState's value


@dataclass(frozen=True)
class SocketRecord:
    unit: str
    index: int
    fd: int


@dataclass(frozen=True)
class StackRecord:
    format: int
    version: str
    upgrades: int
    token: str
    instance: str
    runtime_dir: str
    detached: bool
    pid: int
    fork_server_pid: int
    fork_server_fd: int
    last_request_id: int
    control_fd: int
    lease_fd: int
    state_cgroups: tuple[str, ...]
    state_files: tuple[str, ...]
    state_dirs: tuple[str, ...]
    state_subnets: tuple[str, ...]
    state_userns: tuple[tuple[str, int], ...]
    netns: tuple[tuple[str, int], ...]
    sockets: tuple[SocketRecord, ...]
    services: tuple[ServiceRecord, ...]
    instances: tuple[InstanceRecord, ...]
    started_wall: float
    exec_count: int
    spec: str
    descriptors: tuple[Descriptor, ...]


def encode(record: StackRecord) -> bytes:
    """The record as JSON text (its format first)."""
    return json.dumps(to_wire(record), separators=(",", ":")).encode()


def decode(data: bytes) -> StackRecord:
    """The record in `data`, or RecordRefused saying why this sandboxd cannot read it: a format
    it does not know (checked before anything else), a field missing, unknown or of the wrong
    type, or a descriptor the fields use that `descriptors` does not name once."""
    try:
        wire = json.loads(data)
    except ValueError as e:
        raise RecordRefused(f"the state record is not JSON: {e}") from None
    if not isinstance(wire, dict) or type(wire.get("format")) is not int:
        raise RecordRefused("the state record has no format version")
    if wire["format"] != FORMAT:
        raise RecordRefused(f"state record format {wire['format']}: this sandboxd reads format {FORMAT} only")
    try:
        record = from_wire(StackRecord, wire)
    except ProtocolError as e:
        raise RecordRefused(f"the state record does not match format {FORMAT}: {e}") from None
    check(record)
    return record


def check(record: StackRecord) -> None:
    """What must hold between the record's fields (RecordRefused otherwise)."""
    named = [d.fd for d in record.descriptors]
    if len(set(named)) != len(named) or any(fd < 3 for fd in named):
        raise RecordRefused("the state record names a descriptor twice, or one of 0, 1, 2")
    used = used_descriptors(record)
    if sorted(used) != sorted(named):
        missing = sorted(set(used) - set(named))
        raise RecordRefused(f"the state record's descriptors do not match its fields (unnamed: {missing})")
    names = [s.name for s in record.services]
    if len(set(names)) != len(names):
        raise RecordRefused("the state record lists a service twice")
    states = {s.value for s in State}
    for service in record.services:
        if service.state not in states:
            raise RecordRefused(f"{service.name}: state {service.state!r} is unknown to this sandboxd")
    instance_states = {s.value for s in InstanceState}
    for instance in record.instances:
        if instance.service not in names or instance.state not in instance_states:
            raise RecordRefused(f"{instance.name}: unknown service or state ({instance.service!r}, {instance.state!r})")


def used_descriptors(record: StackRecord) -> list[int]:
    """Every descriptor number the record's fields refer to (-1: none)."""
    fds = [record.fork_server_fd, record.control_fd, record.lease_fd]
    fds += [fd for _key, fd in record.netns] + [s.fd for s in record.sockets]
    for s in record.services:
        fds += [s.launch.pidfd, s.output_r, s.output_w, s.notify_fd, s.listener]
        fds += [stored.fd for stored in s.fdstore] + [fd for _path, fd in s.sources]
    fds += [i.pidfd for i in record.instances]
    return [fd for fd in fds if fd >= 0]


def pack_spec(value: object) -> str:
    """The spec and plans the stack runs, as the record carries them."""
    return base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def unpack_spec(text: str) -> object:
    """The spec and plans from the record, each dataclass in them checked against this
    sandboxd's class (RecordRefused for a field it lacks or does not know). The record comes
    from the supervisor itself, through a descriptor only root can reach."""
    try:
        value = pickle.loads(base64.b64decode(text))
    except Exception as e:  # noqa: BLE001 - a class renamed or gone, whatever pickle says
        raise RecordRefused(f"the stack's spec in the state record cannot be read: {e}") from None
    _check_fields(value, set())
    return value


def _check_fields(value: object, seen: set[int]) -> None:
    if id(value) in seen or value is None or isinstance(value, (str, int, float, bool, bytes)):
        return
    seen.add(id(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        expected = {f.name for f in dataclasses.fields(value)}
        present = {name for name in getattr(value, "__dict__", {}) if not name.startswith("_")}  # not its caches
        if present != expected:
            gone, extra = sorted(expected - present), sorted(present - expected)
            raise RecordRefused(f"{type(value).__name__} in the state record: fields missing {gone}, unknown {extra}")
        for name in expected:
            _check_fields(getattr(value, name), seen)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_fields(key, seen)
            _check_fields(item, seen)
    elif isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            _check_fields(item, seen)
