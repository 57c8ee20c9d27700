"""Reach programs that know nothing of socket activation (redis, nginx, PostgreSQL) through a
`proxy:` socket that sandboxd bound before any service started. The socket is not handed to the
program as LISTEN_FDS; the program binds its own address, and sandboxd reaches it one of two ways.

The handoff (handoff.py): the program's bind() of the proxy's address is answered with sandboxd's
bound socket; it then accepts on it itself, with nothing in between.

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
/proc/PID/net/{tcp,tcp6,unix} of the sandbox's init (host/listening.py), which shows the sandbox's
own network namespace, so no probe connection ever reaches the program (PostgreSQL would log each one).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import stat
from collections.abc import Awaitable

from sandboxd.daemon.console import Console
from sandboxd.daemon.forks import Ended, ForkServerLink
from sandboxd.daemon.restart import classify
from sandboxd.daemon.runtime import RunningStack, ServiceRuntime
from sandboxd.daemon.states import ALIVE, State
from sandboxd.daemon.tasks import Background
from sandboxd.errors import LaunchError
from sandboxd.host.facts import proxy_binary
from sandboxd.host.listening import listening
from sandboxd.kernel import linux
from sandboxd.sandbox.handle import read_status
from sandboxd.spec.model import Address, Socket, hands_off, holds_proxy_address

POLL_FIRST = 0.005  # seconds between looks while the program starts; growing to POLL_MAX
POLL_MAX = 0.1
WARN_AFTER = 30.0  # seconds without anything listening on a proxy address before saying so
NOBODY = 65534


def proxy_plan(sock: Socket, rt: ServiceRuntime) -> str:
    """What becomes of a `proxy:` socket, as the startup summary says it before the program
    binds anything: handed to the program at its bind(), forwarded, or either (the handoff when
    it binds the address with a socket like this one, else forwarding)."""
    if holds_proxy_address(sock):
        return f"given to the program when it binds {sock.proxy}"
    if rt.plan.intercept_bind and hands_off(sock, rt.spec):
        return f"given to the program if it binds {sock.proxy}, else forwarded to it"
    return f"forwarded to {sock.proxy}"


def proxy_target(target: Address, init_pid: int) -> str:
    """The address as systemd-socket-proxyd reads it, seen from the host's file system."""
    if target.path is not None:
        if target.is_abstract:
            return target.path
        return f"/proc/{init_pid}/root{target.path}"
    host = f"[{target.host}]" if ":" in str(target.host) else str(target.host)
    return f"{host}:{target.port}"


