"""Turn a validated stack into launch plans: the exact steps that make each sandbox.

A plan is plain data. It says which namespaces to create, which mounts to make inside the new
root (in order), which descriptors the service gets and under which names, and the exact
environment. `plan_stack` is pure apart from asking `exists` whether a mount target is present in
the image, so it is unit-tested without root; the sandbox child (sandbox/child.py) only walks the list.

Descriptor order (documented in the README): the socket units feeding a service, sorted by unit
name, and within one unit its `listen` entries in the order written. Fds start at 3.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.kernel.abi import CAPABILITIES, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUTS

if TYPE_CHECKING:  # the fork server imports this module and should stay small: no YAML in it
    from sandboxd.store.images import Image
    from sandboxd.spec.model import Service, Stack

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NOTIFY_PATH_IN_SANDBOX = "/run/.sbd-notify"

# The service is the first child of the init (pid 1) in a fresh pid namespace, so it is pid 2.
SERVICE_PID_IN_SANDBOX = 2

# Directories that are a fresh tmpfs in every sandbox: mount targets below them need not exist.
TMPFS_DIRS = ("/tmp", "/run")
# The tmpfs every sandbox has of its own, each capped (tmpfs_size, shm_size), mounted before pivot_root.
SANDBOX_TMPFS = (*TMPFS_DIRS, "/dev/shm")
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")

MountKind = Literal["rbind-root", "tmpfs-root", "image-root", "mountpoint", "proc", "sysfs", "mask", "readonly", "tmpfs", "dev", "bind"]


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


@dataclass(frozen=True)
class HostFacts:
    init_path: str  # the small init that runs as pid 1 of each sandbox (dumb-init)
    runtime_dir: str = "/run/sandboxd/stack"  # where the stack's generated files (hosts) live
    userns: UserNamespace = UserNamespace(100000, 100000, 65536, 100000, 100000)  # the stack's ids (subids.py)
    volumes_dir: str = "/var/lib/sandboxd/volumes"
    # Host paths a sandbox on the host's root never sees unless a mount asks for them (as systemd's
    # ProtectHome= and InaccessiblePaths=): the state directory (image store, volumes, id leases)
    # and, from prepare.py, the host's SSH private keys. /run/user needs nothing: /run is a tmpfs.
    hidden: tuple[str, ...] = ("/root", "/home", "/var/lib/sandboxd")
    static_init_path: str = ""  # the init of sandboxes on an image: linked statically (tini-static)
    images: dict[str, Image] = field(default_factory=dict)  # by the spec's `image:` value (a name or a folder)


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


def uses_notify(service: Service) -> bool:
    """Whether the service gets a NOTIFY_SOCKET (readiness, status, watchdog, fd store)."""
    return service.ready == "notify" or service.watchdog > 0 or service.fdstore_max > 0


def net_mode(stack: Stack, service: Service) -> NetMode:
    from sandboxd.spec.model import socket_namespace

    if service.network == "host":
        return "host"
    if service.attachments or any(socket_namespace(s) == service.name for s in stack.sockets):
        return "join"
    return "none" if service.network == "none" else "private"


def _ifnames(service: Service) -> list[str]:
    names = [f"sbd-{a.network}"[:15] for a in service.attachments]
    if len(set(names)) != len(names):
        names = [f"sbd{i}-{a.network}"[:15] for i, a in enumerate(service.attachments)]
    return names


def _free_hosts(net: IPNetwork, taken: set[IPAddress]) -> Iterator[IPAddress]:
    hosts = net.hosts()
    next(hosts, None)  # the first host address stays free, as a gateway would take it
    return (ip for ip in hosts if ip not in taken)


def plan_networks(stack: Stack, subnets: dict[str, tuple[str, ...]]) -> tuple[NetworkPlan, ...]:
    """Addresses for every member of every network: fixed ones first, then in service name order.

    `subnets` gives each network's subnets (the spec's, or those chosen at start). The first host
    address of each subnet is left free, as a gateway would take it, so addresses start at .2.
    """
    plans = []
    for network in stack.networks:
        nets = [ipaddress.ip_network(c) for c in subnets[network.name]]
        attachments = [(svc, a) for svc in stack.members(network.name) for a in svc.attachments if a.network == network.name]
        taken: set[IPAddress] = {ipaddress.ip_address(addr) for _, a in attachments for addr in a.addresses}
        free = {net.version: _free_hosts(net, taken) for net in nets}
        members = []
        for svc, attachment in attachments:
            fixed = {ipaddress.ip_address(addr).version: addr for addr in attachment.addresses}
            addresses = []
            for net in nets:
                ip = fixed.get(net.version) or str(next(free[net.version]))
                addresses.append(f"{ip}/{net.prefixlen}")
            index = [a.network for a in svc.attachments].index(network.name)
            members.append(Member(svc.name, _ifnames(svc)[index], 2 + index, tuple(addresses)))
        plans.append(NetworkPlan(network.name, f"sbd-{network.name}"[:15], tuple(str(n) for n in nets), tuple(members)))
    return tuple(plans)


def hosts_file(service: Service, networks: tuple[NetworkPlan, ...]) -> str:
    """/etc/hosts for a service on networks: itself, and every service on any of its networks."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    mine = {a.network for a in service.attachments}
    seen: set[tuple[str, str]] = set()
    for network in networks:
        if network.name not in mine:
            continue
        for member in network.members:
            for address in member.addresses:
                ip = address.split("/")[0]
                if (ip, member.service) not in seen:
                    seen.add((ip, member.service))
                    lines.append(f"{ip}\t{member.service}")
    return "\n".join(lines) + "\n"


