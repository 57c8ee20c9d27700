"""Reach programs that know nothing of socket activation (redis, nginx, PostgreSQL) through a
`proxy:` socket that sandboxd bound before any service started. The socket is not handed to the
program as LISTEN_FDS; the program binds its own address, and sandboxd reaches it one of two ways.

The handoff: the sandbox runs with a seccomp filter that passes every bind() to sandboxd (the
listener comes back with the launch status). When the address is the proxy's and the caller's
socket has the bound socket's family and type, sandboxd puts a copy of its socket at the caller's
descriptor (SECCOMP_IOCTL_NOTIF_ADDFD with SETFD, the caller's close-on-exec and non-blocking flags
kept) and lets bind() return 0; every other bind proceeds. The program then accepts on sandboxd's
socket itself: nothing in between, and clients that came early are in its queue.

Forwarding, otherwise: once the address listens (and the service is ready, with a readiness check),
sandboxd starts systemd-socket-proxyd in the sandbox's cgroup and network namespace with the bound
socket as fd 3, and the proxy connects each accepted connection to the program's address. Why it and
not a proxy in the supervisor's event loop: a small, maintained C program made for exactly this,
moving bytes with splice(2); the supervisor's loop stays out of the data path, and the proxy's CPU
counts against the service. Not in the sandbox's pid namespace (a process there of the same uid
could open /proc/PID/root of the proxy, which is the host's root), not in its mount namespace (the
proxy is the host's program, so any image works); it ends with the sandbox's cgroup. It never has
capabilities: nobody for tcp targets; for a unix target the service's user, connecting through a
descriptor sandboxd opened inside the sandbox's root (so a symlink there leads nowhere on the host).

Why wait for the program to listen instead of retrying connections: systemd-socket-proxyd drops a
client whose connection to the target is refused. Whether the target listens is read from
/proc/PID/net/{tcp,tcp6,unix} of the sandbox's init, which shows the sandbox's own network
namespace, so no probe connection ever reaches the program (PostgreSQL would log each one).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import os
import select
import shutil
import signal
import socket
import stat
import struct
from pathlib import Path

from sandboxd.kernel import linux
from sandboxd.errors import HostError, LaunchError
from sandboxd.sandbox.handle import read_status
from sandboxd.kernel.seccomp import BIND
from sandboxd.daemon.runtime import ALIVE, ServiceRuntime, State, SupervisorBase
from sandboxd.spec.model import Address, Socket, hands_off

_CANDIDATES = ("/usr/lib/systemd/systemd-socket-proxyd", "/lib/systemd/systemd-socket-proxyd")
TCP_LISTEN = "0A"
UNIX_LISTENING = 1 << 16  # __SO_ACCEPTCON in the Flags column of /proc/net/unix
POLL_FIRST = 0.005  # seconds between looks while the program starts; growing to POLL_MAX
POLL_MAX = 0.1
WARN_AFTER = 30.0  # seconds without anything listening on a proxy address before saying so
NOBODY = 65534


def proxy_binary() -> str:
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("systemd-socket-proxyd")
    if found:
        return found
    raise HostError("sockets with proxy: need systemd-socket-proxyd, which is not installed", "apt-get install systemd (it ships the proxy)")


def _hex(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How /proc/net/tcp{,6} writes an address: host byte order within each 32-bit word."""
    packed = ip.packed
    return "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))


def _listen_forms(host: str, port: int) -> dict[str, set[str]]:
    """The local addresses, per table, of a listening socket that accepts connections to host:port:
    the address itself, or any address (0.0.0.0, ::); for IPv4 also a dual-stack IPv6 socket."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        v4 = {_hex(ip), _hex(ipaddress.IPv4Address(0))}
        v6 = {_hex(mapped), _hex(ipaddress.IPv6Address(0))}
        return {"tcp": {f"{a}:{port:04X}" for a in v4}, "tcp6": {f"{a}:{port:04X}" for a in v6}}
    return {"tcp6": {f"{a}:{port:04X}" for a in {_hex(ip), _hex(ipaddress.IPv6Address(0))}}}


def listening(pid: int, target: Address) -> bool:
    """Whether `target` listens in the network namespace of process `pid`. Raises OSError once the
    process is gone."""
    if target.path is not None:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == target.path and int(fields[3], 16) & UNIX_LISTENING:
                    return True
        return False
    assert target.host is not None and target.port is not None
    for table, wanted in _listen_forms(target.host, target.port).items():
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == TCP_LISTEN and fields[1] in wanted:
                        return True
        except FileNotFoundError:
            if not Path(f"/proc/{pid}").exists():
                raise
    return False


def proxy_target(target: Address, init_pid: int) -> str:
    """The address as systemd-socket-proxyd reads it, seen from the host's file system."""
    if target.path is not None:
        if target.is_abstract:
            return target.path
        return f"/proc/{init_pid}/root{target.path}"
    host = f"[{target.host}]" if ":" in str(target.host) else str(target.host)
    return f"{host}:{target.port}"


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


