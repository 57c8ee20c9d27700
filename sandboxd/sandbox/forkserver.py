"""The fork server: a small single-threaded process that forks one child per sandbox.

Why a fork server: forking from the asyncio supervisor is unsafe once it has threads, and
starting a Python interpreter per sandbox costs 20-90 ms. The fork server is forked from the
supervisor at start-up (handle.py, `ForkServer.start`), before any thread or event loop exists,
stays single-threaded, and forks one child per sandbox from a small address space.

Why it is pid 1 of a pid namespace of its own: when the supervisor dies, even by SIGKILL, the
fork server gets SIGKILL (PR_SET_PDEATHSIG), and when the init of a pid namespace dies the kernel
kills every process in it and in every namespace nested in it, which is every sandbox. No service
outlives sandboxd.

    supervisor (asyncio)              fork server (pid 1, sandboxd's pid ns)      sandbox init (pid 1 of its own ns)
    ────────────────────              ───────────────────────────────────────      ──────────────────────────────────
    ForkServer.start() ──fork───────▶ serve(): select on request socket + SIGCHLD
    LaunchSandbox + SCM_RIGHTS ─────▶ [status, output, socket fds..., held bind sources..., netns?]
                                      detached.py: a detached copy of each source
                                      and of the image, the sandbox's /dev; idmap
                                      those stored through the stack's ids
                                      program.py: the set-up program, on a pipe
                                      clone3(NEWPID[, NEWUSER]) into the ──clone──▶ [userns: wait on a pipe]
                                      cgroup [userns: in the service's
                                      netns, with its sysfs made there]
                                      [userns: uid/gid maps, idmap copies ─pipe──▶ become root inside]
                                       of host ids]                                 child.py: execveat(sealed sbd-setup)
                                                                                    sbd-setup.c, op by op: join cgroups;
                                                                                    unshare(mnt,uts,ipc,net); setsid;
                                                                                    the mounts; pivot_root; hostname;
                                                                                    lo up; fds; seccomp; caps
            ◀──────────── status channel (SEQPACKET, SO_PASSCRED) ─────────────── Executing (creds carry its host pid)
            ◀──────────── EOF (the channel is close-on-exec) ──────────────────── execveat(sealed copy of dumb-init, -- command...)
                                                                                  or SetupFailed(step, ...); _exit(127)
            ◀──Exited(id, status)── waitpid()

The messages are protocol.py's; RunCommand and StartProxy fork into a running sandbox (join.py).
Whether the kernel forks into a cgroup (clone3 CLONE_INTO_CGROUP) is probed once, when the fork
server starts (`linux.clone_into_cgroup_works`); without it the child joins its cgroup after a fork.

The init (dumb-init, or tini-static on an image) never runs from its file on the host: the fork
server copies it once into a sealed, execute-only memfd (`detached.sealed_copy`), and every
sandbox executes that descriptor, as runc does with its own binary since CVE-2019-5736. So with
the set-up interpreter (setup/sbd-setup): a child executes the fork server's sealed copy of it
right after the clone (and the user namespace's maps), so that the set-up runs in a small static
process of its own, not in the copy of this Python heap that a fork makes (copy-on-write faults
on every page it touches). The descriptors its program names are made inheritable for the
moment of the clone (`detached.inheritable`); all else of the fork server's is close-on-exec.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import fcntl
import gc
import os
import selectors
import signal
import socket
from typing import NoReturn

from sandboxd.kernel import abi, linux
from sandboxd.kernel.seam import LINUX
from sandboxd.plan.launch import HOST_IDS, STORE_IDS, SYSFS_OF_NETNS, UserNamespace
from sandboxd.sandbox.child import EXIT_SETUP_FAILED, EXIT_UNEXPECTED, SETUP_BINARY, enter_setup, is_dir_fd, root_entries
from sandboxd.sandbox.confine import Step
from sandboxd.sandbox.detached import detached_bind, detached_dev, host_pid, idmap, inheritable, sealed_copy, storage_userns
from sandboxd.sandbox.join import run_in_sandbox, run_proxy
from sandboxd.sandbox.ops import encode as encode_program
from sandboxd.sandbox.program import READONLY, Descriptors, HostView, Trees, compile_launch
from sandboxd.sandbox.protocol import Exited, ForkFailed, HoldDescriptors, LaunchSandbox, Request, RunCommand, StartProxy, decode_request, encode, make_decoders

MAX_MESSAGE = 1 << 20
MAX_FDS = 250


def serve(conn: socket.socket) -> NoReturn:
    """The fork server's loop: requests in, exit statuses out. Never returns."""
    try:
        # Children of this process must not copy pages: the collector would touch every object.
        gc.disable()
        gc.freeze()
        linux.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        make_decoders()
        linux.clone_into_cgroup_works()  # probed now, once, rather than at the first sandbox
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        own_netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        children: dict[int, int] = {}  # pid in our namespace -> request id
        held: list[int] = []  # HoldDescriptors: open until this process exits
        selector = selectors.DefaultSelector()
        selector.register(conn, selectors.EVENT_READ, "request")
        selector.register(wake_r, selectors.EVENT_READ, "sigchld")
        while True:
            for key, _ in selector.select():
                if key.data == "request":
                    msg, fds = _recv_with_fds(conn)
                    if not msg:
                        os._exit(0)  # the supervisor is gone or done: our exit ends every sandbox
                    request = decode_request(msg)
                    if isinstance(request, HoldDescriptors):
                        held += fds
                        continue
                    _fork_request(conn, request, fds, own_pidns, own_netns, children)
                else:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    _reap(conn, children)
    except BaseException:  # noqa: BLE001 - a request that is not the protocol's ends it too
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


