"""The fork server: a small single-threaded process that forks one child per sandbox.

Why a fork server: forking from the asyncio supervisor is unsafe once it has threads, and
starting a Python interpreter per sandbox costs 20-90 ms. The fork server is forked from the
supervisor at start-up (handle.py, `ForkServer.start`), before any thread or event loop exists,
stays single-threaded, and forks one child per sandbox from a small address space.

Why it is pid 1 of a pid namespace of its own: when the supervisor dies, even by SIGKILL, the
fork server gets SIGKILL (PR_SET_PDEATHSIG), and when the init of a pid namespace dies the kernel
kills every process in it and in every namespace nested in it, which is every sandbox. No service
outlives sandboxd.

    supervisor (asyncio)              fork server (pid 1, sandboxd's pid ns)
    ────────────────────              ───────────────────────────────────────
    ForkServer.start() ──fork───────▶ serve(): select on request socket + SIGCHLD
    LaunchSandbox + SCM_RIGHTS ─────▶ [status, output, socket fds..., held bind sources..., netns?]
                                      detached.py: a detached copy of each source
                                      and of the image, the sandbox's /dev; idmap
                                      those stored through the stack's ids
                                      program.py: the set-up program, on a pipe
                                      posix_spawn (vfork) ──▶ spawner: sbd-setup spawn (host root)
                                                              [userns: in the service's netns,
                                                              its sysfs made there]
                                                              clone3(PARENT, NEWPID[, NEWUSER],
                                                              INTO_CGROUP, PIDFD) ──clone──▶ sandbox init (pid 1 of its ns,
                                                              [userns: uid/gid maps,           the fork server's child)
                                                              idmap of host-id trees]          [userns: waits on a pipe]
                                      ◀── pid + pidfd ─────── SCM_RIGHTS; lets it go ─pipe──▶ [userns: becomes root inside]
                                          (reaps it)          _exit                            the program, op by op: join
                                                                                               cgroups; unshare(mnt,uts,ipc,
                                                                                               net); setsid; the mounts;
                                                                                               pivot_root; hostname; lo up;
                                                                                               fds; seccomp; caps
            ◀──────────── status channel (SEQPACKET, SO_PASSCRED) ──────────────────────────── Executing (creds carry its host pid)
            ◀──────────── EOF (the channel is close-on-exec) ───────────────────────────────── execveat(sealed copy of dumb-init, -- command...)
                                                                                               or SetupFailed(step, ...); _exit(127)
            ◀──Exited(id, status)── waitpid()

The messages are protocol.py's; RunCommand and StartProxy fork into a running sandbox (join.py).
Whether the kernel forks into a cgroup (clone3 CLONE_INTO_CGROUP) is probed once, when the fork
server starts (`linux.clone_into_cgroup_works`); without it the child joins its cgroup after a fork.

The init (dumb-init, or tini-static on an image) never runs from its file on the host: the fork
server copies it once into a sealed, execute-only memfd (`detached.sealed_copy`), and every
sandbox executes that descriptor, as runc does with its own binary since CVE-2019-5736. So with
the set-up interpreter (setup/sbd-setup): the fork server starts its own sealed copy
of it with vfork semantics (os.posix_spawn), and that small static process clones the sandbox's
init from itself (`_spawn_sandbox`): no step of a sandbox's set-up runs in a copy of this Python
heap (a fork of it cost some 2.5 ms in page-table copies and copy-on-write faults, and as much
again in its exit or exec). The descriptors the program names are made inheritable for the
moment of the spawn (`detached.inheritable`); all else of the fork server's is close-on-exec.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import fcntl
import gc
import mmap
import os
import selectors
import signal
import socket
import time
from typing import NoReturn

from sandboxd.kernel import abi, linux
from sandboxd.kernel.seam import EntryKind
from sandboxd.plan.launch import HOST_IDS, STORE_IDS, SYSFS_OF_NETNS, LaunchPlan
from sandboxd.sandbox.child import EXIT_UNEXPECTED, SETUP_BINARY, SETUP_NAME, is_dir_fd, root_entries
from sandboxd.sandbox.confine import Step
from sandboxd.sandbox.detached import detached_bind, detached_dev, idmap, inheritable, sealed_copy, storage_userns
from sandboxd.sandbox.join import run_in_sandbox, run_proxy
from sandboxd.sandbox.ops import Op, encode_op, program_head
from sandboxd.sandbox.program import Descriptors, HostView, Trees, compile_parts, with_environment
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
        _reset_oom_score_adj()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        make_decoders()
        linux.clone_into_cgroup_works()  # probed now, once, rather than at the first sandbox
        try:
            sealed_copy(str(SETUP_BINARY))  # now too, not at the first sandbox; a failure is that launch's to report
        except OSError:
            pass
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
                    _fork_request(conn, request, fds, children)
                else:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    _reap(conn, children)
    except BaseException:  # noqa: BLE001 - a request that is not the protocol's ends it too
        os._exit(EXIT_UNEXPECTED)


def _reset_oom_score_adj() -> None:
    """The supervisor shields itself from the OOM killer (daemon/recovery.py); the sandboxes,
    which inherit this process's value, must not be: back to the kernel's default, 0."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")
    except OSError:
        pass


