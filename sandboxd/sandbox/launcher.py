"""The fork server and the code that turns a forked child into a sandbox.

Why a fork server: forking from the asyncio supervisor is unsafe once it has threads, and
starting a Python interpreter per sandbox costs 20-90 ms. The fork server is forked from the
supervisor at start-up, before any thread or event loop exists, stays single-threaded, and forks
one child per sandbox from a small address space.

Why it is pid 1 of a pid namespace of its own: when the supervisor dies, even by SIGKILL, the
fork server gets SIGKILL (PR_SET_PDEATHSIG), and when the init of a pid namespace dies the kernel
kills every process in it and in every namespace nested in it, which is every sandbox. No service
outlives sandboxd.

    supervisor (asyncio)              fork server (pid 1, sandboxd's pid ns)      sandbox init (pid 1 of its own ns)
    ────────────────────              ───────────────────────────────────────      ──────────────────────────────────
    ForkServer.start() ──fork───────▶ serve(): select on request socket + SIGCHLD
    launch() ──request + SCM_RIGHTS─▶ [status, output, socket fds..., held bind sources...]
                                      open_tree: a detached copy of each source (detached_bind)
                                      and of the image; idmap those stored through the stack's ids
                                      clone3(NEWPID[, NEWUSER]) into the ──clone──▶ [userns: wait on a pipe]
                                      cgroup [userns: in the service's
                                      netns, with its sysfs made there]
                                      [userns: uid/gid maps, idmap copies ─pipe──▶ become root inside]
                                       of host ids, v1 cgroup.procs]                join cgroup; unshare(mnt,uts,ipc,net)
                                                                                    setsid; mounts; pivot_root; move_mount
                                                                                    the copies; hostname
                                                                                    lo up; fds 0,1,2 and 3..; chdir
            ◀──────────── status channel (SEQPACKET, SO_PASSCRED) ─────────────── {"exec": t_ns} (creds carry its host pid)
            ◀──────────── EOF (the channel is close-on-exec) ──────────────────── execveat(sealed copy of dumb-init, -- command...)
                                                                                  or {"error": step, "detail": ...}; _exit(127)
            ◀──{"exit": id, "status": wstatus}── waitpid()

The child never touches asyncio or the supervisor's logging; it reports one structured message
and exits with a distinct code on failure.

The init (dumb-init, or tini-static on an image) never runs from its file on the host: the fork
server copies it once into a sealed, execute-only memfd (`sealed_copy`), and every sandbox
executes that descriptor, as runc does with its own binary since CVE-2019-5736.
"""

from __future__ import annotations

import array
import errno
import fcntl
import gc
import json
import os
import selectors
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from sandboxd.kernel import abi, linux
from sandboxd.errors import LaunchError
from sandboxd.plan.launch import DEVICE_NODES, HOST_IDS, MASK_WITH_MOUNTPOINTS, SANDBOX_TMPFS, STORE_IDS, SYSFS_OF_NETNS, LaunchPlan, MountOp, is_under, swapped_id_map
# Imported here, never in the child: an import there, as the host's root and after pivot_root,
# would be looked up in the sandbox's tree.
from sandboxd.kernel.seccomp import bind_notify_filter

MAX_MESSAGE = 1 << 20
MAX_FDS = 250
EXIT_SETUP_FAILED = 127
EXIT_UNEXPECTED = 126



# ───────────────────────────── in the sandbox child ─────────────────────────────


class _Step:
    """Remembers what the child is doing, so a failure names it."""

    name = "start"


def _ensure_mountpoint(target: str, is_dir: bool) -> None:
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if is_dir:
        os.mkdir(target)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


_DEVICE_NUMBERS: dict[str, int] = {}


def detached_dev(owner: tuple[int, int] | None) -> int:
    """In the fork server, for one launch: the sandbox's /dev, a small tmpfs with the device nodes
    a service needs (mknod, with the host's numbers), the mount points of its devpts and /dev/shm
    and the usual links, detached, for the sandbox to attach (`_mount_dev`). Made here, in the
    host's user namespace, because a tmpfs mounted in a user namespace holds no usable device node
    (the kernel makes it nodev) and mknod there is refused; and so a sandbox attaches one mount
    where it made some fifteen files and mounts. `owner`: the host's ids of root inside the
    sandbox's user namespace, whose /dev it is, as it is root's in a sandbox without one."""
    if not _DEVICE_NUMBERS:
        for node in DEVICE_NODES:
            try:
                _DEVICE_NUMBERS[node] = os.stat(f"/dev/{node}").st_rdev
            except FileNotFoundError:
                continue
    dev = linux.detached_mount("tmpfs", abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NOEXEC, (("mode", "0755"), ("size", "64k")))
    try:
        for node, number in _DEVICE_NUMBERS.items():
            os.mknod(node, stat.S_IFCHR | 0o666, number, dir_fd=dev)
            os.chmod(node, 0o666, dir_fd=dev)  # mknod honours the umask
        for directory in ("pts", "shm"):
            os.mkdir(directory, 0o755, dir_fd=dev)
        for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, name, dir_fd=dev)
        if owner is not None:
            os.chown(".", *owner, dir_fd=dev)
    except BaseException:
        os.close(dev)
        raise
    return dev


def _mount_dev(dev: str, detach_covered: Callable[[str], None], tree: int) -> None:
    """Attach the sandbox's /dev (`tree`, from `detached_dev`), then its own devpts (its /dev/shm, a
    capped tmpfs, is a mount of the plan's own)."""
    detach_covered(dev)
    linux.move_mount(tree, dev)
    os.close(tree)
    linux.mount("devpts", f"{dev}/pts", "devpts", abi.MS_NOSUID | abi.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")


READONLY = abi.MOUNT_ATTR_RDONLY | abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV
_FRESH_IN_SANDBOX = {"proc", "dev", "tmp", "run"}
OLD_ROOT = "/run/.sbd-oldroot"  # on the sandbox's own /run tmpfs, removed before exec


def _host_root_on_tmpfs(root: str, fresh: set[str]) -> None:
    """A root of its own: a tmpfs with the host's top-level entries bound (or linked) into it,
    except those in `fresh` (sandboxd mounts its own there: the host's would only be covered, and
    still listed in /proc/self/mountinfo)."""
    linux.mount("tmpfs", root, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755,size=64k")
    for entry in os.scandir("/"):
        path = f"{root}/{entry.name}"
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), path)
        elif entry.is_dir():
            os.mkdir(path)
            if entry.name not in fresh:
                linux.mount(entry.path, path, None, abi.MS_BIND | abi.MS_REC)
        else:
            _ensure_mountpoint(path, is_dir=False)
            linux.mount(entry.path, path, None, abi.MS_BIND)