def _reap(conn: socket.socket, children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        request_id = children.pop(pid, None)
        if request_id is not None:
            conn.send(encode(Exited(request_id, status)))


@dataclasses.dataclass
class _Received:
    """A request's descriptors, sorted by what they are (see protocol.py for their order)."""

    status: int
    output: int
    sockets: list[int]
    sources: list[int]
    netns: int
    cgroup_tasks: list[int] = dataclasses.field(default_factory=list)  # opened here, for the child (child.Descriptors)

    @staticmethod
    def sort(request: Request, fds: list[int]) -> _Received:
        status, *rest = fds
        # A command's request may lack the output: it gets the sandbox's own /dev/null.
        output = rest.pop(0) if not isinstance(request, RunCommand) or request.output else -1
        netns = rest.pop() if isinstance(request, LaunchSandbox) and request.netns else -1
        first_source = len(rest) - (request.sources if isinstance(request, LaunchSandbox) else 0)
        return _Received(status, output, rest[:first_source], rest[first_source:], netns)


def _fork_request(conn: socket.socket, request: Request, fds: list[int], own_pidns: int, own_netns: int, children: dict[int, int]) -> None:
    """Fork what a request asks for; ForkFailed if that fails here. Every descriptor received
    or made for it is closed here once the child holds its own."""
    received = _Received.sort(request, fds)
    cgroup_fd, init_fd, program_fd = -1, -1, -1
    trees = Trees()
    host_id_trees: list[tuple[int, str]] = []
    doing = Step("fork")
    try:
        if isinstance(request, LaunchSandbox):
            init_fd, trees, host_id_trees = _prepare_launch(request, received.sources, doing)
            doing.name = "open the v1 cgroups' tasks files"
            for path in request.cgroup_tasks:
                received.cgroup_tasks.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            doing.name = "compile the set-up program"
            program_fd = _program(request, received, init_fd, trees)
            doing.name = "fork"
        cgroup_fd = os.open(request.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        match request:
            case LaunchSandbox(plan=plan):
                # What the program names crosses the exec of the interpreter; nothing else does.
                kept = [received.status, received.output, *received.sockets, init_fd, received.netns, *received.cgroup_tasks, *trees.binds, trees.image, trees.dev, program_fd]
                with inheritable([fd for fd in kept if fd >= 0]):
                    if plan.userns:
                        pid = _fork_userns_sandbox(request, plan.userns, cgroup_fd, own_netns, received, program_fd, host_id_trees)
                    else:
                        pid = _fork_sandbox_init(cgroup_fd, own_pidns)
                        if pid == 0:
                            _sandbox_child(request, received, program_fd, -1)
            case RunCommand():
                pid = linux.fork_into_cgroup(cgroup_fd)
                if pid == 0:
                    run_in_sandbox(request, received.status, received.output)
            case StartProxy():
                pid = linux.fork_into_cgroup(cgroup_fd)
                if pid == 0:
                    run_proxy(request, received.status, received.output, received.sockets)
        children[pid] = request.id
    except (OSError, ValueError) as e:
        detail = f"{e.strerror} ({e.filename or request.cgroup})" if isinstance(e, OSError) else str(e)
        conn.send(encode(ForkFailed(request.id, f"{doing.name}: {detail}")))
    finally:
        for fd in [*fds, *received.cgroup_tasks, *trees.binds, trees.image, trees.dev, cgroup_fd, program_fd]:
            if fd >= 0:
                os.close(fd)


_programs: dict[object, bytes] = {}


def _program(request: LaunchSandbox, received: _Received, init_fd: int, trees: Trees) -> int:
    """The launch's set-up program (program.py), compiled and written to a pipe whose read end
    (returned) the interpreter reads it from. A child in a user namespace is born in its network
    namespace: its program joins none."""
    plan = request.plan
    netns = -1 if plan.userns else received.netns
    fds = Descriptors(received.output, tuple(received.sockets), init_fd, netns, tuple(received.cgroup_tasks))
    tmpfs_root = any(op.kind == "tmpfs-root" for op in plan.mounts)
    view = HostView(tuple(is_dir_fd(tree) for tree in trees.binds), root_entries() if tmpfs_root else ())
    key = (plan, request.root, fds, trees, view)  # a restart, a connection in accept mode: the same program
    data = _programs.get(key)
    if data is None:
        if len(_programs) >= 64:
            _programs.clear()
        data = _programs[key] = encode_program(compile_launch(request, fds, trees, view), 3 + len(received.sockets))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        if len(data) > 65536:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, len(data))
        view_of = memoryview(data)
        while view_of:
            view_of = view_of[os.write(write_end, view_of) :]
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def _prepare_launch(request: LaunchSandbox, held: list[int], doing: Step) -> tuple[int, Trees, list[tuple[int, str]]]:
    """Before the fork: the sealed init, a detached copy of each bind source and of the image,
    the sandbox's /dev. In a user namespace the copies stored through the stack's ids are
    idmapped here (STORE_IDS); those seen with the host's ids (HOST_IDS, returned) once the
    sandbox's own user namespace exists: only root of the host's user namespace may idmap a
    mount of the host's file systems."""
    plan = request.plan
    doing.name = f"make a sealed copy of the init {plan.argv[0]}"
    init_fd = sealed_copy(plan.argv[0])
    doing.name = "make a sealed copy of the set-up interpreter"
    sealed_copy(str(SETUP_BINARY))  # once per fork server, as the init's; executed by every child
    binds = [op for op in plan.mounts if op.kind == "bind"]
    if len(held) != len(binds):  # the kernel cut the descriptors short (more than MAX_FDS)
        raise OSError(errno.EMSGSIZE, f"{len(binds)} bind sources, {len(held)} descriptors received", plan.service)
    store = storage_userns(plan.userns) if plan.userns and any(op.options == STORE_IDS for op in binds) else -1
    copies: list[int] = []
    host_id_trees: list[tuple[int, str]] = []
    image_tree = -1
    try:
        for fd, op in zip(held, binds):
            doing.name = f"copy the mount of {op.source}"
            copies.append(detached_bind(fd, op.source))
            if op.options == STORE_IDS and store >= 0:
                idmap(copies[-1], store, op.source)
            elif op.options == HOST_IDS:
                host_id_trees.append((copies[-1], op.source))
        if plan.mounts[0].kind == "image-root":
            rootfs = plan.mounts[0].source
            doing.name = f"copy the mount of the image {rootfs}"
            held_root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                image_tree = detached_bind(held_root, rootfs)
            finally:
                os.close(held_root)
            if plan.mounts[0].options == HOST_IDS:
                host_id_trees.append((image_tree, rootfs))
        doing.name = "make the sandbox's /dev"
        dev_tree = detached_dev((plan.userns.uid, plan.userns.gid) if plan.userns else None)
    except BaseException:
        for fd in [*copies, image_tree]:
            if fd >= 0:
                os.close(fd)
        raise
    doing.name = "fork"
    return init_fd, Trees(tuple(copies), image_tree, -1, dev_tree), host_id_trees


def _sandbox_child(request: LaunchSandbox, received: _Received, program_fd: int, sysfs: int) -> NoReturn:
    """In the cloned child: the set-up interpreter, the fork server's sealed copy (child.py)."""
    enter_setup(LINUX, bool(request.plan.userns), sealed_copy(str(SETUP_BINARY)), program_fd, received.status, sysfs)  # made already


def _fork_sandbox_init(cgroup_fd: int, own_pidns: int) -> int:
    """Fork the sandbox's init: pid 1 of a new pid namespace, born in its cgroup where the kernel
    allows (clone3 CLONE_INTO_CGROUP, probed once); else forked, then joining it itself."""
    if linux.clone_into_cgroup_works():
        return linux.fork_into_cgroup(cgroup_fd, abi.CLONE_NEWPID)
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


def _fork_userns_sandbox(
    request: LaunchSandbox, ids: UserNamespace, cgroup_fd: int, own_netns: int, received: _Received, program_fd: int, host_id_trees: list[tuple[int, str]]
) -> int:
    """Fork a sandbox with a user namespace of its own; the child becomes it (child.py) once this
    process has set up what only it may (`_fork_in_user_namespace`). It was born in its network
    namespace; it joins its v1 cgroups itself (its program), as any sandbox."""
    pid, sysfs = _fork_in_user_namespace(request, cgroup_fd, received.netns, own_netns, ids, host_id_trees)
    if pid == 0:
        _sandbox_child(request, received, program_fd, sysfs)
    return pid


def _fork_in_user_namespace(
    request: LaunchSandbox, cgroup_fd: int, netns_fd: int, own_netns: int, ids: UserNamespace, host_id_trees: list[tuple[int, str]]
) -> tuple[int, int]:
    """Fork the sandbox's init into a new user and pid namespace, born in its cgroup, and in the
    service's network namespace if sandboxd made one (`netns_fd`). Returns its pid (0 in the
    child) and the sysfs made for it (or -1).

    The child may not do anything as root-inside before its uid and gid maps exist, and only a
    process outside (this one, root in the parent namespace) may write maps that name other ids
    than its own. So the child waits on a pipe while this process writes the maps, idmaps the
    trees that keep the host's ids (HOST_IDS) through the child's user namespace, and then lets it
    go. The child still has the host's root's ids underneath (only its capabilities are confined
    to its namespace until it becomes root inside), so it joins its v1 cgroups itself, as any
    sandbox does: a write of "0" to each `tasks` file, which the kernel does without the global
    lock that a write of its pid from here would take.

    A child in a new user namespace may not join a network namespace of the host's user namespace,
    nor mount a sysfs for it: so this process joins it for the moment of the clone (the child is
    born there) and makes the sysfs there, detached, for the child to attach.
    """
    wait_r, wait_w = os.pipe2(os.O_CLOEXEC)
    pid, pidfd, sysfs = -1, -1, -1
    try:
        pid, pidfd, sysfs = _clone_in_user_namespace(request, cgroup_fd, netns_fd, own_netns, ids)
        if pid == 0:
            os.close(wait_w)
            if os.read(wait_r, 1) != b"1":
                os._exit(EXIT_SETUP_FAILED)  # the fork server could not set it up; it says why
            os.close(wait_r)
            return 0, sysfs
        child = host_pid(pid, pidfd)
        for kind, first in (("uid_map", ids.uid), ("gid_map", ids.gid)):
            with open(f"/proc/{child}/{kind}", "w") as f:
                f.write(f"0 {first} {ids.count}\n")
        if host_id_trees:
            userns = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for tree, source in host_id_trees:
                    idmap(tree, userns, source)
            finally:
                os.close(userns)
        os.write(wait_w, b"1")
    finally:
        if pid != 0:
            for fd in (wait_r, wait_w, pidfd, sysfs):
                if fd >= 0:
                    os.close(fd)
    return pid, -1


def _clone_in_user_namespace(request: LaunchSandbox, cgroup_fd: int, netns_fd: int, own_netns: int, ids: UserNamespace) -> tuple[int, int, int]:
    """The clone itself: (pid, pidfd, sysfs), in the service's network namespace for the moment.

    The new user namespace's owner is whoever's effective ids clone it. The kernel counts what
    its processes hold (inotify instances, user namespaces ...) against their user inside and
    against that owner outside, and a process of the host's user namespace running as the owner
    has every capability inside. So the owner is the block's last id: not the host's root, whose
    limits a sandbox must not use up, nor the block's root, as which sandboxd runs a proxy to a
    unix socket of a root service. Root's capabilities stay for the clone.
    """
    pid, pidfd, sysfs = -1, -1, -1
    if netns_fd >= 0:
        linux.setns(netns_fd, abi.CLONE_NEWNET)
    try:
        if netns_fd >= 0 and any(op.kind == "sysfs" and op.options == SYSFS_OF_NETNS for op in request.plan.mounts):
            sysfs = linux.detached_mount("sysfs", READONLY | abi.MOUNT_ATTR_NOEXEC)
            os.set_inheritable(sysfs, True)  # for the interpreter (R_SYSFS); closed here after the clone
        os.setegid(ids.gid + ids.count - 1)
        os.seteuid(ids.uid + ids.count - 1)
        try:
            linux.raise_effective_capabilities()
            pid, pidfd = linux.fork_into_cgroup_with_pidfd(cgroup_fd, abi.CLONE_NEWPID | abi.CLONE_NEWUSER)
        finally:
            if pid != 0:
                os.seteuid(0)  # the effective capabilities come back with it
                os.setegid(0)
    except BaseException:
        if sysfs >= 0:
            os.close(sysfs)
        raise
    finally:
        if netns_fd >= 0 and pid != 0:
            linux.setns(own_netns, abi.CLONE_NEWNET)
    return pid, pidfd, sysfs

