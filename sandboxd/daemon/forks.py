"""The supervisor's side of the fork server's connection: requests out, their ends back.

Every request (a service's sandbox, a per-connection instance, a command inside a running
sandbox, a proxy) has an id; the fork server reports how it ended on its connection:

    supervisor                                  fork server
    ──────────  request id N (+ descriptors) ─▶  forks; the child reports on its status channel
                ◀─ Exited(N, status)           the child's wait status, when it was reaped
                ◀─ ForkFailed(N, detail)       it could not even fork

(the messages are sandbox/protocol.py's replies)

`send` sends one request and `ended` is the one coroutine that awaits its end, whoever asked.

When the fork server dies (EOF on its connection: SIGKILL from the OOM killer or an operator),
every sandbox it forked dies with its pid namespace, and no `Exited` will ever come: the link
says so to `on_death` (recovery.py), which may `replace` it with a new fork server, and
`lose_pending` then ends every request still awaited as `Ended(SIGKILLED, server_died=True)`,
so that each waiter (a service's sandbox, an instance, a health check, a proxy) takes its end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sandboxd.daemon.runtime import ServiceRuntime, command_env
from sandboxd.errors import LaunchError
from sandboxd.sandbox.handle import ForkServer, read_status
from sandboxd.sandbox.protocol import NOT_FORKED, ForkFailed



SIGKILLED = signal.SIGKILL.value  # the wait status of a process killed by SIGKILL


@dataclass(frozen=True)
class Ended:
    status: int  # its wait status
    failure: str = ""  # what the fork server said when it could not fork
    server_died: bool = False  # the fork server died first: its sandbox died with it


@dataclass
class Sent:
    id: int
    channel: socket.socket  # the supervisor's end of the child's status channel
    end: asyncio.Future[Ended]


class ForkServerLink:
    def __init__(self, server: ForkServer | None = None) -> None:
        self.server = server  # started by the supervisor before its event loop, if not given; None once it died
        self.pending: dict[int, asyncio.Future[Ended]] = {}
        self.on_death: Callable[[ForkServer], None] = lambda dead: None
        self.next_id = 0  # request ids go on across fork servers: an id is never reused
        self.lost_up_to = 0  # the last id sent to a fork server that died

    def listen(self, on_death: Callable[[ForkServer], None]) -> None:
        """Read the fork server's replies from the event loop; `on_death(server)` once it died."""
        assert self.server is not None
        self.on_death = on_death
        asyncio.get_running_loop().add_reader(self.server.conn, self._on_message)

    def close(self) -> None:
        if self.server is not None:
            asyncio.get_running_loop().remove_reader(self.server.conn)

    def replace(self, server: ForkServer) -> None:
        """A new fork server in place of the one that died; the next requests go to it."""
        self.server = server
        asyncio.get_running_loop().add_reader(server.conn, self._on_message)

    def lose_pending(self) -> int:
        """End every request sent to the fork server that died and still awaited: it will never
        say their end, and what it forked died with it (those sent to its successor wait on).
        Returns how many there were."""
        lost = [end for request_id, end in self.pending.items() if request_id <= self.lost_up_to and not end.done()]
        for end in lost:
            end.set_result(Ended(SIGKILLED, server_died=True))
        return len(lost)

    def send(self, request: Callable[[ForkServer, int], socket.socket]) -> Sent:
        """Send one request: `request` sends it with the id it is given and returns its status channel.
        Without a fork server (it died and none replaced it), OSError(EPIPE)."""
        if self.server is None:
            raise OSError(errno.EPIPE, "sandboxd's fork server is gone")
        self.next_id += 1
        request_id = self.next_id
        end: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = end
        try:
            channel = request(self.server, request_id)
        except BaseException:
            del self.pending[request_id]
            raise
        return Sent(request_id, channel, end)

    def adopt(self, request_id: int) -> Awaitable[Ended]:
        """The end of a request the sandboxd this one was upgraded from sent (resume.py), awaited
        under its id, registered now: the fork server's reply names it."""
        future: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future

        async def ended() -> Ended:
            try:
                return await future
            finally:
                self.pending.pop(request_id, None)

        return ended()

    async def ended(self, sent: Sent) -> Ended:
        """How what `sent` started ended. Cancelled (a timeout), its end is no longer awaited."""
        try:
            return await sent.end
        finally:
            self.pending.pop(sent.id, None)

    def on_end(self, sent: Sent, callback: Callable[[Ended], None]) -> None:
        """Call `callback` with how what `sent` started ended, from the event loop, once it did:
        `ended` without a task of its own to await it (one per connection in accept mode). Not
        called if the end was cancelled: then nobody is left to tell."""

        def done(end: asyncio.Future[Ended]) -> None:
            self.pending.pop(sent.id, None)
            if not end.cancelled():
                callback(end.result())

        sent.end.add_done_callback(done)

    def _on_message(self) -> None:
        assert self.server is not None
        try:
            reply = self.server.receive()
        except BlockingIOError:
            return
        except ConnectionError:
            reply = None
        if reply is None:
            dead, self.server, self.lost_up_to = self.server, None, self.next_id
            asyncio.get_running_loop().remove_reader(dead.conn)
            self.on_death(dead)
            return
        end = self.pending.get(reply.id)
        if end is not None and not end.done():
            end.set_result(Ended(reply.wait_status, reply.detail if isinstance(reply, ForkFailed) else ""))

    async def run_inside(self, rt: ServiceRuntime, argv: list[str], timeout: float, output_fd: int = -1) -> int | None:
        """Run a command inside a running sandbox (its namespaces, cgroups and confinement) and wait
        for its wait status; None if it did not end within `timeout` (it is then killed)."""
        sent = self.send(
            lambda server, request_id: server.send_exec(
                request_id, rt.launch.pid, str(rt.cgroup.path), argv, command_env(rt), rt.plan.workdir,
                rt.plan.capabilities, rt.plan.seccomp_filter, rt.plan.uid, rt.plan.gid, output_fd, rt.cgroup.v1_tasks_files,
            )
        )
        try:
            return (await asyncio.wait_for(self.ended(sent), timeout)).status
        except TimeoutError:
            try:
                _kind, launched = read_status(sent.channel, argv[0])
            except LaunchError:
                launched = None
            if launched is not None and launched.pidfd >= 0:
                signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)  # the command dies with it
                os.close(launched.pidfd)
            return None
        finally:
            sent.channel.close()
