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
                                      posix_spawn (vfork), once ──▶ resident spawner: sbd-setup
                                                                    serve (host root), its channel
                                                                    in the fork server's selector
    LaunchSandbox + SCM_RIGHTS ─────▶ [status, output, socket fds..., held bind sources..., netns?]
                                      detached.py: a detached copy of each source
                                      and of the image, the sandbox's /dev; idmap
                                      those stored through the stack's ids
                                      program.py: the set-up program, on a pipe
                                      the spawner's arguments ────▶ [userns: in the service's netns,
                                      + SCM_RIGHTS: what the        its sysfs made there]
                                      program names; the next       clone3(PARENT, NEWPID[, NEWUSER],
                                      requests meanwhile            INTO_CGROUP, PIDFD) ──clone──▶ sandbox init (pid 1 of its ns,
                                                                    [userns: uid/gid maps,         the fork server's child): each
                                                                    idmap of host-id trees]        descriptor at its number in the
                                                                    its own netns again            fork server, no other; waits
                                      ◀── pid + pidfd ───────────── SCM_RIGHTS; lets it go ─pipe─▶ [userns: becomes root inside]
                                          (reaps it)                closes what it received        the program, op by op: join
                                                                                                   cgroups; unshare(mnt,uts,ipc,
                                                                                                   net); the mounts; pivot_root;
                                                                                                   hostname; lo up; fds; setsid;
                                                                                                   seccomp; caps
            ◀──────────── status channel (SEQPACKET, SO_PASSCRED) ──────────────────────────────── Executing (creds carry its host pid)
            ◀──────────── EOF (once the command executed) ─────────────────────────────────────── init_exec: fork ──▶ command (pid 2, setsid)
                                                                                                   the init stays: forwards signals,
                                                                                                   reaps, exits as the command did
                                                                                                   or SetupFailed(step, ...); _exit(127)
            ◀──Exited(id, status)── waitpid()

The messages are protocol.py's; RunCommand and StartProxy fork into a running sandbox (join.py).
Whether the kernel forks into a cgroup (clone3 CLONE_INTO_CGROUP) is probed once, when the fork
server starts (`linux.clone_into_cgroup_works`); without it the child joins its cgroup after a fork.

The sandbox's init is the set-up interpreter itself (setup/sbd-setup, static: it needs nothing
of an image's), which never runs from its file on the host: the fork server copies it once into
a sealed, execute-only memfd (`detached.sealed_copy`) and executes that descriptor, as runc does
with its own binary since CVE-2019-5736. The fork server starts its sealed copy once with vfork
semantics (os.posix_spawn), and that small static process, resident, clones each sandbox's init
from itself (`_spawn_sandbox`), which runs the program and stays as pid 1 once it forked the
command: no step of a sandbox's set-up runs in a copy of this Python heap (a fork of it cost some
2.5 ms in page-table copies and copy-on-write faults, and as much again in its exit or exec), and
no exec happens before the command's own (each costs 0.5-1 ms of CPU here: a spawner executed per
launch, a second init). The spawner holds nothing of a launch once it replied to it: the
descriptors it received are closed, its network namespace and ids are its own again (sbd-setup.c,
`serve`), and the init gets only what the program names. A launch does not wait for its reply:
the next requests are served meanwhile (`Children` says how an exit that comes before the reply
finds its request).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import errno
import fcntl
import gc
import mmap
import os
import select
import selectors
import signal
import socket
import time
from typing import NoReturn

from sandboxd.kernel import abi, linux
from sandboxd.kernel.seam import EntryKind
from sandboxd.plan.launch import HOST_IDS, STORE_IDS, SYSFS_OF_NETNS, LaunchPlan, UserNamespace
from sandboxd.sandbox.child import EXIT_UNEXPECTED, SETUP_BINARY, SETUP_NAME, is_dir_fd, root_entries
from sandboxd.sandbox.confine import Step
from sandboxd.sandbox.detached import detached_bind, detached_dev, idmap, inheritable, sealed_copy, storage_userns
from sandboxd.sandbox.join import run_in_sandbox, run_proxy
from sandboxd.sandbox.ops import Op, encode_op, program_head
from sandboxd.sandbox.program import Descriptors, HostView, Trees, compile_parts, with_environment
from sandboxd.sandbox.protocol import (
    NOT_FORKED, ExpectLaunches, Exited, ForkFailed, HoldDescriptors, LaunchSandbox, PrepareStorage, Request, RunCommand, StartProxy, decode_request,
    encode, make_decoders, unbatch,
)  # fmt: skip

