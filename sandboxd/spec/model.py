"""What a spec folder becomes: a `Stack` of frozen dataclasses, one per unit.

A spec folder is one stack. Every `*.yaml` / `*.yml` file directly in it holds one or more YAML
documents, and every document is one unit, a mapping with `kind: service`, `kind: socket`,
`kind: network` or `kind: volume`:

    kind: socket              # sandboxd binds it and hands it to the service as fd 3, 4, ...
    name: web                 # defaults to the file's stem if the file has one unit of this kind
    listen: [unix:/run/web.sock, tcp:127.0.0.1:8080]

These classes are plain data: no I/O, no side effects, nothing but the values the spec gave or
the defaults it left (load.py reads and checks a folder into them). Every unit keeps its file and
line, so that what is done with it later can still name where it was written.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Family = Literal["tcp", "udp", "unix", "unix-dgram", "unix-seqpacket"]
Restart = Literal["no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always"]
NetworkMode = Literal["private", "none", "host"]

_STREAM, _DGRAM, _SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET
_SOCKTYPES = {"tcp": _STREAM, "udp": _DGRAM, "unix": _STREAM, "unix-dgram": _DGRAM, "unix-seqpacket": _SEQPACKET}


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


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host path (`source`) or of a volume into the sandbox at `target`."""

    source: Path | None  # the host path it names (symlinks resolved, as validation found it); None for a volume
    target: str
    readonly: bool
    line: int
    volume: str = ""  # a `kind: volume` unit's name, instead of source
    given: str = ""  # the source as written: absolute, or relative to the spec folder (pins.py opens it)


@dataclass(frozen=True)
class EnvFile:
    """A file of `KEY=VALUE` lines a service's environment is read from (`env_file:`, compose's)."""

    path: Path  # the file: absolute, or the spec folder's path joined with the name written
    required: bool  # False: a missing file is skipped (compose's `{path: x, required: false}`)
    line: int


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
    """An internal network of the stack that services attach to (`network: [NAME]`), with its subnets."""

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
    """A program sandboxd runs in a sandbox of its own, with every key of `kind: service` (keys.py)."""

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
    env_file: tuple[EnvFile, ...] = ()  # read at load time: `environment` holds what they gave
    # `listen:` on the service: the addresses of the socket unit it implies (implied.py), named
    # as the service, its fdname the service's name, every other socket key at its default; that
    # Socket is in Stack.sockets with `implied` set. () = no implied socket.
    listen: tuple[Address, ...] = ()

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        return self.network if isinstance(self.network, tuple) else ()


@dataclass(frozen=True)
class Socket:
    """A listening socket sandboxd binds and passes to `service` (its fds from 3 on, by socket name)."""

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
    implied: bool = False  # made from a service's `listen:`, not written as a unit of its own


@dataclass(frozen=True)
class Volume:
    """A named directory that outlives the stack: /var/lib/sandboxd/volumes/NAME until `volume rm`."""

    name: str
    file: Path
    line: int


@dataclass(frozen=True)
class Stack:
    """One spec folder: its units, each kind sorted by name."""

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
        found = self._services_by_name.get(name)
        if found is None:
            raise KeyError(f"no service '{name}' in stack '{self.name}'")
        return found

    def socket(self, name: str) -> Socket:
        found = self._sockets_by_name.get(name)
        if found is None:
            raise KeyError(f"no socket '{name}' in stack '{self.name}'")
        return found

    def sockets_of(self, service: str) -> tuple[Socket, ...]:
        """The sockets feeding `service`, by socket name: the order of its fds from 3 on."""
        return self._sockets_by_service.get(service, ())

    def binds_inside(self, service: str) -> bool:
        """Whether a socket of the stack is bound inside `service`'s network namespace (`netns:`)."""
        return service in self._socket_namespaces

    # Indexes of the units, made at the first look-up: a stack of N services is planned and run
    # with look-ups by name, which would otherwise each walk every unit (N x N in all).
    @functools.cached_property
    def _services_by_name(self) -> dict[str, Service]:
        return {service.name: service for service in reversed(self.services)}  # the first of a name

    @functools.cached_property
    def _sockets_by_name(self) -> dict[str, Socket]:
        return {sock.name: sock for sock in reversed(self.sockets)}

    @functools.cached_property
    def _sockets_by_service(self) -> dict[str, tuple[Socket, ...]]:
        found: dict[str, list[Socket]] = {}
        for sock in self.sockets:
            found.setdefault(sock.service, []).append(sock)
        return {service: tuple(socks) for service, socks in found.items()}

    @functools.cached_property
    def _socket_namespaces(self) -> frozenset[str | None]:
        return frozenset(socket_namespace(sock) for sock in self.sockets)


# Unit names, and the names of images and volumes: they become cgroup, file and folder names.
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NAME_RULE = "1 to 63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit (names become cgroup and file names)"


def hands_off(sock: Socket, service: Service) -> bool:
    """Whether a program that binds the proxy address of `sock` is given the socket itself. Not by
    default when the service has a readiness check: a handed-off socket is served from the moment
    the program accepts, while forwarding waits until it is ready. Always when the socket holds
    the proxy's address in the program's own namespace (`holds_proxy_address`): there the
    program's own bind() would fail with EADDRINUSE, and nothing could be forwarded to it."""
    if sock.proxy is None or len(sock.listen) != 1:
        return False
    if holds_proxy_address(sock):
        return sock.handoff is not False  # checks.py refuses handoff: false here
    return sock.handoff if sock.handoff is not None else service.ready == "started"


def holds_proxy_address(sock: Socket) -> bool:
    """Whether `sock` is bound, in its service's own network namespace, on an address that takes
    the proxy's: the same address and port, or one of them the unspecified address (0.0.0.0,
    [::]) of the same IP version; or the same abstract unix name (a unix path of the socket is
    the host's file, the proxy's one of the sandbox's own file system)."""
    target = sock.proxy
    if target is None or socket_namespace(sock) != sock.service:
        return False
    return any(takes_address(address, target) for address in sock.listen if address.is_inet or address.is_abstract)


def takes_address(a: Address, b: Address) -> bool:
    """Whether sockets of one type bound on `a` and `b` in one network namespace (and one file
    system) get in each other's way."""
    if a.socktype != b.socktype:
        return False
    if not (a.is_inet and b.is_inet):
        return a.path is not None and a.path == b.path
    if a.port != b.port or a.port == 0:
        return False
    host_a, host_b = ipaddress.ip_address(a.host or ""), ipaddress.ip_address(b.host or "")
    return host_a.version == host_b.version and (host_a == host_b or host_a.is_unspecified or host_b.is_unspecified)


def socket_namespace(sock: Socket) -> str | None:
    """The service in whose network namespace `sock` is bound, or None for the host's."""
    if sock.netns == "host":
        return None
    return sock.service if sock.netns == "service" else sock.netns
