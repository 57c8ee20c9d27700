"""What a service says through sd_notify (notify.py reads it): readiness, status, its watchdog and
start timeout, and the descriptors it gives sandboxd to keep (the fd store)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import signal
import time

from sandboxd.daemon.console import Console
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.notify import Message, host_pid, main_pid_of
from sandboxd.daemon.runtime import FDSTORE_POLL, RunningStack, ServiceRuntime, StoredFd, Verdict
from sandboxd.daemon.states import Event, State
from sandboxd.daemon.stopping import fail
from sandboxd.plan.environment import with_descriptors
from sandboxd.plan.launch import LaunchPlan


class Readiness:
    """start_timeout, the watchdog, and the notify messages of each service."""

    def __init__(self, machine: ServiceMachine, console: Console, fdstore: FdStore) -> None:
        self.machine = machine
        self.console = console
        self.fdstore = fdstore

    def arm(self, rt: ServiceRuntime) -> None:
        """Its sandbox runs: start_timeout (unless `ready: started`) and the watchdog begin."""
        loop = asyncio.get_running_loop()
        if rt.spec.ready != "started" and rt.spec.start_timeout > 0:
            rt.timers.start = loop.call_later(rt.spec.start_timeout, self._on_start_timeout, rt)
        if rt.spec.watchdog > 0:
            rt.timers.watchdog = loop.call_later(rt.spec.watchdog, self._on_watchdog, rt)
        if rt.notify.held and rt.notify.socket is not None:
            rt.notify.held = False
            loop.add_reader(rt.notify.socket.sock, self.on_notify, rt)

    def end_start_timeout(self, rt: ServiceRuntime) -> None:
        """The END_START_TIMEOUT action: it is ready."""
        if rt.timers.start is not None:
            rt.timers.start.cancel()
            rt.timers.start = None

    def _on_start_timeout(self, rt: ServiceRuntime) -> None:
        rt.timers.start = None
        if self.machine.allows(rt, Event.START_TIMEOUT):
            why = f"not ready within start_timeout ({rt.spec.start_timeout:g} s)"
            fail(self.machine, rt, Event.START_TIMEOUT, Verdict("timeout", why, rt.spec.stop_signal))

    def _on_watchdog(self, rt: ServiceRuntime) -> None:
        rt.timers.watchdog = None
        if self.machine.allows(rt, Event.WATCHDOG):
            why = f"watchdog timeout: no WATCHDOG=1 within {rt.spec.watchdog:g} s"
            fail(self.machine, rt, Event.WATCHDOG, Verdict("watchdog", why, signal.SIGABRT))

    def on_notify(self, rt: ServiceRuntime) -> None:
        assert rt.notify.socket is not None
        if rt.state is State.STARTING:
            # The sandbox may have executed its command before the loop read its status channel's
            # end (both were ready at one wake-up): what it says now waits in the socket, in order,
            # until it is known to run (arm), rather than be dropped (READY=1 would never count).
            asyncio.get_running_loop().remove_reader(rt.notify.socket.sock)
            rt.notify.held = True
            return
        while (message := rt.notify.socket.receive()) is not None:
            try:
                if self._may_notify(rt, message.pid):
                    self._apply_notify(rt, message.fields)
                    if message.fields.get("FDSTOREREMOVE") == "1":
                        self.fdstore.remove(rt, message.fields.get("FDNAME", "stored"))
                    if message.fields.get("FDSTORE") == "1" and message.fds:
                        self.fdstore.add(rt, message)
            finally:
                message.close_fds()  # what was not stored; BARRIER=1's descriptor is answered by closing it

    def _may_notify(self, rt: ServiceRuntime, pid: int) -> bool:
        if rt.state not in (State.RUNNING, State.READY, State.RELOADING) or not pid:
            return False
        if rt.spec.notify_access == "all":
            return pid in rt.cgroup.pids()
        if not rt.notify.main_pid:
            rt.notify.main_pid = main_pid_of(rt.launch.pid)
        return pid == rt.notify.main_pid

    def _apply_notify(self, rt: ServiceRuntime, fields: dict[str, str]) -> None:
        name = rt.spec.name
        if _decimal(fields.get("MAINPID", "")):
            rt.notify.main_pid = host_pid(rt.cgroup.pids(), int(fields["MAINPID"])) or rt.notify.main_pid
        if "STATUS" in fields and fields["STATUS"] != rt.notify.status_text:
            rt.notify.status_text = fields["STATUS"]
            self.console.note(f"{name}: status: {rt.notify.status_text}")
        if _decimal(fields.get("ERRNO", "")) and int(fields["ERRNO"]) <= ERRNO_MAX:
            rt.notify.errno = int(fields["ERRNO"])
        if _decimal(fields.get("WATCHDOG_USEC", "")):
            rt.spec = dataclasses.replace(rt.spec, watchdog=int(fields["WATCHDOG_USEC"]) / 1e6)
        if fields.get("WATCHDOG") == "1" and rt.spec.watchdog > 0:
            if rt.timers.watchdog is not None:
                rt.timers.watchdog.cancel()
            rt.timers.watchdog = asyncio.get_running_loop().call_later(rt.spec.watchdog, self._on_watchdog, rt)
        elif fields.get("WATCHDOG") == "trigger":
            self._on_watchdog(rt)
            return
        if _decimal(fields.get("EXTEND_TIMEOUT_USEC", "")) and rt.timers.start is not None:
            rt.timers.start.cancel()
            extra = int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6
            rt.timers.start = asyncio.get_running_loop().call_later(extra, self._on_start_timeout, rt)
        if fields.get("STOPPING") == "1":
            self.console.note(f"{name}: says it is stopping")
        if fields.get("RELOADING") == "1" and rt.state is State.READY:
            self.machine.transition(rt, Event.RELOAD, "RELOADING=1")
        if fields.get("READY") == "1" and self.machine.allows(rt, Event.READY):
            after = f" after {time.monotonic() - rt.launch.started_at:.3f} s" if rt.state is State.RUNNING else ""
            self.machine.transition(rt, Event.READY, "READY=1" + after)


ERRNO_MAX = 4095  # as systemd's parse_errno: what an errno can be (os.strerror refuses more than an int)


def _decimal(text: str) -> bool:
    """A number as sd_notify's fields have them: ASCII digits only (str.isdigit takes "²" too,
    which int() refuses)."""
    return text.isascii() and text.isdigit()


class FdStore:
    """The descriptors services keep in sandboxd (FDSTORE=1), handed back at their next start."""

    def __init__(self, console: Console, running: RunningStack) -> None:
        self.console = console
        self.running = running

    # ── the fd store ──

    def add(self, rt: ServiceRuntime, message: Message) -> None:
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
        self.watch(rt)

    def watch(self, rt: ServiceRuntime) -> None:
        """Look at the stored descriptors every FDSTORE_POLL seconds, if there are any."""
        if rt.fdstore and rt.fdstore_timer is None:
            rt.fdstore_timer = asyncio.get_running_loop().call_later(FDSTORE_POLL, self._fdstore_poll, rt)

    def remove(self, rt: ServiceRuntime, name: str) -> None:
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
        if rt.fdstore and not self.running.stopping:
            rt.fdstore_timer = asyncio.get_running_loop().call_later(FDSTORE_POLL, self._fdstore_poll, rt)

    def with_stored_fds(self, rt: ServiceRuntime) -> LaunchPlan:
        """The plan, with the fd store's descriptors after the listening sockets (named by FDNAME)."""
        if not rt.fdstore:
            return rt.plan
        self._fdstore_poll(rt)
        names = (*rt.plan.fd_names, *(s.name for s in rt.fdstore))
        env = with_descriptors(rt.plan.env, names)
        return dataclasses.replace(rt.plan, env=tuple(env), fd_names=names)
