"""The supervisor's side of the fork server: `ForkServer` (start it, send it requests, read its
replies, stop it) and `read_status` (what a launching child says on its status channel).

The messages and their order are protocol.py's; the fork server itself is forkserver.py.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from dataclasses import dataclass

from sandboxd.errors import HostError, LaunchError
from sandboxd.kernel import abi, linux
from sandboxd.plan.launch import LaunchPlan, UserNamespace
from sandboxd.sandbox.child import SETUP_BINARY
from sandboxd.sandbox.forkserver import serve
from sandboxd.sandbox.protocol import BATCH_BYTES, BATCH_FDS, Connection, ExpectLaunches, HoldDescriptors, LaunchSandbox, PrepareStorage, Reply, Request, RunCommand, SetupFailed, StartProxy, decode_reply, decode_status, encode, encode_batch


@dataclass
class Launched:
    pid: int  # the sandbox init's pid in the host's pid namespace
    pidfd: int
    exec_ns: int  # CLOCK_MONOTONIC when the child was about to exec
    listener: int = -1  # the seccomp listener of its bind() calls, with `intercept_bind`


class ForkServer:
    """The supervisor's handle on the fork server."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        # Between `hold_back` and `send_held`: the requests held back, each encoded, with its
        # descriptors and the far end of its status channel (open until it is sent).
        self._held: list[tuple[bytes, list[int], socket.socket]] | None = None

    @staticmethod
    def start() -> ForkServer:
        """Fork the fork server as pid 1 of a new pid namespace. Call before any thread exists.

        The fork server closes every descriptor it inherited but its connection and the standard
        three: a replacement for one that died is forked from the running supervisor
        (daemon/recovery.py), which holds sockets, pipes and pidfds by then, and the first one
        from `up`, which holds whatever its caller left open (a pipe a script waits on to end):
        neither the fork server nor the spawner it executes (and so no sandbox) holds any of them.

        A fork costs in proportion to the pages of the process forked and those the child then
        touches (copy on write), so `sandboxd up` starts the fork server first, before it reads
        the specs (YAML), plans and makes anything, and before the supervisor's own imports
        (asyncio, pyroute2): every sandbox is a fork of this smaller process. (Starting a fresh
        interpreter instead would cost about 80 ms before the first sandbox, more than it saves.)
        Refused (HostError) without the set-up interpreter every sandbox executes (child.py).
        """
        if not os.access(SETUP_BINARY, os.X_OK):
            raise HostError(f"sandboxd's set-up interpreter {SETUP_BINARY} is missing", "run scripts/install (it builds it from sbd-setup.c with gcc); in a checkout, scripts/test builds it too")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.unshare(abi.CLONE_NEWPID)
            try:
                pid = os.fork()
                if pid == 0:
                    parent.close()
                    os.closerange(3, child.fileno())
                    os.closerange(child.fileno() + 1, 1 << 20)
                    serve(child)
            finally:
                linux.setns(own_pidns, abi.CLONE_NEWPID)
        finally:
            os.close(own_pidns)
        child.close()
        return ForkServer(parent, pid)

    def hold(self, fds: list[int]) -> None:
        """Have the fork server keep copies of `fds` open until it exits (HoldDescriptors)."""
        socket.send_fds(self.conn, [encode(HoldDescriptors(len(fds)))], fds)

    def prepare_storage(self, ids: UserNamespace) -> None:
        """Have the fork server make the storage user namespace of `ids` now (PrepareStorage)."""
        self.conn.send(encode(PrepareStorage(ids)))

    def expect(self, root: str, plans: list[LaunchPlan]) -> None:
        """Tell the fork server the plans of the first launches, in the order they come, so that
        it has their programs compiled by then (ExpectLaunches)."""
        message = ExpectLaunches.first(root, plans)
        if message.plans:
            self.conn.send(encode(message))

    def send_launch(
        self,
        launch_id: int,
        plan: LaunchPlan,
        cgroup: str,
        cgroup_tasks: tuple[str, ...],
        root: str,
        output_fd: int,
        socket_fds: list[int],
        netns_fd: int = -1,
        source_fds: list[int] | None = None,
        connection: Connection | None = None,
    ) -> socket.socket:
        """Ask for a sandbox born in cgroup2 directory `cgroup` that also joins `cgroup_tasks`.

        With `netns_fd`, the sandbox joins that network namespace instead of creating one.
        `source_fds` are the held descriptors of its bind sources (pins.py), one per bind in the
        order of the plan's mounts. With `connection`, the sandbox is a connection's: `plan`
        (the same object for every connection of a service) with its name and environment.
        Returns the supervisor's end of its status channel.
        """
        sources = list(source_fds or [])
        request = LaunchSandbox(launch_id, plan, cgroup, tuple(cgroup_tasks), root, netns_fd >= 0, len(sources), connection)
        return self._send(request, [output_fd, *socket_fds, *sources] + ([netns_fd] if netns_fd >= 0 else []))

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
        cgroup_tasks: tuple[str, ...] = (),
    ) -> socket.socket:
        """Run a command inside a running sandbox (its init's namespaces and its cgroup)."""
        request = RunCommand(
            launch_id, init_pid, cgroup, tuple(cgroup_tasks), tuple(argv), tuple(env.items()), workdir,
            tuple(capabilities), seccomp_filter, uid, gid,
            # Without an output, none is sent: the command gets the sandbox's own /dev/null, not
            # a descriptor of the host's that a process of the service could reopen through /proc.
            output=output_fd >= 0,
        )  # fmt: skip
        return self._send(request, [output_fd] if output_fd >= 0 else [])

    def send_proxy(
        self,
        launch_id: int,
        pidfd: int,
        cgroup: str,
        cgroup_tasks: tuple[str, ...],
        argv: list[str],
        socket_fds: list[int],
        output_fd: int,
        uid: int,
        gid: int,
        target_fd: int = -1,
    ) -> socket.socket:
        """Start a proxy in a running sandbox's cgroup and network namespace (see proxy.py)."""
        request = StartProxy(launch_id, cgroup, tuple(cgroup_tasks), tuple(argv), uid, gid, unix_target=target_fd >= 0)
        return self._send(request, [output_fd, pidfd, *([target_fd] if target_fd >= 0 else []), *socket_fds])

    def _send(self, request: Request, fds: list[int]) -> socket.socket:
        """Send a request with its descriptors after a new status channel; returns our end of it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        if self._held is not None:
            self._held.append((encode(request), [theirs.fileno(), *fds], theirs))
            return ours
        try:
            socket.send_fds(self.conn, [encode(request)], [theirs.fileno(), *fds])
        finally:
            theirs.close()
        return ours

    def hold_back(self) -> None:
        """Hold the next requests back until `send_held`, which sends them in as few messages as
        it can (protocol.py's batches): a stack's `up` asks for every eager sandbox at once."""
        if self._held is None:
            self._held = []

    def send_held(self) -> None:
        """Send the requests held back since `hold_back`, as batches of at most BATCH_FDS
        descriptors and about BATCH_BYTES bytes (a request beyond either goes alone, as it
        would have). Each status channel's far end is closed once its request was sent, or
        could not be: then the fork server is gone (its EOF says so) or the error is raised."""
        held, self._held = self._held or [], None
        try:
            for batch in _batches(held):
                if len(batch) == 1:
                    socket.send_fds(self.conn, [batch[0][0]], batch[0][1])
                else:
                    message = encode_batch([(data, len(fds)) for data, fds, _ in batch])
                    socket.send_fds(self.conn, [message], [fd for _, fds, _ in batch for fd in fds])
        finally:
            for _data, _fds, theirs in held:
                theirs.close()

    def receive(self) -> Reply | None:
        """The fork server's next reply (Exited, ForkFailed); None once it is gone. Raises
        BlockingIOError when there is none to read yet (the socket is non-blocking)."""
        data = self.conn.recv(65536)
        return decode_reply(data) if data else None

    def stop(self) -> None:
        """Close our end: the fork server exits, and with it anything still in its namespace."""
        self.conn.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _batches(held: list[tuple[bytes, list[int], socket.socket]]) -> list[list[tuple[bytes, list[int], socket.socket]]]:
    """The held requests in order, cut into batches within BATCH_FDS descriptors and BATCH_BYTES."""
    batches: list[list[tuple[bytes, list[int], socket.socket]]] = []
    fds = size = 0
    for item in held:
        if not batches or fds + len(item[1]) > BATCH_FDS or size + len(item[0]) > BATCH_BYTES:
            batches.append([])
            fds = size = 0
        batches[-1].append(item)
        fds, size = fds + len(item[1]), size + len(item[0]) + 16
    return batches


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
    message = decode_status(data)
    if isinstance(message, SetupFailed):
        raise LaunchError(service, message.step, message.detail)
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
    return "pending", Launched(pid, pidfd, message.exec_ns, listener)
