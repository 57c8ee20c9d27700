"""What the control socket asks of a running stack (control.Verbs): status, stop, start, kill,
exec, reload, down, and applying a changed spec (reload.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.daemon.console import Console
from sandboxd.daemon.forks import ForkServerLink
from sandboxd.daemon.lifecycle import Lifecycle
from sandboxd.daemon.resources import StackResources
from sandboxd.daemon.runtime import RunningStack, ServiceRuntime, command_env
from sandboxd.daemon.states import ALIVE, State
from sandboxd.daemon.stopping import Stopper, signal_init
from sandboxd.host.cgroups import Cgroup
from sandboxd.host.identity import lookup_identity
from sandboxd.wire import ApplyResult, ExecInfo, ServiceStatus, ServiceUsage, SocketQueue, SocketStatus, StackStatus

if TYPE_CHECKING:
    from sandboxd.daemon.reload import Reload


class Operations:
    def __init__(
        self,
        running: RunningStack,
        resources: StackResources,
        lifecycle: Lifecycle,
        stopper: Stopper,
        link: ForkServerLink,
        reload: Callable[[], Reload],  # makes the one Reload, at the first: its modules wait until then
        console: Console,
        stop_requested: asyncio.Event,
    ) -> None:
        self.running = running
        self.resources = resources
        self.lifecycle = lifecycle
        self.stopper = stopper
        self.link = link
        self.make_reload = reload
        self.reload: Reload | None = None
        self.console = console
        self.stop_requested = stop_requested
        self.started_wall = time.time()
        self.exec_count = 0  # `sandboxd exec` commands so far: each gets a cgroup sbd-exec-N of its own
        self.sessions: set[str] = set()  # the cgroups of the `sandboxd exec` commands running now
        self.busy = 0  # verbs under way that await something (an upgrade waits for them: upgrade.py)
        self.upgrader: Callable[[str, int | None], Awaitable[str]] | None = None  # upgrade.py's Upgrade.request

    @property
    def instance(self) -> str:
        return self.running.instance

    def knows(self, name: str) -> bool:
        return name in self.running.services

    def status(self, names: list[str]) -> StackStatus:
        services = self.running.services
        chosen = [services[n] for n in names] if names else list(services.values())
        record = self.resources.record
        return {
            "stack": self.running.instance,
            "folder": str(self.running.stack.folder),
            "pid": os.getpid(),
            "started": self.started_wall,
            "userns": record.userns if record is not None else {},  # root inside is host uid `uid`
            "services": [self._status_of(rt) for rt in chosen],
        }

    def usage(self, names: list[str]) -> list[ServiceUsage]:
        """I/O and network bytes of the services named (all if none), for `sandboxd stats`."""
        from sandboxd.daemon.usage import service_usage

        services = self.running.services
        return [service_usage(rt) for rt in ([services[n] for n in names] if names else services.values())]

    def knows_socket(self, name: str) -> bool:
        return any(sock.name == name for sock in self.running.stack.sockets)

    def queues(self, sockets: list[str]) -> list[SocketQueue]:
        """The accept queue of every listening socket of the units named (all if none): what
        `Stack.wait_for_accept` watches, asked of the sockets sandboxd holds (host/queues.py)."""
        from sandboxd.host.queues import accept_queue

        found: list[SocketQueue] = []
        for (name, index), bound in sorted(self.running.sockets.items()):
            if sockets and name not in sockets:
                continue
            entry: SocketQueue = {"socket": name, "index": index, "address": bound.real_address(), "service": self.running.socket_unit(name).service}
            if (queued := accept_queue(bound.sock)) is not None:
                entry["queued"] = queued
            found.append(entry)
        return found

    def _status_of(self, rt: ServiceRuntime) -> ServiceStatus:
        sockets: list[SocketStatus] = []
        for key in rt.plan.fd_sockets + rt.plan.proxied:
            unit = self.running.socket_unit(key[0])
            entry: SocketStatus = {"socket": unit.name, "address": self.running.sockets[key].real_address(), "fdname": unit.fdname, "netns": unit.netns}
            if unit.proxy is not None:
                entry["proxy"] = str(unit.proxy)
            sockets.append(entry)
        stats = rt.cgroup.stats()
        alive = rt.state in (State.RUNNING, State.READY, State.RELOADING, State.STOPPING)
        broken = rt.state in (State.FAILED, State.BACKOFF)
        status: ServiceStatus = {
            "name": rt.spec.name,
            "state": rt.state.label,
            "pid": rt.launch.pid if alive else 0,
            "uptime": round(time.monotonic() - rt.launch.started_at, 3) if alive else 0,
            "restarts": rt.restarts.count,
            "ready": rt.state in (State.READY,) or (rt.state is State.RUNNING and rt.spec.ready == "started"),
            "status_text": rt.notify.status_text,
            "sockets": sockets,
            "memory": stats.get("memory_current", 0),
            "cpu_seconds": round(stats["cpu_usec"] / 1e6, 3),
            "processes": stats["processes"],
            "instances": rt.connections.active,
            "reason": rt.reason if broken else "",
        }
        ended = rt.launch.exit
        if broken and ended is not None:
            if ended.code is not None:
                status["exit_code"] = ended.code
            if ended.signal is not None:
                status["signal"] = ended.signal
        return status

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    async def upgrade(self, token: str, record_format: int | None) -> str:
        """Execute the installed sandboxd in this process (upgrade.py): "" once accepted, else why not."""
        assert self.upgrader is not None
        return await self.upgrader(token, record_format)

    async def stop_service(self, name: str) -> None:
        with self._working():
            await self.stopper.stop_by_hand(self.running.services[name])

    def start_service(self, name: str) -> None:
        self.lifecycle.start_by_hand(self.running.services[name])

    async def restart_service(self, name: str) -> None:
        """Stop, then start; the stack is held meanwhile (a foreground stack whose services are all
        stopped for a moment would otherwise end)."""
        rt = self.running.services[name]
        with self.lifecycle.dependencies.held(), self._working():
            await self.stopper.stop_by_hand(rt)
            self.lifecycle.start_by_hand(rt)

    def kill_service(self, name: str, signame: str) -> None:
        rt = self.running.services[name]
        sig = signal.Signals[signame if signame.startswith("SIG") else f"SIG{signame}"]
        if rt.state in ALIVE:
            signal_init(rt.launch.pidfd, rt.cgroup, sig)

    def request_down(self) -> None:
        self.stop_requested.set()

    async def apply_folder(self, folder: str, env: list[str], variables: dict[str, str] | None = None, listen: list[str] | None = None) -> ApplyResult:
        with self._working():
            if self.reload is None:
                self.reload = self.make_reload()
            return await self.reload.apply_folder(folder, env, variables, listen)

    def exec_info(self, name: str, user: str = "", session: bool = False) -> ExecInfo:
        """What `sandboxd exec` needs to run a command confined as the service is. With `user`
        (`sandboxd exec -u USER[:GROUP]`), its ids, names looked up as the spec's `user:` is.
        With `session`, a cgroup of the command's own below the service's (`exec_cgroup`), which
        `end_exec` empties and removes when the asking connection closes."""
        rt = self.running.services[name]
        if rt.state not in (State.RUNNING, State.READY, State.RELOADING) or not rt.launch.pid:
            raise ValueError(f"service {name!r} is not running ({rt.state.label})")
        uid, gid = rt.plan.uid, rt.plan.gid
        if user:
            root = rt.plan.mounts[0] if rt.plan.mounts else None
            rootfs = root.source if root is not None and root.kind == "image-root" else ""
            name_part, _, group_part = user.partition(":")
            uid, gid, problems = lookup_identity(name_part, group_part, rootfs, f"image '{rt.spec.image}'" if rootfs else "host")
            if problems:
                raise ValueError(f"{name}: -u {user}: " + "; ".join(message for _key, message in problems))
        info: ExecInfo = {
            "init_pid": rt.launch.pid,
            "cgroup": str(rt.cgroup.path),
            "cgroup_tasks": list(rt.cgroup.v1_tasks_files),
            "capabilities": list(rt.plan.capabilities),
            "seccomp_filter": rt.plan.seccomp_filter,
            "uid": uid,
            "gid": gid,
            "env": [[key, value] for key, value in command_env(rt).items()],
            "workdir": rt.plan.workdir,
        }
        if not session:
            return info
        self.exec_count += 1
        exec_cgroup = rt.cgroup.path / f"sbd-exec-{self.exec_count}"
        exec_cgroup.mkdir()
        self.sessions.add(f"{name}: sbd-exec-{self.exec_count}")
        return {"exec_cgroup": str(exec_cgroup), **info}  # its key first, as it always was on the wire

    async def end_exec(self, path: str) -> None:
        """The CLI of a `sandboxd exec` is gone (it ended, or was killed, even by SIGKILL): what
        is left of its command gets SIGHUP, and whatever is still there after HANGUP_GRACE is
        killed; then its cgroup is removed. Nothing of the command outlives its CLI by more."""
        from sandboxd.sandbox.relay import HANGUP_GRACE

        cgroup = Cgroup(Path(path))
        self.sessions.discard(f"{cgroup.path.parent.name}: {cgroup.path.name}")
        if cgroup.populated():
            for pid in cgroup.pids():
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + HANGUP_GRACE
            while cgroup.populated() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        cgroup.kill()
        deadline = time.monotonic() + 5.0
        while cgroup.populated() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            cgroup.remove()
        except OSError as e:
            self.console.note(f"exec: could not remove {path}: {e.strerror}")

    async def reload_service(self, name: str) -> str:
        """The service's own reload: its reload_signal to the main process; with ready: notify, wait
        for RELOADING=1 and READY=1 (up to start_timeout). Returns an error text, or ""."""
        with self._working():
            return await self._reload_service(name)

    async def _reload_service(self, name: str) -> str:
        rt = self.running.services[name]
        if rt.state not in (State.RUNNING, State.READY):
            return f"{name} is not running ({rt.state.label})"
        if rt.spec.reload:
            self.console.note(f"{name}: reload: running {' '.join(rt.spec.reload)} inside its sandbox")
            status = await self.link.run_inside(rt, list(rt.spec.reload), rt.spec.start_timeout, rt.output.w)
            if status is None:
                return f"{name}: the reload command did not finish within {rt.spec.start_timeout:g} s"
            if os.waitstatus_to_exitcode(status) != 0:
                return f"{name}: the reload command failed (exit code {os.waitstatus_to_exitcode(status)})"
        else:
            self.console.note(f"{name}: reload: sending {signal.Signals(rt.spec.reload_signal).name}")
            signal_init(rt.launch.pidfd, rt.cgroup, rt.spec.reload_signal)
        if rt.spec.ready != "notify":
            return ""
        deadline = time.monotonic() + rt.spec.start_timeout
        seen_reloading = False
        while time.monotonic() < deadline:
            state = self.running.services[name].state  # changes while we wait
            seen_reloading = seen_reloading or state is State.RELOADING
            if seen_reloading and state is State.READY:
                return ""
            if state not in (State.READY, State.RELOADING):
                return f"{name} stopped while reloading ({state.label})"
            await asyncio.sleep(0.01)
        return f"{name} did not finish reloading within {rt.spec.start_timeout:g} s"
