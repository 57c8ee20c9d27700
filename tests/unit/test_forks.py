"""The supervisor's side of the fork server's connection: every request's end comes back to whoever awaits it."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any, cast

import pytest

from sandboxd.daemon.forks import NOT_FORKED, SIGKILLED, Ended, ForkServerLink
from sandboxd.sandbox.handle import ForkServer
from sandboxd.sandbox.protocol import Exited, ForkFailed, Reply, decode_reply, encode


class FakeForkServer:
    """The fork server's connection, with the test at its other end."""

    def __init__(self) -> None:
        self.conn, self.other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.conn.setblocking(False)
        self.channels: list[socket.socket] = []

    def request(self, server: ForkServer, request_id: int) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channels += [ours, theirs]
        return ours

    def receive(self) -> Reply | None:
        data = self.conn.recv(65536)
        return decode_reply(data) if data else None

    def report(self, reply: Reply) -> None:
        self.other.send(encode(reply))

    def close(self) -> None:
        for sock in (self.conn, self.other, *self.channels):
            sock.close()


@pytest.fixture
def server() -> Any:
    fake = FakeForkServer()
    yield fake
    fake.close()


def run(test: Any) -> None:
    asyncio.run(asyncio.wait_for(test(), 5))


def link_to(server: FakeForkServer) -> ForkServerLink:
    return ForkServerLink(cast(ForkServer, server))


def test_each_end_reaches_the_request_that_awaits_it(server: FakeForkServer) -> None:

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: pytest.fail("the fork server is alive"))
        first, second = link.send(server.request), link.send(server.request)
        assert (first.id, second.id) == (1, 2)
        server.report(Exited(2, 9))
        server.report(Exited(99, 0))  # nobody asked: ignored
        server.report(ForkFailed(1, "fork: out of memory"))
        assert await link.ended(second) == Ended(9)
        assert await link.ended(first) == Ended(NOT_FORKED, "fork: out of memory")
        assert link.pending == {}
        link.close()

    run(scenario)


def test_an_end_no_longer_awaited_is_forgotten(server: FakeForkServer) -> None:

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: None)
        sent = link.send(server.request)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(link.ended(sent), 0.01)
        assert link.pending == {}
        server.report(Exited(sent.id, 0))  # comes late: nothing waits for it
        await asyncio.sleep(0.01)
        link.close()

    run(scenario)


def test_a_request_that_cannot_be_sent_leaves_nothing_pending(server: FakeForkServer) -> None:

    def broken(server: ForkServer, request_id: int) -> socket.socket:
        raise OSError("EMFILE")

    async def scenario() -> None:
        link = link_to(server)
        with pytest.raises(OSError):
            link.send(broken)
        assert link.pending == {}

    run(scenario)


def test_the_fork_servers_death_is_said_once(server: FakeForkServer) -> None:
    deaths: list[str] = []

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: deaths.append("dead" if dead is cast(Any, server) else "another"))
        server.other.close()
        await asyncio.sleep(0.05)
        assert link.server is None

    run(scenario)
    assert deaths == ["dead"]


def test_the_requests_of_a_dead_fork_server_end_as_lost_and_its_successors_wait_on(server: FakeForkServer) -> None:
    successor = FakeForkServer()

    async def scenario() -> None:
        link = link_to(server)
        gone: list[object] = []
        link.listen(on_death=lambda dead: (gone.append(dead), link.replace(cast(ForkServer, successor))))
        lost = [link.send(server.request), link.send(server.request)]
        server.other.close()
        while not gone:
            await asyncio.sleep(0.001)
        kept = link.send(successor.request)
        assert kept.id == 3  # ids go on: none of the dead one's is used again
        assert link.lose_pending() == 2
        assert [await link.ended(sent) for sent in lost] == [Ended(SIGKILLED, server_died=True)] * 2
        assert link.lose_pending() == 0
        successor.report(Exited(kept.id, 0))
        assert await link.ended(kept) == Ended(0)
        link.close()

    try:
        run(scenario)
    finally:
        successor.close()


def test_without_a_fork_server_a_request_is_refused_with_epipe(server: FakeForkServer) -> None:

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: None)
        server.other.close()
        while link.server is not None:
            await asyncio.sleep(0.001)
        with pytest.raises(OSError) as refused:
            link.send(server.request)
        assert refused.value.errno == errno.EPIPE
        assert link.pending == {}

    run(scenario)


def test_an_end_followed_by_a_callback_reaches_it_once_and_is_forgotten(server: FakeForkServer) -> None:

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: pytest.fail("the fork server is alive"))
        sent = link.send(server.request)
        seen: list[Ended] = []
        link.on_end(sent, seen.append)
        server.report(Exited(sent.id, 0))
        while not seen:
            await asyncio.sleep(0.001)
        server.report(Exited(sent.id, 0))  # again: the request is forgotten, so nobody hears it
        later = link.send(server.request)
        server.report(Exited(later.id, 3))
        assert await link.ended(later) == Ended(3)  # read after the repeated report
        assert seen == [Ended(0)]
        assert link.pending == {}
        link.close()

    run(scenario)


def test_a_callback_takes_the_end_of_a_request_lost_with_its_fork_server(server: FakeForkServer) -> None:

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: link.lose_pending())
        sent = link.send(server.request)
        seen: list[Ended] = []
        link.on_end(sent, seen.append)
        server.other.close()
        while not seen:
            await asyncio.sleep(0.001)
        assert seen == [Ended(SIGKILLED, server_died=True)]
        assert link.pending == {}

    run(scenario)


def test_a_callback_is_not_called_for_an_end_that_was_cancelled(server: FakeForkServer) -> None:

    async def scenario() -> None:
        link = link_to(server)
        link.listen(on_death=lambda dead: pytest.fail("the fork server is alive"))
        sent = link.send(server.request)
        seen: list[Ended] = []
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        link.on_end(sent, seen.append)
        sent.end.cancel()
        later = link.send(server.request)
        server.report(Exited(later.id, 0))
        assert await link.ended(later) == Ended(0)  # the cancelled end's callbacks ran before
        assert seen == [] and link.pending == {} and errors == []
        link.close()

    run(scenario)
