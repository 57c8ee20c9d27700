"""The sandbox's init between the fork server's clone and its exec: one ordered walk.

The fork server forks this child as pid 1 of a new pid namespace (and, in a user namespace, lets
it go once its id maps are written: forkserver.py). From there it makes itself the sandbox the
plan describes, in this order, each step named so that its failure says what failed:

    reset signals                    the fork server's handlers, SIG_IGN, wakeup fd and mask
    join cgroups                     the v1 hierarchies: "0" to the tasks files the fork server opened
    join the service's network ns    when sandboxd made one (in a user namespace: born in it)
    create namespaces                unshare(mount, uts, ipc[, net]); setsid
    become root of the user ns       setgroups, setresgid and setresuid to the mapped 0
    take the sealed copy of the init moved clear of fds 3..
    build the root (RootWalk)        / private; the plan's mounts in order; pivot_root; the
                                     binds and the spec's tmpfs inside; seal; detach the old root
    set hostname, bring up lo
    set up descriptors               0 from /dev/null, 1 and 2 to the output, sockets at 3..;
                                     chdir; every other descriptor closed
    install the bind() listener      with the plan's intercept_bind
    confine                          seccomp, bounding set, ids, capabilities (confine.py)
    report Executing                 on the status channel, with the listener
    execute the init                 the sealed copy, by descriptor; the channel closes on exec

The first step that fails is reported as SetupFailed(step, detail, path) and the child exits
127 (126 for anything but an OSError), as bubblewrap dies naming the path. The child never
touches asyncio or the supervisor's logging, and every call it makes goes through a `Kernel`
(kernel/seam.py): tests/unit/test_child.py runs this walk against the recording fake.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass
from typing import NoReturn

from sandboxd.kernel import abi
from sandboxd.kernel.seam import Kernel

# Imported here, never in the child: an import there, as the host's root and after pivot_root,
# would be looked up in the sandbox's tree.
from sandboxd.kernel.seccomp import bind_notify_filter
from sandboxd.plan.launch import MASK_WITH_MOUNTPOINTS, SANDBOX_TMPFS, SYSFS_OF_NETNS, MountOp, is_under
from sandboxd.sandbox.confine import Step, become_userns_root, confine, failure, place_fds, report
from sandboxd.sandbox.protocol import Executing, LaunchSandbox, encode

EXIT_SETUP_FAILED = 127
EXIT_UNEXPECTED = 126

READONLY = abi.MOUNT_ATTR_RDONLY | abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV
FRESH_IN_SANDBOX = ("dev", "proc", "run", "tmp")  # sandboxd mounts its own at these top-level paths
OLD_ROOT = "/run/.sbd-oldroot"  # on the sandbox's own /run tmpfs, removed before exec


@dataclass(frozen=True)
class Trees:
    """The detached mounts the fork server made for one launch, for the child to attach: the
    bind sources' copies (one per bind, in the plan's order), the image's, a sysfs made in the
    service's network namespace, and the sandbox's /dev (forkserver.py, detached.py)."""

    binds: tuple[int, ...] = ()
    image: int = -1
    sysfs: int = -1
    dev: int = -1


@dataclass(frozen=True)
class Descriptors:
    """What else the child holds: the output pipe, the sockets (fds 3.. of the service), the
    fork server's sealed copy of the init, the network namespace to join (or -1), and the `tasks`
    files of its v1 cgroups (a hybrid host), opened by the fork server: a child in a user namespace
    of its own may no longer open them, and may still write "0" to them to join them."""

    output: int
    sockets: tuple[int, ...]
    init: int
    netns: int = -1
    cgroup_tasks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Init:
    """What the child executes once it is the sandbox."""

    fd: int
    argv: list[str]
    env: dict[str, str]
    name: str  # the command behind the init, as a failure names it


def run_sandbox(kernel: Kernel, request: LaunchSandbox, channel: socket.socket, fds: Descriptors, trees: Trees) -> NoReturn:
    """Become the sandbox `request` plans and exec its init; report the step that failed."""
    step = Step()
    try:
        init = become_sandbox(kernel, request, channel, fds, trees, step)
        step.name = f"execute {init.name}"
        kernel.execve(init.fd, init.argv, init.env)
    except OSError as e:
        report(kernel, channel, failure(step, e, EXIT_SETUP_FAILED))
        kernel.exit(EXIT_SETUP_FAILED)
    except BaseException as e:  # noqa: BLE001 - the child must never unwind into the fork server's loop
        report(kernel, channel, failure(step, e, EXIT_UNEXPECTED))
        kernel.exit(EXIT_UNEXPECTED)


def become_sandbox(kernel: Kernel, request: LaunchSandbox, channel: socket.socket, fds: Descriptors, trees: Trees, step: Step) -> Init:
    """Every step before the exec, in the order of the module's docstring; the last one reports
    Executing. Returns what to execute."""
    plan = request.plan
    step.name = "reset signals"
    kernel.reset_signals()
    step.name = "join cgroups"
    for tasks in fds.cgroup_tasks:  # further hierarchies (v1 controllers on a hybrid host)
        kernel.write(tasks, b"0")
        kernel.close(tasks)
    if fds.netns >= 0:
        step.name = "join the service's network namespace"
        kernel.setns(fds.netns, abi.CLONE_NEWNET)
        kernel.close(fds.netns)
    step.name = "create namespaces"
    kernel.unshare(plan.clone_flags)
    kernel.setsid()
    if plan.userns:
        # Still the host's root by id; become root of the new user namespace (the mapped ids).
        step.name = "become root of the user namespace"
        become_userns_root(kernel)
    # The init is the fork server's sealed copy (sealed_copy), executed through its descriptor:
    # /proc/1/exe is that memfd, never a file of the host's, wherever sandboxd is installed.
    step.name = f"take the sealed copy of the init {plan.argv[0]}"
    init_fd = kernel.dup_above(fds.init, 3 + len(fds.sockets))  # clear of fds 3..
    RootWalk(kernel, request.root, plan.mounts, trees, bool(plan.userns), step).build()
    step.name = "set hostname"
    if plan.clone_flags & abi.CLONE_NEWUTS:  # never the host's
        kernel.sethostname(plan.hostname)
    if plan.net == "private":
        step.name = "bring up lo"
        kernel.loopback_up()
    step.name = "set up descriptors"
    place_fds(kernel, fds.output, list(fds.sockets))
    step.name = f"change directory to {plan.workdir}"
    kernel.chdir(plan.workdir)
    # Whatever else this process holds, inherited or ours, the service does not get.
    keep = sorted((channel.fileno(), init_fd))
    kernel.closerange(3 + len(fds.sockets), keep[0])
    kernel.closerange(keep[0] + 1, keep[1])
    kernel.closerange(keep[1] + 1, 1 << 20)
    listener = -1
    if plan.intercept_bind:
        step.name = "install the bind() listener"
        listener = kernel.install_seccomp_listener(bind_notify_filter())
    confine(kernel, plan.seccomp_filter, plan.capabilities, plan.no_new_privs, step, plan.uid, plan.gid)
    if listener >= 0:
        # sandboxd answers the service's bind() calls through this descriptor (proxy.py).
        kernel.send(channel, encode(Executing(time.monotonic_ns())), [listener])
        kernel.close(listener)
    else:
        report(kernel, channel, Executing(time.monotonic_ns()))
    name = plan.argv[plan.argv.index("--") + 1] if "--" in plan.argv else plan.argv[0]
    return Init(init_fd, list(plan.argv), dict(plan.env), name)


class RootWalk:
    """The sandbox's file system, made by one walk over the plan's mounts (bubblewrap's
    setup_newroot). `trees` are the fork server's detached copies; `locked`: in a user
    namespace (see `detach_covered`).

    With the host's root as it is (`rbind-root` with options "in-place"): the new mount
    namespace's copy of the host's tree is made read-only, nosuid and nodev in one call, and
    /proc, /sys, /dev, /tmp and /run are mounted over it, each after the host's mount there is
    detached; no copy of the tree, no pivot_root, no detaching of the old root (about 1 ms less
    per sandbox). Otherwise (new top-level mount points: `tmpfs-root`; an image: `image-root`) a
    root is built at `root` and pivoted into (bubblewrap's order of steps).

    Binds and the spec's own tmpfs are made after pivot_root, so that a target's path (and any
    symlink in it) resolves inside the sandbox, never on the host.
    """

    def __init__(self, kernel: Kernel, root: str, mounts: tuple[MountOp, ...], trees: Trees, locked: bool, step: Step) -> None:
        self.kernel = kernel
        self.mounts = mounts
        self.trees = trees
        self.locked = locked
        self.step = step
        self.in_place = mounts[0].kind == "rbind-root" and mounts[0].options == "in-place"
        self.root = "" if self.in_place else root
        self.unattached = iter(trees.binds)
        self.inside: list[tuple[MountOp, int]] = []  # made after pivot_root: (op, its tree or -1)
        self.masks_to_seal: list[str] = []
        self.pending_seal = any(op.kind == "tmpfs-root" for op in mounts)
        self.fresh = {*FRESH_IN_SANDBOX, *(("sys",) if any(op.kind == "sysfs" for op in mounts) else ())}

    def build(self) -> None:
        self.step.name = "make / private"
        self.kernel.mount(None, "/", None, abi.MS_REC | abi.MS_PRIVATE)
        for op in self.mounts:
            self.step.name = f"mount {op.kind} on {op.target}"
            self.mount(op, self.root + op.target if op.target != "/" else (self.root or "/"))
        if not self.in_place:
            self.step.name = f"pivot_root into {self.root}"
            # The old root stays on the sandbox's own /run until the binds are made, so that a
            # target that leads into it through a symlink is seen, and refused.
            self.kernel.mkdir(f"{self.root}{OLD_ROOT}")
            self.kernel.chdir(self.root)
            self.kernel.pivot_root(".", OLD_ROOT.lstrip("/"))
        self.kernel.chdir("/")
        for op, tree in self.inside:
            self.mount_inside(op, tree)
        self.seal()

    def mount(self, op: MountOp, target: str) -> None:
        """One mount of the walk before pivot_root, at `target` (below the new root)."""
        kernel = self.kernel
        match op.kind:
            case "rbind-root" if self.in_place:
                kernel.mount_setattr("/", READONLY)
            case "rbind-root":
                kernel.mount(op.source, self.root, None, abi.MS_BIND | abi.MS_REC)
                kernel.mount_setattr(self.root, READONLY)
            case "tmpfs-root":
                host_root_on_tmpfs(kernel, self.root, self.fresh)
            case "image-root":
                image_root(kernel, self.root, self.trees.image, op.source)
            case "mountpoint":
                ensure_mountpoint(kernel, target, is_dir=op.options == "dir")
            case "proc":
                if self.pending_seal:  # the tmpfs root and its binds, once its mount points exist
                    kernel.mount_setattr(self.root, READONLY)
                    self.pending_seal = False
                self.detach_covered(target)
                kernel.mount("proc", target, "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            case "sysfs" if op.options == SYSFS_OF_NETNS:
                self.detach_covered(target)
                kernel.move_mount(self.trees.sysfs, target)
            case "sysfs":
                # Its own sysfs, read-only: /sys/class/net shows the sandbox's links, not the host's.
                self.detach_covered(target)
                kernel.mount("sysfs", target, "sysfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            case "mask":
                self.mask(op, target)
            case "readonly":
                if kernel.lexists(target):
                    kernel.mount(target, target, None, abi.MS_BIND | abi.MS_REC)
                    kernel.mount_setattr(target, READONLY)
            case "dev":
                self.dev(target)
            case "tmpfs" if op.target in SANDBOX_TMPFS:
                self.detach_covered(target)
                kernel.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, op.options or None)
            case "tmpfs":
                self.inside.append((op, -1))  # a tmpfs the spec asked for: made inside
            case "bind":
                self.inside.append((op, next(self.unattached)))

    def mask(self, op: MountOp, target: str) -> None:
        """Hide `target`: an empty read-only tmpfs over a directory (writable until the mounts
        below it have their mount points, with MASK_WITH_MOUNTPOINTS), the sandbox's own
        /dev/null (made before the masks) over anything else, as runc does; nothing if absent."""
        if op.options == MASK_WITH_MOUNTPOINTS:
            if self.kernel.isdir(target):
                self.kernel.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=64k")
                self.masks_to_seal.append(op.target)
        elif self.kernel.isdir(target):
            self.kernel.mount("tmpfs", target, "tmpfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=0")
        elif self.kernel.lexists(target):
            self.kernel.mount(f"{self.root}/dev/null", target, None, abi.MS_BIND)

    def dev(self, target: str) -> None:
        """Attach the sandbox's /dev (the fork server's `detached_dev`), then its own devpts (its
        /dev/shm, a capped tmpfs, is a mount of the plan's own)."""
        self.detach_covered(target)
        self.kernel.move_mount(self.trees.dev, target)
        self.kernel.close(self.trees.dev)
        self.kernel.mount("devpts", f"{target}/pts", "devpts", abi.MS_NOSUID | abi.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")

    def detach_covered(self, target: str) -> None:
        """Detach the host's mount at `target` (and everything below it) just before sandboxd
        mounts its own there, so that /proc/self/mountinfo lists only the sandbox's mount, not
        the host's /proc, /sys (with every cgroup hierarchy), /dev (shm, pts, mqueue), /tmp and
        /run subtrees. Only a root bound from the host's has the host's mounts there (a root on
        a tmpfs or an image has plain directories).

        Only ever in the sandbox's own mount namespace, after `/` was made private recursively:
        the host's mounts are untouched. Bind sources are detached copies already, so nothing
        below these mounts is still needed. In a user namespace the kernel locks the mounts it
        copied from the host to the ones around them (MNT_LOCKED): umount2 refuses them (EINVAL,
        or EPERM), and they stay listed.
        """
        if self.mounts[0].kind != "rbind-root":
            return
        if self.kernel.device_of(target) == self.kernel.device_of(os.path.dirname(target)):
            return  # no mount of its own here (or a bind of the parent's file system, left as it is)
        try:
            self.kernel.umount2(target, abi.MNT_DETACH)
        except OSError as e:
            if not (self.locked and e.errno in (errno.EINVAL, errno.EPERM)):
                raise

    def mount_inside(self, op: MountOp, tree: int) -> None:
        """After pivot_root: a bind's detached copy (`tree`) or a tmpfs at `op.target`. A symlink on
        the way (/etc/resolv.conf -> /run/...) is followed inside the sandbox, where it may lead
        onto the private /run: the mount point is made there. One that leads to the host's root,
        still at OLD_ROOT here (an image can hold any symlink), is refused."""
        self.step.name = f"mount tmpfs on {op.target}" if op.kind == "tmpfs" else f"bind {op.source} on {op.target}"
        target = self.kernel.realpath(op.target)
        if not self.in_place and is_under(target, OLD_ROOT):
            raise OSError(errno.EPERM, "leads out of the sandbox through a symlink", op.target)
        if op.kind == "tmpfs":
            ensure_mountpoint(self.kernel, target, is_dir=True)
            self.kernel.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, op.options)
            return
        attach_bind(self.kernel, tree, target, op.readonly)
        self.kernel.close(tree)

    def seal(self) -> None:
        """The last of the walk: masks that held mount points, an image's root with readonly_root,
        read-only; the host's root detached (unless it is the sandbox's, in place)."""
        for path in self.masks_to_seal:
            self.step.name = f"make {path} read-only"
            self.kernel.mount_setattr(path, READONLY, recursive=False)  # the mounts on it keep their flags
        if self.mounts[0].kind == "image-root" and self.mounts[0].readonly:
            self.step.name = "make the image's root read-only"
            # Only the overlay itself: the mounts on it (/tmp, /run, writable binds) keep their flags.
            self.kernel.mount(None, "/", None, abi.MS_REMOUNT | abi.MS_BIND | abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV)
        if not self.in_place:
            self.step.name = "detach the host's root"
            self.kernel.umount2(OLD_ROOT, abi.MNT_DETACH)
            self.kernel.rmdir(OLD_ROOT)


def ensure_mountpoint(kernel: Kernel, target: str, is_dir: bool) -> None:
    """A directory or an empty file at `target`, with its parents, unless something is there."""
    if kernel.lexists(target):
        return
    kernel.makedirs(os.path.dirname(target))
    if is_dir:
        kernel.mkdir(target)
    else:
        kernel.create_file(target)


def host_root_on_tmpfs(kernel: Kernel, root: str, fresh: set[str]) -> None:
    """A root of its own: a tmpfs with the host's top-level entries bound (or linked) into it,
    except those in `fresh` (sandboxd mounts its own there: the host's would only be covered, and
    still listed in /proc/self/mountinfo)."""
    kernel.mount("tmpfs", root, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755,size=64k")
    for name, kind in kernel.list_dir("/"):
        path = f"{root}/{name}"
        if kind == "symlink":
            kernel.symlink(kernel.readlink(f"/{name}"), path)
        elif kind == "dir":
            kernel.mkdir(path)
            if name not in fresh:
                kernel.mount(f"/{name}", path, None, abi.MS_BIND | abi.MS_REC)
        else:
            ensure_mountpoint(kernel, path, is_dir=False)
            kernel.mount(f"/{name}", path, None, abi.MS_BIND)


def image_root(kernel: Kernel, root: str, tree: int, source: str) -> None:
    """The image's tree (`tree`: a detached copy of `source` from the fork server, idmapped in a
    user namespace) as the lower layer of an overlay on `root`, the upper layer on a tmpfs of this
    mount namespace (systemd-nspawn's --volatile=overlay): writes are charged to the sandbox's
    memory cgroup and vanish with the namespace, with nothing to clean up."""
    kernel.mount("tmpfs", root, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755")
    kernel.mkdir(f"{root}/upper", 0o755)
    kernel.mkdir(f"{root}/work", 0o700)
    # The overlay's options show in /proc/self/mountinfo as they are written: the layers are named
    # relative to the tmpfs, not by sandboxd's runtime paths. The copy of the tree is attached at a
    # path ending with the tree's own in the image store: that is how images.trees_in_use tells
    # which trees are mounted.
    kernel.makedirs(f"{root}/lower{source}", 0o755)
    kernel.move_mount(tree, f"{root}/lower{source}")
    kernel.close(tree)
    kernel.chdir(root)
    kernel.mount("overlay", root, "overlay", abi.MS_NOSUID | abi.MS_NODEV, f"lowerdir=lower{source},upperdir=upper,workdir=work")
    # What sandboxd mounts before pivot_root goes on these; a symlink would lead onto the host.
    for top in (*FRESH_IN_SANDBOX, "sys"):
        path = f"{root}/{top}"
        if kernel.islink(path):
            raise OSError(errno.ELOOP, "is a symlink in the image; sandboxd mounts a directory there", f"/{top}")
        if not kernel.isdir(path):
            kernel.mkdir(path, 0o755)


def attach_bind(kernel: Kernel, tree: int, target: str, readonly: bool) -> None:
    """Attach a detached copy from the fork server's `detached_bind` on `target`. The copy has
    the flags of the host's mount it came from: it is made read-only, or writable, and nosuid
    and nodev either way."""
    ensure_mountpoint(kernel, target, is_dir=kernel.fd_is_dir(tree))
    kernel.move_mount(tree, target)
    if readonly:
        kernel.mount_setattr(target, READONLY)
    else:
        kernel.mount_setattr(target, abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV, abi.MOUNT_ATTR_RDONLY)