MAX_MESSAGE = 1 << 20
MAX_FDS = 250


def serve(conn: socket.socket) -> NoReturn:
    """The fork server's loop: requests in, exit statuses out. Never returns.

    A launch does not hold up the requests behind it: it goes to the resident spawner
    (`_Resident`), whose channel is in the selector beside the request socket, and its reply, or
    the spawner's end without one, completes it (`_spawner_replied`) while the next requests are
    served."""
    try:
        # Children of this process must not copy pages: the collector would touch every object.
        gc.disable()
        gc.freeze()
        linux.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
        _own_scheduling_group()
        _reset_oom_score_adj()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        make_decoders()
        linux.clone_into_cgroup_works()  # probed now, once, rather than at the first sandbox
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        children = Children()
        held: list[int] = []  # HoldDescriptors: open until this process exits
        selector = selectors.DefaultSelector()
        selector.register(conn, selectors.EVENT_READ, "request")
        selector.register(wake_r, selectors.EVENT_READ, "sigchld")
        try:
            _resident(children, selector)  # now, not at the first sandbox; a failure is that launch's to report
        except OSError:
            pass
        while True:
            for key, _ in selector.select():
                if key.data == "request":
                    msg, fds = _recv_with_fds(conn)
                    if not msg:
                        os._exit(0)  # the supervisor is gone or done: our exit ends every sandbox
                    for part, part_fds in unbatch(msg, fds):  # a batch's requests, each as if alone
                        request = decode_request(part)
                        if isinstance(request, HoldDescriptors):
                            held += part_fds
                            continue
                        if isinstance(request, PrepareStorage):
                            _prepare_storage(request.ids)
                            continue
                        if isinstance(request, ExpectLaunches):
                            _expect(request)
                            continue
                        _fork_request(conn, request, part_fds, children, selector)
                elif key.data == "sigchld":
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    _reap(conn, children)
                else:
                    _spawner_replied(conn, key.data, children, selector)
    except BaseException:  # noqa: BLE001 - a request that is not the protocol's ends it too
        os._exit(EXIT_UNEXPECTED)


def _prepare_storage(ids: UserNamespace) -> None:
    """PrepareStorage: the storage user namespace of `ids`, made now and kept for the launches
    that idmap through it; what fails is the first such launch's to report (it tries again)."""
    try:
        storage_userns(ids, sealed_copy(str(SETUP_BINARY)))
    except OSError:
        pass


AUTOGROUP_NICE = -10


def _expect(request: ExpectLaunches) -> None:
    """ExpectLaunches: each plan's program compiled now (its text was decoded with the message)
    as its first launch will compile it, but with stand-ins for that launch's descriptors. Its
    trees are where every launch has them (`_trees_at`), so the walk of its root, most of the
    program, and the encoding of its ops are kept for that launch (program.py's `_walk_ops`,
    `encode_op`); and a /dev is made for the first launch of each owner (`_spare_devs`). A plan
    that fails to compile fails again at its launch, which reports it."""
    for plan in request.plans:
        binds = [op for op in plan.mounts if op.kind == "bind"]
        image = plan.mounts[0].kind == "image-root"
        at = _trees_at(len(binds) + int(image) + 1)
        trees = Trees(tuple(at[: len(binds)]), at[len(binds)] if image else -1, -1, at[-1])
        view = HostView(tuple(os.path.isdir(op.source) for op in binds), _root_entries() if any(op.kind == "tmpfs-root" for op in plan.mounts) else ())
        stand_in = _Received(-1, 1, list(range(3, 3 + len(plan.fd_sockets))), [], -1)
        try:
            _compiled(LaunchSandbox(0, plan, "", (), request.root, False, len(binds)), stand_in, trees, view, keep=False)
        except Exception:  # noqa: BLE001 - work done ahead: what fails here is its launch's to report
            continue
    for plan in request.plans:
        _keep_a_spare_dev(_dev_owner(plan))


