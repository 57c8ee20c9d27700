"""The launch plan: the exact steps that make one sandbox, as plain data, and the facts about the
host that plans are made against.

A plan says which namespaces to create, which mounts to make inside the new root (in order), which
descriptors the service gets and under which names, and the exact environment. The launcher only
walks it (sandbox/child.py imports this module, so it stays small: no YAML, no builders). The
builders are beside it, each one concern, all pure:

    stack.py        plan_stack, plan_service: a stack plus HostFacts -> one LaunchPlan per service
    mounts.py       the root, /proc, /sys, /dev, the tmpfs, masks and binds; checks of mount targets
    identity.py     uid and gid from user:/group: or the image's User, in the facts' user tables
    program.py      argv and workdir (docker's Entrypoint/Cmd rule); the program must exist
    environment.py  the environment, with the one builder of LISTEN_* and NOTIFY_* variables
    confinement.py  capabilities, the seccomp filter, the bind handoff
    networks.py     network modes, addresses on a stack's networks, /etc/hosts

HostFacts is everything planning needs from the host, gathered before by host/prepare.py: the init
paths, the architecture, the images, their user tables and the host's answers for the users a
spec names, and what the file system showed at the paths planning looks at. Planning opens no
file, asks no NSS and probes nothing: a plan is unit-tested without root, and without the files
it names on disk.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from pathlib import Path

# Directories that are a fresh tmpfs in every sandbox: mount targets below them need not exist.
TMPFS_DIRS = ("/tmp", "/run")
# The tmpfs every sandbox has of its own, each capped (tmpfs_size, shm_size), mounted before pivot_root.
SANDBOX_TMPFS = (*TMPFS_DIRS, "/dev/shm")
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")

MountKind = Literal["rbind-root", "tmpfs-root", "image-root", "mountpoint", "proc", "sysfs", "mask", "readonly", "tmpfs", "dev", "bind"]


def is_under(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies below it (as strings: both normalised)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@dataclass(frozen=True)
class MountOp:
    """One mount inside the new root. `target` is the path as the service will see it.

    In a user namespace, `options` of a bind (and of an image's root) says whose ids its files
    are seen with: STORE_IDS or HOST_IDS (see UserNamespace); "" for sandboxd's own files, seen as
    they are (host root's belong to nobody inside)."""

    kind: MountKind
    target: str
    source: str = ""
    readonly: bool = True
    options: str = ""


STORE_IDS = "store-ids"  # idmapped: ids store_uid.. on disk are 0.. inside (volumes, binds)
HOST_IDS = "host-ids"  # idmapped: id N on disk is N inside (an image's tree, sockets a service uses)
SYSFS_OF_NETNS = "made-in-netns"  # a sysfs made by the fork server inside the service's namespace
MASK_WITH_MOUNTPOINTS = "mountpoints"  # a hidden folder that mounts asked into: empty but for their mount points


@dataclass(frozen=True)
class UserNamespace:
    """The ids a stack's sandboxes get: 0..count-1 inside are the host's uid.. and gid.. (a block
    of the `sandboxd` user's subordinate ids that no other running stack has, see subids.py).

    What sandboxes write to volumes and binds is stored under store_uid.. and store_gid.. on the
    host (a block no sandbox runs as, unless there is only one), whatever block the stack got:
    those mounts are idmapped so that ids store_uid.. on disk are 0.. inside, and every other id
    is the host's (`swapped_id_map`). A volume therefore reads the same in every stack and after
    any restart, and a file a sandbox wrote there is nobody's to every other sandbox that sees it
    through the host's root."""

    uid: int
    gid: int
    count: int
    store_uid: int
    store_gid: int


MAX_ID = 4294967295  # (uid_t)-1 is no id: the ids are 0 .. MAX_ID - 1


def swapped_id_map(stored: int, running: int, count: int) -> str:
    """A uid_map (or gid_map) of the user namespace that volumes and binds are idmapped through:
    every host id as it is, but for the stored block and the running block, swapped. Through it,
    a file stored as `stored` + N is `running` + N (the sandbox's own N inside); a file of the
    host's (root's, a user's) keeps its owner, which the sandbox does not own, as on the host's
    root; and every id on disk maps to something, so the kernel lets the sandbox write wherever
    the mode bits let it (a mount refuses writes to files whose owner it cannot map)."""
    low, high = sorted((stored, running))
    extents = [(0, 0, low), (low, high, count), (low + count, low + count, high - low - count), (high, low, count), (high + count, high + count, MAX_ID - high - count)]
    return "".join(f"{inside} {outside} {length}\n" for inside, outside, length in extents if length > 0)


NetMode = Literal["private", "none", "host", "join"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LaunchPlan:
    service: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    hostname: str
    workdir: str
    clone_flags: int
    mounts: tuple[MountOp, ...]
    fd_names: tuple[str, ...]
    fd_sockets: tuple[tuple[str, int], ...] = field(default=())  # (socket unit, listen index) per fd
    proxied: tuple[tuple[str, int], ...] = ()  # sockets served by sandboxd's proxy (not passed as fds)
    intercept_bind: bool = False  # sandboxd answers the service's bind() calls (proxy handoff)
    # private: a fresh namespace with lo up; none: fresh, lo down; host: the host's; join: the
    # namespace sandboxd made for this service before it started (networks, sockets bound inside).
    net: NetMode = "private"
    per_connection: bool = False  # fed by accept: true sockets: one sandbox per connection
    capabilities: tuple[int, ...] = ()  # kept in every set; everything else is dropped before exec
    no_new_privs: bool = True
    seccomp_filter: str = ""  # hex of the BPF program; "" = unconfined
    uid: int = 0
    gid: int = 0
    userns: UserNamespace | None = None  # None: the host's user namespace (`userns: false`)

    @property
    def stores_through_ids(self) -> bool:
        """Whether a bind of this plan is idmapped through the storage user namespace of its ids
        (STORE_IDS, in a user namespace of its own): the fork server's storage_userns."""
        return self.userns is not None and any(op.kind == "bind" and op.options == STORE_IDS for op in self.mounts)


class ImageDefaults(Protocol):
    """What a service takes from its image unless its spec says otherwise (store.images.ImageConfig)."""

    @property
    def env(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def entrypoint(self) -> tuple[str, ...]: ...
    @property
    def cmd(self) -> tuple[str, ...]: ...
    @property
    def workdir(self) -> str: ...
    @property
    def user(self) -> str: ...


class PlannedImage(Protocol):
    """An image as planning sees it (store.images.Image): its tree and its defaults."""

    @property
    def rootfs(self) -> Path: ...
    @property
    def config(self) -> ImageDefaults: ...


@dataclass(frozen=True)
class Accounts:
    """The users and groups of one root, by name: an image's from its /etc/passwd and /etc/group;
    the host's as NSS answered for the names the spec uses (LDAP and sssd users too)."""

    users: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # name -> (uid, primary gid)
    groups: Mapping[str, int] = field(default_factory=dict)  # name -> gid


@dataclass(frozen=True)
class PathFacts:
    """What the host's file system showed at the paths planning looks at (stack.paths_asked): each
    that exists (a dangling symlink too), and whether it is a directory (following links). A path
    not in `found` does not exist."""

    found: Mapping[str, bool] = field(default_factory=dict)  # path -> is a directory

    def exists(self, path: str) -> bool:
        return path in self.found

    def is_dir(self, path: str) -> bool:
        return self.found.get(path, False)


@dataclass(frozen=True)
class HostFacts:
    runtime_dir: str = "/run/sandboxd/stack"  # where the stack's generated files (hosts) live
    userns: UserNamespace = UserNamespace(100000, 100000, 65536, 100000, 100000)  # the stack's ids (subids.py)
    volumes_dir: str = "/var/lib/sandboxd/volumes"
    # Host paths a sandbox on the host's root never sees unless a mount asks for them (as systemd's
    # ProtectHome= and InaccessiblePaths=): the state directory (image store, volumes, id leases)
    # and, from prepare.py, the host's SSH private keys. /run/user needs nothing: /run is a tmpfs.
    hidden: tuple[str, ...] = ("/root", "/home", "/var/lib/sandboxd")
    images: Mapping[str, PlannedImage] = field(default_factory=dict)  # by the spec's `image:` value (a name or a folder)
    architecture: str = ""  # the machine, as uname says ("x86_64"); "" unknown
    accounts: Mapping[str, Accounts] = field(default_factory=dict)  # by `image:` value; "host" for the host's
    paths: PathFacts = field(default_factory=PathFacts)


@dataclass(frozen=True)
class Member:
    """One service's interface on a network: its name and index inside the sandbox, its addresses."""

    service: str
    ifname: str
    ifindex: int
    addresses: tuple[str, ...]  # "10.213.0.2/24", "fd5b:d000:0:1::2/64"


@dataclass(frozen=True)
class NetworkPlan:
    name: str
    bridge: str
    subnets: tuple[str, ...]
    members: tuple[Member, ...]
