"""Load a spec folder into frozen dataclasses.

A spec folder is one stack. Every `*.yaml` / `*.yml` file directly in it holds one or more YAML
documents, and every document is one unit, a mapping with `kind: service` or `kind: socket`:

    kind: socket              # sandboxd binds it and hands it to the service as fd 3, 4, ...
    name: web                 # defaults to the file's stem if the file has one unit of this kind
    listen: [unix:/run/web.sock, tcp:127.0.0.1:8080]

`load_stack` returns a `Stack`, or raises `SpecErrors` with every problem of the folder at once, each
naming file, line and key. YAML is read as nodes, not plain values, so that a problem can point at its
line. Each kind has a table of keys, each with a parser and a default; a parser raises `_Invalid` with all
problems of its value. Checks between units (names, addresses, `uses`) run once every file is read.
Reading the files, checking that nobody but root can change them (trust.py), and opening mount
sources to see what they name (pins.py) is the only I/O done here.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import posixpath
import re
import shlex
import signal
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard, TypeVar, get_args

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sandboxd.errors import SpecError, SpecErrors

Family = Literal["tcp", "udp", "unix", "unix-dgram", "unix-seqpacket"]
Restart = Literal["no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always"]
NetworkMode = Literal["private", "none", "host"]

_STREAM, _DGRAM, _SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET
_SOCKTYPES = {"tcp": _STREAM, "udp": _DGRAM, "unix": _STREAM, "unix-dgram": _DGRAM, "unix-seqpacket": _SEQPACKET}
_FAMILIES: dict[str, Family] = {family: family for family in get_args(Family)}


@dataclass(frozen=True)
class Address:
    """Where a socket listens; `str()` is the canonical form, which `parse_address` reads back."""

    family: Family
    host: str | None
    port: int | None
    path: str | None

    @property
    def is_inet(self) -> bool:
        return self.family in ("tcp", "udp")

    @property
    def is_abstract(self) -> bool:
        return self.path is not None and self.path.startswith("@")

    @property
    def socktype(self) -> int:
        return _SOCKTYPES[self.family]

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.family}:{self.path}"
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"{self.family}:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Read `tcp:127.0.0.1:80`, `udp:[::1]:53`, `127.0.0.1:80` (tcp), `unix:/path`, `unix:@name` and so on."""
    prefix, colon, rest = text.partition(":")
    family = _FAMILIES.get(prefix)
    if family is None:
        if colon and re.fullmatch(r"[a-z][a-z0-9-]*", prefix) and not rest.isdigit():
            forms = "tcp:, udp:, unix:, unix-dgram: or unix-seqpacket:"
            raise ValueError(f"unknown address family '{prefix}'; expected {forms} or HOST:PORT for tcp")
        family, rest = "tcp", text
    if family not in ("tcp", "udp"):
        return Address(family, None, None, _unix_path(family, rest))
    host, colon, port = rest.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not colon or not host or (":" in host and not bracketed):
        raise ValueError(
            f"expected HOST:PORT with an IP address like {family}:127.0.0.1:80 or {family}:[::1]:80, got '{rest}'"
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"expected an IP address like 127.0.0.1 or [::1], got '{host}' (host names are not resolved)"
        ) from None
    if bracketed and ip.version == 4:
        raise ValueError(f"brackets are for IPv6 addresses only; write {family}:{host}:{port}")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"expected a port from 0 to 65535, got '{port}'")
    return Address(family, str(ip), int(port), None)


def _unix_path(family: str, path: str) -> str:
    if path.startswith("/"):
        path = _normpath(path)
    elif path == "@" or not path.startswith("@") or "\0" in path:
        raise ValueError(f"expected an absolute path or @name after '{family}:', got '{path}'")
    if (size := len(os.fsencode(path))) >= 108:
        raise ValueError(f"expected a unix socket path shorter than 108 bytes, got {size} bytes")
    return path