# A launch's trees (its binds', its image's, its /dev) are moved to descriptors from TREES_AT
# up, in that order, as they are made (`_at_trees`): a launch then has them at the same numbers
# as the one before (they are closed once the spawner has its own), and its program's walk, which
# names them, is the one kept from that launch, or from ExpectLaunches. TREES_AT is above the
# numbers the requests' descriptors take (a batch brings at most BATCH_FDS); where the limit of
# descriptors is lower, or one is in use, a tree is where it is, or the next number free above.
TREES_AT = 512


def _trees_at(count: int) -> list[int]:
    """The numbers `count` trees take when none from TREES_AT up is in use."""
    return list(range(TREES_AT, TREES_AT + count))


def _at_trees(fd: int) -> int:
    """`fd` moved to the lowest free number from TREES_AT up (closed where it was), or left there."""
    try:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, TREES_AT)
    except OSError:
        return fd
    os.close(fd)
    return moved


def _own_scheduling_group() -> None:
    """A session of its own, so no terminal (the terminal's signals are the supervisor's to act
    on) and, where the kernel schedules by session (sched_autogroup), a scheduling group of its
    own, given the weight of AUTOGROUP_NICE. Every sandbox starts sessions of its own (its init
    once its set-up is done, its command at once), each a group as heavy as a whole session of
    nice 0: in one group with the supervisor, this process and its spawner would get one share
    against all of them, and a stack's last launches would wait behind the services started
    first (seen: the 50 launches of `scripts/bench`'s stack spread over half a second, this
    process idle for tens of milliseconds at a time with its requests queued). Its children
    that run anything of a sandbox's (join.py) leave the group first. Best effort: where the
    kernel has no autogroups, or this process is in a cpu cgroup of its own, the write is
    refused or has no effect."""
    os.setsid()
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(AUTOGROUP_NICE))
    except OSError:
        pass


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


class Children:
    """Which request each child of the fork server is of, and so which request an exit status
    (`Exited`) goes to. Pure bookkeeping, no system calls (tests/unit/test_forkserver.py).

    A launch's init is known by its pid only once its spawner's reply is read, and it may have
    exited and been reaped (waitpid of any child, at SIGCHLD) before that: its status is then
    kept (`unclaimed`), and the reply claims it (`launched`), so that its Exited is sent once,
    after the reply, to its own request. Whether the init named by a reply was reaped already is
    told by its pidfd (`_reaped_already`), not guessed from its pid: a pid once reaped may be
    another process's by then. What nothing claims (the init of a launch whose spawner failed
    after the clone, a process this one inherited as the init of its pid namespace) is dropped
    once no launch awaits its reply, and the oldest beyond UNCLAIMED_MAX."""

    UNCLAIMED_MAX = 4096

    def __init__(self) -> None:
        self.running: dict[int, int] = {}  # pid -> request id
        self.helpers: set[int] = set()  # pids of spawners: reaped without a word
        self.unclaimed: dict[int, int] = {}  # pid -> wait status, reaped before any reply named it
        self.awaited = 0  # launches whose spawner has not replied yet

    def forked(self, pid: int, request_id: int) -> None:
        """A child whose pid is known at once (a command, a proxy)."""
        self.running[pid] = request_id

    def awaiting(self) -> None:
        """A launch sent to a spawner; `launched` or `not_launched` ends it."""
        self.awaited += 1

    def launched(self, pid: int, request_id: int, reaped: bool) -> Exited | None:
        """The spawner says the init of `request_id` is `pid`; `reaped`: that very process was
        reaped already (its pidfd says so). Returns its Exited when it was."""
        self.awaited -= 1
        status = self.unclaimed.pop(pid, None)
        self._forget()
        if reaped:
            return Exited(request_id, status if status is not None else NOT_FORKED)
        self.running[pid] = request_id
        return None

    def not_launched(self) -> None:
        """A launch's spawner failed (ForkFailed): no Exited for it."""
        self.awaited -= 1
        self._forget()

    def reaped(self, pid: int, status: int) -> Exited | None:
        request_id = self.running.pop(pid, None)
        if request_id is not None:
            return Exited(request_id, status)
        if pid in self.helpers:
            self.helpers.discard(pid)
        elif self.awaited:
            self.unclaimed.pop(pid, None)
            self.unclaimed[pid] = status
            while len(self.unclaimed) > self.UNCLAIMED_MAX:
                del self.unclaimed[next(iter(self.unclaimed))]
        return None

    def _forget(self) -> None:
        if not self.awaited:
            self.unclaimed.clear()