def _image_root(root: str, tree: int, source: str) -> None:
    """The image's tree (`tree`: a detached copy of `source` from the fork server, idmapped in a
    user namespace) as the lower layer of an overlay on `root`, the upper layer on a tmpfs of this
    mount namespace (systemd-nspawn's --volatile=overlay): writes are charged to the sandbox's
    memory cgroup and vanish with the namespace, with nothing to clean up."""
    linux.mount("tmpfs", root, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755")
    os.mkdir(f"{root}/upper", 0o755)
    os.mkdir(f"{root}/work", 0o700)
    # The overlay's options show in /proc/self/mountinfo as they are written: the layers are named
    # relative to the tmpfs, not by sandboxd's runtime paths. The copy of the tree is attached at a
    # path ending with the tree's own in the image store: that is how images.trees_in_use tells
    # which trees are mounted.
    os.makedirs(f"{root}/lower{source}", 0o755)
    linux.move_mount(tree, f"{root}/lower{source}")
    os.close(tree)
    os.chdir(root)
    options = f"lowerdir=lower{source},upperdir=upper,workdir=work"
    linux.mount("overlay", root, "overlay", abi.MS_NOSUID | abi.MS_NODEV, options)
    # What sandboxd mounts before pivot_root goes on these; a symlink would lead onto the host.
    for top in _FRESH_IN_SANDBOX | {"sys"}:
        path = f"{root}/{top}"
        if os.path.islink(path):
            raise OSError(errno.ELOOP, "is a symlink in the image; sandboxd mounts a directory there", f"/{top}")
        if not os.path.isdir(path):
            os.mkdir(path, 0o755)


def _seal(root: str, pending: bool) -> None:
    """Make a tmpfs-based root and everything bound into it read-only, once its mount points exist."""
    if pending:
        linux.mount_setattr(root, READONLY)


def detached_bind(held_fd: int, source: str) -> int:
    """In the fork server, for one launch: a detached copy of the mount tree that a held source
    descriptor names (pins.py), private (no mount or unmount propagates into or out of it), for
    the sandbox to attach with `_attach_bind`. Made here, in the host's mount namespace, because
    open_tree may copy only mounts of the caller's own namespace, which a sandbox has left."""
    tree = linux.clone_mount_tree(held_fd, source)
    try:
        linux.mount_setattr(tree, 0, propagation=abi.MS_PRIVATE, name=source)
    except OSError:
        os.close(tree)
        raise
    return tree


def _attach_bind(tree: int, target: str, readonly: bool) -> None:
    """In the sandbox: attach a detached copy from `detached_bind` on `target`. The copy has the
    flags of the host's mount it came from: it is made read-only, or writable, and nosuid and
    nodev either way."""
    _ensure_mountpoint(target, is_dir=stat.S_ISDIR(os.fstat(tree).st_mode))
    linux.move_mount(tree, target)
    if readonly:
        linux.mount_setattr(target, READONLY)
    else:
        linux.mount_setattr(target, abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV, abi.MOUNT_ATTR_RDONLY)


def _detach_covered(target: str, locked: bool) -> None:
    """Detach the host's mount at `target` (and everything below it) just before sandboxd mounts
    its own there, so that /proc/self/mountinfo lists only the sandbox's mount, not the host's
    /proc, /sys (with every cgroup hierarchy), /dev (shm, pts, mqueue), /tmp and /run subtrees.

    Only ever in the sandbox's own mount namespace, after `/` was made private recursively: the
    host's mounts are untouched. Bind sources are detached copies already (`detached_bind`), so
    nothing below these mounts is still needed. In a user namespace the kernel locks the mounts it
    copied from the host to the ones around them (MNT_LOCKED): umount2 refuses them (EINVAL, or
    EPERM), and they stay listed.
    """
    if os.stat(target).st_dev == os.stat(os.path.dirname(target)).st_dev:
        return  # no mount of its own here (or a bind of the parent's file system, left as it is)
    try:
        linux.umount2(target, abi.MNT_DETACH)
    except OSError as e:
        if not (locked and e.errno in (errno.EINVAL, errno.EPERM)):
            raise


def _build_root(
    root: str, mounts: tuple[MountOp, ...], step: _Step, trees: list[int], locked: bool = False, image_tree: int = -1, sysfs_tree: int = -1, dev_tree: int = -1
) -> None:
    """Make the sandbox's file system. `trees` are the detached copies of the bind sources
    (`detached_bind`), one per bind in the order of `mounts`; `image_tree` the image's,
    `dev_tree` its /dev (`detached_dev`), and `sysfs_tree` a sysfs the fork server made in the
    service's network namespace (a user namespace cannot mount one for a namespace the host's
    user namespace owns).

    With the host's root as it is (`rbind-root` with options "in-place"): the new mount namespace's
    copy of the host's tree is made read-only, nosuid and nodev in one call, and /proc, /sys, /dev,
    /tmp and /run are mounted over it, each after the host's mount there is detached; no copy of
    the tree, no pivot_root, no detaching of the old root (about 1 ms less per sandbox). Otherwise
    (a user namespace, whose /dev must bind the host's nodes from a mount without nodev; or new
    top-level mount points, `tmpfs-root`) a root is built at `root` and pivoted into (bubblewrap's
    order of steps). `locked`: in a user namespace (see _detach_covered).
    """
    step.name = "make / private"
    linux.mount(None, "/", None, abi.MS_REC | abi.MS_PRIVATE)
    in_place = mounts[0].kind == "rbind-root" and mounts[0].options == "in-place"
    if in_place:
        root = ""
    seal_image = mounts[0].kind == "image-root" and mounts[0].readonly
    binds: list[tuple[MountOp, int]] = []
    masks_to_seal: list[str] = []
    unattached = iter(trees)
    pending_seal = any(op.kind == "tmpfs-root" for op in mounts)
    fresh = _FRESH_IN_SANDBOX | ({"sys"} if any(op.kind == "sysfs" for op in mounts) else set())

    def detach_covered(target: str) -> None:
        # A root bound from the host's has the host's mounts where sandboxd mounts its own: they
        # go first. (A root on a tmpfs or an image has plain directories there.)
        if mounts[0].kind == "rbind-root":
            _detach_covered(target, locked)

    for op in mounts:
        target = root + op.target if op.target != "/" else (root or "/")
        step.name = f"mount {op.kind} on {op.target}"
        match op.kind:
            case "rbind-root" if in_place:
                linux.mount_setattr("/", READONLY)
            case "rbind-root":
                linux.mount(op.source, root, None, abi.MS_BIND | abi.MS_REC)
                linux.mount_setattr(root, READONLY)
            case "tmpfs-root":
                _host_root_on_tmpfs(root, fresh)
            case "image-root":
                _image_root(root, image_tree, op.source)
            case "mountpoint":
                _ensure_mountpoint(target, is_dir=op.options == "dir")
            case "proc":
                _seal(root, pending_seal)
                pending_seal = False
                detach_covered(target)
                linux.mount("proc", target, "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            case "sysfs" if op.options == SYSFS_OF_NETNS:
                detach_covered(target)
                linux.move_mount(sysfs_tree, target)
            case "sysfs":
                # Its own sysfs, read-only: /sys/class/net shows the sandbox's links, not the host's.
                detach_covered(target)
                linux.mount("sysfs", target, "sysfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            case "mask" if op.options == MASK_WITH_MOUNTPOINTS:
                if os.path.isdir(target):
                    # Writable until the mounts below it have their mount points, then sealed.
                    linux.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=64k")
                    masks_to_seal.append(op.target)
            case "mask":
                if os.path.isdir(target):
                    linux.mount("tmpfs", target, "tmpfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=0")
                elif os.path.lexists(target):
                    # The sandbox's own /dev/null (made before the masks), as runc does.
                    linux.mount(f"{root}/dev/null", target, None, abi.MS_BIND)
            case "readonly":
                if os.path.lexists(target):
                    linux.mount(target, target, None, abi.MS_BIND | abi.MS_REC)
                    linux.mount_setattr(target, READONLY)
            case "dev":
                _mount_dev(target, detach_covered, dev_tree)
            case "tmpfs" if op.target in SANDBOX_TMPFS:
                detach_covered(target)
                linux.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, op.options or None)
            case "tmpfs":
                binds.append((op, -1))  # a tmpfs the spec asked for: made inside, after pivot_root
            case "bind":
                # Attached after pivot_root, so that the target's path (and any symlink in it)
                # resolves inside the sandbox, never on the host.
                binds.append((op, next(unattached)))
    if not in_place:
        step.name = f"pivot_root into {root}"
        # The old root stays on the sandbox's own /run until the binds are made, so that a target
        # that leads into it through a symlink is seen, and refused, below.
        os.mkdir(f"{root}{OLD_ROOT}")
        os.chdir(root)
        linux.pivot_root(".", OLD_ROOT.lstrip("/"))
    os.chdir("/")
    for op, fd in binds:
        # A symlink on the way (/etc/resolv.conf -> /run/...) is followed inside the sandbox, where
        # it may lead onto the private /run: the mount point is made there. One that leads to the
        # host's root, still at OLD_ROOT here (an image can hold any symlink), is refused.
        target = os.path.realpath(op.target)
        if not in_place and is_under(target, OLD_ROOT):
            raise OSError(errno.EPERM, "leads out of the sandbox through a symlink", op.target)
        if op.kind == "tmpfs":
            step.name = f"mount tmpfs on {op.target}"
            _ensure_mountpoint(target, is_dir=True)
            linux.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, op.options)
            continue
        step.name = f"bind {op.source} on {op.target}"
        _attach_bind(fd, target, op.readonly)
        os.close(fd)
    for path in masks_to_seal:
        step.name = f"make {path} read-only"
        linux.mount_setattr(path, READONLY, recursive=False)  # the mounts on it keep their flags
    if seal_image:
        step.name = "make the image's root read-only"
        # Only the overlay itself: the mounts on it (/tmp, /run, writable binds) keep their flags.
        linux.mount(None, "/", None, abi.MS_REMOUNT | abi.MS_BIND | abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV)
    if not in_place:
        step.name = "detach the host's root"
        linux.umount2(OLD_ROOT, abi.MNT_DETACH)
        os.rmdir(OLD_ROOT)


def _place_fds(output_fd: int, socket_fds: list[int]) -> None:
    """stdin from /dev/null, stdout and stderr to the output pipe, sockets at 3, 4, ..."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in [output_fd, *socket_fds]]
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(high[0], 1)
    os.dup2(high[0], 2)
    for index, fd in enumerate(high[1:]):
        os.dup2(fd, 3 + index)  # dup2 clears close-on-exec on the new descriptor


def _confine(seccomp_filter: str, capabilities: tuple[int, ...], no_new_privs: bool, step: _Step, uid: int = 0, gid: int = 0) -> None:
    """The last steps before exec, in the order the kernel allows them: the seccomp filter (with
    CAP_SYS_ADMIN, or after no_new_privs), the bounding set (needs CAP_SETPCAP), the user, then
    the remaining capability sets, which setuid would otherwise clear."""
    if seccomp_filter:
        step.name = "install the seccomp filter"
        if no_new_privs:
            linux.prctl(abi.PR_SET_NO_NEW_PRIVS, 1)
        linux.install_seccomp(bytes.fromhex(seccomp_filter))
    step.name = "drop capabilities"
    linux.drop_bounding_set(set(capabilities))
    if uid or gid:
        step.name = f"become uid {uid} gid {gid}"
        linux.prctl(abi.PR_SET_KEEPCAPS, 1)  # permitted capabilities survive setuid; effective are set again below
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    step.name = "set capabilities"
    linux.keep_only_capabilities(set(capabilities))
    if no_new_privs:
        linux.prctl(abi.PR_SET_NO_NEW_PRIVS, 1)


def _reset_signals() -> None:
    """What the fork server set up for itself must not reach a sandbox: handlers, SIG_IGN (which
    survives exec), the wakeup fd, the signal mask."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _report(channel: socket.socket, message: dict[str, Any]) -> None:
    try:
        channel.send(json.dumps(message).encode())
    except OSError:
        pass


def run_sandbox(request: dict[str, Any], status_fd: int, output_fd: int, socket_fds: list[int], init_fd: int, netns_fd: int = -1, trees: list[int] | None = None) -> NoReturn:
    """In the forked child (pid 1 of a fresh pid namespace): become the sandbox and exec its init
    (`init_fd`, the fork server's sealed copy of it). `trees`: the detached copies of its bind
    sources (`detached_bind`), in the plan's order."""
    step = _Step()
    # Out of the way of fds 3.. that the sockets will take.
    channel = socket.socket(fileno=fcntl.fcntl(status_fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(socket_fds)))
    os.close(status_fd)
    try:
        step.name = "reset signals"
        _reset_signals()
        plan = LaunchPlan.from_wire(request["plan"])
        step.name = "join cgroups"
        for procs in request["cgroup_procs"]:  # further hierarchies (v1 controllers on a hybrid host)
            with open(procs, "w") as f:
                f.write("0")
        if netns_fd >= 0:
            step.name = "join the service's network namespace"
            linux.setns(netns_fd, abi.CLONE_NEWNET)
            os.close(netns_fd)
        step.name = "create namespaces"
        linux.unshare(plan.clone_flags)
        os.setsid()
        if plan.userns:
            # Still the host's root by id; become root of the new user namespace (the mapped ids).
            step.name = "become root of the user namespace"
            become_userns_root()
        # The init is the fork server's sealed copy (sealed_copy), executed through its descriptor:
        # /proc/1/exe is that memfd, never a file of the host's, wherever sandboxd is installed.
        step.name = f"take the sealed copy of the init {plan.argv[0]}"
        init_fd = fcntl.fcntl(init_fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(socket_fds))  # clear of fds 3..
        _build_root(request["root"], plan.mounts, step, trees or [], bool(plan.userns), request.get("image_tree", -1), request.get("sysfs_tree", -1), request["dev_tree"])
        step.name = "set hostname"
        if plan.clone_flags & abi.CLONE_NEWUTS:  # never the host's
            socket.sethostname(plan.hostname)
        if plan.net == "private":
            step.name = "bring up lo"
            linux.loopback_up()
        step.name = "set up descriptors"
        _place_fds(output_fd, socket_fds)
        step.name = f"change directory to {plan.workdir}"
        os.chdir(plan.workdir)
        # Whatever else this process holds, inherited or ours, the service does not get.
        keep = sorted((channel.fileno(), init_fd))
        os.closerange(3 + len(socket_fds), keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, 1 << 20)
        listener = -1
        if plan.intercept_bind:
            step.name = "install the bind() listener"
            listener = linux.install_seccomp_listener(bind_notify_filter())
        _confine(plan.seccomp_filter, plan.capabilities, plan.no_new_privs, step, plan.uid, plan.gid)
        if listener >= 0:
            # sandboxd answers the service's bind() calls through this descriptor (proxy.py).
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener]).tobytes())]
            channel.sendmsg([json.dumps({"exec": time.monotonic_ns()}).encode()], rights)
            os.close(listener)
        else:
            _report(channel, {"exec": time.monotonic_ns()})
        step.name = f"execute {plan.argv[plan.argv.index('--') + 1] if '--' in plan.argv else plan.argv[0]}"
        os.execve(init_fd, list(plan.argv), dict(plan.env))
    except OSError as e:
        detail = e.strerror or str(e)
        if e.filename:
            detail += f" ({e.filename})"
        _report(channel, {"error": step.name, "detail": detail})
        os._exit(EXIT_SETUP_FAILED)
    except BaseException as e:  # noqa: BLE001 - the child must never unwind into the fork server's loop
        _report(channel, {"error": step.name, "detail": repr(e)})
        os._exit(EXIT_UNEXPECTED)
    raise AssertionError("unreachable")


