"""Readiness, start timeout, watchdog, sd_notify messages, health checks and the fd store."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import signal
import time

from sandboxd.errors import LaunchError
from sandboxd.sandbox.handle import read_status
from sandboxd.daemon.notify import Message, host_pid, main_pid_of
from sandboxd.plan.launch import LaunchPlan
from sandboxd.daemon.restart import Outcome, classify
from sandboxd.daemon.runtime import (
    ALIVE,
    FDSTORE_POLL,
    HEALTH_FIRST_CHECK,
    ServiceRuntime,
    State,
    StoredFd,
    SupervisorBase,
    command_env,
)
from sandboxd.spec.model import HealthCheck


class Readiness(SupervisorBase):
    # ── readiness, start timeout and watchdog (sd_notify) ──

    def _arm_timers(self, rt: ServiceRuntime) -> None:
        loop = asyncio.get_running_loop()
        if rt.spec.ready != "started" and rt.spec.start_timeout > 0:
            rt.start_timer = loop.call_later(rt.spec.start_timeout, self._on_start_timeout, rt)
        if isinstance(rt.spec.ready, HealthCheck):
            rt.health_failures = 0
            rt.health_timer = loop.call_later(HEALTH_FIRST_CHECK, self._run_health_check, rt)
        if rt.spec.watchdog > 0:
            rt.watchdog_timer = loop.call_later(rt.spec.watchdog, self._on_watchdog, rt)
        self._arm_idle_check(rt)

    def _disarm_timers(self, rt: ServiceRuntime) -> None:
        for timer in (rt.start_timer, rt.watchdog_timer, rt.idle_timer, rt.health_timer):
            if timer is not None:
                timer.cancel()
        rt.start_timer = rt.watchdog_timer = rt.idle_timer = rt.health_timer = None

    def _on_start_timeout(self, rt: ServiceRuntime) -> None:
        rt.start_timer = None
        if rt.state is State.RUNNING:
            self._kill_for(rt, "timeout", f"not ready within start_timeout ({rt.spec.start_timeout:g} s)", rt.spec.stop_signal)

    def _on_watchdog(self, rt: ServiceRuntime) -> None:
        rt.watchdog_timer = None
        if rt.state in (State.RUNNING, State.READY, State.RELOADING):
            self._kill_for(rt, "watchdog", f"watchdog timeout: no WATCHDOG=1 within {rt.spec.watchdog:g} s", signal.SIGABRT)

    def _kill_for(self, rt: ServiceRuntime, outcome: Outcome, why: str, sig: int) -> None:
        """Stop a service that failed while running; its exit is then judged as `outcome`."""
        self.console.note(f"{rt.spec.name}: {why}; sending {signal.Signals(sig).name}")
        rt.kill_reason = (outcome, why)
        self._disarm_timers(rt)
        self._signal_init(rt, sig)

        def kill_after_timeout() -> None:
            if rt.kill_reason is not None and rt.state in ALIVE:
                rt.cgroup.kill()

        rt.timer = asyncio.get_running_loop().call_later(rt.spec.stop_timeout, kill_after_timeout)

    def _signal_init(self, rt: ServiceRuntime, sig: int) -> None:
        try:
            if rt.pidfd >= 0:
                signal.pidfd_send_signal(rt.pidfd, sig)
            else:
                rt.cgroup.kill()
        except ProcessLookupError:
            pass

    def _on_notify(self, rt: ServiceRuntime) -> None:
        assert rt.notify is not None
        while (message := rt.notify.receive()) is not None:
            try:
                if self._may_notify(rt, message.pid):
                    self._apply_notify(rt, message.fields)
                    if message.fields.get("FDSTOREREMOVE") == "1":
                        self._fdstore_remove(rt, message.fields.get("FDNAME", "stored"))
                    if message.fields.get("FDSTORE") == "1" and message.fds:
                        self._fdstore_add(rt, message)
            finally:
                message.close_fds()  # what was not stored; BARRIER=1's descriptor is answered by closing it

    # ── health checks: a command inside the sandbox ──

    def _run_health_check(self, rt: ServiceRuntime) -> None:
        rt.health_timer = None
        check = rt.spec.ready
        assert isinstance(check, HealthCheck)
        if rt.state not in (State.RUNNING, State.READY) or rt.health_running or not rt.pid:
            return
        rt.health_running = True
        asyncio.ensure_future(self._health_probe(rt, check))

    async def _health_probe(self, rt: ServiceRuntime, check: HealthCheck) -> None:
        status = await self._run_inside(rt, list(check.exec), check.timeout)
        rt.health_running = False
        if rt.state not in (State.RUNNING, State.READY):
            return
        if status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            rt.health_failures = 0
            if rt.state is State.RUNNING:
                if rt.start_timer is not None:
                    rt.start_timer.cancel()
                    rt.start_timer = None
                self._transition(rt, State.READY, f"health check passed after {time.monotonic() - rt.started_at:.3f} s")
        elif rt.state is State.READY:
            rt.health_failures += 1
            text = classify(status)[1] if status is not None else f"no answer within {check.timeout:g} s"
            self.console.note(f"{rt.spec.name}: health check failed ({text}), {rt.health_failures} of {check.retries}")
            if rt.health_failures >= check.retries:
                self._kill_for(rt, "watchdog", f"unhealthy: health check failed {check.retries} times in a row", rt.spec.stop_signal)
                return
        delay = check.interval if rt.state is State.READY else min(check.interval, HEALTH_FIRST_CHECK * 2)
        rt.health_timer = asyncio.get_running_loop().call_later(delay, self._run_health_check, rt)

    async def _run_inside(self, rt: ServiceRuntime, argv: list[str], timeout: float, output_fd: int = -1) -> int | None:
        """Run a command inside a running sandbox (its namespaces, cgroups and confinement) and wait
        for its wait status; None if it did not end within `timeout` (it is then killed)."""
        assert self.fork_server is not None
        launch_id = self.fork_server.next_id()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.commands[launch_id] = done
        channel = self.fork_server.send_exec(
            launch_id, rt.pid, str(rt.cgroup.path), argv, command_env(rt), rt.plan.workdir,
            rt.plan.capabilities, rt.plan.seccomp_filter, rt.plan.uid, rt.plan.gid, output_fd, rt.cgroup.extra_procs_files,
        )
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            try:
                _kind, launched = read_status(channel, argv[0])
            except LaunchError:
                launched = None
            if launched is not None and launched.pidfd >= 0:
                signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)  # the command dies with it
                os.close(launched.pidfd)
            return None
        finally:
            self.commands.pop(launch_id, None)
            channel.close()

    # ── the fd store ──

    def _fdstore_add(self, rt: ServiceRuntime, message: Message) -> None:
        name = message.fields.get("FDNAME", "stored")
        poll = message.fields.get("FDPOLL", "1") != "0"
        known = {(st.st_dev, st.st_ino) for st in (os.fstat(s.fd) for s in rt.fdstore)}
        for fd in list(message.fds):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in known:
                continue  # the same open file twice: kept once, as systemd does
            if len(rt.fdstore) >= rt.spec.fdstore_max:
                self.console.note(f"{rt.spec.name}: fd store full (fdstore_max {rt.spec.fdstore_max}); descriptor dropped")
                break
            message.fds.remove(fd)
            rt.fdstore.append(StoredFd(name, fd, poll))
            known.add((st.st_dev, st.st_ino))
        if rt.fdstore and rt.fdstore_timer is None:
            rt.fdstore_timer = asyncio.get_running_loop().call_later(FDSTORE_POLL, self._fdstore_poll, rt)

    def _fdstore_remove(self, rt: ServiceRuntime, name: str) -> None:
        for stored in [s for s in rt.fdstore if s.name == name]:
            os.close(stored.fd)
            rt.fdstore.remove(stored)

    def _fdstore_poll(self, rt: ServiceRuntime) -> None:
        """Drop stored descriptors that report hang-up or error (poll with no events asks just that)."""
        rt.fdstore_timer = None
        poller = select.poll()
        for stored in rt.fdstore:
            if stored.poll:
                poller.register(stored.fd, 0)
        dead = {fd for fd, events in poller.poll(0) if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)}
        for stored in [s for s in rt.fdstore if s.fd in dead]:
            self.console.note(f"{rt.spec.name}: stored descriptor '{stored.name}' hung up; dropped from the fd store")
            os.close(stored.fd)
            rt.fdstore.remove(stored)
        if rt.fdstore and not self.stopping:
            rt.fdstore_timer = asyncio.get_running_loop().call_later(FDSTORE_POLL, self._fdstore_poll, rt)

    def _with_stored_fds(self, rt: ServiceRuntime) -> LaunchPlan:
        """The plan, with the fd store's descriptors after the listening sockets (named by FDNAME)."""
        if not rt.fdstore:
            return rt.plan
        self._fdstore_poll(rt)
        names = (*rt.plan.fd_names, *(s.name for s in rt.fdstore))
        env = [(k, v) for k, v in rt.plan.env if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")]
        env += [("LISTEN_FDS", str(len(names))), ("LISTEN_PID", "2"), ("LISTEN_FDNAMES", ":".join(names))]
        return dataclasses.replace(rt.plan, env=tuple(env), fd_names=names)

    def _may_notify(self, rt: ServiceRuntime, pid: int) -> bool:
        if rt.state not in (State.RUNNING, State.READY, State.RELOADING) or not pid:
            return False
        if rt.spec.notify_access == "all":
            return pid in rt.cgroup.pids()
        if not rt.main_pid:
            rt.main_pid = main_pid_of(rt.pid)
        return pid == rt.main_pid

    def _apply_notify(self, rt: ServiceRuntime, fields: dict[str, str]) -> None:
        name = rt.spec.name
        if "MAINPID" in fields and fields["MAINPID"].isdigit():
            rt.main_pid = host_pid(rt.cgroup.pids(), int(fields["MAINPID"])) or rt.main_pid
        if "STATUS" in fields and fields["STATUS"] != rt.status_text:
            rt.status_text = fields["STATUS"]
            self.console.note(f"{name}: status: {rt.status_text}")
        if fields.get("ERRNO", "").isdigit():
            rt.errno = int(fields["ERRNO"])
        if "WATCHDOG_USEC" in fields and fields["WATCHDOG_USEC"].isdigit():
            rt.spec = dataclasses.replace(rt.spec, watchdog=int(fields["WATCHDOG_USEC"]) / 1e6)
        if fields.get("WATCHDOG") == "1" and rt.spec.watchdog > 0:
            if rt.watchdog_timer is not None:
                rt.watchdog_timer.cancel()
            rt.watchdog_timer = asyncio.get_running_loop().call_later(rt.spec.watchdog, self._on_watchdog, rt)
        elif fields.get("WATCHDOG") == "trigger":
            self._on_watchdog(rt)
            return
        if fields.get("EXTEND_TIMEOUT_USEC", "").isdigit() and rt.start_timer is not None:
            rt.start_timer.cancel()
            extra = int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6
            rt.start_timer = asyncio.get_running_loop().call_later(extra, self._on_start_timeout, rt)
        if fields.get("STOPPING") == "1":
            self.console.note(f"{name}: says it is stopping")
        if fields.get("RELOADING") == "1" and rt.state is State.READY:
            self._transition(rt, State.RELOADING, "RELOADING=1")
        if fields.get("READY") == "1" and rt.state in (State.RUNNING, State.RELOADING):
            if rt.start_timer is not None:
                rt.start_timer.cancel()
                rt.start_timer = None
            self._transition(rt, State.READY, "READY=1" + (f" after {time.monotonic() - rt.started_at:.3f} s" if rt.state is State.RUNNING else ""))