class Proxies:
    """Starts, for each running sandbox, one proxy per `proxy:` socket of its service, once the
    program listens (and is ready), and again should it end while the sandbox runs."""

    def __init__(self, running: RunningStack, link: ForkServerLink, tasks: Background, console: Console) -> None:
        self.running = running
        self.link = link
        self.tasks = tasks
        self.console = console
        self.started: dict[str, dict[str, int]] = {}  # service -> socket -> request id of its running proxy

    def start(self, rt: ServiceRuntime) -> None:
        """Its sandbox runs: watch each proxy's address until the program listens there. Not for a
        socket that holds the proxy's address in the program's namespace: what listens there is
        sandboxd's own socket, which the program gets at its bind() (the handoff, the only way)."""
        for sock in self.running.stack.sockets_of(rt.spec.name):
            if sock.proxy is not None and not holds_proxy_address(sock):
                self.tasks.spawn(self._proxy_while_running(rt, sock, rt.launch.id), "the proxy watch")

    def adopt(self, rt: ServiceRuntime, running: dict[str, int]) -> None:
        """After an upgrade in place (resume.py): each proxy socket watched again; a proxy the
        sandboxd before started (`running`: socket -> request id) forwards on, and its end is
        awaited under its request id, then it is started again as any proxy that ended."""
        for sock in self.running.stack.sockets_of(rt.spec.name):
            if sock.proxy is not None and not holds_proxy_address(sock):
                self.tasks.spawn(self._proxy_while_running(rt, sock, rt.launch.id, running.get(sock.name)), "the proxy watch")

    def _same_sandbox(self, rt: ServiceRuntime, launch_id: int) -> bool:
        return rt.launch.id == launch_id and rt.state in ALIVE and not self.running.stopping and rt.launch.pid > 0

    async def _proxy_while_running(self, rt: ServiceRuntime, sock: Socket, launch_id: int, adopted: int | None = None) -> None:
        assert sock.proxy is not None
        pid = rt.launch.pid
        delay, waited, warned, failures = POLL_FIRST, 0.0, False, 0
        if adopted is not None:  # started by the sandboxd this one was upgraded from
            status = await self._ended(rt, sock, adopted, self.link.adopt(adopted))
            failures += 1
            if not await self._pause_after(rt, sock, launch_id, classify(status)[1], failures):
                return
        while self._same_sandbox(rt, launch_id) and sock.name not in rt.handoff.handed_off:
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
            if sock.name in rt.handoff.handed_off:
                return  # the program has the socket itself
            self.console.note(f"{rt.spec.name}: {sock.proxy} listens; socket {sock.name} is forwarded to it")
            try:
                status = await self._run_proxy(rt, sock, pid)
                text = classify(status)[1]
            except OSError as e:
                text = f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e)
            failures += 1
            if not await self._pause_after(rt, sock, launch_id, text, failures):
                return
            delay = POLL_FIRST

    async def _pause_after(self, rt: ServiceRuntime, sock: Socket, launch_id: int, text: str, failures: int) -> bool:
        """A proxy ended (`text` says how): False if its sandbox is gone too, else True once it
        may be started again (a pause growing with the ends in a row)."""
        if not self._same_sandbox(rt, launch_id):
            return False
        pause = min(POLL_MAX * 2**failures, 5.0)
        self.console.note(f"{rt.spec.name}: the proxy of socket {sock.name} ended ({text}); starting it again in {pause:g} s")
        await asyncio.sleep(pause)
        return True

    async def _ended(self, rt: ServiceRuntime, sock: Socket, request_id: int, end: Awaitable[Ended]) -> int:
        """The wait status of the running proxy `request_id`, known as running until it ended
        (an upgrade carries it over: capture.py)."""
        self.started.setdefault(rt.spec.name, {})[sock.name] = request_id
        try:
            return (await end).status
        finally:
            del self.started[rt.spec.name][sock.name]

    async def _run_proxy(self, rt: ServiceRuntime, sock: Socket, pid: int) -> int:
        assert sock.proxy is not None
        # systemd-socket-proxyd (252) admits one connection more than --connections-max and closes
        # those beyond it; so N-1 gives at most N open connections (for N >= 2).
        argv = [proxy_binary(), f"--connections-max={max(1, sock.max_connections - 1)}", proxy_target(sock.proxy, pid)]
        fds = [self.running.sockets[(sock.name, index)].sock.fileno() for index in range(len(sock.listen))]
        uid = gid = NOBODY
        target_fd = -1
        if sock.proxy.path is not None and not sock.proxy.is_abstract:
            # The program's socket file, looked up inside the sandbox's root (a symlink the sandbox
            # made cannot lead to a socket of the host's), connected to as the service's user.
            target_fd = self._open_unix_target(rt, sock.proxy.path)
            ids = rt.plan.userns
            uid, gid = (ids.uid + rt.plan.uid, ids.gid + rt.plan.gid) if ids else (rt.plan.uid, rt.plan.gid)
        try:
            sent = self.link.send(
                lambda server, request_id: server.send_proxy(
                    request_id, rt.launch.pidfd, str(rt.cgroup.path), rt.cgroup.v1_tasks_files, argv, fds, rt.output.w, uid, gid, target_fd
                )
            )
        finally:
            if target_fd >= 0:
                os.close(target_fd)
        try:
            status = await self._ended(rt, sock, sent.id, self.link.ended(sent))
            try:
                _kind, _ = read_status(sent.channel, f"{rt.spec.name} (proxy)")
            except LaunchError as e:
                self.console.note(f"{rt.spec.name}: the proxy of socket {sock.name} could not start: {e.step}: {e.detail}")
            return status
        finally:
            sent.channel.close()

    def _open_unix_target(self, rt: ServiceRuntime, path: str) -> int:
        root = os.open(f"/proc/{rt.launch.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            signal.pidfd_send_signal(rt.launch.pidfd, 0)  # still the sandbox's init: the pid was not reused
            target = linux.open_in_root(root, path, os.O_PATH)
        finally:
            os.close(root)
        if not stat.S_ISSOCK(os.fstat(target).st_mode):
            os.close(target)
            raise OSError(errno.ENOTSOCK, "is not a socket in the sandbox", path)
        return target
