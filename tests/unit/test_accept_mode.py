"""Accept mode's loop side (activation.py) without root: a real listening socket on 127.0.0.1,
and fakes for what would start sandboxes (the fork server's link, the cgroup manager)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sandboxd.daemon.activation import ACCEPT_BATCH, Activation
from sandboxd.daemon.forks import Sent
from sandboxd.daemon.runtime import Connections

KEY = ("echo", 0)


@dataclasses.dataclass(frozen=True)
class FakePlan:
    env: tuple[tuple[str, str], ...] = ()
    fd_names: tuple[str, ...] = ("echo",)
    fd_sockets: tuple[tuple[str, int], ...] = (KEY,)
    proxied: tuple[tuple[str, int], ...] = ()
    net: str = "private"


class FakeLink:
    """Sends nothing: each request gets a status channel and an end that never comes."""

    def __init__(self) -> None:
        self.sent = 0
        self.kept: list[socket.socket] = []

    def send(self, request: Any) -> Sent:
        self.sent += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.kept += [ours, theirs]
        return Sent(self.sent, ours, asyncio.get_running_loop().create_future())

    def on_end(self, sent: Sent, callback: Any) -> None:
        pass


class FakeCgroups:
    def __init__(self) -> None:
        self.made: list[str] = []

    def create(self, name: str, parent: Any = None) -> Any:
        self.made.append(name)
        return SimpleNamespace(path=Path("/nonexistent") / name, v1_tasks_files=())


def accept_waiting(waiting: int, max_connections: int) -> tuple[int, list[str], bool]:
    """`waiting` connections in the queue, one wake-up of the accept handler: how many sandboxes
    were asked for, their cgroups, and whether the socket is still watched."""

    async def run() -> tuple[int, list[str], bool]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.setblocking(False)
            clients = [socket.create_connection(listener.getsockname()) for _ in range(waiting)]
            running = SimpleNamespace(
                sockets={KEY: SimpleNamespace(sock=listener)},
                socket_unit=lambda name: SimpleNamespace(max_connections=max_connections),
                netns_fd=lambda rt: -1,
                root_dir=Path("/nonexistent"),
                stopping=False,
            )
            rt = SimpleNamespace(
                spec=SimpleNamespace(name="echo"), plan=FakePlan(), connections=Connections(), per_connection=True,
                source_fds=lambda: [], output=SimpleNamespace(w=-1), cgroup=None,
            )  # fmt: skip
            link, cgroups = FakeLink(), FakeCgroups()
            activation = Activation(None, running, link, None, cgroups, SimpleNamespace(note=print))  # type: ignore[arg-type]
            activation.watch(rt)  # type: ignore[arg-type]
            activation._on_accept(rt, KEY)  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            for instance in activation.instances.values():
                loop.remove_reader(instance.channel.fileno())
            watched = "echo" in activation.watching
            activation.unwatch(rt)  # type: ignore[arg-type]
            for sock in clients + link.kept:
                sock.close()
            return link.sent, cgroups.made, watched

    return asyncio.run(run())


def test_connections_waiting_together_are_all_accepted_at_one_wake_up() -> None:
    sent, made, watched = accept_waiting(5, max_connections=64)
    assert sent == 5 and watched
    assert made == [f"echo@{n}" for n in range(1, 6)]  # a cgroup of its own each


def test_one_wake_up_accepts_at_most_accept_batch() -> None:
    sent, _, _ = accept_waiting(ACCEPT_BATCH + 3, max_connections=64)
    assert sent == ACCEPT_BATCH


def test_accepting_together_stops_at_max_connections() -> None:
    sent, made, watched = accept_waiting(5, max_connections=2)
    assert sent == 2 and made == ["echo@1", "echo@2"]
    assert not watched  # the others wait in the queue until an instance ends