def _recv_with_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """recvmsg with MSG_CMSG_CLOEXEC, so no received descriptor leaks into a sandbox by accident.

    (socket.recv_fds accepts a flags argument but, up to Python 3.12, does not pass it on.)
    """
    fds = array.array("i")
    # Into a buffer kept for the next message: recvmsg would allocate MAX_MESSAGE bytes for every
    # one and shrink them after (measured: some 100 us a request, a launch's plan is 6 kB).
    # An anonymous mapping: its pages are touched only as far as the longest message went.
    global _buffer
    if _buffer is None:
        _buffer = memoryview(mmap.mmap(-1, MAX_MESSAGE))
    size, ancillary, _flags, _addr = conn.recvmsg_into([_buffer], socket.CMSG_LEN(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return bytes(_buffer[:size]), list(fds)


_buffer: memoryview | None = None


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


def _fork_request(conn: socket.socket, request: Request, fds: list[int], children: dict[int, int]) -> None:
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
            case LaunchSandbox():
                # What the program names crosses the exec of the interpreter; nothing else does.
                kept = [received.status, received.output, *received.sockets, init_fd, received.netns, *received.cgroup_tasks, *trees.binds, trees.image, trees.dev, program_fd]
                with inheritable([fd for fd in kept if fd >= 0]):
                    pid = _spawn_sandbox(request, cgroup_fd, received, program_fd, host_id_trees)
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


@dataclasses.dataclass(frozen=True)
class _Program:
    """A compiled program kept for the next launch of the same plan: the encoding of every op
    but the last, and the last (the execve: a connection's environment goes in it)."""

    plan: LaunchPlan  # what it was compiled from (kept by its id: no other plan takes it meanwhile)
    body: bytes
    execve: Op
    count: int


_programs: dict[tuple[object, ...], _Program] = {}


def _program(request: LaunchSandbox, received: _Received, init_fd: int, trees: Trees) -> int:
    """The launch's set-up program (program.py), compiled and written to a pipe whose read end
    (returned) the interpreter reads it from. A child in a user namespace is born in its network
    namespace: its program joins none.

    A restart, a connection in accept mode: the same plan (the very object, protocol.py decodes
    a plan's text once), the same descriptors and trees, the same program but for a connection's
    environment, so it is compiled and encoded once."""
    plan = request.plan
    netns = -1 if plan.userns else received.netns
    fds = Descriptors(received.output, tuple(received.sockets), init_fd, netns, tuple(received.cgroup_tasks))
    tmpfs_root = any(op.kind == "tmpfs-root" for op in plan.mounts)
    view = HostView(tuple(is_dir_fd(tree) for tree in trees.binds), _root_entries() if tmpfs_root else ())
    key = (id(plan), request.root, fds, trees, view)
    kept = _programs.get(key)
    if kept is None or kept.plan is not plan:
        if len(_programs) >= 64:
            _programs.clear()
        head, root, tail = compile_parts(dataclasses.replace(request, connection=None), fds, trees, view)
        body = b"".join([*(encode_op(op) for op in head), _encoded_root(root), *(encode_op(op) for op in tail[:-1])])
        kept = _programs[key] = _Program(plan, body, tail[-1], len(head) + len(root) + len(tail))
    execve = kept.execve if request.connection is None else with_environment(kept.execve, request.connection.env)
    data = program_head(kept.count, 3 + len(received.sockets)) + kept.body + encode_op(execve, keep=request.connection is None)
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


# The encoding of the root parts of programs (program.py's compile_parts), by the identity of
# the part, which is the same tuple for every plan with the same mounts: most of a program.
# Each entry holds its part, so no other object takes its id while it is here.
_ROOT_ENCODINGS: dict[int, tuple[tuple[Op, ...], bytes]] = {}


def _encoded_root(root: tuple[Op, ...]) -> bytes:
    known = _ROOT_ENCODINGS.get(id(root))
    if known is not None and known[0] is root:
        return known[1]
    if len(_ROOT_ENCODINGS) >= 64:
        _ROOT_ENCODINGS.clear()
    data = b"".join([encode_op(op) for op in root])
    _ROOT_ENCODINGS[id(root)] = (root, data)
    return data


_root_seen: tuple[tuple[int, int, int, int], tuple[tuple[str, EntryKind, str], ...]] | None = None


def _root_entries() -> tuple[tuple[str, EntryKind, str], ...]:
    """The host root's entries (child.root_entries), listed again only once "/" changed: an
    entry made, removed, renamed or replaced changes its directory's mtime. The kernel's clock
    for it is coarse (a tick), so a listing is kept only if "/" had been still for a second by
    then: two changes within one tick leave the same mtime."""
    global _root_seen
    st = os.stat("/")
    seen = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if _root_seen is not None and _root_seen[0] == seen:
        return _root_seen[1]
    entries = root_entries()
    still = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > 1_000_000_000
    _root_seen = (seen, entries) if still else None
    return entries


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
        raise OSError(errno.EMSGSIZE, f"{len(binds)} bind sources, {len(held)} descriptors received", request.launched().service)
    store = storage_userns(plan.userns, sealed_copy(str(SETUP_BINARY))) if plan.userns and any(op.options == STORE_IDS for op in binds) else -1
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


def _spawn_sandbox(request: LaunchSandbox, cgroup_fd: int, received: _Received, program_fd: int, host_id_trees: list[tuple[int, str]]) -> int:
    """Start the sandbox's init through the set-up interpreter's spawner (setup/sbd-setup.c,
    `spawn`), started with vfork semantics (os.posix_spawn: no copy of this heap); returns the
    init's pid, a child of this process's (CLONE_PARENT), which reaps it and the spawner both.

    What only a process of the host's namespaces may do is the spawner's, as this process's own
    rules say it (`_spawn_argv`): in a user namespace the clone is in the service's network
    namespace, whose sysfs it makes there (a child in a new user namespace may join neither, nor
    mount a sysfs for it), and as the block's last ids; the uid and gid maps (only a process
    outside may write maps naming other ids than its own) and the idmap of the trees that keep
    the host's ids (HOST_IDS) through the init's user namespace, while the init waits for them.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        argv = _spawn_argv(request, theirs.fileno(), cgroup_fd, received, program_fd, [tree for tree, _ in host_id_trees])
        with inheritable([theirs.fileno(), cgroup_fd]):
            os.posix_spawn(f"/proc/self/fd/{sealed_copy(str(SETUP_BINARY))}", argv, {})  # made already
        theirs.close()
        msg, fds, _flags, _addr = socket.recv_fds(ours, 64, 1)
    finally:
        ours.close()
        theirs.close()
    for fd in fds:
        os.close(fd)  # the pidfd: the supervisor opens its own
    if msg[:1] == b"P" and len(fds) == 1:
        return int(msg[1:])
    error, _, what = msg[1:].decode(errors="replace").partition(" ")
    if msg[:1] != b"E" or not error.isdigit():
        raise OSError(errno.ECHILD, "the set-up interpreter ended before it cloned the sandbox", str(SETUP_BINARY))
    number = int(error)
    if what.startswith("idmap "):
        _tree, source = host_id_trees[int(what.split()[1])]
        if number == errno.EINVAL:
            raise OSError(number, "its file system cannot be idmapped (a user namespace needs that for mounts; userns: false does not)", source)
        raise OSError(number, f"mount_setattr: {os.strerror(number)}", source)
    raise OSError(number, f"{what}: {os.strerror(number)}", request.launched().service)


def _spawn_argv(request: LaunchSandbox, reply: int, cgroup_fd: int, received: _Received, program_fd: int, host_id_trees: list[int]) -> list[str]:
    """The spawner's arguments (sbd-setup.c, `spawn`): what the request says of the clone. A
    child in a user namespace is born in its network namespace (with its sysfs made there) and
    joins its v1 cgroups itself (its program), as any sandbox.

    The new user namespace's owner is whoever's effective ids clone it. The kernel counts what
    its processes hold (inotify instances, user namespaces ...) against their user inside and
    against that owner outside, and a process of the host's user namespace running as the owner
    has every capability inside. So the owner is the block's last id: not the host's root, whose
    limits a sandbox must not use up, nor the block's root, as which sandboxd runs a proxy to a
    unix socket of a root service. Root's capabilities stay for the clone."""
    ids = request.plan.userns
    netns = received.netns if ids else -1
    sysfs = netns >= 0 and any(op.kind == "sysfs" and op.options == SYSFS_OF_NETNS for op in request.plan.mounts)
    into_cgroup = linux.clone_into_cgroup_works()
    mapped = (ids.uid, ids.gid, ids.count) if ids else (-1, -1, 0)
    trees = ",".join(str(tree) for tree in host_id_trees) or "-"
    numbers = (reply, program_fd, received.status, cgroup_fd, int(into_cgroup), netns, int(sysfs), *mapped)
    return [SETUP_NAME, "spawn", *(str(n) for n in numbers), trees]