def _reap(conn: socket.socket, children: Children) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited = children.reaped(pid, status)
        if exited is not None:
            conn.send(encode(exited))


def _reaped_already(pidfd: int) -> bool:
    """Whether the child `pidfd` refers to is reaped already (it is no child to wait for)."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


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


def _fork_request(conn: socket.socket, request: Request, fds: list[int], children: Children, selector: selectors.BaseSelector) -> None:
    """Fork what a request asks for; ForkFailed if that fails here. Every descriptor received
    or made for it is closed here once the child (or a launch's spawner) holds its own. A
    launch is left pending on its spawner's reply (`_Pending`, in `selector`)."""
    received = _Received.sort(request, fds)
    cgroup_fd, program_fd = -1, -1
    trees = Trees()
    host_id_trees: list[tuple[int, str]] = []
    doing = Step("fork")
    try:
        if isinstance(request, LaunchSandbox):
            trees, host_id_trees = _prepare_launch(request, received.sources, doing)
            doing.name = "open the v1 cgroups' tasks files"
            for path in request.cgroup_tasks:
                received.cgroup_tasks.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            doing.name = "compile the set-up program"
            program_fd = _program(request, received, trees)
            doing.name = "fork"
        cgroup_fd = os.open(request.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        match request:
            case LaunchSandbox():
                # What the program names reaches the init at its number here; nothing else does.
                kept = [received.status, received.output, *received.sockets, received.netns, *received.cgroup_tasks, *trees.binds, trees.image, trees.dev, program_fd, cgroup_fd]
                _spawn_sandbox(conn, request, cgroup_fd, received, program_fd, host_id_trees, [fd for fd in kept if fd >= 0], children, selector)
            case RunCommand():
                pid = linux.fork_into_cgroup(cgroup_fd)
                if pid == 0:
                    run_in_sandbox(request, received.status, received.output)
                children.forked(pid, request.id)
            case StartProxy():
                pid = linux.fork_into_cgroup(cgroup_fd)
                if pid == 0:
                    run_proxy(request, received.status, received.output, received.sockets)
                children.forked(pid, request.id)
    except (OSError, ValueError) as e:
        conn.send(encode(ForkFailed(request.id, _failure(doing.name, e, request.cgroup))))
    finally:
        for fd in [*fds, *received.cgroup_tasks, *trees.binds, trees.image, trees.dev, cgroup_fd, program_fd]:
            if fd >= 0:
                os.close(fd)


def _failure(step: str, e: OSError | ValueError, cgroup: str) -> str:
    """A ForkFailed's detail: the step, the error and the path it names."""
    return f"{step}: {e.strerror} ({e.filename or cgroup})" if isinstance(e, OSError) else f"{step}: {e}"


@dataclasses.dataclass(frozen=True)
class _Program:
    """A compiled program kept for the next launch of the same plan: the encoding of every op
    but the last, and the last (init_exec: a connection's environment goes in it)."""

    plan: LaunchPlan  # what it was compiled from (kept by its id: no other plan takes it meanwhile)
    body: bytes
    init_exec: Op
    count: int


_programs: dict[tuple[object, ...], _Program] = {}


def _program(request: LaunchSandbox, received: _Received, trees: Trees) -> int:
    """The launch's set-up program (program.py), compiled and written to a pipe whose read end
    (returned) the interpreter reads it from. A child in a user namespace is born in its network
    namespace: its program joins none.

    A restart, a connection in accept mode: the same plan (the very object, protocol.py decodes
    a plan's text once), the same descriptors and trees, the same program but for a connection's
    environment, so it is compiled and encoded once."""
    tmpfs_root = any(op.kind == "tmpfs-root" for op in request.plan.mounts)
    view = HostView(tuple(is_dir_fd(tree) for tree in trees.binds), _root_entries() if tmpfs_root else ())
    data = _compiled(request, received, trees, view)
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


def _compiled(request: LaunchSandbox, received: _Received, trees: Trees, view: HostView, keep: bool = True) -> bytes:
    """The launch's program, encoded (`_program`); kept for the next launch of its plan with the
    same descriptors unless `keep` is false (ExpectLaunches: its descriptors are stand-ins)."""
    plan = request.plan
    netns = -1 if plan.userns else received.netns
    fds = Descriptors(received.output, tuple(received.sockets), netns, tuple(received.cgroup_tasks))
    key = (id(plan), request.root, fds, trees, view)
    kept = _programs.get(key)
    if kept is None or kept.plan is not plan:
        head, root, tail = compile_parts(dataclasses.replace(request, connection=None), fds, trees, view)
        body = b"".join([*(encode_op(op) for op in head), _encoded_root(root), *(encode_op(op) for op in tail[:-1])])
        kept = _Program(plan, body, tail[-1], len(head) + len(root) + len(tail))
        if keep:
            if len(_programs) >= 64:
                _programs.clear()
            _programs[key] = kept
    last = kept.init_exec if request.connection is None else with_environment(kept.init_exec, request.connection.env)
    return program_head(kept.count, 3 + len(received.sockets)) + kept.body + encode_op(last, keep=request.connection is None)


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


def _prepare_launch(request: LaunchSandbox, held: list[int], doing: Step) -> tuple[Trees, list[tuple[int, str]]]:
    """Before the fork: a detached copy of each bind source and of the image,
    the sandbox's /dev. In a user namespace the copies stored through the stack's ids are
    idmapped here (STORE_IDS); those seen with the host's ids (HOST_IDS, returned) once the
    sandbox's own user namespace exists: only root of the host's user namespace may idmap a
    mount of the host's file systems."""
    plan = request.plan
    doing.name = "make a sealed copy of the set-up interpreter"
    sealed_copy(str(SETUP_BINARY))  # once per fork server; executed by every child
    binds = [op for op in plan.mounts if op.kind == "bind"]
    if len(held) != len(binds):  # the kernel cut the descriptors short (more than MAX_FDS)
        raise OSError(errno.EMSGSIZE, f"{len(binds)} bind sources, {len(held)} descriptors received", request.launched().service)
    store = storage_userns(plan.userns, sealed_copy(str(SETUP_BINARY))) if plan.userns is not None and plan.stores_through_ids else -1
    copies: list[int] = []
    host_id_trees: list[tuple[int, str]] = []
    image_tree = -1
    try:
        for fd, op in zip(held, binds):
            doing.name = f"copy the mount of {op.source}"
            copies.append(_at_trees(detached_bind(fd, op.source)))
            if op.options == STORE_IDS and store >= 0:
                idmap(copies[-1], store, op.source)
            elif op.options == HOST_IDS:
                host_id_trees.append((copies[-1], op.source))
        if plan.mounts[0].kind == "image-root":
            rootfs = plan.mounts[0].source
            doing.name = f"copy the mount of the image {rootfs}"
            held_root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                image_tree = _at_trees(detached_bind(held_root, rootfs))
            finally:
                os.close(held_root)
            if plan.mounts[0].options == HOST_IDS:
                host_id_trees.append((image_tree, rootfs))
        doing.name = "make the sandbox's /dev"
        owner = _dev_owner(plan)
        dev_tree = _at_trees(_spare_devs.pop(owner) if owner in _spare_devs else detached_dev(owner))
    except BaseException:
        for fd in [*copies, image_tree]:
            if fd >= 0:
                os.close(fd)
        raise
    doing.name = "fork"
    return Trees(tuple(copies), image_tree, -1, dev_tree), host_id_trees


def _dev_owner(plan: LaunchPlan) -> tuple[int, int] | None:
    """Whose the sandbox's /dev is (detached.detached_dev)."""
    return (plan.userns.uid, plan.userns.gid) if plan.userns else None


# A /dev made ahead (ExpectLaunches) for the first launch of each owner, which takes it rather
# than making its own on its way; the launches after it make their own (made after a launch, the
# next one's would take a CPU from the launch's init). A fork server serves one stack: at most
# two owners, the stack's ids and none (a sandbox without a user namespace).
_spare_devs: dict[tuple[int, int] | None, int] = {}


def _keep_a_spare_dev(owner: tuple[int, int] | None) -> None:
    if owner not in _spare_devs:
        try:
            _spare_devs[owner] = detached_dev(owner)
        except OSError:
            pass  # the launch makes its own, and reports what fails


@dataclasses.dataclass
class _Pending:
    """A launch sent to the spawner and not replied to yet: what its reply completes."""

    request_id: int
    cgroup: str
    service: str
    idmapped: list[str]  # the sources of the trees the spawner idmaps, in its order (for its errors)


@dataclasses.dataclass
class _Resident:
    """The resident spawner: one set-up interpreter (sbd-setup.c, `serve`) started from this
    process's sealed copy of it, which clones every sandbox's init (CLONE_PARENT: this process's
    child) and replies to each launch in order, on a channel in this process's selector. Started
    again at the next launch once it died; the launches it had not replied to fail (ForkFailed)."""

    pid: int
    channel: socket.socket  # non-blocking
    waiting: collections.deque[_Pending] = dataclasses.field(default_factory=collections.deque)


_spawner: _Resident | None = None
MAX_PASSED = 1024  # a launch's descriptors (sbd-setup.c, MAX_PASSED)
FDS_PER_MESSAGE = 250  # under the kernel's SCM_MAX_FD (253)


def _resident(children: Children, selector: selectors.BaseSelector) -> _Resident:
    """The resident spawner, started if there is none (with vfork semantics: no copy of this heap)."""
    global _spawner
    if _spawner is None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            interpreter = sealed_copy(str(SETUP_BINARY))
            with inheritable([theirs.fileno()]):
                pid = os.posix_spawn(f"/proc/self/fd/{interpreter}", [SETUP_NAME, "serve", str(theirs.fileno())], {})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        children.helpers.add(pid)
        _spawner = _Resident(pid, ours)
        selector.register(ours, selectors.EVENT_READ, _spawner)
    return _spawner


def _spawn_sandbox(
    conn: socket.socket,
    request: LaunchSandbox,
    cgroup_fd: int,
    received: _Received,
    program_fd: int,
    host_id_trees: list[tuple[int, str]],
    passed: list[int],
    children: Children,
    selector: selectors.BaseSelector,
) -> None:
    """Have the resident spawner (setup/sbd-setup.c, `serve`) start the sandbox's init, with
    `passed`, the descriptors the program names, each at its number here. Its reply, the init's
    pid (a child of this process's, CLONE_PARENT, which reaps it) or why there is none, comes
    later on the spawner's channel (`_spawner_replied`).

    What only a process of the host's namespaces may do is the spawner's, as this process's own
    rules say it (`_spawn_request`): in a user namespace the clone is in the service's network
    namespace, whose sysfs it makes there (a child in a new user namespace may join neither, nor
    mount a sysfs for it), and as the block's last ids; the uid and gid maps (only a process
    outside may write maps naming other ids than its own) and the idmap of the trees that keep
    the host's ids (HOST_IDS) through the init's user namespace, while the init waits for them.
    """
    if len(passed) > MAX_PASSED:
        raise OSError(errno.EMSGSIZE, f"{len(passed)} descriptors for the sandbox, more than {MAX_PASSED}", request.launched().service)
    text = _spawn_request(request, cgroup_fd, received, program_fd, [tree for tree, _ in host_id_trees], passed)
    for attempt in (1, 2):
        spawner = _resident(children, selector)
        sent = 0
        try:
            for start in range(0, len(passed), FDS_PER_MESSAGE):
                _send_to_spawner(conn, spawner, text if start == 0 else b"+", passed[start : start + FDS_PER_MESSAGE], children, selector)
                sent += 1
            break
        except OSError as e:
            dead = e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
            if dead or sent:  # it is gone, or has part of a request: a new one takes the next
                _forget_spawner(conn, spawner, children, selector)
            if not dead or attempt == 2:
                raise
    spawner.waiting.append(_Pending(request.id, request.cgroup, request.launched().service, [source for _, source in host_id_trees]))
    children.awaiting()


def _send_to_spawner(conn: socket.socket, spawner: _Resident, text: bytes, fds: list[int], children: Children, selector: selectors.BaseSelector) -> None:
    """One message to the spawner. While its queue is full, its replies are read (it may be
    waiting for room for them); it died meanwhile: OSError(EPIPE)."""
    while True:
        try:
            socket.send_fds(spawner.channel, [text], fds)
            return
        except BlockingIOError:
            pass
        readable, _writable, _ = select.select([spawner.channel], [spawner.channel], [])
        if readable:
            _spawner_replied(conn, spawner, children, selector)
        if _spawner is not spawner:
            raise OSError(errno.EPIPE, "the set-up interpreter ended before it cloned the sandbox", str(SETUP_BINARY))


def _spawner_replied(conn: socket.socket, spawner: _Resident, children: Children, selector: selectors.BaseSelector) -> None:
    """Every reply the spawner has sent, each to the launch it answers (they come in order): the
    init's pid with its pidfd, else ForkFailed with what failed, as a failure before the spawn
    says it. At its end (EOF) the launches it had not replied to fail, and it is forgotten."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(spawner.channel, 64, 1)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = b"", []
        try:
            if not msg:
                _forget_spawner(conn, spawner, children, selector)
                return
            if not spawner.waiting:
                continue  # no launch asked: nothing to complete
            pending = spawner.waiting.popleft()
            if msg[:1] == b"P" and len(fds) == 1 and msg[1:].isdigit():
                # The pidfd: whether this very init was reaped already; the supervisor opens its own.
                exited = children.launched(int(msg[1:]), pending.request_id, _reaped_already(fds[0]))
                if exited is not None:
                    conn.send(encode(exited))
            else:
                _launch_failed(conn, pending, msg, children)
        finally:
            for fd in fds:
                os.close(fd)


def _forget_spawner(conn: socket.socket, spawner: _Resident, children: Children, selector: selectors.BaseSelector) -> None:
    """The spawner is gone (or is left to its EOF): the launches it had not replied to fail; the
    next launch starts a new one."""
    global _spawner
    if _spawner is spawner:
        _spawner = None
        selector.unregister(spawner.channel)
        spawner.channel.close()
    while spawner.waiting:
        _launch_failed(conn, spawner.waiting.popleft(), b"", children)


def _launch_failed(conn: socket.socket, pending: _Pending, msg: bytes, children: Children) -> None:
    children.not_launched()
    conn.send(encode(ForkFailed(pending.request_id, _failure("fork", _spawn_error(msg, pending), pending.cgroup))))


def _spawn_error(msg: bytes, pending: _Pending) -> OSError:
    """The OSError a spawner's failure reply ("E<errno> <what>") or its silence stands for."""
    error, _, what = msg[1:].decode(errors="replace").partition(" ")
    if msg[:1] != b"E" or not error.isdigit():
        return OSError(errno.ECHILD, "the set-up interpreter ended before it cloned the sandbox", str(SETUP_BINARY))
    number = int(error)
    tree = what.removeprefix("idmap ")
    if tree != what and tree.isdigit() and int(tree) < len(pending.idmapped):
        source = pending.idmapped[int(tree)]
        if number == errno.EINVAL:
            return OSError(number, "its file system cannot be idmapped (a user namespace needs that for mounts; userns: false does not)", source)
        return OSError(number, f"mount_setattr: {os.strerror(number)}", source)
    return OSError(number, f"{what}: {os.strerror(number)}", pending.service)


def _spawn_request(request: LaunchSandbox, cgroup_fd: int, received: _Received, program_fd: int, host_id_trees: list[int], passed: list[int]) -> bytes:
    """The spawner's request (sbd-setup.c, `parse_request`): what the request says of the clone,
    every descriptor named by its number here, and those numbers of `passed`, in their order. A
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
    numbers = (program_fd, received.status, cgroup_fd, int(into_cgroup), netns, int(sysfs), *mapped)
    return " ".join([*(str(n) for n in numbers), trees, str(len(passed)), *(str(fd) for fd in passed)]).encode()
