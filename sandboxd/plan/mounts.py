"""What a sandbox's root is made of: the mount ops, in the order the launcher makes them.

    1. the root: the host's, bound read-only in place (`rbind-root`); or a tmpfs with the host's
       top-level entries bound into it and new mount points beside them (`tmpfs-root`), when a
       mount target has no place on the host's root; or an image's tree (`image-root`)
    2. /proc, its own /sys (unless on the host's network), /dev, and capped tmpfs at /dev/shm,
       /tmp and /run
    3. masks and read-only remounts of what /proc and /sys say too much with (after /dev: files
       are masked with the sandbox's own /dev/null), the host paths no sandbox sees, and the
       stack's socket files the service does not use
    4. the spec's mounts, tmpfs and used sockets, and sandboxd's own binds (notify socket, /etc
       files of networks): parents before children, so a bind below another lands on top of it

The targets the spec asks for are checked against PathFacts (on the host's root: a file where a
directory is mounted, or the other way round, is refused; a target that does not exist is made,
a new top-level one in the root's tmpfs, a deeper one by the set-up in a cover of its deepest
existing folder); `target_paths` says which paths that check may look at, so that the prepare
step looks at them first.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sandboxd.errors import SpecError
from sandboxd.plan.environment import NOTIFY_PATH_IN_SANDBOX, uses_notify
from sandboxd.plan.launch import HOST_IDS, MASK_WITH_MOUNTPOINTS, STORE_IDS, SYSFS_OF_NETNS, TMPFS_DIRS, HostFacts, MountOp, NetMode, PathFacts, PlannedImage, is_under

if TYPE_CHECKING:
    from sandboxd.spec.model import Service, Socket, Stack

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


@dataclass(frozen=True)
class MountRequest:
    """A mount the spec asks for, before its target is checked: the op, where the spec asks for
    it (for errors), and whether a mount point made for it must be a directory whatever its source."""

    op: MountOp
    line: int
    key: str
    directory: bool = False


def tmpfs_options(size: int, mode: str, owner: tuple[int, int] | None = None) -> str:
    """Mount options of a capped tmpfs. Besides its size, one inode per 4 KiB of it: a file with
    data takes a page at least, so that never limits files that hold data, and it caps what empty
    files, directories and links cost the kernel (about 1 KiB each), which tmpfs would otherwise
    allow by the million (half of the host's RAM in pages)."""
    options = f"mode={mode},size={size},nr_inodes={max(size // 4096, 1024)}"
    return options + (f",uid={owner[0]},gid={owner[1]}" if owner is not None else "")


def requested_mounts(stack: Stack, service: Service, facts: HostFacts, owner: tuple[int, int]) -> tuple[list[MountRequest], dict[str, MountOp]]:
    """The spec's mounts, tmpfs entries and used unix sockets, in that order; and apart, its tmpfs
    entries at /tmp or /run, which take the place of the sandbox's own. A tmpfs is owned by the
    service's user (`owner`), so that it can write there even without capabilities."""

    def bind(source: str, target: str, readonly: bool, ids: str) -> MountOp:
        return MountOp("bind", target, source, readonly=readonly, options=ids if service.userns else "")

    requests = []
    for index, m in enumerate(service.mounts):
        key = f"mounts[{index}].target"
        if m.volume:
            requests.append(MountRequest(bind(f"{facts.volumes_dir}/{m.volume}", m.target, m.readonly, STORE_IDS), m.line, key, directory=True))
        else:
            requests.append(MountRequest(bind(str(m.source), m.target, m.readonly, STORE_IDS), m.line, key))
    own_tmpfs: dict[str, MountOp] = {}
    for index, entry in enumerate(service.tmpfs):
        # A /tmp stays sticky and open to all, as a /tmp is.
        options = tmpfs_options(entry.size or service.tmpfs_size, "1777" if entry.path == "/tmp" else "0755", owner)
        if entry.path in TMPFS_DIRS:
            own_tmpfs[entry.path] = MountOp("tmpfs", entry.path, options=options)
        else:
            requests.append(MountRequest(MountOp("tmpfs", entry.path, readonly=False, options=options), entry.line, f"tmpfs[{index}]", directory=True))
    for name in service.uses:
        for address in next(s for s in stack.sockets if s.name == name).listen:
            if address.path and not address.is_abstract:
                # Read-only: connect() needs no writable mount, and the service cannot chmod the
                # host's socket file. Its owner and mode decide, with the service's ids as the host's.
                requests.append(MountRequest(bind(address.path, posixpath.normpath(address.path), True, HOST_IDS), service.line, "uses"))
    return requests, own_tmpfs


def hostname_file(service: Service, facts: HostFacts) -> str:
    """The file sandboxd writes with the service's host name, bound read-only on /etc/hostname."""
    return f"{facts.runtime_dir}/etc/{service.name}/hostname"


def sandboxd_binds(service: Service, facts: HostFacts) -> list[MountOp]:
    """sandboxd's own files in the sandbox: its /etc/hostname (as docker makes one), the notify
    socket, the /etc files of its networks."""
    binds = [MountOp("bind", "/etc/hostname", hostname_file(service, facts))]
    if uses_notify(service):
        binds.append(MountOp("bind", NOTIFY_PATH_IN_SANDBOX, f"{facts.runtime_dir}/notify/{service.name}", readonly=False))
    if service.attachments:
        etc = f"{facts.runtime_dir}/etc/{service.name}"
        binds += [MountOp("bind", "/etc/hosts", f"{etc}/hosts"), MountOp("bind", "/etc/resolv.conf", f"{etc}/resolv.conf")]
    return binds


def _prefixes(path: str) -> Iterator[str]:
    """/a, /a/b, /a/b/c of /a/b/c."""
    current = ""
    for part in path.strip("/").split("/"):
        current += "/" + part
        yield current


def _first_missing(path: str, exists: Callable[[str], bool]) -> str | None:
    """The shortest prefix of `path` that does not exist, or None if all of it exists."""
    return next((prefix for prefix in _prefixes(path) if not exists(prefix)), None)


def _kind_error(target: str, directory: bool, paths: PathFacts) -> str | None:
    """Why a mount of a directory (or of a file: not `directory`) cannot go at `target` on the
    host's root, if it cannot: a file where a directory is mounted or the other way round, or a
    file on the way to the target."""
    missing = _first_missing(target, paths.exists)
    if missing is None:
        if paths.is_dir(target) != directory:
            what = "a directory, and what is mounted there is a file" if paths.is_dir(target) else "a file, and what is mounted there is a directory"
            return f"{target} is {what}; mount a {'file' if not directory else 'directory'} at a path that is one, or at a new path"
        return None
    parent = posixpath.dirname(missing)
    if parent != "/" and not paths.is_dir(parent):
        return f"{parent} is a file on the host's root, so {target} cannot be made below it"
    return None


def _target_errors(service: Service, request: MountRequest, directory: bool, paths: PathFacts, hidden: tuple[str, ...]) -> tuple[list[SpecError], str | None]:
    """Check one mount target; returns (errors, the top-level mount point to make in a root of its
    own, or None). On the host's root a target that does not exist is made: at the top level in
    the root's tmpfs, deeper in a cover of its deepest existing folder (program.py), so that only
    a target sandboxd manages, and one whose kind does not fit what is there, are refused."""
    target, line, key = request.op.target, request.line, request.key
    if target in ("/", "/proc", "/dev", "/sys") or any(is_under(target, d) for d in ("/proc", "/dev")):
        return [SpecError(service.file, line, key, f"cannot mount over {target}: sandboxd manages it")], None
    if any(is_under(target, d) for d in TMPFS_DIRS) or service.image != "host":
        return [], None  # the sandbox's own tmpfs, or an image's overlay: mount points are made there
    if any(is_under(target, h) and target != h for h in hidden):
        return [], None  # made in the hidden folder's mask (an empty tmpfs, sealed after the mounts)
    problem = _kind_error(target, directory, paths)
    if problem is not None:
        return [SpecError(service.file, line, key, problem)], None
    missing = _first_missing(target, paths.exists)
    if missing is not None and missing.count("/") == 1:
        return [], target  # made, with its parents, in the root's tmpfs before it is sealed
    return [], None


def check_targets(service: Service, requests: Sequence[MountRequest], facts: HostFacts) -> tuple[list[SpecError], dict[str, bool]]:
    """The errors of the requested targets, and the top-level mount points the root must gain
    (each: whether it is a directory)."""
    errors: list[SpecError] = []
    new_tops: dict[str, bool] = {}
    for request in requests:
        directory = request.directory or facts.paths.is_dir(request.op.source)
        found, top = _target_errors(service, request, directory, facts.paths, facts.hidden)
        errors.extend(found)
        if top is not None:
            new_tops[top] = new_tops.get(top, False) or directory
    return errors, new_tops


def target_paths(service: Service, requests: Sequence[MountRequest]) -> set[str]:
    """Every path `check_targets` may look at: the prefixes of each target and each source."""
    if service.image != "host":
        return set()  # an image's targets are made in its overlay, never looked for
    return {path for request in requests for path in (*_prefixes(request.op.target), request.op.source) if path}


def nested_in_writable_errors(service: Service) -> list[SpecError]:
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


def _root(service: Service, image: PlannedImage | None, new_tops: dict[str, bool]) -> list[MountOp]:
    if image is not None:
        # The image's tree as the read-only lower layer of an overlay whose upper layer is a tmpfs
        # of this sandbox's own: writes vanish with it; with readonly_root the overlay is sealed.
        # In a user namespace the tree is idmapped: its files keep the owners the image gave them.
        return [MountOp("image-root", "/", str(image.rootfs), readonly=service.readonly_root, options=HOST_IDS if service.userns else "")]
    if new_tops:
        # The host's root has no place for these targets: build the root on a tmpfs instead, with
        # the host's top-level entries bound into it read-only, and the new mount points beside them.
        return [MountOp("tmpfs-root", "/", "/", readonly=True), *(MountOp("mountpoint", top, options="dir" if d else "file") for top, d in sorted(new_tops.items()))]
    return [MountOp("rbind-root", "/", "/", readonly=True, options="in-place")]


def _base_mounts(service: Service, own: dict[str, MountOp], net: NetMode) -> list[MountOp]:
    """/proc, /sys, /dev, and the sandbox's own capped /tmp, /run and /dev/shm (or the spec's
    `tmpfs:` entry at /tmp or /run in place of the default one)."""
    mounts = [MountOp("proc", "/proc")]
    if net != "host":
        # Its own sysfs shows the sandbox's links; with the host's network the host's stays. A
        # user namespace cannot mount sysfs for a namespace sandboxd made (the host's user
        # namespace owns it): the fork server makes that one, inside it, for the sandbox to attach.
        mounts.append(MountOp("sysfs", "/sys", options=SYSFS_OF_NETNS if service.userns and net == "join" else ""))
    return [
        *mounts,
        MountOp("dev", "/dev"),
        MountOp("tmpfs", "/dev/shm", options=tmpfs_options(service.shm_size or service.tmpfs_size, "1777")),
        own.get("/tmp") or MountOp("tmpfs", "/tmp", options=tmpfs_options(service.tmpfs_size, "1777")),
        own.get("/run") or MountOp("tmpfs", "/run", options=tmpfs_options(service.tmpfs_size, "0755")),
    ]


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


def _unused_socket_files(stack: Stack, service: Service) -> list[str]:
    """The stack's unix socket files that `service` does not `uses:`, where its root shows them
    (the host's root outside /tmp and /run): hidden, since a read-only mount does not stop a
    connect(). What a service is fed it gets as a descriptor; what it uses is bound in."""
    if service.image != "host":
        return []
    used = set(service.uses)
    return sorted({path for name, path in _visible_socket_files(stack.sockets) if name not in used})


# The last stack's sockets and their files outside TMPFS_DIRS: the same for every service planned.
_visible: list[tuple[tuple[Socket, ...], tuple[tuple[str, str], ...]]] = []


def _visible_socket_files(sockets: tuple[Socket, ...]) -> tuple[tuple[str, str], ...]:
    """(socket name, normalised path) of each unix socket file of `sockets` outside TMPFS_DIRS,
    worked out once per stack rather than once per service (N x N for N services)."""
    if _visible and _visible[0][0] is sockets:
        return _visible[0][1]
    found = []
    for sock in sockets:
        for address in sock.listen:
            if address.path and not address.is_abstract:
                path = posixpath.normpath(address.path)
                if not any(is_under(path, d) for d in TMPFS_DIRS):
                    found.append((sock.name, path))
    _visible[:] = [(sockets, tuple(found))]
    return _visible[0][1]


def service_mounts(
    stack: Stack, service: Service, facts: HostFacts, image: PlannedImage | None, requests: Sequence[MountRequest], own_tmpfs: dict[str, MountOp], new_tops: dict[str, bool], net: NetMode
) -> tuple[list[MountOp], list[MountOp]]:
    """Every mount of the sandbox, in order; and apart, the masks of hidden host paths."""
    mounts = _root(service, image, new_tops) + _base_mounts(service, own_tmpfs, net)
    at = mounts.index(MountOp("dev", "/dev")) + 1
    hidden = _hidden_mounts(facts.hidden, [request.op.target for request in requests]) if image is None else []
    masks = [MountOp("mask", path) for path in _unused_socket_files(stack, service)]
    masks += [MountOp("mask", path) for path in MASKED] + [MountOp("readonly", path) for path in READONLY_PROC] + hidden
    mounts[at:at] = masks
    # A spec's own /etc or /etc/hostname is what the sandbox sees there: sandboxd's /etc/hostname
    # is left out then (bound below it, it would make the file in a spec's /etc, or cover that /etc).
    own = sandboxd_binds(service, facts)
    hostname, rest = own[:1], own[1:]
    if any(request.op.target in ("/etc", "/etc/hostname") for request in requests):
        hostname = []
    binds = hostname + [request.op for request in requests] + rest
    mounts += sorted(binds, key=lambda m: m.target.count("/"))
    return mounts, hidden
