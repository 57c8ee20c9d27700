"""The keys of every kind of unit: for each key, how its value is read and its default.

One table per kind (`_SERVICE_KEYS`, `_SOCKET_KEYS`, `_NETWORK_KEYS`; a volume has no keys of its
own), and one per mapping inside a unit (a mount, a tmpfs entry, limits, a health check ...). A
default is a value, `Required(hint)` for a key that must be given, or `UNIT_NAME` for one that
takes the unit's name. These tables are what a spec may say: the order of a table is the order
in which an unknown key's message lists the known ones. The parsers of plain values are in
values.py, the machinery that reads a mapping against a table in nodes.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
from pathlib import Path
from typing import Literal, get_args

from yaml.nodes import Node, ScalarNode, SequenceNode

from sandboxd.spec.envfile import env_file_key
from sandboxd.spec.model import (
    DEFAULT_TMPFS_SIZE,
    NAME,
    NAME_RULE,
    Address,
    Attachment,
    Condition,
    Dependency,
    HealthCheck,
    Limits,
    Mount,
    Network,
    NetworkMode,
    Restart,
    Service,
    Socket,
    StartLimit,
    Tmpfs,
    Volume,
)
from sandboxd.spec.nodes import (
    UNIT_NAME,
    Invalid,
    Key,
    Problem,
    Required,
    checked,
    command,
    environment,
    fail,
    line_of,
    list_of,
    read_keys,
    scalar,
    text,
    value_of,
    with_defaults,
)
from sandboxd.spec.reference import BadReference, parse_reference
from sandboxd.spec.sources import open_source, real_path, source_problem
from sandboxd.spec.values import (
    describe,
    is_int,
    normpath,
    parse_address,
    parse_capability,
    parse_duration,
    parse_ip,
    parse_memory,
    parse_mode,
    parse_signal,
    parse_size,
    parse_subnet,
    parse_syscall,
    parse_tmpfs_size,
)

_HOSTNAME = re.compile(r"(?=.{1,64}$)([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.|$))+")
# The name of a unit, and of what a key names by name: a network, a volume, a socket in `uses`.
unit_name = checked(lambda v: isinstance(v, str) and NAME.fullmatch(v), f"a name of {NAME_RULE}")
_hostname = checked(
    lambda v: isinstance(v, str) and _HOSTNAME.fullmatch(v),
    "a hostname of letters, digits, '-' and '.', at most 64 long",
)
_absolute = checked(
    lambda v: isinstance(v, str) and v.startswith("/") and "\0" not in v, "an absolute path", normpath
)
_boolean = checked(lambda v: isinstance(v, bool), "true or false")
_restart = checked(  # `v is False` because YAML 1.1 reads an unquoted `no` as false
    lambda v: v in get_args(Restart) or v is False, f"one of: {', '.join(get_args(Restart))}", lambda v: v or "no"
)
_backlog = checked(lambda v: is_int(v) and 1 <= v <= 65535, "a backlog from 1 to 65535")
_fdname = checked(
    lambda v: isinstance(v, str) and re.fullmatch(r"[ -9;-~]{1,255}", v),
    "an fd name of 1 to 255 printable ASCII characters without ':'",
)
_address = checked(
    lambda v: isinstance(v, str), "an address like 'unix:/run/app.sock' or 'tcp:127.0.0.1:80'", parse_address
)


def _source(node: Node, folder: Path) -> tuple[Path, str]:
    """The host path a source names, and the source as written. A relative one must stay inside
    the spec folder: a `..` or a symlink that leads out is refused (sources.py says how)."""
    given = text(node, folder)
    try:
        fd = open_source(folder, given)
    except OSError as e:
        raise fail(node, source_problem(folder, given, e)) from None
    try:
        return real_path(fd), given
    finally:
        os.close(fd)


_MOUNT_KEYS = {
    "source": Key(_source, None),
    "volume": Key(unit_name, ""),
    "target": Key(_absolute, Required("an absolute path inside the sandbox")),
    "readonly": Key(_boolean, None),
}


def _mount(node: Node, folder: Path) -> Mount:
    values, problems = read_keys(node, _MOUNT_KEYS, folder, "a mapping with source (or volume), target and readonly")
    if ("source" in values) == ("volume" in values) and not any(key in (".source", ".volume") for _, key, _ in problems):
        given = "both" if "source" in values else "neither"
        problems.append((node, ".source", f"expected either source (a host path) or volume (a volume's name), got {given}"))
    if problems:
        raise Invalid(*problems)
    values = with_defaults(values, _MOUNT_KEYS, "")
    if values["readonly"] is None:  # a volume is for data that is written; a host path is read-only unless asked
        values["readonly"] = not values["volume"]
    values["source"], values["given"] = values["source"] or (None, "")
    return Mount(line=line_of(node), **values)


def _one_per_version(items: tuple[str, ...], what: str, node: Node) -> tuple[str, ...]:
    versions = [ipaddress.ip_network(item, strict=False).version for item in items]
    if len(versions) != len(set(versions)):
        raise fail(node, f"expected at most one IPv4 and one IPv6 {what}")
    return items


def _attachment(node: Node, folder: Path) -> Attachment:
    if isinstance(node, ScalarNode):
        return Attachment(unit_name(node, folder), (), line_of(node))
    values, problems = read_keys(node, _ATTACHMENT_KEYS, folder, "a network name or a mapping with name and address")
    if problems:
        raise Invalid(*problems)
    addresses = _one_per_version(values.get("address", ()), "address", node)
    return Attachment(values["name"], addresses, line_of(node))


_ATTACHMENT_KEYS = {
    "name": Key(unit_name, Required("the network's name")),
    "address": Key(list_of(scalar(lambda v: parse_ip(str(v))), "an address or a list of them", single=True), ()),
}
_MODES = ", ".join(get_args(NetworkMode))


def _network_mode(node: Node, folder: Path) -> NetworkMode | tuple[Attachment, ...]:
    if isinstance(node, ScalarNode):
        value = value_of(node)
        if value in get_args(NetworkMode):
            return value  # type: ignore[return-value]
        raise fail(node, f"expected one of: {_MODES}, or a list of network names, got {describe(value)}")
    attachments = list_of(_attachment, f"one of: {_MODES}, or a list of network names")(node, folder)
    if not attachments:
        raise fail(node, "expected at least one network in the list")
    return attachments


def _subnets(node: Node, folder: Path) -> tuple[str, ...]:
    subnets = list_of(scalar(parse_subnet), "a subnet or a list of them", single=True)(node, folder)
    return _one_per_version(subnets, "subnet", node)


_START_LIMIT_KEYS = {
    "burst": Key(checked(lambda v: is_int(v) and v >= 1, "a whole number of 1 or more"), 5),
    "interval": Key(scalar(parse_duration), 10.0),
}


def _start_limit(node: Node, folder: Path) -> StartLimit:
    values, problems = read_keys(node, _START_LIMIT_KEYS, folder, "a mapping with burst and interval")
    if problems:
        raise Invalid(*problems)
    return StartLimit(**with_defaults(values, _START_LIMIT_KEYS, ""))


_TMPFS_KEYS = {
    "path": Key(_absolute, Required("the absolute path to mount it on")),
    "size": Key(scalar(parse_tmpfs_size), None),
}


def _tmpfs(node: Node, folder: Path) -> Tmpfs:
    if isinstance(node, ScalarNode):
        path, size = _absolute(node, folder), None
    else:
        values, problems = read_keys(node, _TMPFS_KEYS, folder, "an absolute path or a mapping with path and size")
        if problems:
            raise Invalid(*problems)
        path, size = values["path"], values.get("size")
    if path == "/dev/shm":
        raise fail(node, "/dev/shm is the sandbox's own tmpfs already; set its size with shm_size")
    return Tmpfs(path, size, line_of(node))


def _tmpfs_list(node: Node, folder: Path) -> tuple[Tmpfs, ...]:
    entries = list_of(_tmpfs, "an absolute path, a mapping with path and size, or a list of them", single=True)(node, folder)
    first: dict[str, int] = {}
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        if entry.path in first:
            item = node.value[index] if isinstance(node, SequenceNode) else node
            problems.append((item, f"[{index}]", f"{entry.path} is in tmpfs[{first[entry.path]}] already"))
        first.setdefault(entry.path, index)
    if problems:
        raise Invalid(*problems)
    return entries


_LIMIT_KEYS = {
    "memory": Key(scalar(parse_memory), None),
    "memory_high": Key(scalar(parse_memory), None),
    "swap": Key(scalar(parse_size), None),
    "pids": Key(checked(lambda v: is_int(v) and v >= 1, "a whole number of 1 or more"), None),
    "cpu": Key(
        checked(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.01 <= v <= 1024, "a number of CPUs from 0.01 up, like 0.5", float),
        None,
    ),
    "cpu_weight": Key(checked(lambda v: is_int(v) and 1 <= v <= 10000, "a whole number from 1 to 10000"), None),
    "io_weight": Key(checked(lambda v: is_int(v) and 1 <= v <= 10000, "a whole number from 1 to 10000"), None),
}


def _limits(node: Node, folder: Path) -> Limits:
    values, problems = read_keys(node, _LIMIT_KEYS, folder, "a mapping of limits: memory, memory_high, swap, pids, cpu, cpu_weight, io_weight")
    if "swap" in values and "memory" not in values:
        problems.append((node, ".swap", "swap needs memory: it is swap on top of the memory limit"))
    if problems:
        raise Invalid(*problems)
    return Limits(**values)


def _seccomp(node: Node, folder: Path) -> Literal["default", "unconfined"] | tuple[str, ...]:
    if isinstance(node, ScalarNode):
        value = value_of(node)
        if value in ("default", "unconfined"):
            return value
        raise fail(node, f"expected default, unconfined or a list of system calls to allow, got {describe(value)}")
    return list_of(scalar(parse_syscall), "a list of system call names")(node, folder)


_HEALTH_KEYS = {
    "exec": Key(command, Required("the command to run inside the sandbox")),
    "interval": Key(scalar(parse_duration), 5.0),
    "timeout": Key(scalar(parse_duration), 5.0),
    "retries": Key(checked(lambda v: is_int(v) and v >= 1, "a whole number of 1 or more"), 3),
}


def _ready(node: Node, folder: Path) -> Literal["started", "notify"] | HealthCheck:
    if isinstance(node, ScalarNode):
        value = value_of(node)
        if value in ("started", "notify"):
            return value
        raise fail(node, f"expected started, notify or a health check {{exec: [...], interval, timeout, retries}}, got {describe(value)}")
    values, problems = read_keys(node, _HEALTH_KEYS, folder, "started, notify or a mapping with exec, interval, timeout and retries")
    if problems:
        raise Invalid(*problems)
    return HealthCheck(**with_defaults(values, _HEALTH_KEYS, ""))


_DEPENDENCY_KEYS = {
    "service": Key(unit_name, Required("the service to wait for")),
    "condition": Key(checked(lambda v: v in get_args(Condition), "started, ready or completed"), "started"),
}


def _dependency(node: Node, folder: Path) -> Dependency:
    if isinstance(node, ScalarNode):
        return Dependency(unit_name(node, folder), "started", line_of(node))
    values, problems = read_keys(node, _DEPENDENCY_KEYS, folder, "a service name or a mapping with service and condition")
    if problems:
        raise Invalid(*problems)
    return Dependency(line=line_of(node), **with_defaults(values, _DEPENDENCY_KEYS, ""))


_internal = checked(
    lambda v: v is True,
    "true (networks are internal: no address on the host, no route, no forwarding; others are not supported yet)",
)


def _image(node: Node, folder: Path) -> str:
    """host, a root file system folder (absolute, or ./ ../ relative to the spec folder), an image
    name, or a registry reference (kept as written: the store resolves it, see store/pull.py)."""
    given = text(node, folder)
    if given == "host" or (NAME.fullmatch(given) and "/" not in given):
        return given
    if given.startswith(("/", "./", "../")):
        path = Path(os.path.normpath(folder / given))
        if not path.is_dir():
            raise fail(node, f"image folder '{given}' does not exist (looked for {path})")
        return str(path)
    try:
        parse_reference(given)
    except BadReference as e:
        raise fail(
            node,
            f"expected host, a folder (/path, ./path) or an image name ({NAME_RULE}) or a registry reference "
            f"(like redis:7, docker.io/library/redis:7, localhost:5000/app:1, NAME@sha256:DIGEST), got '{given}': {e}",
        ) from None
    return given


def _proxy_target(node: Node, folder: Path) -> Address:
    address = _address(node, folder)
    if address.socktype != socket.SOCK_STREAM:
        raise fail(node, f"expected a stream address to forward to (tcp: or unix:), got {address}")
    if address.is_inet and address.port == 0:
        raise fail(node, "expected the port the program listens on, got 0")
    return address  # type: ignore[no-any-return]


def _listen(node: Node, folder: Path) -> tuple[Address, ...]:
    if addresses := list_of(_address, "an address or a list of addresses", single=True)(node, folder):
        return addresses
    raise fail(node, "expected at least one address")


_SERVICE_KEYS = {
    "command": Key(command, ()),
    "environment": Key(environment, ()),
    "env_file": Key(env_file_key, ()),
    "workdir": Key(_absolute, ""),
    "hostname": Key(_hostname, UNIT_NAME),
    "restart": Key(_restart, "on-failure"),
    "restart_delay": Key(scalar(parse_duration), 0.1),
    "restart_steps": Key(checked(lambda v: is_int(v) and 0 <= v <= 1000, "a whole number from 0 to 1000"), 0),
    "restart_max_delay": Key(scalar(parse_duration), 5.0),
    "start_limit": Key(_start_limit, StartLimit(5, 10.0)),
    "stop_signal": Key(scalar(parse_signal), int(signal.SIGTERM)),
    "reload_signal": Key(scalar(parse_signal), int(signal.SIGHUP)),
    "reload": Key(command, ()),
    "stop_timeout": Key(scalar(parse_duration), 10.0),
    "mounts": Key(list_of(_mount, "a list of mappings with source, target and readonly"), ()),
    "uses": Key(list_of(unit_name, "a socket name or a list of them", single=True), ()),
    "network": Key(_network_mode, "private"),
    "ready": Key(_ready, "started"),
    "notify_access": Key(checked(lambda v: v in ("main", "all"), "main or all"), "main"),
    "start_timeout": Key(scalar(parse_duration), 90.0),
    "watchdog": Key(scalar(parse_duration), 0.0),
    "start": Key(checked(lambda v: v in ("eager", "on-demand"), "eager or on-demand"), "eager"),
    "idle_stop": Key(scalar(parse_duration), 0.0),
    "capabilities": Key(list_of(scalar(parse_capability), "a list of capability names like NET_BIND_SERVICE"), ()),
    "no_new_privs": Key(_boolean, True),
    "limits": Key(_limits, Limits()),
    "limits_optional": Key(_boolean, False),
    "seccomp": Key(_seccomp, "default"),
    "userns": Key(_boolean, True),
    "readonly_root": Key(_boolean, True),
    "image": Key(_image, "host"),
    "user": Key(checked(lambda v: (isinstance(v, str) and bool(re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", v))) or (is_int(v) and v >= 0), "a user name or a uid", str), ""),
    "group": Key(checked(lambda v: (isinstance(v, str) and bool(re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", v))) or (is_int(v) and v >= 0), "a group name or a gid", str), ""),
    "tmpfs": Key(_tmpfs_list, ()),
    "tmpfs_size": Key(scalar(parse_tmpfs_size), DEFAULT_TMPFS_SIZE),
    "shm_size": Key(scalar(parse_tmpfs_size), None),
    "fdstore_max": Key(checked(lambda v: is_int(v) and 0 <= v <= 4096, "a whole number from 0 to 4096"), 0),
    "after": Key(list_of(_dependency, "a list of service names or {service, condition} mappings", single=True), ()),
    "listen": Key(_listen, ()),  # the addresses of the socket unit it implies (implied.py)
}
_SOCKET_KEYS = {
    "service": Key(unit_name, UNIT_NAME),
    "listen": Key(_listen, Required("an address like 'unix:/run/app.sock' or 'tcp:127.0.0.1:80', or a list")),
    "fdname": Key(_fdname, UNIT_NAME),
    "backlog": Key(_backlog, socket.SOMAXCONN),
    "mode": Key(scalar(parse_mode), 0o666),
    "reuseport": Key(_boolean, False),
    "netns": Key(checked(lambda v: isinstance(v, str) and (NAME.fullmatch(v)), "host, service, or a service name"), "host"),
    "accept": Key(_boolean, False),
    "max_connections": Key(checked(lambda v: is_int(v) and 1 <= v <= 65536, "a whole number from 1 to 65536"), 64),
    "proxy": Key(_proxy_target, None),
    "handoff": Key(_boolean, None),
}
_NETWORK_KEYS = {
    "subnet": Key(_subnets, ()),
    "internal": Key(_internal, True),
}
# Every kind of unit: its class and its key table (load.py adds `kind` and `name` to each).
KINDS: dict[str, tuple[type[Service | Socket | Network | Volume], dict[str, Key]]] = {
    "service": (Service, _SERVICE_KEYS),
    "socket": (Socket, _SOCKET_KEYS),
    "network": (Network, _NETWORK_KEYS),
    "volume": (Volume, {}),
}

