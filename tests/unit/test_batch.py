"""A stack's launches go to the fork server as batches (protocol.py `encode_batch`, `unbatch`;
handle.py `hold_back`, `send_held`): each request comes out as it went in, with its own
descriptors, in as few messages as the descriptor and size limits allow."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from sandboxd.sandbox.handle import ForkServer
from sandboxd.sandbox.protocol import BATCH_FDS, HoldDescriptors, ProtocolError, RunCommand, decode_request, encode, encode_batch, unbatch


def test_a_batch_gives_back_each_request_with_its_own_descriptors() -> None:
    parts = [encode(HoldDescriptors(2)), encode(HoldDescriptors(0)), encode(HoldDescriptors(1))]
    message = encode_batch([(parts[0], 2), (parts[1], 0), (parts[2], 1)])
    assert unbatch(message, [10, 11, 12]) == [(parts[0], [10, 11]), (parts[1], []), (parts[2], [12])]


def test_a_message_that_is_no_batch_is_itself_alone() -> None:
    data = encode(HoldDescriptors(1))
    assert unbatch(data, [7]) == [(data, [7])]


@pytest.mark.parametrize(
    "message, fds",
    [
        (encode_batch([(b"{}", 1)]), []),  # a descriptor short
        (encode_batch([(b"{}", 0)]) + b"x", []),  # a byte more than it says
        (b'{"type":"batch","arg":{"sizes":[2]}}\n{}', []),  # no counts of descriptors
        (b'{"type":"batch","arg":{"sizes":[-1],"fds":[0]}}\n', []),
        (b'{"type":"batch","arg":{"sizes":[2],"fds":[0]}}', []),  # no end of its head
        (b'{"type":"batch","arg":nope}\n', []),
    ],
)
def test_a_batch_that_does_not_hold_what_it_says_is_refused(message: bytes, fds: list[int]) -> None:
    with pytest.raises(ProtocolError):
        unbatch(message, fds)


@pytest.fixture
def pair() -> Iterator[tuple[ForkServer, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ForkServer(ours, 0), theirs
    ours.close()
    theirs.close()


def _messages(sock: socket.socket) -> list[tuple[bytes, list[int]]]:
    sock.setblocking(False)
    got = []
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 256)
        except BlockingIOError:
            return got
        got.append((data, fds))


def _exec(server: ForkServer, request_id: int, output: int) -> socket.socket:
    return server.send_exec(request_id, 1, "/sys/fs/cgroup/x", ["true"], {}, "/", output_fd=output)


def _close(messages: list[tuple[bytes, list[int]]], channels: list[socket.socket]) -> None:
    for _data, fds in messages:
        for fd in fds:
            os.close(fd)
    for channel in channels:
        channel.close()


def test_requests_held_back_go_as_one_message_each_with_its_own_status_channel(pair: tuple[ForkServer, socket.socket]) -> None:
    server, far = pair
    output = os.open("/dev/null", os.O_WRONLY)
    try:
        server.hold_back()
        channels = [_exec(server, n, output) for n in range(1, 31)]
        assert _messages(far) == []  # nothing is sent before send_held
        server.send_held()
        messages = _messages(far)
        assert len(messages) == 1
        requests = [(decode_request(data), fds) for data, fds in unbatch(*messages[0])]
        assert [r.id for r, _ in requests if isinstance(r, RunCommand)] == list(range(1, 31))
        for (request, fds), channel in zip(requests, channels):
            assert len(fds) == 2  # its status channel and its output
            os.write(fds[0], b"hello %d" % request.id if isinstance(request, RunCommand) else b"")
            assert channel.recv(64) == b"hello %d" % request.id if isinstance(request, RunCommand) else b""
            for fd in fds:
                os.close(fd)
            channel.close()
        server.send_held()  # nothing held: nothing sent
        assert _messages(far) == []
    finally:
        os.close(output)


def test_a_batch_is_cut_at_the_kernels_limit_of_descriptors(pair: tuple[ForkServer, socket.socket]) -> None:
    server, far = pair
    output = os.open("/dev/null", os.O_WRONLY)
    count = BATCH_FDS  # two descriptors each: two messages
    try:
        server.hold_back()
        channels = [_exec(server, n, output) for n in range(count)]
        server.send_held()
        messages = _messages(far)
        assert len(messages) == 2
        assert all(len(fds) <= BATCH_FDS for _, fds in messages)
        assert sum(len(unbatch(*m)) for m in messages) == count
        _close(messages, channels)
    finally:
        os.close(output)


def test_without_hold_back_each_request_is_a_message_of_its_own(pair: tuple[ForkServer, socket.socket]) -> None:
    server, far = pair
    output = os.open("/dev/null", os.O_WRONLY)
    try:
        channels = [_exec(server, n, output) for n in range(3)]
        messages = _messages(far)
        assert [len(unbatch(*m)) for m in messages] == [1, 1, 1]
        _close(messages, channels)
    finally:
        os.close(output)
