"""The supervisor's side of the fork server's connection: requests out, their ends back.

Every request (a service's sandbox, a per-connection instance, a command inside a running
sandbox, a proxy) has an id; the fork server reports how it ended on its connection:

    supervisor                                  fork server
    ──────────  request id N (+ descriptors) ─▶  forks; the child reports on its status channel
                ◀─ Exited(N, status)           the child's wait status, when it was reaped
                ◀─ ForkFailed(N, detail)       it could not even fork

(the messages are sandbox/protocol.py's replies)

`send` sends one request and `ended` is the one coroutine that awaits its end, whoever asked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from sandboxd.daemon.runtime import ServiceRuntime, command_env
from sandboxd.errors import LaunchError
from sandboxd.sandbox.handle import ForkServer, read_status
from sandboxd.sandbox.protocol import NOT_FORKED, ForkFailed



@dataclass(frozen=True)
class Ended:
    status: int  # its wait status
    failure: str = ""  # what the fork server said when it could not fork


@dataclass
class Sent:
    id: int
    channel: socket.socket  # the supervisor's end of the child's status channel
    end: asyncio.Future[Ended]


class ForkServerLink:
    def __init__(self, server: ForkServer | None = None) -> None:
        self.server = server  # started by the supervisor before its event loop, if not given
        self.pending: dict[int, asyncio.Future[Ended]] = {}

    def listen(self, on_death: Callable[[], None]) -> None:
        assert self.server is not None
        asyncio.get_running_loop().add_reader(self.server.conn, self._on_message, on_death)

    def close(self) -> None:
        assert self.server is not None
        asyncio.get_running_loop().remove_reader(self.server.conn)

    def send(self, request: Callable[[ForkServer, int], socket.socket]) -> Sent:
        """Send one request: `request` sends it with the id it is given and returns its status channel."""
        assert self.server is not None
        request_id = self.server.next_id()
        end: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = end
        try:
            channel = request(self.server, request_id)
        except BaseException:
            del self.pending[request_id]
            raise
        return Sent(request_id, channel, end)

    async def ended(self, sent: Sent) -> Ended:
        """How what `sent` started ended. Cancelled (a timeout), its end is no longer awaited."""
        try:
            return await sent.end
        finally:
            self.pending.pop(sent.id, None)

    def _on_message(self, on_death: Callable[[], None]) -> None:
        assert self.server is not None
        try:
            reply = self.server.receive()
        except BlockingIOError:
            return
        if reply is None:
            self.close()
            on_death()
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