RESOLV_CONF = "# sandboxd: this sandbox reaches no DNS server; names of its networks are in /etc/hosts\nnameserver 127.0.0.1\noptions ndots:0 attempts:1 timeout:1\n"


def is_under(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies below it (as strings: both normalised)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# As runc, docker and podman do: files of /proc and /sys that say too much about the host, or
# change it, are hidden (the sandbox's /dev/null over files, an empty read-only tmpfs over
# directories) or made read-only. MASKED is the union of runc's, docker's and podman's lists
# (containers-common's adds /proc/interrupts, /sys/dev/block and /sys/fs/selinux; docker's
# /sys/devices/virtual/powercap; runc's /sys/devices/virtual/tpm), and the files that describe
# the host's kernel and memory layout to an attacker: vmcoreinfo (symbol addresses for a crash
# dump), boot_params (the boot loader's data, the memory map) and config.gz (the kernel's build
# options). Paths that do not exist on the host are skipped.
MASKED = (
    "/proc/acpi", "/proc/asound", "/proc/config.gz", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list", "/proc/timer_stats",
    "/sys/dev/block", "/sys/devices/virtual/powercap", "/sys/devices/virtual/tpm", "/sys/firmware",
    "/sys/fs/selinux", "/sys/kernel/boot_params", "/sys/kernel/vmcoreinfo",
)  # fmt: skip
# /proc/pressure: a PSI trigger is a kernel allocation per descriptor, and a read-only view still
# lets a service read its pressure.
READONLY_PROC = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/pressure")


MASK_WITH_MOUNTPOINTS = "mountpoints"  # a hidden folder that mounts asked into: empty but for their mount points


def _hidden_mounts(hidden: tuple[str, ...], targets: list[str]) -> list[MountOp]:
    """Masks of the host paths no sandbox on the host's root sees. A mount whose target is such a
    path, or a folder above it, covers it anyway; one below it gets its mount point in the mask."""
    ops = []
    for path in hidden:
        if any(is_under(path, target) for target in targets):
            continue
        below = any(is_under(target, path) for target in targets)
        ops.append(MountOp("mask", path, options=MASK_WITH_MOUNTPOINTS if below else ""))
    return ops


def tmpfs_options(size: int, mode: str, owner: tuple[int, int] | None = None) -> str:
    """Mount options of a capped tmpfs. Besides its size, one inode per 4 KiB of it: a file with
    data takes a page at least, so that never limits files that hold data, and it caps what empty
    files, directories and links cost the kernel (about 1 KiB each), which tmpfs would otherwise
    allow by the million (half of the host's RAM in pages)."""
    options = f"mode={mode},size={size},nr_inodes={max(size // 4096, 1024)}"
    return options + (f",uid={owner[0]},gid={owner[1]}" if owner is not None else "")


def _base_mounts(service: Service, own: dict[str, MountOp]) -> list[MountOp]:
    """/proc, /dev, and the sandbox's own capped /tmp, /run and /dev/shm (or the spec's `tmpfs:`
    entry at /tmp or /run in place of the default one)."""
    return [
        MountOp("proc", "/proc"),
        MountOp("dev", "/dev"),
        MountOp("tmpfs", "/dev/shm", options=tmpfs_options(service.shm_size or service.tmpfs_size, "1777")),
        own.get("/tmp") or MountOp("tmpfs", "/tmp", options=tmpfs_options(service.tmpfs_size, "1777")),
        own.get("/run") or MountOp("tmpfs", "/run", options=tmpfs_options(service.tmpfs_size, "0755")),
    ]


def _first_missing(path: str, exists: Callable[[str], bool]) -> str | None:
    """The shortest prefix of `path` that does not exist, or None if all of it exists."""
    current = ""
    for part in path.strip("/").split("/"):
        current += "/" + part
        if not exists(current):
            return current
    return None


def _mount_target_errors(
    service: Service, target: str, line: int, key: str, exists: Callable[[str], bool], hidden: tuple[str, ...] = ()
) -> tuple[list[SpecError], str | None]:
    """Check one mount target; returns (errors, the mount point to make in a root of its own, or None)."""
    if target in ("/", "/proc", "/dev", "/sys") or any(is_under(target, d) for d in ("/proc", "/dev")):
        return [SpecError(service.file, line, key, f"cannot mount over {target}: sandboxd manages it")], None
    if any(is_under(target, d) for d in TMPFS_DIRS) or service.image != "host":
        return [], None  # an image's root is an overlay: mount points are made in its upper layer
    if any(is_under(target, h) and target != h for h in hidden):
        return [], None  # made in the hidden folder's mask (an empty tmpfs, sealed after the mounts)
    missing = _first_missing(target, exists)
    if missing is None:
        return [], None
    if missing.count("/") == 1:
        return [], target  # made, with its parents, in the root's tmpfs before it is sealed
    return [
        SpecError(
            service.file,
            line,
            key,
            f"{target} does not exist in the image and {posixpath.dirname(missing)} is read-only; "
            "use an existing path, a new top-level directory (like /app), or a path under /tmp or /run",
        )
    ], None


def _host_path(path: str, binds: list[MountOp], rootfs: str = "") -> str:
    """Where a path inside the sandbox comes from on the host (the deepest bind that covers it)."""
    for bind in sorted(binds, key=lambda b: -len(b.target)):
        if is_under(path, bind.target):
            return bind.source + path[len(bind.target) :]
    return rootfs + path


def _command_error(
    service: Service, argv: tuple[str, ...], workdir: str, path_var: str, binds: list[MountOp], rootfs: str, exists: Callable[[str], bool], hidden: list[str]
) -> SpecError | None:
    """The program must exist in the sandbox: a typo is a validation error, not a restart loop.
    A path the sandbox does not see (`hidden`, unless a bind brings it) does not count."""
    program = argv[0]
    if "/" in program:
        candidates = [posixpath.normpath(posixpath.join(workdir, program))]
    else:
        candidates = [posixpath.join(d, program) for d in path_var.split(":") if d.startswith("/")]

    def seen(path: str) -> bool:
        bound = any(is_under(path, b.target) for b in binds)
        return (bound or not any(is_under(path, h) for h in hidden)) and exists(_host_path(path, binds, rootfs))

    if any(seen(c) for c in candidates):
        return None
    where = f"in PATH ({path_var})" if "/" not in program else "in the sandbox"
    image = f" of image '{service.image}'" if rootfs else ""
    return SpecError(service.file, service.line, "command", f"program {program!r} not found {where}{image}")


def _id_table(rootfs: str, path: str) -> dict[str, tuple[int, int]]:
    """name -> (id, primary group id) from an image's passwd file; name -> (gid, gid) from a group
    file. Read inside the image's tree (its symlinks cannot lead onto the host's files), a regular
    file of at most 4 MiB."""
    import stat

    from sandboxd.kernel.linux import open_in_root

    table: dict[str, tuple[int, int]] = {}
    try:
        root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_in_root(root, path, os.O_RDONLY | os.O_NOFOLLOW)
        finally:
            os.close(root)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4 << 20:
            os.close(fd)
            return table
        with open(fd, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[2].isdigit():
                    primary = fields[3] if len(fields) >= 4 and fields[3].isdigit() else fields[2]
                    table.setdefault(fields[0], (int(fields[2]), int(primary)))
    except OSError:
        pass
    return table


def _user(name: str, rootfs: str) -> tuple[int, int] | None:
    """uid and primary gid of a user: the host's through NSS (LDAP, sssd and the like too), an
    image's from its /etc/passwd."""
    if rootfs:
        return _id_table(rootfs, "/etc/passwd").get(name)
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _group(name: str, rootfs: str) -> int | None:
    if rootfs:
        found = _id_table(rootfs, "/etc/group").get(name)
        return found[0] if found else None
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _identity(service: Service, rootfs: str, image_user: str = "") -> tuple[int, int, list[SpecError]]:
    """uid and gid from `user:`/`group:` (numbers, or names looked up in the root's passwd/group);
    without them, from the image's User (`name`, `uid`, `name:group` or `uid:gid`)."""
    user, group = service.user, service.group
    if not user and not group and image_user:
        user, _, group = image_user.partition(":")
    where = f"image '{service.image}'" if rootfs else "host"
    uid, gid, problems = lookup_identity(user, group, rootfs, where)
    return uid, gid, [SpecError(service.file, service.line, key, message) for key, message in problems]


def lookup_identity(user: str, group: str, rootfs: str, where: str) -> tuple[int, int, list[tuple[str, str]]]:
    """uid and gid of `user` and `group`, each a number or a name: the host's through NSS when
    `rootfs` is "", else looked up in the passwd and group files of that tree. A number as user
    is also the gid, unless `group` says otherwise. Problems come back as (key, message), `where`
    naming the root in them ("host", "image 'busybox'"). The spec's `user:` and `sandboxd exec
    -u` both go through here, so a name means the same to both."""
    uid = gid = 0
    problems: list[tuple[str, str]] = []
    if user:
        if user.isdigit():
            uid = gid = int(user)
        elif (found := _user(user, rootfs)) is not None:
            uid, gid = found
        else:
            problems.append(("user", f"no user '{user}' in the {where}'s /etc/passwd; use a name from it or a number"))
    if group:
        if group.isdigit():
            gid = int(group)
        elif (found_gid := _group(group, rootfs)) is not None:
            gid = found_gid
        else:
            problems.append(("group", f"no group '{group}' in the {where}'s /etc/group; use a name from it or a number"))
    return uid, gid, problems


def _seccomp_filter(service: Service) -> str:
    from sandboxd.kernel.seccomp import SeccompUnsupported, build_filter

    if service.seccomp == "unconfined":
        return ""
    allow = frozenset(service.seccomp) if isinstance(service.seccomp, tuple) else frozenset()
    try:
        return build_filter(allow).hex()
    except SeccompUnsupported as e:
        raise SpecErrors([SpecError(service.file, service.line, "seccomp", f"{e}; set seccomp: unconfined")]) from None


def _intercept_bind(stack: Stack, service: Service) -> bool:
    """Whether a `proxy:` socket of the service may be handed to the program when it binds the
    proxy's address (one listen address, a seccomp table for this machine)."""
    import platform

    from sandboxd.spec.model import hands_off

    return platform.machine() == "x86_64" and any(hands_off(s, service) for s in stack.sockets_of(service.name))


def _unused_socket_files(stack: Stack, service: Service) -> list[str]:
    """The stack's unix socket files that `service` does not `uses:`, where its root shows them
    (the host's root outside /tmp and /run): hidden, since a read-only mount does not stop a
    connect(). What a service is fed it gets as a descriptor; what it uses is bound in."""
    if service.image != "host":
        return []
    used = set(service.uses)
    return sorted(
        {
            posixpath.normpath(address.path)
            for sock in stack.sockets
            if sock.name not in used
            for address in sock.listen
            if address.path and not address.is_abstract and not any(is_under(posixpath.normpath(address.path), d) for d in TMPFS_DIRS)
        }
    )


def _nested_in_writable_errors(service: Service) -> list[SpecError]:
    """A mount inside a volume or a writable bind is refused: whoever else writes that tree (another
    stack sharing the volume, the host, the service itself) can rename its mount point aside or
    swap it for a symlink, and the next write or start lands where they chose."""
    writable = [(m.target, f"mounts[{i}]") for i, m in enumerate(service.mounts) if not m.readonly]
    nested = [(m.target, m.line, f"mounts[{i}].target") for i, m in enumerate(service.mounts)]
    nested += [(t.path, t.line, f"tmpfs[{i}]") for i, t in enumerate(service.tmpfs)]
    errors = []
    for target, line, key in nested:
        outer = next((k for w, k in writable if w != target and is_under(target, w)), None)
        if outer is not None:
            errors.append(
                SpecError(
                    service.file,
                    line,
                    key,
                    f"{target} lies inside the writable mount {outer}, whose mount points others can move or replace; "
                    "mount it beside it, or make the outer mount read-only",
                )
            )
    return errors


def plan_service(
    stack: Stack,
    service: Service,
    facts: HostFacts,
    exists: Callable[[str], bool] = os.path.lexists,
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> LaunchPlan:
    errors: list[SpecError] = []
    user_mounts: list[MountOp] = []
    new_tops: dict[str, bool] = {}  # top-level directories the root must gain, and whether each is a dir
    image = facts.images.get(service.image) if service.image != "host" else None
    if service.image != "host" and image is None:
        raise SpecErrors([SpecError(service.file, service.line, "image", f"image '{service.image}' is not known")])
    rootfs = str(image.rootfs) if image else ""

    def in_root(path: str) -> bool:
        return exists(rootfs + path)

    def add_bind(source: str, target: str, readonly: bool, line: int, key: str, directory: bool = False, ids: str = STORE_IDS) -> None:
        found, top = _mount_target_errors(service, target, line, key, in_root, facts.hidden)
        errors.extend(found)
        if top is not None:
            new_tops[top] = new_tops.get(top, False) or directory or is_dir(source)
        user_mounts.append(MountOp("bind", target, source, readonly=readonly, options=ids if service.userns else ""))

    errors.extend(_nested_in_writable_errors(service))
    for index, m in enumerate(service.mounts):
        if m.volume:
            add_bind(f"{facts.volumes_dir}/{m.volume}", m.target, m.readonly, m.line, f"mounts[{index}].target", directory=True)
        else:
            add_bind(str(m.source), m.target, m.readonly, m.line, f"mounts[{index}].target")
    uid, gid, who_errors = _identity(service, rootfs, image.config.user if image else "")
    errors.extend(who_errors)
    own_tmpfs: dict[str, MountOp] = {}  # the spec's entries at /tmp or /run, instead of the sandbox's own
    for index, entry in enumerate(service.tmpfs):
        # Owned by the service's user, so that it can write there even without capabilities; a
        # /tmp stays sticky and open to all, as a /tmp is.
        options = tmpfs_options(entry.size or service.tmpfs_size, "1777" if entry.path == "/tmp" else "0755", (uid, gid))
        if entry.path in TMPFS_DIRS:
            own_tmpfs[entry.path] = MountOp("tmpfs", entry.path, options=options)
            continue
        found, top = _mount_target_errors(service, entry.path, entry.line, f"tmpfs[{index}]", in_root, facts.hidden)
        errors.extend(found)
        if top is not None:
            new_tops[top] = True
        user_mounts.append(MountOp("tmpfs", entry.path, readonly=False, options=options))
    for name in service.uses:
        for address in next(s for s in stack.sockets if s.name == name).listen:
            if address.path and not address.is_abstract:
                # Read-only: connect() needs no writable mount, and the service cannot chmod the
                # host's socket file. Its owner and mode decide, with the service's ids as the host's.
                add_bind(address.path, posixpath.normpath(address.path), True, service.line, "uses", ids=HOST_IDS)
    if errors:
        raise SpecErrors(errors)
    mounts: list[MountOp] = []
    if image is not None:
        # The image's tree as the read-only lower layer of an overlay whose upper layer is a tmpfs
        # of this sandbox's own: writes vanish with it; with readonly_root the overlay is sealed.
        # In a user namespace the tree is idmapped: its files keep the owners the image gave them.
        mounts.append(MountOp("image-root", "/", rootfs, readonly=service.readonly_root, options=HOST_IDS if service.userns else ""))
    elif new_tops:
        # The host's root has no place for these targets: build the root on a tmpfs instead, with
        # the host's top-level entries bound into it read-only, and the new mount points beside them.
        mounts.append(MountOp("tmpfs-root", "/", "/", readonly=True))
        mounts += [MountOp("mountpoint", top, options="dir" if d else "file") for top, d in sorted(new_tops.items())]
    else:
        mounts.append(MountOp("rbind-root", "/", "/", readonly=True, options="in-place"))
    mounts += _base_mounts(service, own_tmpfs)
    net = net_mode(stack, service)
    if net != "host":
        # Its own sysfs shows the sandbox's links; with the host's network the host's stays. A
        # user namespace cannot mount sysfs for a namespace sandboxd made (the host's user
        # namespace owns it): the fork server makes that one, inside it, for the sandbox to attach.
        sysfs = MountOp("sysfs", "/sys", options=SYSFS_OF_NETNS if service.userns and net == "join" else "")
        mounts.insert(mounts.index(MountOp("proc", "/proc")) + 1, sysfs)
    # After /dev: files are masked with the sandbox's own /dev/null.
    at = mounts.index(MountOp("dev", "/dev")) + 1
    hidden = _hidden_mounts(facts.hidden, [m.target for m in user_mounts]) if image is None else []
    mounts[at:at] = [MountOp("mask", path) for path in MASKED] + [MountOp("readonly", path) for path in READONLY_PROC] + hidden
    mounts[at:at] = [MountOp("mask", path) for path in _unused_socket_files(stack, service)]
    if uses_notify(service):
        user_mounts.append(MountOp("bind", NOTIFY_PATH_IN_SANDBOX, f"{facts.runtime_dir}/notify/{service.name}", readonly=False))
    if service.attachments:
        etc = f"{facts.runtime_dir}/etc/{service.name}"
        user_mounts += [MountOp("bind", "/etc/hosts", f"{etc}/hosts"), MountOp("bind", "/etc/resolv.conf", f"{etc}/resolv.conf")]
    # Parents before children, so a bind below another bind lands on top of it.
    mounts += sorted(user_mounts, key=lambda m: m.target.count("/"))

    fd_names: list[str] = []
    fd_sockets: list[tuple[str, int]] = []
    proxied: list[tuple[str, int]] = []
    for sock in stack.sockets_of(service.name):
        if sock.proxy is not None:  # served by sandboxd's proxy, not handed to the program
            proxied += [(sock.name, index) for index in range(len(sock.listen))]
            continue
        for index, _ in enumerate(sock.listen):
            fd_names.append(sock.fdname)
            fd_sockets.append((sock.name, index))

    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    if image is not None:
        env.update(dict(image.config.env))
    env.update(dict(service.environment))
    argv = service.command
    if image is not None:  # as docker: command replaces the image's Cmd; its Entrypoint stays
        argv = image.config.entrypoint + (service.command or image.config.cmd)
    if not argv:
        raise SpecErrors([SpecError(service.file, service.line, "command", f"image '{service.image}' has no Entrypoint or Cmd; give the program to run with command:")])
    workdir = service.workdir or (image.config.workdir if image else "") or "/"
    command_error = _command_error(service, argv, workdir, env["PATH"], user_mounts, rootfs, exists, [op.target for op in hidden])
    if command_error:
        raise SpecErrors([command_error])
    if uses_notify(service):
        env["NOTIFY_SOCKET"] = NOTIFY_PATH_IN_SANDBOX
    if service.watchdog:
        env["WATCHDOG_USEC"] = str(int(service.watchdog * 1_000_000))
        env["WATCHDOG_PID"] = str(SERVICE_PID_IN_SANDBOX)
    if fd_names:
        env["LISTEN_FDS"] = str(len(fd_names))
        env["LISTEN_PID"] = str(SERVICE_PID_IN_SANDBOX)
        env["LISTEN_FDNAMES"] = ":".join(fd_names)

    return LaunchPlan(
        service=service.name,
        # "--" ends the init's own options, so a command may start with "-". tini's -g forwards
        # signals to the service's process group, as dumb-init does by default.
        argv=(facts.init_path, "--", *argv) if image is None else (facts.static_init_path, "-g", "--", *argv),
        env=tuple(env.items()),
        hostname=service.hostname,
        workdir=workdir,
        clone_flags=CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (CLONE_NEWNET if net in ("private", "none") else 0),
        mounts=tuple(mounts),
        fd_names=tuple(fd_names),
        fd_sockets=tuple(fd_sockets),
        proxied=tuple(proxied),
        intercept_bind=_intercept_bind(stack, service),
        net=net,
        per_connection=any(sock.accept for sock in stack.sockets_of(service.name)),
        capabilities=tuple(sorted(CAPABILITIES[name] for name in service.capabilities)),
        no_new_privs=service.no_new_privs,
        seccomp_filter=_seccomp_filter(service),
        uid=uid,
        gid=gid,
        userns=facts.userns if service.userns else None,
    )


def plan_stack(
    stack: Stack,
    facts: HostFacts,
    exists: Callable[[str], bool] = os.path.lexists,
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> dict[str, LaunchPlan]:
    """Plan every service; all problems of all services are reported together."""
    plans: dict[str, LaunchPlan] = {}
    errors: list[SpecError] = []
    for service in stack.services:
        try:
            plans[service.name] = plan_service(stack, service, facts, exists, is_dir)
        except SpecErrors as e:
            errors += e.errors
    if errors:
        raise SpecErrors(errors)
    return plans


def init_path() -> str:
    """Where dumb-init lives: beside the Python that runs sandboxd (its wheel installs it there)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "dumb-init"
    if beside.exists():
        return str(beside)
    found = shutil.which("dumb-init")
    if found:
        return found
    from sandboxd.errors import HostError

    raise HostError("dumb-init, the init sandboxd runs as pid 1 of each sandbox, is not installed", "pip install dumb-init")


def static_init_path() -> str:
    """The init of sandboxes on an image. The image has its own C library or none, so the init
    must need none: dumb-init's wheel links glibc dynamically; Debian's tini-static does not."""
    import shutil

    found = shutil.which("tini-static") or ("/usr/bin/tini-static" if os.path.exists("/usr/bin/tini-static") else None)
    if found:
        return found
    from sandboxd.errors import HostError

    raise HostError("services with image: need a statically linked init (tini-static), which is not installed", "apt-get install tini")