class Proxies(SupervisorBase):
    """Starts, for each running sandbox, one proxy per `proxy:` socket of its service; or, when the
    program binds the proxy's address itself, gives it the bound socket instead (the handoff)."""

    # ── the handoff: the program's bind() answered with sandboxd's socket ──

    def _watch_binds(self, rt: ServiceRuntime, listener: int) -> None:
        self._unwatch_binds(rt)
        rt.bind_listener = listener
        rt.handed_off = set()
        asyncio.get_running_loop().add_reader(listener, self._on_bind, rt)

    def _unwatch_binds(self, rt: ServiceRuntime) -> None:
        if rt.bind_listener >= 0:
            asyncio.get_running_loop().remove_reader(rt.bind_listener)
            os.close(rt.bind_listener)
            rt.bind_listener = -1

    def _on_bind(self, rt: ServiceRuntime) -> None:
        """A process of the sandbox called bind(): if it binds the address of a `proxy:` socket, with
        a socket of the same family and type, its descriptor is replaced by a copy of sandboxd's
        bound socket (with the caller's close-on-exec and non-blocking flags) and the call succeeds;
        anything else proceeds as it would have. Connections then go straight to the program, with
        no proxy in between, and those that came earlier are in the queue."""
        listener = rt.bind_listener
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        events = poller.poll(0)
        if not events:
            return
        if not events[0][1] & select.POLLIN:
            self._unwatch_binds(rt)  # every process of the filter is gone
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
            cloexec, nonblocking = self._caller_flags(note.pid, target_fd)
            ours = self.sockets[(chosen.name, 0)].sock
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
        rt.handed_off.add(chosen.name)
        self.console.note(f"{rt.spec.name}: binds {chosen.proxy} itself; it gets socket {chosen.name} instead (no proxy)")

    @staticmethod
    def _caller_flags(pid: int, fd: int) -> tuple[bool, bool]:
        """(close-on-exec, non-blocking) of the caller's descriptor, from /proc/PID/fdinfo."""
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    value = int(line.split()[1], 8)
                    return bool(value & os.O_CLOEXEC), bool(value & os.O_NONBLOCK)
        return False, False

    def _bound_address_owner(self, rt: ServiceRuntime, note: linux.Notification) -> Socket | None:
        length = int(note.args[2])
        if not 0 < length <= 128:
            return None
        with open(f"/proc/{note.pid}/mem", "rb", buffering=0) as mem:
            raw = os.pread(mem.fileno(), length, int(note.args[1]))
        family, host, port, path = _program_address(raw)
        for sock in self.stack.sockets_of(rt.spec.name):
            if not hands_off(sock, rt.spec) or sock.proxy is None:
                continue
            bound = self.sockets[(sock.name, 0)].sock
            if bound.family == family and _matches(sock.proxy, host, port, path):
                return sock if self._caller_type(note.pid, int(note.args[0])) == bound.type else None
        return None

    @staticmethod
    def _caller_type(pid: int, fd: int) -> int:
        """The type (SOCK_STREAM, SOCK_DGRAM, ...) of the socket the caller binds: a UDP server on
        the proxy's address and port keeps its own socket."""
        pidfd = os.pidfd_open(pid)
        try:
            copy = linux.pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        with socket.socket(fileno=copy) as theirs:
            return int(theirs.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))

    # ── the proxy ──

    def _start_proxies(self, rt: ServiceRuntime) -> None:
        for sock in self.stack.sockets_of(rt.spec.name):
            if sock.proxy is not None:
                task = asyncio.ensure_future(self._proxy_while_running(rt, sock, rt.launch_id))
                self.proxy_tasks.add(task)
                task.add_done_callback(self._proxy_task_done)

    def _proxy_task_done(self, task: asyncio.Future[None]) -> None:
        self.proxy_tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.console.note(f"the proxy watch failed: {error!r}")

    def _same_sandbox(self, rt: ServiceRuntime, launch_id: int) -> bool:
        return rt.launch_id == launch_id and rt.state in ALIVE and not self.stopping and rt.pid > 0

    async def _proxy_while_running(self, rt: ServiceRuntime, sock: Socket, launch_id: int) -> None:
        assert sock.proxy is not None
        pid = rt.pid
        delay, waited, warned, failures = POLL_FIRST, 0.0, False, 0
        while self._same_sandbox(rt, launch_id) and sock.name not in rt.handed_off:
            try:
                # With a readiness check, connections wait for it too: a program may listen a
                # moment before it serves (PostgreSQL: "the database system is starting up").
                if (rt.spec.ready != "started" and rt.state is not State.READY) or not listening(pid, sock.proxy):
                    await asyncio.sleep(delay)
                    waited += delay
                    delay = min(delay * 1.5, POLL_MAX)
                    if waited > WARN_AFTER and not warned:
                        warned = True
                        self.console.note(f"{rt.spec.name}: not forwarding to {sock.proxy} after {WARN_AFTER:g} s (not listening, or not ready); socket {sock.name} holds its clients until then")
                    continue
            except OSError:
                return  # the sandbox is gone
            if sock.name in rt.handed_off:
                return  # the program has the socket itself
            self.console.note(f"{rt.spec.name}: {sock.proxy} listens; socket {sock.name} is forwarded to it")
            try:
                status = await self._run_proxy(rt, sock, pid)
                text = f"wait status {status}"
            except OSError as e:
                text = f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e)
            if not self._same_sandbox(rt, launch_id):
                return
            failures += 1
            pause = min(POLL_MAX * 2**failures, 5.0)
            self.console.note(f"{rt.spec.name}: the proxy of socket {sock.name} ended ({text}); starting it again in {pause:g} s")
            await asyncio.sleep(pause)
            delay = POLL_FIRST

    async def _run_proxy(self, rt: ServiceRuntime, sock: Socket, pid: int) -> int:
        assert self.fork_server is not None and sock.proxy is not None
        # systemd-socket-proxyd (252) admits one connection more than --connections-max and closes
        # those beyond it; so N-1 gives at most N open connections (for N >= 2).
        argv = [proxy_binary(), f"--connections-max={max(1, sock.max_connections - 1)}", proxy_target(sock.proxy, pid)]
        fds = [self.sockets[(sock.name, index)].sock.fileno() for index in range(len(sock.listen))]
        uid = gid = NOBODY
        target_fd = -1
        if sock.proxy.path is not None and not sock.proxy.is_abstract:
            # The program's socket file, looked up inside the sandbox's root (a symlink the sandbox
            # made cannot lead to a socket of the host's), connected to as the service's user.
            target_fd = self._open_unix_target(rt, sock.proxy.path)
            ids = rt.plan.userns
            uid, gid = (ids.uid + rt.plan.uid, ids.gid + rt.plan.gid) if ids else (rt.plan.uid, rt.plan.gid)
        launch_id = self.fork_server.next_id()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.commands[launch_id] = done
        try:
            channel = self.fork_server.send_proxy(
                launch_id, rt.pidfd, str(rt.cgroup.path), rt.cgroup.extra_procs_files, argv, fds, rt.output_w, uid, gid, target_fd
            )
        except OSError:
            self.commands.pop(launch_id, None)
            raise
        finally:
            if target_fd >= 0:
                os.close(target_fd)
        try:
            status = await done
            try:
                _kind, _ = read_status(channel, f"{rt.spec.name} (proxy)")
            except LaunchError as e:
                self.console.note(f"{rt.spec.name}: the proxy of socket {sock.name} could not start: {e.step}: {e.detail}")
            return status
        finally:
            self.commands.pop(launch_id, None)
            channel.close()

    def _open_unix_target(self, rt: ServiceRuntime, path: str) -> int:
        root = os.open(f"/proc/{rt.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            signal.pidfd_send_signal(rt.pidfd, 0)  # still the sandbox's init: the pid was not reused
            target = linux.open_in_root(root, path, os.O_PATH)
        finally:
            os.close(root)
        if not stat.S_ISSOCK(os.fstat(target).st_mode):
            os.close(target)
            raise OSError(errno.ENOTSOCK, "is not a socket in the sandbox", path)
        return target