def _normpath(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")


_DURATION = re.compile(r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*(us|µs|ms|s|m|h)?")
_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from `"100ms"`, `"1.5s"`, `"2m"`, `"1h"`, `"250us"` or a plain number of seconds."""
    if isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _SECONDS[match[2]]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(
            f"expected a duration like '100ms', '1.5s', '2m' or a number of seconds, got {_describe(value)}"
        )
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"expected a duration of zero or more, got {_describe(value)}")
    return seconds


@dataclass(frozen=True)
class Mount:
    source: Path | None  # the host path it names (symlinks resolved, as validation found it); None for a volume
    target: str
    readonly: bool
    line: int
    volume: str = ""  # a `kind: volume` unit's name, instead of source
    given: str = ""  # the source as written: absolute, or relative to the spec folder (pins.py opens it)


@dataclass(frozen=True)
class Tmpfs:
    """A private, writable tmpfs the spec asks for; at /tmp or /run it takes the place of the
    sandbox's own one there."""

    path: str
    size: int | None  # bytes; None = the service's tmpfs_size
    line: int


# Every tmpfs of a sandbox is capped unless the spec says otherwise: docker's /dev/shm size, which
# holds what these directories are for (sockets, pid files, locks, small temporary files) and keeps
# a service without limits from taking the host's memory through them.
DEFAULT_TMPFS_SIZE = 64 << 20
# The default process limit of a service (podman's). systemd's 15 % of pid_max would be 4915 tasks
# on a host with the classic pid_max of 32768 and 629145 on one with 4194304, too many to stop a
# fork bomb from taking the host's memory; 2048 is far above what servers need (PostgreSQL with
# 100 connections runs about 110) and keeps a bomb to about 40 MiB of kernel memory.
DEFAULT_PIDS = 2048


@dataclass(frozen=True)
class Attachment:
    """A service's place on a network: the network's name and, optionally, fixed addresses."""

    network: str
    addresses: tuple[str, ...]  # at most one IPv4 and one IPv6 address; () = chosen by sandboxd
    line: int


@dataclass(frozen=True)
class Network:
    name: str
    file: Path
    line: int
    subnet: tuple[str, ...]  # CIDRs, at most one IPv4 and one IPv6; () = chosen by sandboxd at start
    internal: bool


@dataclass(frozen=True)
class Limits:
    """Resource limits of one service; None means no limit."""

    memory: int | None = None  # bytes
    memory_high: int | None = None  # bytes: throttling above it (v2), the soft limit (v1)
    swap: int | None = None  # bytes of swap on top of memory
    pids: int | None = None
    cpu: float | None = None  # fraction of one CPU: 0.5 = half a CPU, 2 = two CPUs
    cpu_weight: int | None = None  # 1..10000, 100 = the default share
    io_weight: int | None = None  # 1..10000

    def given(self) -> list[str]:
        return [name for name in ("memory", "memory_high", "swap", "pids", "cpu", "cpu_weight", "io_weight") if getattr(self, name) is not None]

    def with_defaults(self) -> Limits:
        """The limits a service gets: these, and the default process limit unless pids is given."""
        return self if self.pids is not None else dataclasses.replace(self, pids=DEFAULT_PIDS)


@dataclass(frozen=True)
class HealthCheck:
    """A command run inside the sandbox: ready once it succeeds; unhealthy after `retries` failures."""

    exec: tuple[str, ...]
    interval: float
    timeout: float
    retries: int


Condition = Literal["started", "ready", "completed"]


@dataclass(frozen=True)
class Dependency:
    """Start only once `service` has started, is ready, or has completed successfully."""

    service: str
    condition: Condition
    line: int


@dataclass(frozen=True)
class StartLimit:
    """At most `burst` starts within `interval` seconds; then the service is failed and stays so."""

    burst: int
    interval: float


@dataclass(frozen=True)
class Service:
    name: str
    file: Path
    line: int
    command: tuple[str, ...]  # () = the image's (Entrypoint and Cmd)
    environment: tuple[tuple[str, str], ...]
    workdir: str  # "" = the image's WorkingDir, or /
    hostname: str
    restart: Restart
    restart_delay: float
    restart_steps: int
    restart_max_delay: float
    start_limit: StartLimit
    stop_signal: int
    reload_signal: int
    reload: tuple[str, ...]  # a command run inside the sandbox instead of sending reload_signal
    stop_timeout: float
    mounts: tuple[Mount, ...]
    uses: tuple[str, ...]
    network: NetworkMode | tuple[Attachment, ...]
    ready: Literal["started", "notify"] | HealthCheck
    notify_access: Literal["main", "all"]
    start_timeout: float
    watchdog: float
    start: Literal["eager", "on-demand"]
    idle_stop: float
    after: tuple[Dependency, ...]
    fdstore_max: int
    capabilities: tuple[str, ...]
    no_new_privs: bool
    limits: Limits
    limits_optional: bool
    seccomp: Literal["default", "unconfined"] | tuple[str, ...]
    userns: bool
    readonly_root: bool
    user: str  # a name (looked up in the image) or a number; "" = root
    group: str
    tmpfs: tuple[Tmpfs, ...]
    tmpfs_size: int  # bytes: the cap of /tmp, /run, /dev/shm and tmpfs entries without a size of their own
    shm_size: int | None  # bytes: /dev/shm's cap; None = tmpfs_size
    image: str  # "host", an absolute path to a root file system folder, or an image name

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        return self.network if isinstance(self.network, tuple) else ()


@dataclass(frozen=True)
class Socket:
    name: str
    file: Path
    line: int
    service: str
    listen: tuple[Address, ...]
    fdname: str
    backlog: int
    mode: int
    reuseport: bool
    netns: str  # "host", or the service in whose network namespace sandboxd binds it
    accept: bool  # one sandbox of the service per accepted connection (systemd's Accept=yes)
    max_connections: int
    proxy: Address | None  # forward each connection to this address inside the service's sandbox
    handoff: bool | None  # with proxy: a program that binds that address itself gets this socket
    # instead; None = yes unless the service has a readiness check (see `hands_off`)



@dataclass(frozen=True)
class Volume:
    """A named directory that outlives the stack: /var/lib/sandboxd/volumes/NAME until `volume rm`."""

    name: str
    file: Path
    line: int


@dataclass(frozen=True)
class Stack:
    folder: Path
    name: str
    services: tuple[Service, ...]
    sockets: tuple[Socket, ...]
    networks: tuple[Network, ...] = ()
    volumes: tuple[Volume, ...] = ()

    def network(self, name: str) -> Network:
        for network in self.networks:
            if network.name == name:
                return network
        raise KeyError(f"no network '{name}' in stack '{self.name}'")

    def members(self, network: str) -> tuple[Service, ...]:
        """The services attached to `network`, by name."""
        return tuple(s for s in self.services if any(a.network == network for a in s.attachments))

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service '{name}' in stack '{self.name}'")

    def sockets_of(self, service: str) -> tuple[Socket, ...]:
        """The sockets feeding `service`, by socket name: the order of its fds from 3 on."""
        return tuple(sock for sock in self.sockets if sock.service == service)


# --- values: a parser takes a node and the spec folder, and raises _Invalid with all problems of the value

_Problem = tuple[Node, str, str]  # node at fault, key path below the parsed key, message
_Parser = Callable[[Node, Path], Any]
_T = TypeVar("_T")


class _Invalid(Exception):
    def __init__(self, *problems: _Problem) -> None:
        super().__init__(problems)
        self.problems = list(problems)


def _fail(node: Node, message: str) -> _Invalid:
    return _Invalid((node, "", message))


def _under(prefix: str, problems: Iterable[_Problem]) -> list[_Problem]:
    return [(node, prefix + key, message) for node, key, message in problems]


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _value(node: Node) -> object:
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError) as error:
        problem = error.problem if isinstance(error, yaml.MarkedYAMLError) else error
        raise _fail(node, f"cannot read this value: {problem}") from None


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if value is None or isinstance(value, (list, dict)):
        return "nothing" if value is None else "a list" if isinstance(value, list) else "a mapping"
    return repr(value) if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"


def _scalar(convert: Callable[[object], object]) -> _Parser:
    """A parser from a function of the plain value that raises ValueError saying what it expected."""

    def parse(node: Node, folder: Path) -> object:
        try:
            return convert(_value(node))
        except ValueError as error:
            raise _fail(node, str(error)) from None

    return parse


def _checked(test: Callable[[Any], object], expected: str, convert: Callable[[Any], object] = lambda v: v) -> _Parser:
    def check(value: object) -> object:
        if test(value):
            return convert(value)
        raise ValueError(f"expected {expected}, got {_describe(value)}")

    return _scalar(check)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_NAME_RULE = "1 to 63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit (names become cgroup and file names)"
_HOSTNAME = re.compile(r"(?=.{1,64}$)([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.|$))+")
_name = _checked(lambda v: isinstance(v, str) and NAME.fullmatch(v), f"a name of {_NAME_RULE}")
_hostname = _checked(
    lambda v: isinstance(v, str) and _HOSTNAME.fullmatch(v),
    "a hostname of letters, digits, '-' and '.', at most 64 long",
)
_absolute = _checked(
    lambda v: isinstance(v, str) and v.startswith("/") and "\0" not in v, "an absolute path", _normpath
)
_boolean = _checked(lambda v: isinstance(v, bool), "true or false")
_restart = _checked(  # `v is False` because YAML 1.1 reads an unquoted `no` as false
    lambda v: v in get_args(Restart) or v is False, f"one of: {', '.join(get_args(Restart))}", lambda v: v or "no"
)
_backlog = _checked(lambda v: _is_int(v) and 1 <= v <= 65535, "a backlog from 1 to 65535")
_fdname = _checked(
    lambda v: isinstance(v, str) and re.fullmatch(r"[ -9;-~]{1,255}", v),
    "an fd name of 1 to 255 printable ASCII characters without ':'",
)
_address = _checked(
    lambda v: isinstance(v, str), "an address like 'unix:/run/app.sock' or 'tcp:127.0.0.1:80'", parse_address
)


def _signal_number(value: object) -> int:
    if isinstance(value, str) and (name := "SIG" + value.upper().removeprefix("SIG")) in signal.Signals.__members__:
        return int(signal.Signals[name])
    if _is_int(value) and value in signal.valid_signals():
        return value
    raise ValueError(f"expected a signal name like 'SIGTERM' or 'TERM', or a signal number, got {_describe(value)}")


def _mode(value: object) -> int:
    if isinstance(value, str) and (match := re.fullmatch(r"(?:0o?)?([0-7]{1,3})", value)):
        return int(match[1], 8)
    if _is_int(value) and 0 <= value <= 0o777:
        return value
    hint = " (a number without a leading 0 is decimal; write '0666')" if _is_int(value) else ""
    raise ValueError(f"expected a file mode from 0 to 0777 like '0660' or 0o660, got {_describe(value)}{hint}")


def _list(parse: Callable[[Node, Path], _T], what: str, single: bool = False) -> Callable[[Node, Path], tuple[_T, ...]]:
    """A parser for a list of items; with `single`, one string item may also stand alone."""

    def parse_list(node: Node, folder: Path) -> tuple[_T, ...]:
        if single and isinstance(node, ScalarNode) and isinstance(_value(node), str):
            return (parse(node, folder),)
        if not isinstance(node, SequenceNode):
            raise _fail(node, f"expected {what}, got {_describe(_value(node))}")
        items, problems = [], []
        for index, item in enumerate(node.value):
            try:
                items.append(parse(item, folder))
            except _Invalid as invalid:
                problems += _under(f"[{index}]", invalid.problems)
        if problems:
            raise _Invalid(*problems)
        return tuple(items)

    return parse_list


def _text(node: Node, folder: Path) -> str:
    """A string; a number is taken as written (`8080`, `1.10`), as it is text to the program anyway."""
    value = str(node.value) if _is_int(number := _value(node)) or isinstance(number, float) else number
    if not isinstance(value, str):
        raise _fail(node, f"expected a string, got {_describe(value)}")
    if "\0" in value:
        raise _fail(node, "expected a string without NUL characters")
    return value


def _command(node: Node, folder: Path) -> tuple[str, ...]:
    if isinstance(node, ScalarNode) and isinstance(text := _value(node), str):
        try:
            argv = tuple(shlex.split(text))
        except ValueError as error:
            raise _fail(node, f"cannot split the command into words: {str(error).lower()}") from None
    else:
        argv = _list(_text, "a list of strings or a string")(node, folder)
    if not argv or not argv[0]:
        raise _fail(node, "expected a program to run, got an empty command")
    return argv


def _entries(node: Node, expected: str) -> tuple[dict[str, tuple[Node, Node]], list[_Problem]]:
    """The keys of a mapping node in order; a repeated key is a problem and the first one counts."""
    if not isinstance(node, MappingNode):
        raise _fail(node, f"expected {expected}, got {_describe(_value(node))}")
    entries: dict[str, tuple[Node, Node]] = {}
    problems: list[_Problem] = []
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if not isinstance(key_node, ScalarNode):
            problems.append((key_node, "", f"expected a plain key, got {_describe(_value(key_node))}"))
        elif key in entries:
            problems.append((key_node, f".{key}", f"duplicate key '{key}' (also at line {_line(entries[key][0])})"))
        else:
            entries[key] = (key_node, value_node)
    return entries, problems


def _environment(node: Node, folder: Path) -> tuple[tuple[str, str], ...]:
    entries, problems = _entries(node, "a mapping of variable names to values")
    pairs = []
    for key, (key_node, value_node) in entries.items():
        if not key or "=" in key or "\0" in key:
            problems.append((key_node, f".{key}", f"expected a variable name without '=', got '{key}'"))
        try:
            pairs.append((key, _text(value_node, folder)))
        except _Invalid as invalid:
            problems += _under(f".{key}", invalid.problems)
    if problems:
        raise _Invalid(*problems)
    return tuple(pairs)


def _source(node: Node, folder: Path) -> tuple[Path, str]:
    """The host path a source names, and the source as written. A relative one must stay inside
    the spec folder: a `..` or a symlink that leads out is refused (pins.py says how)."""
    from sandboxd.host.pins import open_source, real_path, source_problem

    text = _text(node, folder)
    try:
        fd = open_source(folder, text)
    except OSError as e:
        raise _fail(node, source_problem(folder, text, e)) from None
    try:
        return real_path(fd), text
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Required:
    hint: str  # what to write, for the message about the missing key


@dataclass(frozen=True)
class _Key:
    parse: _Parser
    default: object  # a value, _Required, or _UNIT_NAME


_UNIT_NAME = object()


def _read_keys(node: Node, table: Mapping[str, _Key], folder: Path, what: str) -> tuple[dict[str, Any], list[_Problem]]:
    """The parsed values of the keys present, and the problems of all keys, unknown and missing ones too."""
    entries, problems = _entries(node, what)
    values: dict[str, Any] = {}
    for key, (key_node, value_node) in entries.items():
        if key not in table:
            close = difflib.get_close_matches(key, list(table), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(table)}"
            problems.append((key_node, f".{key}", f"unknown key '{key}'; {hint}"))
            continue
        try:
            values[key] = table[key].parse(value_node, folder)
        except _Invalid as invalid:
            problems += _under(f".{key}", invalid.problems)
    for key, spec in table.items():
        if key not in entries and isinstance(spec.default, _Required):
            problems.append((node, f".{key}", f"missing key '{key}'; expected {spec.default.hint}"))
    return values, problems


def _with_defaults(values: dict[str, Any], table: Mapping[str, _Key], name: str) -> dict[str, Any]:
    return {key: values.get(key, name if spec.default is _UNIT_NAME else spec.default) for key, spec in table.items()}


_MOUNT_KEYS = {
    "source": _Key(_source, None),
    "volume": _Key(_name, ""),
    "target": _Key(_absolute, _Required("an absolute path inside the sandbox")),
    "readonly": _Key(_boolean, None),
}


def _mount(node: Node, folder: Path) -> Mount:
    values, problems = _read_keys(node, _MOUNT_KEYS, folder, "a mapping with source (or volume), target and readonly")
    if ("source" in values) == ("volume" in values) and not any(key in (".source", ".volume") for _, key, _ in problems):
        given = "both" if "source" in values else "neither"
        problems.append((node, ".source", f"expected either source (a host path) or volume (a volume's name), got {given}"))
    if problems:
        raise _Invalid(*problems)
    values = _with_defaults(values, _MOUNT_KEYS, "")
    if values["readonly"] is None:  # a volume is for data that is written; a host path is read-only unless asked
        values["readonly"] = not values["volume"]
    values["source"], values["given"] = values["source"] or (None, "")
    return Mount(line=_line(node), **values)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got '{text}'") from None


def _one_per_version(items: tuple[str, ...], what: str, node: Node) -> tuple[str, ...]:
    versions = [ipaddress.ip_network(item, strict=False).version for item in items]
    if len(versions) != len(set(versions)):
        raise _fail(node, f"expected at most one IPv4 and one IPv6 {what}")
    return items


def _attachment(node: Node, folder: Path) -> Attachment:
    if isinstance(node, ScalarNode):
        return Attachment(_name(node, folder), (), _line(node))
    values, problems = _read_keys(node, _ATTACHMENT_KEYS, folder, "a network name or a mapping with name and address")
    if problems:
        raise _Invalid(*problems)
    addresses = _one_per_version(values.get("address", ()), "address", node)
    return Attachment(values["name"], addresses, _line(node))


_ATTACHMENT_KEYS = {
    "name": _Key(_name, _Required("the network's name")),
    "address": _Key(_list(_scalar(lambda v: _ip(str(v))), "an address or a list of them", single=True), ()),
}
_MODES = ", ".join(get_args(NetworkMode))


def _network_mode(node: Node, folder: Path) -> NetworkMode | tuple[Attachment, ...]:
    if isinstance(node, ScalarNode):
        value = _value(node)
        if value in get_args(NetworkMode):
            return value  # type: ignore[return-value]
        raise _fail(node, f"expected one of: {_MODES}, or a list of network names, got {_describe(value)}")
    attachments = _list(_attachment, f"one of: {_MODES}, or a list of network names")(node, folder)
    if not attachments:
        raise _fail(node, "expected at least one network in the list")
    return attachments


def _subnet(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a subnet like 10.89.0.0/24 or fd00:89::/64, got {_describe(value)}")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        raise ValueError(f"expected a subnet like 10.89.0.0/24 or fd00:89::/64, got '{value}' ({error})") from None
    if net.num_addresses < 4:
        raise ValueError(f"subnet '{value}' is too small: it needs room for at least two services")
    return str(net)


def _subnets(node: Node, folder: Path) -> tuple[str, ...]:
    subnets = _list(_scalar(_subnet), "a subnet or a list of them", single=True)(node, folder)
    return _one_per_version(subnets, "subnet", node)


_START_LIMIT_KEYS = {
    "burst": _Key(_checked(lambda v: _is_int(v) and v >= 1, "a whole number of 1 or more"), 5),
    "interval": _Key(_scalar(parse_duration), 10.0),
}


def _start_limit(node: Node, folder: Path) -> StartLimit:
    values, problems = _read_keys(node, _START_LIMIT_KEYS, folder, "a mapping with burst and interval")
    if problems:
        raise _Invalid(*problems)
    return StartLimit(**_with_defaults(values, _START_LIMIT_KEYS, ""))


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?[bB])?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from `256M`, `1.5G`, `512MiB`, `1024k` or a plain number of bytes (binary units)."""
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(float(match[1]) * _UNITS[match[2].lower()])
    if _is_int(value) and value >= 0:
        return value
    raise ValueError(f"expected a size like 256M, 1G or a number of bytes, got {_describe(value)}")


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size < 1 << 20:
        raise ValueError(f"expected at least 1M, got {_describe(value)}")
    return size


def _tmpfs_size(value: object) -> int:
    size = parse_size(value)
    if size < 4096:
        why = "; a tmpfs of size 0 would have no cap at all" if size == 0 else ""
        raise ValueError(f"expected a size of at least 4K (one page), like 64M, got {_describe(value)}{why}")
    return size


_TMPFS_KEYS = {
    "path": _Key(_absolute, _Required("the absolute path to mount it on")),
    "size": _Key(_scalar(_tmpfs_size), None),
}


def _tmpfs(node: Node, folder: Path) -> Tmpfs:
    if isinstance(node, ScalarNode):
        path, size = _absolute(node, folder), None
    else:
        values, problems = _read_keys(node, _TMPFS_KEYS, folder, "an absolute path or a mapping with path and size")
        if problems:
            raise _Invalid(*problems)
        path, size = values["path"], values.get("size")
    if path == "/dev/shm":
        raise _fail(node, "/dev/shm is the sandbox's own tmpfs already; set its size with shm_size")
    return Tmpfs(path, size, _line(node))


def _tmpfs_list(node: Node, folder: Path) -> tuple[Tmpfs, ...]:
    entries = _list(_tmpfs, "an absolute path, a mapping with path and size, or a list of them", single=True)(node, folder)
    first: dict[str, int] = {}
    problems: list[_Problem] = []
    for index, entry in enumerate(entries):
        if entry.path in first:
            item = node.value[index] if isinstance(node, SequenceNode) else node
            problems.append((item, f"[{index}]", f"{entry.path} is in tmpfs[{first[entry.path]}] already"))
        first.setdefault(entry.path, index)
    if problems:
        raise _Invalid(*problems)
    return entries


_LIMIT_KEYS = {
    "memory": _Key(_scalar(_positive_size), None),
    "memory_high": _Key(_scalar(_positive_size), None),
    "swap": _Key(_scalar(parse_size), None),
    "pids": _Key(_checked(lambda v: _is_int(v) and v >= 1, "a whole number of 1 or more"), None),
    "cpu": _Key(
        _checked(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.01 <= v <= 1024, "a number of CPUs from 0.01 up, like 0.5", float),
        None,
    ),
    "cpu_weight": _Key(_checked(lambda v: _is_int(v) and 1 <= v <= 10000, "a whole number from 1 to 10000"), None),
    "io_weight": _Key(_checked(lambda v: _is_int(v) and 1 <= v <= 10000, "a whole number from 1 to 10000"), None),
}


def _limits(node: Node, folder: Path) -> Limits:
    values, problems = _read_keys(node, _LIMIT_KEYS, folder, "a mapping of limits: memory, memory_high, swap, pids, cpu, cpu_weight, io_weight")
    if "swap" in values and "memory" not in values:
        problems.append((node, ".swap", "swap needs memory: it is swap on top of the memory limit"))
    if problems:
        raise _Invalid(*problems)
    return Limits(**values)


def _seccomp(node: Node, folder: Path) -> Literal["default", "unconfined"] | tuple[str, ...]:
    from sandboxd.kernel.seccomp import known_calls

    if isinstance(node, ScalarNode):
        value = _value(node)
        if value in ("default", "unconfined"):
            return value
        raise _fail(node, f"expected default, unconfined or a list of system calls to allow, got {_describe(value)}")

    def call(value: object) -> str:
        if not isinstance(value, str) or value not in known_calls():
            close = difflib.get_close_matches(str(value), sorted(known_calls()), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the filter refuses only: {', '.join(sorted(known_calls()))}"
            raise ValueError(f"{_describe(value)} is not refused by the default filter{hint}")
        return value

    return _list(_scalar(call), "a list of system call names")(node, folder)


def _capability(value: object) -> str:
    from sandboxd.kernel.abi import CAPABILITIES

    name = str(value).upper().removeprefix("CAP_") if isinstance(value, str) else ""
    if name not in CAPABILITIES:
        close = difflib.get_close_matches(name, list(CAPABILITIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"expected a capability name like NET_BIND_SERVICE, got {_describe(value)}{hint}")
    return name


_HEALTH_KEYS = {
    "exec": _Key(lambda node, folder: _command(node, folder), _Required("the command to run inside the sandbox")),
    "interval": _Key(_scalar(parse_duration), 5.0),
    "timeout": _Key(_scalar(parse_duration), 5.0),
    "retries": _Key(_checked(lambda v: _is_int(v) and v >= 1, "a whole number of 1 or more"), 3),
}


def _ready(node: Node, folder: Path) -> Literal["started", "notify"] | HealthCheck:
    if isinstance(node, ScalarNode):
        value = _value(node)
        if value in ("started", "notify"):
            return value
        raise _fail(node, f"expected started, notify or a health check {{exec: [...], interval, timeout, retries}}, got {_describe(value)}")
    values, problems = _read_keys(node, _HEALTH_KEYS, folder, "started, notify or a mapping with exec, interval, timeout and retries")
    if problems:
        raise _Invalid(*problems)
    return HealthCheck(**_with_defaults(values, _HEALTH_KEYS, ""))


_DEPENDENCY_KEYS = {
    "service": _Key(_name, _Required("the service to wait for")),
    "condition": _Key(_checked(lambda v: v in get_args(Condition), "started, ready or completed"), "started"),
}


def _dependency(node: Node, folder: Path) -> Dependency:
    if isinstance(node, ScalarNode):
        return Dependency(_name(node, folder), "started", _line(node))
    values, problems = _read_keys(node, _DEPENDENCY_KEYS, folder, "a service name or a mapping with service and condition")
    if problems:
        raise _Invalid(*problems)
    return Dependency(line=_line(node), **_with_defaults(values, _DEPENDENCY_KEYS, ""))


_internal = _checked(
    lambda v: v is True,
    "true (networks are internal: no address on the host, no route, no forwarding; others are not supported yet)",
)


def _image(node: Node, folder: Path) -> str:
    """host, a root file system folder (absolute, or ./ ../ relative to the spec folder), or an image name."""
    text = _text(node, folder)
    if text == "host" or (NAME.fullmatch(text) and "/" not in text):
        return text
    if text.startswith(("/", "./", "../")):
        path = Path(os.path.normpath(folder / text))
        if not path.is_dir():
            raise _fail(node, f"image folder '{text}' does not exist (looked for {path})")
        return str(path)
    raise _fail(node, f"expected host, a folder (/path, ./path) or an image name of {_NAME_RULE}, got '{text}'")


def _proxy_target(node: Node, folder: Path) -> Address:
    address = _address(node, folder)
    if address.socktype != socket.SOCK_STREAM:
        raise _fail(node, f"expected a stream address to forward to (tcp: or unix:), got {address}")
    if address.is_inet and address.port == 0:
        raise _fail(node, "expected the port the program listens on, got 0")
    return address  # type: ignore[no-any-return]


def _listen(node: Node, folder: Path) -> tuple[Address, ...]:
    if addresses := _list(_address, "an address or a list of addresses", single=True)(node, folder):
        return addresses
    raise _fail(node, "expected at least one address")


_SERVICE_KEYS = {
    "command": _Key(_command, ()),
    "environment": _Key(_environment, ()),
    "workdir": _Key(_absolute, ""),
    "hostname": _Key(_hostname, _UNIT_NAME),
    "restart": _Key(_restart, "on-failure"),
    "restart_delay": _Key(_scalar(parse_duration), 0.1),
    "restart_steps": _Key(_checked(lambda v: _is_int(v) and 0 <= v <= 1000, "a whole number from 0 to 1000"), 0),
    "restart_max_delay": _Key(_scalar(parse_duration), 5.0),
    "start_limit": _Key(lambda node, folder: _start_limit(node, folder), StartLimit(5, 10.0)),
    "stop_signal": _Key(_scalar(_signal_number), int(signal.SIGTERM)),
    "reload_signal": _Key(_scalar(_signal_number), int(signal.SIGHUP)),
    "reload": _Key(lambda node, folder: _command(node, folder), ()),
    "stop_timeout": _Key(_scalar(parse_duration), 10.0),
    "mounts": _Key(_list(_mount, "a list of mappings with source, target and readonly"), ()),
    "uses": _Key(_list(_name, "a socket name or a list of them", single=True), ()),
    "network": _Key(_network_mode, "private"),
    "ready": _Key(lambda node, folder: _ready(node, folder), "started"),
    "notify_access": _Key(_checked(lambda v: v in ("main", "all"), "main or all"), "main"),
    "start_timeout": _Key(_scalar(parse_duration), 90.0),
    "watchdog": _Key(_scalar(parse_duration), 0.0),
    "start": _Key(_checked(lambda v: v in ("eager", "on-demand"), "eager or on-demand"), "eager"),
    "idle_stop": _Key(_scalar(parse_duration), 0.0),
    "capabilities": _Key(lambda node, folder: _list(_scalar(_capability), "a list of capability names like NET_BIND_SERVICE")(node, folder), ()),
    "no_new_privs": _Key(_boolean, True),
    "limits": _Key(lambda node, folder: _limits(node, folder), Limits()),
    "limits_optional": _Key(_boolean, False),
    "seccomp": _Key(lambda node, folder: _seccomp(node, folder), "default"),
    "userns": _Key(_boolean, True),
    "readonly_root": _Key(_boolean, True),
    "image": _Key(_image, "host"),
    "user": _Key(_checked(lambda v: (isinstance(v, str) and bool(re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", v))) or (_is_int(v) and v >= 0), "a user name or a uid", str), ""),
    "group": _Key(_checked(lambda v: (isinstance(v, str) and bool(re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", v))) or (_is_int(v) and v >= 0), "a group name or a gid", str), ""),
    "tmpfs": _Key(lambda node, folder: _tmpfs_list(node, folder), ()),
    "tmpfs_size": _Key(_scalar(_tmpfs_size), DEFAULT_TMPFS_SIZE),
    "shm_size": _Key(_scalar(_tmpfs_size), None),
    "fdstore_max": _Key(_checked(lambda v: _is_int(v) and 0 <= v <= 4096, "a whole number from 0 to 4096"), 0),
    "after": _Key(lambda node, folder: _list(_dependency, "a list of service names or {service, condition} mappings", single=True)(node, folder), ()),
}
_SOCKET_KEYS = {
    "service": _Key(_name, _UNIT_NAME),
    "listen": _Key(_listen, _Required("an address like 'unix:/run/app.sock' or 'tcp:127.0.0.1:80', or a list")),
    "fdname": _Key(_fdname, _UNIT_NAME),
    "backlog": _Key(_backlog, socket.SOMAXCONN),
    "mode": _Key(_scalar(_mode), 0o666),
    "reuseport": _Key(_boolean, False),
    "netns": _Key(_checked(lambda v: isinstance(v, str) and (NAME.fullmatch(v)), "host, service, or a service name"), "host"),
}
_SOCKET_KEYS["accept"] = _Key(_boolean, False)
_SOCKET_KEYS["max_connections"] = _Key(_checked(lambda v: _is_int(v) and 1 <= v <= 65536, "a whole number from 1 to 65536"), 64)
_SOCKET_KEYS["proxy"] = _Key(_proxy_target, None)
_SOCKET_KEYS["handoff"] = _Key(_boolean, None)
_NETWORK_KEYS = {
    "subnet": _Key(_subnets, ()),
    "internal": _Key(_internal, True),
}
_KINDS: dict[str, tuple[type[Service | Socket | Network | Volume], dict[str, _Key]]] = {
    "service": (Service, _SERVICE_KEYS),
    "socket": (Socket, _SOCKET_KEYS),
    "network": (Network, _NETWORK_KEYS),
    "volume": (Volume, {}),
}


# --- files and units


@dataclass(frozen=True)
class _Found:
    """A unit as read from its document; `unit` is None when the document has problems."""

    kind: str
    name: str | None
    file: Path
    lines: dict[str, int]  # key path ("listen[1]") -> line; "" -> the document's line
    unit: Service | Socket | Network | Volume | None

    def key(self, key: str, index: int) -> str:
        return f"{key}[{index}]" if f"{key}[{index}]" in self.lines else key

    def where(self, key: str) -> str:
        return f"{self.file.name}:{self.lines.get(key, self.lines[''])}"

    def error(self, key: str, message: str) -> SpecError:
        return SpecError(self.file, self.lines.get(key, self.lines[""]), key, message)


def load_stack(folder: Path) -> Stack:
    """Read every spec file of `folder`; raise SpecErrors with all problems found, or return the stack."""
    root = Path(folder).resolve()
    errors: list[SpecError] = []
    found: list[_Found] = []
    files = _spec_files(root)
    if (distrusted := _distrusted(root, "this spec folder")) is not None:
        raise SpecErrors([distrusted])  # what its files say does not count
    for file in files:
        if (distrusted := _distrusted(file, "this spec file")) is not None:
            errors.append(distrusted)
            continue
        errors += _load_file(file, found)
    errors += _duplicate_names(found) + _missing_services(found) + _address_clashes(found) + _bad_uses(found)
    errors += _bad_networks(found) + _bad_netns(found) + _bad_activation(found) + _bad_dependencies(found)
    errors += _bad_volumes(found) + _bad_proxies(found) + _bad_roots(found)
    if not found and not errors:
        errors.append(SpecError(root, 0, "", "no units in this folder: every spec file is empty"))
    if errors:
        raise SpecErrors(errors)
    units = sorted((f.unit for f in found if f.unit is not None), key=lambda unit: unit.name)
    services = tuple(unit for unit in units if isinstance(unit, Service))
    sockets = tuple(unit for unit in units if isinstance(unit, Socket))
    networks = tuple(unit for unit in units if isinstance(unit, Network))
    return Stack(root, root.name, services, sockets, networks, tuple(unit for unit in units if isinstance(unit, Volume)))


def _distrusted(path: Path, what: str) -> SpecError | None:
    """A spec folder says what runs as root with which host paths: only root may be able to
    change it, or its files, or a folder above them (trust.py)."""
    from sandboxd.spec.trust import untrusted

    # A file is checked with its folder (strict=2): a sticky spec folder is no better than any other.
    try:
        found = untrusted(path, strict=1 if path.is_dir() else 2)
    except OSError as e:
        return SpecError(path, 0, "", f"cannot check who may change {what}: {e.strerror}")
    if found is None:
        return None
    return SpecError(
        path,
        0,
        "",
        f"refusing {what}: {found.path} is {found.why}, so someone besides root could change what sandboxd runs as root; "
        f"make it root's and writable by root alone: {found.fix}",
    )


def _spec_files(folder: Path) -> list[Path]:
    try:
        paths = sorted(folder.iterdir())
    except FileNotFoundError:
        message = "spec folder does not exist"
    except OSError as error:
        message = f"cannot read the spec folder: {error.strerror}"
    else:
        if files := [p for p in paths if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()]:
            return files
        message = "no spec files (*.yaml, *.yml) in this folder"
    raise SpecErrors([SpecError(folder, 0, "", message)])


def _load_file(file: Path, found: list[_Found]) -> list[SpecError]:
    """Append the units of `file` to `found`; return its problems."""
    try:
        documents = list(yaml.compose_all(file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    except OSError as error:
        return [SpecError(file, 0, "", f"cannot read the file: {error.strerror}")]
    except UnicodeDecodeError as error:
        return [SpecError(file, 0, "", f"expected UTF-8 text, got byte 0x{error.object[error.start]:02x}")]
    except yaml.MarkedYAMLError as error:
        mark, context = error.problem_mark or error.context_mark, f" ({error.context})" if error.context else ""
        return [SpecError(file, mark.line + 1 if mark else 0, "", f"invalid YAML: {error.problem or error}{context}")]
    except yaml.YAMLError as error:
        return [SpecError(file, 0, "", f"invalid YAML: {str(error).splitlines()[0]}")]
    documents = [node for node in documents if node.tag != "tag:yaml.org,2002:null"]
    problems: list[_Problem] = []
    kinds: list[str | None] = []
    for node in documents:
        try:
            kinds.append(_kind(node))
        except _Invalid as invalid:
            problems += invalid.problems
            kinds.append(None)
    for node, kind in zip(documents, kinds):
        if kind is not None and isinstance(node, MappingNode):
            problems += _load_unit(node, kind, file, kinds.count(kind), found)
    return [SpecError(file, _line(node), key.lstrip("."), message) for node, key, message in problems]


def _kind(node: Node) -> str:
    expected = "expected one of: service, socket, network, volume"
    if not isinstance(node, MappingNode):
        raise _fail(node, f"expected a unit, a mapping with 'kind: service', 'kind: socket', 'kind: network' or 'kind: volume', got {_describe(_value(node))}")
    for key_node, value_node in node.value:
        if key_node.value == "kind":
            if isinstance(kind := _value(value_node), str) and kind in _KINDS:
                return kind
            raise _Invalid((value_node, "kind", f"unknown kind {_describe(kind)}; {expected}"))
    raise _Invalid((node, "kind", f"missing key 'kind'; {expected}"))


def _load_unit(node: MappingNode, kind: str, file: Path, count: int, found: list[_Found]) -> list[_Problem]:
    cls, keys = _KINDS[kind]
    default_name: object = file.stem
    if count > 1:
        default_name = _Required(f"a name, since {file.name} holds more than one {kind}")
    elif not NAME.fullmatch(file.stem):
        default_name = _Required(f"a name, since the file name '{file.stem}' is not a valid one")
    table = {"kind": _Key(lambda node, folder: kind, kind), "name": _Key(_name, default_name), **keys}
    values, problems = _read_keys(node, table, file.parent, "a mapping")
    if kind == "service" and "command" not in values and values.get("image", "host") == "host" and "command" not in {str(k.value) for k, _ in node.value}:
        problems.append((node, ".command", "missing key 'command'; expected the program to run, as a list of strings or a string"))
    name = values.get("name", default_name)
    name = name if isinstance(name, str) else None
    unit = None
    if name is not None and not problems:
        unit = cls(name=name, file=file, line=_line(node), **_with_defaults(values, keys, name))
    lines = {"": _line(node)}
    for key_node, value_node in node.value:
        lines.setdefault(str(key_node.value), _line(value_node))
        for index, item in enumerate(value_node.value if isinstance(value_node, SequenceNode) else ()):
            lines.setdefault(f"{key_node.value}[{index}]", _line(item))
    found.append(_Found(kind, name, file, lines, unit))
    return problems


# --- checks between units: they name units with problems of their own, but look inside valid ones only


def _first_of_each(found: list[_Found], kind: str) -> dict[str, _Found]:
    first: dict[str, _Found] = {}
    for unit in found:
        if unit.kind == kind and unit.name is not None:
            first.setdefault(unit.name, unit)
    return first


def _suggest(name: str, known: Iterable[str], kinds: str) -> str:
    if close := difflib.get_close_matches(name, list(known), n=1):
        return f"; did you mean '{close[0]}'?"
    return f"; {kinds} in this folder: {', '.join(sorted(known))}" if known else f"; this folder has no {kinds}"


def _duplicate_names(found: list[_Found]) -> list[SpecError]:
    firsts = {kind: _first_of_each(found, kind) for kind in _KINDS}
    duplicates = [(unit, firsts[unit.kind][unit.name]) for unit in found if unit.name is not None]
    return [
        unit.error("name", f"duplicate {unit.kind} '{unit.name}' (also defined at {first.where('name')})")
        for unit, first in duplicates
        if first is not unit
    ]


def _missing_services(found: list[_Found]) -> list[SpecError]:
    services = _first_of_each(found, "service")
    return [
        unit.error("service", f"no service '{name}' to pass this socket to{_suggest(name, services, 'services')}")
        for unit in found
        if isinstance(unit.unit, Socket) and (name := unit.unit.service) not in services
    ]


def _overlap(a: Address, b: Address) -> bool:
    if not (a.is_inet and b.is_inet):
        return a.path is not None and a.path == b.path
    if a.family != b.family or a.port != b.port or a.port == 0:
        return False
    host_a, host_b = ipaddress.ip_address(a.host or ""), ipaddress.ip_address(b.host or "")
    return host_a.version == host_b.version and (host_a == host_b or host_a.is_unspecified or host_b.is_unspecified)


def hands_off(sock: Socket, service: Service) -> bool:
    """Whether a program that binds the proxy address of `sock` is given the socket itself. Not by
    default when the service has a readiness check: a handed-off socket is served from the moment
    the program accepts, while forwarding waits until it is ready."""
    if sock.proxy is None or len(sock.listen) != 1:
        return False
    return sock.handoff if sock.handoff is not None else service.ready == "started"


def socket_namespace(sock: Socket) -> str | None:
    """The service in whose network namespace `sock` is bound, or None for the host's."""
    if sock.netns == "host":
        return None
    return sock.service if sock.netns == "service" else sock.netns


def _clash_scope(sock: Socket, address: Address) -> str | None:
    """Unix paths share the file system; inet and abstract addresses belong to a network namespace."""
    return "" if address.path and not address.is_abstract else socket_namespace(sock) or "host"


def _address_clashes(found: list[_Found]) -> list[SpecError]:
    seen: list[tuple[_Found, str, Address, str | None]] = []
    errors = []
    for unit in found:
        if not isinstance(unit.unit, Socket):
            continue
        for index, address in enumerate(unit.unit.listen):
            key, scope = unit.key("listen", index), _clash_scope(unit.unit, address)
            for other, other_key, other_address, other_scope in seen:
                if scope == other_scope and _overlap(address, other_address):
                    verb = "is already used by" if address == other_address else f"overlaps {other_address} of"
                    owner = f"{other_key} of this socket" if other is unit else f"socket '{other.name}'"
                    errors.append(unit.error(key, f"{address} {verb} {owner} ({other.where(other_key)})"))
                    break
            seen.append((unit, key, address, scope))
    return errors


def _networks_of(service: Service | None) -> set[str]:
    return {a.network for a in service.attachments} if service else set()


def _unreachable(client: Service, sock: Socket, address: Address, services: dict[str, _Found]) -> str | None:
    """Why `client` cannot reach `address` of `sock`, or None if it can."""
    owner = socket_namespace(sock)
    if owner == client.name or (owner is None and client.network == "host"):
        return None
    if address.is_abstract:
        where = f"that of '{owner}'" if owner else "the host's"
        return f"abstract sockets belong to one network namespace ({where}); use a path"
    if owner is None:
        return (
            f"it is bound in the host's network namespace, which '{client.name}' does not share; bind it in its "
            f"service's namespace (netns: service) on a network both are attached to, or use a unix socket"
        )
    if address.host and ipaddress.ip_address(address.host).is_loopback:
        return f"it listens on loopback inside the namespace of '{owner}', which only '{owner}' reaches; listen on 0.0.0.0 or [::]"
    found = services.get(owner)
    shared = _networks_of(found.unit if found and isinstance(found.unit, Service) else None)
    if shared & _networks_of(client):
        return None
    if not shared:
        return f"'{owner}' is on no network; attach '{owner}' and '{client.name}' to one (network: [NAME])"
    return f"'{client.name}' shares no network with '{owner}'; attach it to one of: {', '.join(sorted(shared))}"


def _bad_uses(found: list[_Found]) -> list[SpecError]:
    sockets = _first_of_each(found, "socket")
    services = _first_of_each(found, "service")
    errors = []
    for unit in found:
        if not isinstance(unit.unit, Service):
            continue
        for index, name in enumerate(unit.unit.uses):
            key, used = unit.key("uses", index), sockets.get(name)
            if used is None:
                errors.append(unit.error(key, f"no socket '{name}' to use{_suggest(name, sockets, 'sockets')}"))
                continue
            if not isinstance(used.unit, Socket):
                continue
            for address in used.unit.listen:
                if address.is_inet or address.is_abstract:
                    why = _unreachable(unit.unit, used.unit, address, services)
                    if why:
                        errors.append(unit.error(key, f"socket '{name}' listens on {address}, but {why}"))
    return errors


def _bad_netns(found: list[_Found]) -> list[SpecError]:
    services = _first_of_each(found, "service")
    errors = []
    for unit in found:
        if not isinstance(unit.unit, Socket) or unit.unit.netns == "host":
            continue
        owner = socket_namespace(unit.unit)
        assert owner is not None
        target = services.get(owner)
        if target is None:
            if unit.unit.netns != "service":
                errors.append(unit.error("netns", f"expected host, service or a service name, got '{owner}'{_suggest(owner, services, 'services')}"))
            continue
        if isinstance(target.unit, Service) and target.unit.network == "host":
            errors.append(
                unit.error(
                    "netns",
                    f"service '{owner}' runs in the host's network namespace (network: host), so it has no namespace "
                    "of its own to bind in; use netns: host",
                )
            )
    return errors


def _bad_networks(found: list[_Found]) -> list[SpecError]:
    networks = _first_of_each(found, "network")
    errors: list[SpecError] = []
    subnets: list[tuple[_Found, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for unit in found:
        if isinstance(unit.unit, Network):
            for cidr in unit.unit.subnet:
                net = ipaddress.ip_network(cidr)
                for other, other_net in subnets:
                    if other_net.version == net.version and net.overlaps(other_net):
                        errors.append(unit.error("subnet", f"{net} overlaps {other_net} of network '{other.name}' ({other.where('subnet')})"))
                subnets.append((unit, net))
    taken: dict[tuple[str, str], str] = {}
    for unit in found:
        if not isinstance(unit.unit, Service):
            continue
        seen: set[str] = set()
        for index, attachment in enumerate(unit.unit.attachments):
            key = unit.key("network", index)
            network = networks.get(attachment.network)
            if network is None:
                errors.append(unit.error(key, f"no network '{attachment.network}'{_suggest(attachment.network, networks, 'networks')}"))
                continue
            if attachment.network in seen:
                errors.append(unit.error(key, f"network '{attachment.network}' is listed twice"))
            seen.add(attachment.network)
            if not isinstance(network.unit, Network):
                continue
            for address in attachment.addresses:
                errors += _bad_address(unit, key, attachment.network, network.unit, address, taken)
    return errors


def _bad_address(unit: _Found, key: str, name: str, network: Network, address: str, taken: dict[tuple[str, str], str]) -> list[SpecError]:
    ip = ipaddress.ip_address(address)
    nets = [ipaddress.ip_network(c) for c in network.subnet if ipaddress.ip_network(c).version == ip.version]
    if not nets:
        return [unit.error(key, f"{address}: network '{name}' has no IPv{ip.version} subnet; give it one (subnet:) to fix addresses in it")]
    net = nets[0]
    if ip not in net:
        return [unit.error(key, f"{address} is outside the subnet {net} of network '{name}'")]
    if ip == net.network_address or (ip.version == 4 and ip == net.broadcast_address):
        return [unit.error(key, f"{address} is the network or broadcast address of {net}; pick a host address")]
    owner = taken.setdefault((name, str(ip)), unit.name or "")
    if owner != unit.name:
        return [unit.error(key, f"{address} on network '{name}' is already taken by service '{owner}'")]
    return []


def _bad_activation(found: list[_Found]) -> list[SpecError]:
    """accept: true needs a stream socket, and a service fed by one is started per connection only."""
    errors = []
    sockets = [unit for unit in found if isinstance(unit.unit, Socket)]
    for unit in sockets:
        assert isinstance(unit.unit, Socket)
        if unit.unit.accept:
            for index, address in enumerate(unit.unit.listen):
                if address.socktype != socket.SOCK_STREAM:
                    errors.append(unit.error(unit.key("listen", index), f"{address} is not a stream socket; accept: true needs tcp: or unix:"))
            others = [
                other.name
                for other in sockets
                if isinstance(other.unit, Socket) and other.unit.service == unit.unit.service and not other.unit.accept
            ]
            if others:
                errors.append(
                    unit.error(
                        "accept",
                        f"service '{unit.unit.service}' gets one sandbox per connection from this socket, so it cannot "
                        f"also be fed by socket(s) without accept: {', '.join(sorted(str(o) for o in others))}",
                    )
                )
    return errors


def _bad_dependencies(found: list[_Found]) -> list[SpecError]:
    """`after:` must name existing services and must not go round in a circle."""
    services = _first_of_each(found, "service")
    errors = []
    graph: dict[str, list[str]] = {}
    for unit in found:
        if not isinstance(unit.unit, Service):
            continue
        graph[unit.unit.name] = []
        for index, dep in enumerate(unit.unit.after):
            if dep.service not in services:
                errors.append(unit.error(unit.key("after", index), f"no service '{dep.service}' to wait for{_suggest(dep.service, services, 'services')}"))
            elif dep.service == unit.unit.name:
                errors.append(unit.error(unit.key("after", index), "a service cannot wait for itself"))
            else:
                graph[unit.unit.name].append(dep.service)
    reported: set[frozenset[str]] = set()
    for start in sorted(graph):
        cycle = _find_cycle(graph, start)
        if cycle and frozenset(cycle) not in reported:
            reported.add(frozenset(cycle))
            unit = services[cycle[0]]
            errors.append(unit.error("after", f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}; use sockets instead, which need no order"))
    return errors


def _find_cycle(graph: dict[str, list[str]], start: str) -> list[str] | None:
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :]
        path.append(node)
        for nxt in graph.get(node, []):
            if (found := visit(nxt)) is not None:
                return found
        path.pop()
        return None

    cycle = visit(start)
    return cycle if cycle and cycle[0] == start else None


def _bad_volumes(found: list[_Found]) -> list[SpecError]:
    volumes = _first_of_each(found, "volume")
    errors = []
    for unit in found:
        if isinstance(unit.unit, Service):
            for index, mount in enumerate(unit.unit.mounts):
                if mount.volume and mount.volume not in volumes:
                    errors.append(unit.error(unit.key("mounts", index), f"no volume '{mount.volume}'{_suggest(mount.volume, volumes, 'volumes')}; declare it with kind: volume"))
    return errors


def _bad_proxies(found: list[_Found]) -> list[SpecError]:
    """A proxied socket is served by sandboxd's forwarder, never handed to the program itself."""
    errors = []
    for unit in found:
        sock = unit.unit
        if not isinstance(sock, Socket) or sock.proxy is None:
            continue
        if sock.accept:
            errors.append(unit.error("proxy", "proxy: and accept: true exclude each other: the proxy accepts the connections itself"))
        for index, address in enumerate(sock.listen):
            if address.socktype != socket.SOCK_STREAM:
                errors.append(unit.error(unit.key("listen", index), f"{address} is not a stream socket; a proxy forwards tcp: or unix: connections"))
    return errors


def _bad_roots(found: list[_Found]) -> list[SpecError]:
    errors = []
    for unit in found:
        service = unit.unit
        if not isinstance(service, Service):
            continue
        if not service.readonly_root and service.image == "host":
            errors.append(unit.error("readonly_root", "a writable root needs an image (image: NAME or a folder): the host's root stays read-only; use tmpfs: or mounts: for what must be written"))
    return errors