def join_namespaces(target: int) -> bool:
    """Join the namespaces of process `target`: pid, uts, ipc, net, then mnt (which brings its
    root), and its user namespace last, if it has its own. Last, because joining it drops every
    capability in the host's user namespace, and the network namespace of a service on a network
    belongs to the host's. True if a user namespace was joined."""
    own_user = os.stat("/proc/self/ns/user").st_ino
    names = ["pid", "uts", "ipc", "net", "mnt"]
    in_userns = os.stat(f"/proc/{target}/ns/user").st_ino != own_user
    if in_userns:
        names.append("user")
    fds = [os.open(f"/proc/{target}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in names]
    for fd in fds:
        linux.setns(fd, 0)
        os.close(fd)
    return in_userns


def become_userns_root() -> None:
    """After joining a user namespace: take its root's ids (the mapped ones), as the sandbox did."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG, set after the last change of credentials (which clears it: becoming root
    of a user namespace, or the service's user). `parent` is what getppid() said right after the
    fork (0 when the parent is outside a pid namespace joined); if the parent died before this,
    the child was given to another and getppid() says so."""
    linux.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(EXIT_UNEXPECTED)


def _join_then_run(request: dict[str, Any], channel: socket.socket, join: Callable[[], bool], run: Callable[[bool, int], None]) -> NoReturn:
    """The shape of running something inside a running sandbox, in a child born in its cgroup:
    join further cgroups, `join` namespaces (True if a user namespace was joined), report, fork
    `run` (a joined pid namespace takes effect for children only), wait, exit with its status.
    What runs dies with this process (`_die_with_parent`, which `run` calls last before exec), so
    killing this process ends it too."""
    step = _Step()
    try:
        step.name = "reset signals"
        _reset_signals()
        step.name = "join cgroups"
        for procs in request.get("cgroup_procs", ()):
            with open(procs, "w") as f:
                f.write("0")
        step.name = "join the sandbox's namespaces"
        in_userns = join()
        _report(channel, {"exec": time.monotonic_ns()})
        pid = os.fork()
        if pid == 0:
            run(in_userns, os.getppid())
            os._exit(EXIT_UNEXPECTED)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except OSError as e:
        _report(channel, {"error": step.name, "detail": e.strerror or str(e)})
        os._exit(EXIT_SETUP_FAILED)
    except BaseException as e:  # noqa: BLE001
        _report(channel, {"error": step.name, "detail": repr(e)})
        os._exit(EXIT_UNEXPECTED)


def run_in_sandbox(request: dict[str, Any], status_fd: int, output_fd: int) -> NoReturn:
    """Run a command in all the namespaces of a running sandbox's init, confined like the service.
    Used for health checks and `reload:` commands (`sandboxd exec` joins from the CLI: execute.py)."""

    def run(in_userns: bool, parent: int) -> None:
        if in_userns:
            become_userns_root()
        os.chdir(request["workdir"])
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        null = linux.open_null_in_root(root)  # the sandbox's: a host descriptor could be reopened
        for target_fd in (0, 1, 2):
            os.dup2(output_fd if target_fd and output_fd >= 0 else null, target_fd)
        os.closerange(3, 1 << 20)
        _confine(request.get("seccomp_filter", ""), tuple(request.get("capabilities", ())), True, _Step(), request.get("uid", 0), request.get("gid", 0))
        _die_with_parent(parent)
        argv = request["argv"]
        os.execvpe(argv[0], argv, dict(request["env"]))

    _join_then_run(request, socket.socket(fileno=status_fd), lambda: join_namespaces(int(request["exec_into"])), run)


def run_proxy(request: dict[str, Any], status_fd: int, output_fd: int, fds: list[int]) -> NoReturn:
    """Start the proxy (see proxy.py) in a running sandbox's network namespace, with the bound
    sockets as fds 3.., and exit with its status.

    `fds` is the sandbox init's pidfd, then (for a unix target) an O_PATH descriptor of the
    program's socket file, then the bound sockets. The proxy joins the network namespace only: not
    the sandbox's pid namespace (a process there of the same uid could open /proc/PID/root of the
    proxy, which is the host's root), not its mount namespace (the proxy is the host's program). It
    ends with the sandbox through the cgroup, and with this process (PR_SET_PDEATHSIG).
    """
    channel = socket.socket(fileno=fcntl.fcntl(status_fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)))
    os.close(status_fd)
    pidfd, *rest = fds
    target = rest.pop(0) if request.get("unix_target") else -1

    def join() -> bool:
        linux.setns(pidfd, abi.CLONE_NEWNET)
        return False

    def run(_in_userns: bool, parent: int) -> None:
        _place_fds(output_fd, rest + ([target] if target >= 0 else []))
        os.closerange(3 + len(rest) + (1 if target >= 0 else 0), 1 << 20)
        env = {"LISTEN_FDS": str(len(rest)), "LISTEN_PID": str(os.getpid()), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        argv = list(request["argv"])
        if target >= 0:
            argv[-1] = f"/proc/self/fd/{3 + len(rest)}"  # the socket file, opened inside the sandbox's root
        _confine("", (), True, _Step(), int(request["uid"]), int(request["gid"]))
        _die_with_parent(parent)
        os.execve(argv[0], argv, env)

    _join_then_run(request, channel, join, run)


# ───────────────────────────── the fork server ─────────────────────────────


def serve(conn: socket.socket) -> NoReturn:
    """The fork server's loop: launch requests in, exit statuses out. Never returns."""
    try:
        # Children of this process must not copy pages: the collector would touch every object.
        gc.disable()
        gc.freeze()
        linux.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        own_netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        children: dict[int, int] = {}  # pid in our namespace -> launch id
        selector = selectors.DefaultSelector()
        selector.register(conn, selectors.EVENT_READ, "request")
        selector.register(wake_r, selectors.EVENT_READ, "sigchld")
        while True:
            for key, _ in selector.select():
                if key.data == "request":
                    msg, fds = _recv_with_fds(conn)
                    if not msg:
                        os._exit(0)  # the supervisor is gone or done: our exit ends every sandbox
                    _fork_sandbox(conn, json.loads(msg), fds, own_pidns, own_netns, children)
                else:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    _reap(conn, children)
    except BaseException:  # noqa: BLE001
        os._exit(EXIT_UNEXPECTED)


def _recv_with_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """recvmsg with MSG_CMSG_CLOEXEC, so no received descriptor leaks into a sandbox by accident.

    (socket.recv_fds accepts a flags argument but, up to Python 3.12, does not pass it on.)
    """
    fds = array.array("i")
    msg, ancillary, _flags, _addr = conn.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


# MFD_EXEC (Linux 6.3): executable even where vm.memfd_noexec makes memfds non-executable by default.
MFD_EXEC = 0x0010
_sealed_inits: dict[str, int] = {}  # the fork server's sealed copies, by path on the host


def sealed_copy(path: str) -> int:
    """The fork server's read-only, sealed, execute-only copy of the init at `path`, made at its
    first launch and shared by every sandbox after it (no copy per launch).

    Why: an init executed from its file on the host leaves that file in reach through /proc/1/exe;
    uid 0 in the sandbox owns it, and with the root built on a tmpfs its mount is writable: only
    ETXTBSY, which ends with the init, stood between a write and the host's binary (runc's
    CVE-2019-5736). A memfd sealed against writes, growth and shrinking (and against unsealing)
    cannot be changed by anyone, root included, and is no path of the host's.

    Mode 0111: no one in a sandbox can read it either, and the kernel makes a process that execs a
    file it cannot read non-dumpable. So, without CAP_SYS_PTRACE (which docker withholds too), no
    process of the sandbox reaches its init's /proc/1/mem (read or write), environ, exe, fd/,
    root or map_files, nor its memory through process_vm_readv/writev, nor its descriptors
    through pidfd_getfd. What this does not cover: a service given CAP_DAC_OVERRIDE or
    CAP_DAC_READ_SEARCH reads the copy, so its init stays dumpable; a host with
    fs.suid_dumpable=1 makes every such process dumpable; the service's own processes reach one
    another as processes of one uid always do (ptrace itself is refused by seccomp).
    """
    fd = _sealed_inits.get(path)
    if fd is not None:
        return fd
    with open(path, "rb") as source:
        if source.read(4) != b"\x7fELF":
            raise OSError(errno.ENOEXEC, "not an ELF binary: sandboxd runs its init from a sealed copy, executed by descriptor", path)
        source.seek(0)
        try:
            fd = os.memfd_create("sbd-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | MFD_EXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a kernel before MFD_EXEC, where memfds are executable
                raise OSError(e.errno, f"memfd_create: {e.strerror} (vm.memfd_noexec=2 forbids executable memfds)", path) from None
            fd = os.memfd_create("sbd-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            while chunk := source.read(1 << 20):
                os.write(fd, chunk)
            os.fchmod(fd, 0o111)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
    _sealed_inits[path] = fd
    return fd


def _fork_sandbox(conn: socket.socket, request: dict[str, Any], fds: list[int], own_pidns: int, own_netns: int, children: dict[int, int]) -> None:
    """Fork what a request asks for. A sandbox's descriptors are [status, output, sockets...,
    held bind sources..., netns?]; each source becomes a detached copy here, before the fork, and
    so does the image's tree. In a user namespace those stored through the stack's ids are
    idmapped here too (STORE_IDS), those seen with the host's ids once the sandbox's own user
    namespace exists (HOST_IDS, in `_fork_in_user_namespace`): only root of the host's user
    namespace may idmap a mount of the host's file systems. A command's request may lack the
    output (`"output": false`): it gets the sandbox's own /dev/null."""
    status_fd, *socket_fds = fds
    output_fd = socket_fds.pop(0) if request.get("output", True) else -1
    netns_fd = socket_fds.pop() if request.get("netns") else -1
    first_source = len(socket_fds) - request.get("sources", 0)
    held, socket_fds = socket_fds[first_source:], socket_fds[:first_source]
    cgroup_fd = -1
    trees: list[int] = []
    host_id_trees: list[tuple[int, str]] = []
    doing = "fork"
    try:
        init_fd = -1
        if "plan" in request:
            plan = request["plan"]
            doing = f"make a sealed copy of the init {plan['argv'][0]}"
            init_fd = sealed_copy(plan["argv"][0])
            binds = [op for op in plan["mounts"] if op["kind"] == "bind"]
            if len(held) != len(binds):  # the kernel cut the descriptors short (more than MAX_FDS)
                raise OSError(errno.EMSGSIZE, f"{len(binds)} bind sources, {len(held)} descriptors received", plan["service"])
            store = _storage_userns(plan["userns"]) if plan["userns"] and any(op["options"] == STORE_IDS for op in binds) else -1
            for fd, op in zip(held, binds):
                doing = f"copy the mount of {op['source']}"
                trees.append(detached_bind(fd, op["source"]))
                if op["options"] == STORE_IDS and store >= 0:
                    _idmap(trees[-1], store, op["source"])
                elif op["options"] == HOST_IDS:
                    host_id_trees.append((trees[-1], op["source"]))
            if plan["mounts"][0]["kind"] == "image-root":
                rootfs = plan["mounts"][0]["source"]
                doing = f"copy the mount of the image {rootfs}"
                held_root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    request["image_tree"] = image_tree = detached_bind(held_root, rootfs)
                finally:
                    os.close(held_root)
                trees.append(image_tree)
                if plan["mounts"][0]["options"] == HOST_IDS:
                    host_id_trees.append((image_tree, rootfs))
            doing = "make the sandbox's /dev"
            request["dev_tree"] = dev_tree = detached_dev((plan["userns"]["uid"], plan["userns"]["gid"]) if plan["userns"] else None)
            trees.append(dev_tree)
            doing = "fork"
        cgroup_fd = os.open(request["cgroup"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        userns = request["plan"].get("userns") if "plan" in request else None
        if userns:
            pid = _fork_in_user_namespace(request, cgroup_fd, netns_fd, own_netns, userns, host_id_trees)
            if pid == 0:
                run_sandbox(request, status_fd, output_fd, socket_fds, init_fd, -1, trees)
            children[pid] = request["id"]
            return
        if "exec_into" in request:
            pid = linux.fork_into_cgroup(cgroup_fd)
            if pid == 0:
                run_in_sandbox(request, status_fd, output_fd)
        elif "proxy_into" in request:
            pid = linux.fork_into_cgroup(cgroup_fd)
            if pid == 0:
                run_proxy(request, status_fd, output_fd, socket_fds)
        else:
            pid = _fork_sandbox_init(cgroup_fd, own_pidns)
        if pid == 0:
            run_sandbox(request, status_fd, output_fd, socket_fds, init_fd, netns_fd, trees)
        children[pid] = request["id"]
    except OSError as e:
        conn.send(json.dumps({"failed": request["id"], "detail": f"{doing}: {e.strerror} ({e.filename or request['cgroup']})"}).encode())
    finally:
        for fd in [*fds, *trees, cgroup_fd]:
            if fd >= 0:
                os.close(fd)


def _idmap(tree: int, userns: int, source: str) -> None:
    """Idmap a detached copy through `userns`; say plainly when its file system cannot be."""
    try:
        linux.mount_setattr(tree, abi.MOUNT_ATTR_IDMAP, userns_fd=userns, name=source)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise OSError(e.errno, "its file system cannot be idmapped (a user namespace needs that for mounts; userns: false does not)", source) from None


def _host_pid(pid: int, pidfd: int = -1) -> int:
    """The host's pid of a child (`pid` is its pid in this process's namespace): /proc here is the
    host's, and a pidfd's fdinfo tells the pid as the /proc it is read through numbers it."""
    own = pidfd < 0
    if own:
        pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
    finally:
        if own:
            os.close(pidfd)


_store_userns: dict[tuple[int, ...], int] = {}


def _storage_userns(ids: dict[str, int]) -> int:
    """The user namespace that volumes and binds are idmapped through (plan.swapped_id_map): a
    file stored as store_uid + N is the sandbox's own N inside, everything else keeps its host
    owner. -1 when the stack runs as the stored block itself (a single block): no idmap needed.
    Made once per stack's ids by a child that unshares it and waits while its maps are written;
    held by descriptor here for the life of the fork server."""
    if (ids["store_uid"], ids["store_gid"]) == (ids["uid"], ids["gid"]):
        return -1
    key = (ids["store_uid"], ids["store_gid"], ids["uid"], ids["gid"], ids["count"])
    if key in _store_userns:
        return _store_userns[key]
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(done_w)  # else the read below never sees the end
            os.close(ready_r)
            linux.unshare(abi.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "unshare(CLONE_NEWUSER) failed", "the storage user namespace")
        host_pid = _host_pid(pid)
        for kind, stored, running in (("uid_map", ids["store_uid"], ids["uid"]), ("gid_map", ids["store_gid"], ids["gid"])):
            with open(f"/proc/{host_pid}/{kind}", "w") as f:
                f.write(swapped_id_map(stored, running, ids["count"]))
        _store_userns[key] = os.open(f"/proc/{host_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)
    return _store_userns[key]


def _fork_in_user_namespace(
    request: dict[str, Any], cgroup_fd: int, netns_fd: int, own_netns: int, ids: dict[str, int], host_id_trees: list[tuple[int, str]]
) -> int:
    """Fork the sandbox's init into a new user and pid namespace, born in its cgroup, and in the
    service's network namespace if sandboxd made one (`netns_fd`).

    The child may not do anything as root-inside before its uid and gid maps exist, and only a
    process outside (this one, root in the parent namespace) may write maps that name other ids
    than its own. So the child waits on a pipe while this process writes the maps, idmaps the
    trees that keep the host's ids (HOST_IDS) through the child's user namespace, moves it into
    the v1 cgroups of its limits (which the child could no longer do itself), and then lets it go.

    A child in a new user namespace may not join a network namespace of the host's user namespace,
    nor mount a sysfs for it: so this process joins it for the moment of the clone (the child is
    born there) and makes the sysfs there, detached, for the child to attach.
    """
    wait_r, wait_w = os.pipe2(os.O_CLOEXEC)
    pid, pidfd, sysfs = -1, -1, -1
    try:
        if netns_fd >= 0:
            linux.setns(netns_fd, abi.CLONE_NEWNET)
        try:
            if netns_fd >= 0 and any(op["kind"] == "sysfs" and op["options"] == SYSFS_OF_NETNS for op in request["plan"]["mounts"]):
                sysfs = request["sysfs_tree"] = linux.detached_mount("sysfs", READONLY | abi.MOUNT_ATTR_NOEXEC)
            # The new user namespace's owner is whoever's effective ids clone it. The kernel
            # counts what its processes hold (inotify instances, user namespaces ...) against
            # their user inside and against that owner outside, and a process of the host's
            # user namespace running as the owner has every capability inside. So the owner is
            # the block's last id: not the host's root, whose limits a sandbox must not use up,
            # nor the block's root, as which sandboxd runs a proxy to a unix socket of a root
            # service. Root's capabilities stay for the clone.
            os.setegid(ids["gid"] + ids["count"] - 1)
            os.seteuid(ids["uid"] + ids["count"] - 1)
            try:
                linux.raise_effective_capabilities()
                pid, pidfd = linux.fork_into_cgroup_with_pidfd(cgroup_fd, abi.CLONE_NEWPID | abi.CLONE_NEWUSER)
            finally:
                if pid != 0:
                    os.seteuid(0)  # the effective capabilities come back with it
                    os.setegid(0)
        finally:
            if netns_fd >= 0 and pid != 0:
                linux.setns(own_netns, abi.CLONE_NEWNET)
        if pid == 0:
            os.close(wait_w)
            if os.read(wait_r, 1) != b"1":
                os._exit(EXIT_SETUP_FAILED)  # the fork server could not set it up; it says why
            os.close(wait_r)
            request["cgroup_procs"] = []
            return 0
        host_pid = _host_pid(pid, pidfd)
        for kind, first in (("uid_map", ids["uid"]), ("gid_map", ids["gid"])):
            with open(f"/proc/{host_pid}/{kind}", "w") as f:
                f.write(f"0 {first} {ids['count']}\n")
        if host_id_trees:
            userns = os.open(f"/proc/{host_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for tree, source in host_id_trees:
                    _idmap(tree, userns, source)
            finally:
                os.close(userns)
        for procs in request["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(pid))  # cgroup.procs reads pids in the writer's pid namespace: ours
        os.write(wait_w, b"1")
    finally:
        if pid != 0:
            for fd in (wait_r, wait_w, pidfd, sysfs):
                if fd >= 0:
                    os.close(fd)
    return pid


_clone3_works = True


def _fork_sandbox_init(cgroup_fd: int, own_pidns: int) -> int:
    """Fork the sandbox's init: pid 1 of a new pid namespace, born in its cgroup where the kernel allows."""
    global _clone3_works
    if _clone3_works:
        try:
            return linux.fork_into_cgroup(cgroup_fd, abi.CLONE_NEWPID)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.E2BIG, errno.EINVAL):
                raise
            _clone3_works = False  # an older kernel: fork, then join the cgroup in the child
    linux.unshare(abi.CLONE_NEWPID)
    pid = -1
    try:
        pid = os.fork()
        if pid == 0:
            with open(f"/proc/self/fd/{cgroup_fd}/cgroup.procs", "w") as f:
                f.write("0")
        return pid
    finally:
        if pid != 0:
            # Back to our own namespace for children, so the next unshare(CLONE_NEWPID) works.
            linux.setns(own_pidns, abi.CLONE_NEWPID)


def _reap(conn: socket.socket, children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        launch_id = children.pop(pid, None)
        if launch_id is not None:
            conn.send(json.dumps({"exit": launch_id, "status": status}).encode())


# ───────────────────────────── supervisor side ─────────────────────────────


@dataclass
class Launched:
    pid: int  # the sandbox init's pid in the host's pid namespace
    pidfd: int
    exec_ns: int  # CLOCK_MONOTONIC when the child was about to exec
    listener: int = -1  # the seccomp listener of its bind() calls, with `intercept_bind`


ExitCallback = Callable[[int, int], None]


class ForkServer:
    """The supervisor's handle on the fork server."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self._next_id = 0

    @staticmethod
    def start() -> ForkServer:
        """Fork the fork server as pid 1 of a new pid namespace. Call before any thread exists.

        A fork costs in proportion to the pages the child then touches (copy on write), so the
        CLI starts the fork server right after validation, before the supervisor's own imports
        (asyncio, pyroute2): every sandbox is a fork of this smaller process. (Starting a fresh
        interpreter instead would cost about 80 ms before the first sandbox, more than it saves.)
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.unshare(abi.CLONE_NEWPID)
            try:
                pid = os.fork()
                if pid == 0:
                    parent.close()
                    serve(child)
            finally:
                linux.setns(own_pidns, abi.CLONE_NEWPID)
        finally:
            os.close(own_pidns)
        child.close()
        return ForkServer(parent, pid)

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send_launch(
        self,
        launch_id: int,
        plan: LaunchPlan,
        cgroup: str,
        cgroup_procs: tuple[str, ...],
        root: str,
        output_fd: int,
        socket_fds: list[int],
        netns_fd: int = -1,
        source_fds: list[int] | None = None,
    ) -> socket.socket:
        """Ask for a sandbox born in cgroup2 directory `cgroup` that also joins `cgroup_procs`.

        With `netns_fd`, the sandbox joins that network namespace instead of creating one.
        `source_fds` are the held descriptors of its bind sources (pins.py), one per bind in the
        order of the plan's mounts. Returns the supervisor's end of its status channel.
        """
        sources = list(source_fds or [])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        request = {
            "id": launch_id,
            "plan": plan.to_wire(),
            "cgroup": cgroup,
            "cgroup_procs": list(cgroup_procs),
            "root": root,
            "netns": netns_fd >= 0,
            "sources": len(sources),
        }
        fds = [theirs.fileno(), output_fd, *socket_fds, *sources] + ([netns_fd] if netns_fd >= 0 else [])
        try:
            socket.send_fds(self.conn, [json.dumps(request).encode()], fds)
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def send_exec(
        self,
        launch_id: int,
        init_pid: int,
        cgroup: str,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        capabilities: tuple[int, ...] = (),
        seccomp_filter: str = "",
        uid: int = 0,
        gid: int = 0,
        output_fd: int = -1,
        cgroup_procs: tuple[str, ...] = (),
    ) -> socket.socket:
        """Run a command inside a running sandbox (its init's namespaces and its cgroup)."""
        request = {
            "id": launch_id,
            "exec_into": init_pid,
            "cgroup": cgroup,
            "argv": argv,
            "env": list(env.items()),
            "workdir": workdir,
            "capabilities": list(capabilities),
            "seccomp_filter": seccomp_filter,
            "uid": uid,
            "gid": gid,
            "cgroup_procs": list(cgroup_procs),
        }
        # Without an output, none is sent: the command gets the sandbox's own /dev/null, not a
        # descriptor of the host's that a process of the service could reopen through /proc.
        request["output"] = output_fd >= 0
        return self._send(request, [output_fd] if output_fd >= 0 else [])

    def _send(self, request: dict[str, Any], fds: list[int]) -> socket.socket:
        """Send a request with its descriptors after a new status channel; returns our end of it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            socket.send_fds(self.conn, [json.dumps(request).encode()], [theirs.fileno(), *fds])
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def send_proxy(
        self,
        launch_id: int,
        pidfd: int,
        cgroup: str,
        cgroup_procs: tuple[str, ...],
        argv: list[str],
        socket_fds: list[int],
        output_fd: int,
        uid: int,
        gid: int,
        target_fd: int = -1,
    ) -> socket.socket:
        """Start a proxy in a running sandbox's cgroup and network namespace (see proxy.py)."""
        request = {
            "id": launch_id,
            "proxy_into": True,
            "cgroup": cgroup,
            "cgroup_procs": list(cgroup_procs),
            "argv": argv,
            "uid": uid,
            "gid": gid,
            "unix_target": target_fd >= 0,
        }
        return self._send(request, [output_fd, pidfd, *([target_fd] if target_fd >= 0 else []), *socket_fds])

    def stop(self) -> None:
        """Close our end: the fork server exits, and with it anything still in its namespace."""
        self.conn.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def read_status(channel: socket.socket, service: str) -> tuple[str, Launched | None]:
    """Read what a launching child said. Returns ("pending"|"done"|"error", result)."""
    creds_size = struct.calcsize("iII")
    try:
        space = socket.CMSG_SPACE(creds_size) + socket.CMSG_SPACE(array.array("i").itemsize)
        data, ancillary, _flags, _addr = channel.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return "pending", None
    if not data:
        return "done", None
    message = json.loads(data)
    if "error" in message:
        raise LaunchError(service, message["error"], message["detail"])
    pid, listener = 0, -1
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", payload[:creds_size])[0]
        elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            listener = array.array("i", payload[: len(payload) - len(payload) % 4])[0]
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
        pidfd = -1
    return "pending", Launched(pid, pidfd, message["exec"], listener)
