"""The sandbox's set-up as one ordered program: `compile_launch`, pure.

The fork server compiles one program per launch and hands it to the compiled interpreter
(setup/sbd-setup.c) that the child executes right after the clone (child.py), as bubblewrap
walks its SetupOp list. The steps, in this order, each named so that its failure says what failed:

    reset signals                    every disposition SIG_DFL (exec keeps SIG_IGN), an empty mask
    join cgroups                     the v1 hierarchies: "0" to the tasks files the fork server opened
    join the service's network ns    when sandboxd made one (in a user namespace: born in it)
    create namespaces                unshare(mount, uts, ipc[, net])
    build the root (RootProgram)     / private; the plan's mounts in order; pivot_root; the
                                     binds and the spec's tmpfs inside; seal; detach the old root
    set hostname, bring up lo
    set up descriptors               0 from /dev/null, 1 and 2 to the output, sockets at 3..;
                                     chdir
    start a session of its own       setsid: only now, so that the steps above run in the fork
                                     server's scheduling group (forkserver.py); then every
                                     other descriptor closed
    install the bind() listener      with the plan's intercept_bind
    confine                          seccomp, bounding set, ids, capabilities (confine.py)
    report Executing                 on the status channel, with the listener
    execute the command              init_exec: forked as pid 2 (a session of its own) and
                                     executed; this process stays as the sandbox's init
                                     (sbd-setup.c), the channel closed once the command executed

(Root of the user namespace the child became before it executed the interpreter: child.py.)

What the walk used to ask while it ran is a guard the interpreter evaluates at that moment
(ops.py), or a higher-level op (`bind_inside`, `tmpfs_inside`: after pivot_root, at the target
resolved inside the sandbox and mounted by descriptor, refusing one under the old root; what is
missing of the target is made where it would be, a read-only folder on the way first covered
by a tmpfs that binds its entries back, sealed by `seal_covers`), or an answer of the fork server's that is
the same (`HostView`: whether a bind's tree is a directory; the host root's entries, listed
before the child's mount namespace differs from the fork server's).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from sandboxd.kernel import abi
from sandboxd.kernel.seam import EntryKind
from sandboxd.kernel.seccomp import bind_notify_filter
from sandboxd.plan.launch import MASK_WITH_MOUNTPOINTS, SANDBOX_TMPFS, SYSFS_OF_NETNS, MountOp
from sandboxd.sandbox.confine import confine, place_fds
from sandboxd.sandbox.ops import R_CHANNEL, R_SYSFS, Guard, Op, OpRecorder, Recorded, register
from sandboxd.sandbox.protocol import LaunchSandbox

READONLY = abi.MOUNT_ATTR_RDONLY | abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV
FRESH_IN_SANDBOX = ("dev", "proc", "run", "tmp")  # sandboxd mounts its own at these top-level paths
OLD_ROOT = "/run/.sbd-oldroot"  # on the sandbox's own /run tmpfs, removed before exec


@dataclass(frozen=True)
class Trees:
    """The detached mounts the fork server made for one launch, for the child to attach: the
    bind sources' copies (one per bind, in the plan's order), the image's, a sysfs made in the
    service's network namespace, and the sandbox's /dev (forkserver.py, detached.py). The
    program names the sysfs by register (R_SYSFS): it is made just before the clone."""

    binds: tuple[int, ...] = ()
    image: int = -1
    sysfs: int = -1
    dev: int = -1


@dataclass(frozen=True)
class Descriptors:
    """What else the child holds: the output pipe, the sockets (fds 3.. of the service), the
    network namespace to join (or -1), and the `tasks`
    files of its v1 cgroups (a hybrid host), opened by the fork server: a child in a user namespace
    of its own may no longer open them, and may still write "0" to them to join them."""

    output: int
    sockets: tuple[int, ...]
    netns: int = -1
    cgroup_tasks: tuple[int, ...] = ()


@dataclass(frozen=True)
class HostView:
    """The fork server's answers for the compiler: whether each bind's tree is a directory (in
    the plan's order), and the host root's top-level entries (name, kind, a symlink's target)."""

    bind_is_dir: tuple[bool, ...] = ()
    root_entries: tuple[tuple[str, EntryKind, str], ...] = ()


def compile_launch(request: LaunchSandbox, fds: Descriptors, trees: Trees, view: HostView) -> tuple[Op, ...]:
    """Every step from the clone to the command's exec, in the order of the module's docstring,
    for the plan the request launches (a connection's, with `connection`). Only the last op,
    init_exec, holds the environment (`with_environment`); no op holds the service's name."""
    return tuple(op for part in compile_parts(request, fds, trees, view) for op in part)


def compile_parts(request: LaunchSandbox, fds: Descriptors, trees: Trees, view: HostView) -> tuple[tuple[Op, ...], ...]:
    """compile_launch's program in three parts, in order: the steps before the root, the root
    (`RootProgram`: most of the program, and the very same tuple for every launch with equal
    mounts, root, trees and host view, see `_walk_ops`), and the steps after it."""
    plan = request.launched()
    k = OpRecorder()
    k.name = "reset signals"
    k.record("reset_signals")
    k.name = "join cgroups"
    for tasks in fds.cgroup_tasks:  # further hierarchies (v1 controllers on a hybrid host)
        k.record("write", tasks, b"0")
        k.close(tasks)
    if fds.netns >= 0:
        k.name = "join the service's network namespace"
        k.record("setns", fds.netns, abi.CLONE_NEWNET)
        k.close(fds.netns)
    k.name = "create namespaces"
    k.record("unshare", plan.clone_flags)
    head = len(k.ops)
    walk = _walk_ops(RootProgram(k, request.root, plan.mounts, trees, view, bool(plan.userns)))
    k.name = "set hostname"
    if plan.clone_flags & abi.CLONE_NEWUTS:  # never the host's
        k.record("sethostname", plan.hostname)
    if plan.net == "private":
        k.name = "bring up lo"
        k.record("loopback_up")
    k.name = "set up descriptors"
    place_fds(k, fds.output, list(fds.sockets))
    k.name = f"change directory to {plan.workdir}"
    k.chdir(plan.workdir)
    k.name = "start a session of its own"
    k.record("setsid")
    # Whatever else this process holds, inherited or ours, the service does not get.
    k.record("close_others", 3 + len(fds.sockets), register(R_CHANNEL))
    listener = 0  # a register is negative
    if plan.intercept_bind:
        k.name = "install the bind() listener"
        listener = k.install_seccomp_listener(bind_notify_filter())
    confine(k, plan.seccomp_filter, plan.capabilities, plan.no_new_privs, k, plan.uid, plan.gid)
    k.name = "report Executing"
    if listener:
        # sandboxd answers the service's bind() calls through this descriptor (proxy.py).
        k.record("report_executing_with", listener)
        k.close(listener)
    else:
        k.record("report_executing")
    # The init is this process, the sealed copy of sbd-setup the fork server executed: /proc/1/exe
    # is that memfd, never a file of the host's or of an image's, wherever sandboxd is installed.
    k.name = f"execute {plan.argv[0]}"
    k.record("init_exec", tuple(plan.argv), tuple(f"{key}={value}" for key, value in plan.env))
    return (tuple(k.ops[:head]), walk, tuple(k.ops[head + len(walk) :]))


# The walks compiled lately (RootProgram.walk), by what they were compiled from: a stack's
# services mostly have the same mounts (the host's root, the same masks, binds at the same
# targets), and the walk is most of the work of compiling a program. Every input is a value
# (frozen, compared by its fields), so equal inputs compile to equal ops; a bind's source is
# left out, as the walk does not look at it (its op comes after the walk, from the plan's own).
# (Bounded: the fork server's heap is what every fork copies.)
_WALKS: dict[tuple[object, ...], tuple[Recorded, tuple[tuple[int, int, bool], ...], tuple[tuple[str, int], ...], bool]] = {}
_WALKS_MAX = 64


def _walk_ops(program: RootProgram) -> tuple[Op, ...]:
    """`program.build()`, its walk kept for the next launch with the same inputs; returns the
    walk's ops (the very same tuple then)."""
    k, mounts = program.k, program.mounts
    shape = tuple((op.kind, op.target, op.readonly, op.options) if op.kind == "bind" else op for op in mounts)
    key = (program.root, shape, program.trees, program.view, program.locked, k.context())
    kept = _WALKS.get(key)
    if kept is None:
        start = len(k.ops)
        program.walk()
        where = {id(op): index for index, op in enumerate(mounts)}
        inside = tuple((where[id(op)], tree, directory) for op, tree, directory in program.inside)
        if len(_WALKS) >= _WALKS_MAX:
            _WALKS.clear()
        kept = _WALKS[key] = (k.since(start), inside, tuple(program.masks_to_seal), program.pending_seal)
    else:
        recorded, inside, masks, pending = kept
        k.replay(recorded)
        program.inside = [(mounts[index], tree, directory) for index, tree, directory in inside]
        program.masks_to_seal, program.pending_seal = list(masks), pending
    program.inside_and_seal()
    return kept[0].ops


def with_environment(init_exec: Op, env: tuple[tuple[str, str], ...]) -> Op:
    """A program's last op (compile_launch's init_exec) with the environment `env` in place of its own."""
    assert init_exec.call == "init_exec"
    argv, _env = init_exec.args
    return init_exec._replace(args=(argv, tuple(f"{key}={value}" for key, value in env)))


def is_dir(path: str) -> Guard:
    return Guard("dir", path)


def absent(path: str) -> Guard:
    return Guard("absent", path)


class RootProgram:
    """The sandbox's file system, compiled from one walk over the plan's mounts (bubblewrap's
    setup_newroot). `trees` are the fork server's detached copies; `locked`: in a user
    namespace (see `detach_covered`).

    With the host's root as it is (`rbind-root` with options "in-place"): the new mount
    namespace's copy of the host's tree is made read-only, nosuid and nodev in one call, and
    /proc, /sys, /dev, /tmp and /run are mounted over it, each after the host's mount there is
    detached; no copy of the tree, no pivot_root, no detaching of the old root. Otherwise (new
    top-level mount points: `tmpfs-root`; an image: `image-root`) a root is built at `root` and
    pivoted into (bubblewrap's order of steps).

    Binds and the spec's own tmpfs are made after pivot_root, so that a target's path (and any
    symlink in it) resolves inside the sandbox, never on the host. A target missing below a
    read-only folder (the host's /etc) gets its mount point in a cover of that folder: a tmpfs
    with the folder's entries bound back on it, read-only once every mount is made (sbd-setup.c).
    """

    def __init__(self, k: OpRecorder, root: str, mounts: tuple[MountOp, ...], trees: Trees, view: HostView, locked: bool) -> None:
        self.k = k
        self.mounts = mounts
        self.trees = trees
        self.view = view
        self.locked = locked
        self.in_place = mounts[0].kind == "rbind-root" and mounts[0].options == "in-place"
        self.root = "" if self.in_place else root
        self.unattached = iter(zip(trees.binds, view.bind_is_dir, strict=True))
        self.inside: list[tuple[MountOp, int, bool]] = []  # made after pivot_root: (op, its tree, a directory)
        self.masks_to_seal: list[tuple[str, int]] = []  # (path, the mark of its mount)
        self.pending_seal = any(op.kind == "tmpfs-root" for op in mounts)
        self.fresh = {*FRESH_IN_SANDBOX, *(("sys",) if any(op.kind == "sysfs" for op in mounts) else ())}

    def build(self) -> None:
        self.walk()
        self.inside_and_seal()

    def walk(self) -> None:
        """The mounts before pivot_root, and pivot_root: all but the binds and the spec's tmpfs,
        which it only lists (`inside`). No bind's source goes in its ops (see `_walk_ops`)."""
        k = self.k
        k.name = "make / private"
        k.mount(None, "/", None, abi.MS_REC | abi.MS_PRIVATE)
        for op in self.mounts:
            k.name = f"mount {op.kind} on {op.target}"
            self.mount(op, self.root + op.target if op.target != "/" else (self.root or "/"))
        if not self.in_place:
            k.name = f"pivot_root into {self.root}"
            # The old root stays on the sandbox's own /run until the binds are made, so that a
            # target that leads into it through a symlink is seen, and refused.
            k.mkdir(f"{self.root}{OLD_ROOT}")
            k.chdir(self.root)
            k.record("pivot_root", ".", OLD_ROOT.lstrip("/"))
        k.chdir("/")

    def inside_and_seal(self) -> None:
        """After `walk`: the binds and the spec's tmpfs, inside; then `seal`."""
        k = self.k
        refuse_under = "" if self.in_place else OLD_ROOT
        for op, tree, directory in self.inside:
            if op.kind == "tmpfs":
                k.name = f"mount tmpfs on {op.target}"
                k.record("tmpfs_inside", op.target, op.options, refuse_under)
            else:
                k.name = f"bind {op.source} on {op.target}"
                k.record("bind_inside", op.target, tree, int(op.readonly), int(directory), refuse_under)
        self.seal()

    def mount(self, op: MountOp, target: str) -> None:
        """One mount of the walk before pivot_root, at `target` (below the new root)."""
        k = self.k
        match op.kind:
            case "rbind-root" if self.in_place:
                k.mount_setattr("/", READONLY)
            case "rbind-root":
                k.mount(op.source, self.root, None, abi.MS_BIND | abi.MS_REC)
                k.mount_setattr(self.root, READONLY)
            case "tmpfs-root":
                self.host_root_on_tmpfs()
            case "image-root":
                self.image_root(op.source)
            case "mountpoint":
                ensure_mountpoint(k, target, is_dir=op.options == "dir")
            case "proc":
                if self.pending_seal:  # the tmpfs root and its binds, once its mount points exist
                    k.mount_setattr(self.root, READONLY)
                    self.pending_seal = False
                self.detach_covered(target)
                k.mount("proc", target, "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            case "sysfs" if op.options == SYSFS_OF_NETNS:
                self.detach_covered(target)
                k.move_mount(register(R_SYSFS), target)
            case "sysfs":
                # Its own sysfs, read-only: /sys/class/net shows the sandbox's links, not the host's.
                self.detach_covered(target)
                k.mount("sysfs", target, "sysfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            case "mask":
                self.mask(op, target)
            case "readonly":
                with k.when(Guard("exists", target)):
                    k.mount(target, target, None, abi.MS_BIND | abi.MS_REC)
                    k.mount_setattr(target, READONLY)
            case "dev":
                self.detach_covered(target)
                k.move_mount(self.trees.dev, target)
                k.close(self.trees.dev)
                # Its own devpts; its /dev/shm, a capped tmpfs, is a mount of the plan's own.
                k.mount("devpts", f"{target}/pts", "devpts", abi.MS_NOSUID | abi.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
            case "tmpfs" if op.target in SANDBOX_TMPFS:
                self.detach_covered(target)
                k.mount("tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, op.options or None)
            case "tmpfs":
                self.inside.append((op, -1, True))  # a tmpfs the spec asked for: made inside
            case "bind":
                tree, directory = next(self.unattached)
                self.inside.append((op, tree, directory))

    def mask(self, op: MountOp, target: str) -> None:
        """Hide `target`: an empty read-only tmpfs over a directory (writable until the mounts
        below it have their mount points, with MASK_WITH_MOUNTPOINTS), the sandbox's own
        /dev/null (made before the masks) over anything else, as runc does; nothing if absent."""
        k = self.k
        if op.options == MASK_WITH_MOUNTPOINTS:
            mark = k.new_mark()
            with k.when(is_dir(target)):
                k.record("mount", "tmpfs", target, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=64k", mark=mark)
            self.masks_to_seal.append((op.target, mark))
            return
        with k.when(is_dir(target)):
            k.mount("tmpfs", target, "tmpfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=0")
        with k.when(Guard("not-dir", target), Guard("exists", target)):
            k.mount(f"{self.root}/dev/null", target, None, abi.MS_BIND)

    def detach_covered(self, target: str) -> None:
        """Detach the host's mount at `target` (and everything below it) just before sandboxd
        mounts its own there, so that /proc/self/mountinfo lists only the sandbox's mount, not
        the host's /proc, /sys (with every cgroup hierarchy), /dev (shm, pts, mqueue), /tmp and
        /run subtrees. Only a root bound from the host's has the host's mounts there (a root on
        a tmpfs or an image has plain directories), and only where `target` is a mount of its
        own ("own-mount": a bind of the parent's file system is left as it is).

        Only ever in the sandbox's own mount namespace, after `/` was made private recursively:
        the host's mounts are untouched. Bind sources are detached copies already, so nothing
        below these mounts is still needed. In a user namespace the kernel locks the mounts it
        copied from the host to the ones around them (MNT_LOCKED): umount2 refuses them (EINVAL,
        or EPERM), and they stay listed.
        """
        if self.mounts[0].kind != "rbind-root":
            return
        with self.k.when(Guard("own-mount", target)), self.k.tolerating(*((errno.EINVAL, errno.EPERM) if self.locked else ())):
            self.k.umount2(target, abi.MNT_DETACH)

    def host_root_on_tmpfs(self) -> None:
        """A root of its own: a tmpfs with the host's top-level entries bound (or linked) into it,
        except those in `fresh` (sandboxd mounts its own there: the host's would only be covered,
        and still listed in /proc/self/mountinfo)."""
        k, root = self.k, self.root
        k.mount("tmpfs", root, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755,size=64k")
        for name, kind, link in self.view.root_entries:
            path = f"{root}/{name}"
            if kind == "symlink":
                k.record("symlink", link, path)
            elif kind == "dir":
                k.mkdir(path)
                if name not in self.fresh:
                    k.mount(f"/{name}", path, None, abi.MS_BIND | abi.MS_REC)
            else:
                ensure_mountpoint(k, path, is_dir=False)
                k.mount(f"/{name}", path, None, abi.MS_BIND)

    def image_root(self, source: str) -> None:
        """The image's tree (a detached copy of `source` from the fork server, idmapped in a user
        namespace) as the lower layer of an overlay on the root, the upper layer on a tmpfs of this
        mount namespace (systemd-nspawn's --volatile=overlay): writes are charged to the sandbox's
        memory cgroup and vanish with the namespace, with nothing to clean up."""
        k, root = self.k, self.root
        k.mount("tmpfs", root, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755")
        k.mkdir(f"{root}/upper", 0o755)
        k.mkdir(f"{root}/work", 0o700)
        # The overlay's options show in /proc/self/mountinfo as they are written: the layers are
        # named relative to the tmpfs, not by sandboxd's runtime paths. The copy of the tree is
        # attached at a path ending with the tree's own in the image store: that is how
        # images.trees_in_use tells which trees are mounted.
        k.makedirs(f"{root}/lower{source}", 0o755)
        k.move_mount(self.trees.image, f"{root}/lower{source}")
        k.close(self.trees.image)
        k.chdir(root)
        k.mount("overlay", root, "overlay", abi.MS_NOSUID | abi.MS_NODEV, f"lowerdir=lower{source},upperdir=upper,workdir=work")
        # What sandboxd mounts before pivot_root goes on these; a symlink would lead onto the host.
        for top in (*FRESH_IN_SANDBOX, "sys"):
            path = f"{root}/{top}"
            with k.when(Guard("link", path)):
                k.fail(errno.ELOOP, "is a symlink in the image; sandboxd mounts a directory there", f"/{top}")
            with k.when(Guard("not-dir", path)):
                k.mkdir(path, 0o755)

    def seal(self) -> None:
        """The last of the walk: masks that held mount points, an image's root with readonly_root,
        read-only; the host's root detached (unless it is the sandbox's, in place)."""
        k = self.k
        if self.inside:
            k.name = "make the folders made for mount points read-only"
            k.record("seal_covers")
        for path, mark in self.masks_to_seal:
            k.name = f"make {path} read-only"
            with k.when(Guard("marked", mark=mark)):
                k.mount_setattr(path, READONLY, recursive=False)  # the mounts on it keep their flags
        if self.mounts[0].kind == "image-root" and self.mounts[0].readonly:
            k.name = "make the image's root read-only"
            # Only the overlay itself: the mounts on it (/tmp, /run, writable binds) keep their flags.
            k.mount(None, "/", None, abi.MS_REMOUNT | abi.MS_BIND | abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV)
        if not self.in_place:
            k.name = "detach the host's root"
            k.umount2(OLD_ROOT, abi.MNT_DETACH)
            k.record("rmdir", OLD_ROOT)


def ensure_mountpoint(k: OpRecorder, target: str, is_dir: bool) -> None:
    """A directory or an empty file at `target`, with its parents, unless something is there."""
    with k.when(absent(target)):
        k.makedirs(os.path.dirname(target))
        if is_dir:
            k.mkdir(target)
        else:
            k.create_file(target)
