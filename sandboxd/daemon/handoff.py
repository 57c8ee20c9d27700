"""The handoff: a program that binds a `proxy:` socket's address itself gets sandboxd's bound
socket instead, and no proxy is needed (proxy.py says why and when).

The sandbox runs with a seccomp filter that passes every bind() to sandboxd (the listener comes
back with the launch status). When the address is the proxy's and the caller's socket has the
bound socket's family and type, sandboxd puts a copy of its socket at the caller's descriptor
(SECCOMP_IOCTL_NOTIF_ADDFD with SETFD, the caller's close-on-exec and non-blocking flags kept) and
lets bind() return 0; every other bind proceeds. The program then accepts on sandboxd's socket
itself: nothing in between, and clients that came early are in its queue.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct

from sandboxd.daemon.console import Console
from sandboxd.daemon.runtime import RunningStack, ServiceRuntime
from sandboxd.kernel import linux
from sandboxd.kernel.seccomp import BIND
from sandboxd.spec.model import Address, Socket, hands_off


def _program_address(raw: bytes) -> tuple[int, str | None, int | None, str | None]:
    """(family, host, port, path) of a struct sockaddr a program passed to bind()."""
    family = struct.unpack_from("H", raw)[0] if len(raw) >= 2 else 0
    if family == socket.AF_INET and len(raw) >= 8:
        return family, socket.inet_ntop(family, raw[4:8]), struct.unpack_from("!H", raw, 2)[0], None
    if family == socket.AF_INET6 and len(raw) >= 24:
        return family, socket.inet_ntop(family, raw[8:24]), struct.unpack_from("!H", raw, 2)[0], None
    if family == socket.AF_UNIX and len(raw) > 2:
        path = raw[2:]
        text = "@" + path[1:].decode(errors="replace") if path[:1] == b"\0" else path.split(b"\0")[0].decode(errors="replace")
        return family, None, None, text
    return family, None, None, None


def _matches(target: Address, host: str | None, port: int | None, path: str | None) -> bool:
    if target.path is not None:
        return path == target.path
    return host is not None and port == target.port and ipaddress.ip_address(host) == ipaddress.ip_address(str(target.host))


class BindHandoff:
    def __init__(self, running: RunningStack, console: Console) -> None:
        self.running = running
        self.console = console

    def watch(self, rt: ServiceRuntime, listener: int) -> None:
        """Answer the bind() calls of the sandbox's processes, from the filter's `listener`."""
        self.unwatch(rt)
        rt.handoff.listener = listener
        rt.handoff.handed_off = set()
        asyncio.get_running_loop().add_reader(listener, self._on_bind, rt)

    def unwatch(self, rt: ServiceRuntime) -> None:
        if rt.handoff.listener >= 0:
            asyncio.get_running_loop().remove_reader(rt.handoff.listener)
            os.close(rt.handoff.listener)
            rt.handoff.listener = -1

    def _on_bind(self, rt: ServiceRuntime) -> None:
        """A process of the sandbox called bind(): if it binds the address of a `proxy:` socket, with
        a socket of the same family and type, its descriptor is replaced by a copy of sandboxd's
        bound socket (with the caller's close-on-exec and non-blocking flags) and the call succeeds;
        anything else proceeds as it would have. Connections then go straight to the program, with
        no proxy in between, and those that came earlier are in the queue."""
        listener = rt.handoff.listener
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        events = poller.poll(0)
        if not events:
            return
        if not events[0][1] & select.POLLIN:
            self.unwatch(rt)  # every process of the filter is gone
            return
        try:
            note = linux.notif_receive(listener)
        except OSError:
            return  # the caller was interrupted or is gone
        try:
            chosen = self._bound_address_owner(rt, note) if note.nr == BIND else None
            if chosen is None or not linux.notif_still_valid(listener, note.id):
                linux.notif_answer(listener, note.id, proceed=True)
                return
            target_fd = int(note.args[0])
            cloexec, nonblocking = _caller_flags(note.pid, target_fd)
            ours = self.running.sockets[(chosen.name, 0)].sock
            flags = fcntl.fcntl(ours.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(ours.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK if nonblocking else flags & ~os.O_NONBLOCK)
            linux.notif_install_fd(listener, note.id, ours.fileno(), target_fd, cloexec)
            linux.notif_answer(listener, note.id, 0)
        except Exception as e:  # noqa: BLE001 - a bind left unanswered would hang the program
            try:
                linux.notif_answer(listener, note.id, error=e.errno if isinstance(e, OSError) and e.errno else errno.EIO)
            except OSError:
                pass
            return
        rt.handoff.handed_off.add(chosen.name)
        self.console.note(f"{rt.spec.name}: binds {chosen.proxy} itself; it gets socket {chosen.name} instead (no proxy)")

    def _bound_address_owner(self, rt: ServiceRuntime, note: linux.Notification) -> Socket | None:
        length = int(note.args[2])
        if not 0 < length <= 128:
            return None
        with open(f"/proc/{note.pid}/mem", "rb", buffering=0) as mem:
            raw = os.pread(mem.fileno(), length, int(note.args[1]))
        family, host, port, path = _program_address(raw)
        for sock in self.running.stack.sockets_of(rt.spec.name):
            if not hands_off(sock, rt.spec) or sock.proxy is None:
                continue
            bound = self.running.sockets[(sock.name, 0)].sock
            if bound.family == family and _matches(sock.proxy, host, port, path):
                return sock if _caller_type(note.pid, int(note.args[0])) == bound.type else None
        return None


PIDFD_THREAD = os.O_EXCL  # <linux/pidfd.h>: a pidfd of the thread itself (Linux 6.9)


def _pidfd_of_thread(tid: int) -> int:
    """A pidfd to take the calling thread's descriptor through: the notification names the
    thread that called bind(), which need not lead its thread group (pidfd_open refuses such an
    id without PIDFD_THREAD). Before Linux 6.9, its thread group's leader, whose descriptor
    table its threads share."""
    try:
        return os.pidfd_open(tid, PIDFD_THREAD)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    with open(f"/proc/{tid}/status") as f:
        leader = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
    return os.pidfd_open(leader)


def _caller_flags(pid: int, fd: int) -> tuple[bool, bool]:
    """(close-on-exec, non-blocking) of the caller's descriptor, from /proc/PID/fdinfo."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                value = int(line.split()[1], 8)
                return bool(value & os.O_CLOEXEC), bool(value & os.O_NONBLOCK)
    return False, False


def _caller_type(pid: int, fd: int) -> int:
    """The type (SOCK_STREAM, SOCK_DGRAM, ...) of the socket the caller binds: a UDP server on
    the proxy's address and port keeps its own socket."""
    pidfd = _pidfd_of_thread(pid)
    try:
        copy = linux.pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        theirs = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)  # not a socket (ENOTSOCK): socket() did not take the copy
        raise
    with theirs:
        return int(theirs.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
