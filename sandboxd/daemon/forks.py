"""The supervisor's side of the fork server's connection: requests out, their ends back.

Every request (a service's sandbox, a per-connection instance, a command inside a running
sandbox, a proxy) has an id; the fork server reports how it ended on its connection:

    supervisor                                  fork server
    ──────────  request id N (+ descriptors) ─▶  forks; the child reports on its status channel
                ◀─ {"exit": N, "status": S}     the child's wait status, when it was reaped
                ◀─ {"failed": N, "detail": T}   it could not even fork

`send` sends one request and `ended` is the one coroutine that awaits its end, whoever asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from sandboxd.daemon.runtime import ServiceRuntime, command_env
from sandboxd.errors import LaunchError
from sandboxd.sandbox.launcher import ForkServer, read_status

NOT_FORKED = 127 << 8  # the wait status a request gets when the fork server could not fork


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
            data = self.server.conn.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self.close()
            on_death()
            return
        message = json.loads(data)
        end = self.pending.get(message.get("exit", message.get("failed")))
        if end is not None and not end.done():
            end.set_result(Ended(message.get("status", NOT_FORKED), str(message["detail"]) if "failed" in message else ""))

    async def run_inside(self, rt: ServiceRuntime, argv: list[str], timeout: float, output_fd: int = -1) -> int | None:
        """Run a command inside a running sandbox (its namespaces, cgroups and confinement) and wait
        for its wait status; None if it did not end within `timeout` (it is then killed)."""
        sent = self.send(
            lambda server, request_id: server.send_exec(
                request_id, rt.launch.pid, str(rt.cgroup.path), argv, command_env(rt), rt.plan.workdir,
                rt.plan.capabilities, rt.plan.seccomp_filter, rt.plan.uid, rt.plan.gid, output_fd, rt.cgroup.extra_procs_files,
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
