"""How many connections wait in a listening socket's accept queue: made by the kernel (the
handshake is done, connect() has returned) and not yet taken by accept().

sandboxd holds every listening socket, so it can ask the kernel about the very socket a service
accepts on (the same one, passed or handed off), without a probe reaching the program:

    TCP        getsockopt(TCP_INFO): on a listening socket, tcpi_unacked is the accept queue's
               length (sk_ack_backlog) and tcpi_sacked its bound (tcp_get_info in tcp.c)
    unix       sock_diag (NETLINK_SOCK_DIAG) for the socket's inode, with UDIAG_SHOW_RQLEN: on a
    stream,    listening socket, UNIX_DIAG_RQLEN's rqueue is the number of connections waiting
    seqpacket  (unix_diag.c); a unix socket's own ioctl(SIOCINQ) refuses listening ones
    datagram   nothing is accepted: no queue of connections (None)

The netlink socket is made in the caller's network namespace, where the kernel looks the inode
up: a unix socket created in another one (netns: service) is not found there (None).
"""

from __future__ import annotations

import os
import socket
import struct

TCP_INFO_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: 8 one-byte fields, then rto, ato, snd_mss, rcv_mss
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_RQLEN = 4
NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE, in each half: look the socket up by inode alone
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_UNIX_REQUEST = struct.Struct("=BBHIIIII")  # struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_UNIX_MESSAGE_SIZE = 16  # struct unix_diag_msg: family, type, state, pad, ino, cookie[2]


def accept_queue(sock: socket.socket) -> int | None:
    """Connections waiting in `sock`'s accept queue, or None where there is no such queue (a
    datagram socket) or the kernel does not say."""
    if sock.type not in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        return None
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            return int(struct.unpack_from("=I", info, TCP_INFO_UNACKED)[0])
        if sock.family == socket.AF_UNIX:
            return _unix_accept_queue(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    return None


def _unix_accept_queue(inode: int) -> int | None:
    """UNIX_DIAG_RQLEN's rqueue of the unix socket with `inode`, from one sock_diag request."""
    request = _UNIX_REQUEST.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, UDIAG_SHOW_RQLEN, NO_COOKIE, NO_COOKIE)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(1.0)
        diag.send(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request)
        answer = diag.recv(8192)
    if len(answer) < _HEADER.size:
        return None
    length, kind = _HEADER.unpack_from(answer)[:2]
    if kind != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: not found here (another namespace), or no unix_diag
    offset = _HEADER.size + _UNIX_MESSAGE_SIZE
    while offset + 4 <= min(length, len(answer)):
        size, attribute = struct.unpack_from("=HH", answer, offset)
        if size < 4:
            break
        if attribute == UNIX_DIAG_RQLEN and size >= 12:
            return int(struct.unpack_from("=I", answer, offset + 4)[0])
        offset += (size + 3) & ~3
    return None
