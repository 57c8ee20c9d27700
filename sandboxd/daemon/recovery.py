"""When a part of sandboxd dies, and how a stop always ends.

The fork server is pid 1 of a pid namespace that holds every sandbox: when it dies (SIGKILL from
the OOM killer or an operator), every sandbox dies with it, and no end of theirs will ever be
reported. Its death is an event of the state table (`fork server died`), in this order:

    fork server dies ─▶ EOF on its connection (forks.py) ─▶ ForkServerRecovery.on_death
        a new fork server is forked (the next requests go to it: a connection to an
        accept-mode socket meanwhile gets a sandbox from it); too many deaths in a row,
        or none can start: the stack stops, and the supervisor exits with code 1
        the dead one is reaped once it exited, which is once every process of its pid
        namespace is gone (bounded: after REAP_BOUND its sandboxes are taken for dead)
        then every request it left unanswered ends (`lose_pending`): each service whose
        sandbox it was takes `fork server died` to failed (stopped, if it was stopping),
        with the reason; lifecycle.py then starts it again per its `restart:` with the
        new fork server (its sockets were never closed: clients waited in their queues)

A stop always ends (`StopBound`): each service gets its stop_signal, then SIGKILL to its cgroup
after its stop_timeout (stopping.py); should the fork server still not have said their ends
KILL_GRACE later (it is stopped, or wedged), it is killed, which is the death above, and every
end is taken. A second SIGTERM or Ctrl-C kills every cgroup at once, and the same bound follows.

The supervisor shields itself from the OOM killer (`shield_from_oom_killer`, as dockerd does
with -500); the fork server puts itself, and so every sandbox, back to 0 (forkserver.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

from sandboxd.daemon.console import Console
from sandboxd.daemon.forks import ForkServerLink
from sandboxd.daemon.restart import classify
from sandboxd.daemon.runtime import RunningStack
from sandboxd.daemon.tasks import Background
from sandboxd.errors import SandboxdError
from sandboxd.sandbox.handle import ForkServer

OOM_SCORE_ADJ = -500  # the supervisor's, as dockerd's: the OOM killer picks a service first
DEATHS_BURST = 5  # fork server deaths within DEATHS_INTERVAL before the stack is stopped instead
DEATHS_INTERVAL = 60.0
REAP_BOUND = 10.0  # seconds to wait for a dead fork server's namespace to empty
KILL_GRACE = 5.0  # seconds after the stop timeouts before the fork server itself is killed


def shield_from_oom_killer(value: int = OOM_SCORE_ADJ) -> str:
    """Set the supervisor's oom_score_adj; returns why it could not, or ""."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as e:
        return f"cannot set oom_score_adj: {e.strerror}"
    return ""


class ForkServerRecovery:
    def __init__(self, running: RunningStack, link: ForkServerLink, tasks: Background, console: Console, held: Callable[[], list[int]], stop: Callable[[], None]) -> None:
        self.running = running
        self.link = link
        self.tasks = tasks
        self.console = console
        self.held = held  # descriptors every fork server holds until it exits (the lease of ids)
        self.stop = stop  # stop the stack (as a SIGTERM does)
        self.deaths: list[float] = []
        self.gave_up = ""  # why the stack was stopped instead of recovered

    def on_death(self, dead: ForkServer) -> None:
        """The link's on_death: a successor now, the dead one's requests ended once it is reaped."""
        self.deaths.append(time.monotonic())
        self.console.note(f"sandboxd's fork server (pid {dead.pid}) died; every sandbox died with it")
        if not self.running.stopping:
            self._replace()
        self.tasks.spawn(self._reap(dead), "reaping the fork server that died")

    def _replace(self) -> None:
        now = time.monotonic()
        recent = [t for t in self.deaths if now - t <= DEATHS_INTERVAL]
        if len(recent) >= DEATHS_BURST:
            self._give_up(f"it died {len(recent)} times within {DEATHS_INTERVAL:g} s")
            return
        try:
            server = ForkServer.start()
        except (OSError, SandboxdError) as e:
            self._give_up(f"a new one could not start: {e}")
            return
        held = self.held()
        if held:
            server.hold(held)
        self.link.replace(server)
        self.console.note(f"a new fork server runs (pid {server.pid}); services start again as their restart: says")

    def _give_up(self, why: str) -> None:
        self.gave_up = why
        self.console.note(f"the fork server is not replaced ({why}); stopping the stack")
        self.running.stopping = True  # nothing starts any more
        self.stop()

    async def _reap(self, dead: ForkServer) -> None:
        """Wait (bounded) for the dead fork server to exit, which it does once its whole pid
        namespace is gone; reap it; then end every request it left unanswered."""
        try:
            await _exited(dead.pid, REAP_BOUND)
        except TimeoutError:
            self.console.note(f"the fork server (pid {dead.pid}) has not ended after {REAP_BOUND:g} s; its sandboxes are taken for dead")
        try:
            finished, status = os.waitpid(dead.pid, os.WNOHANG)
        except ChildProcessError:
            finished, status = 0, 0
        dead.conn.close()
        if finished:
            self.console.note(f"the fork server that died ended: {classify(status)[1]}")
        self.link.lose_pending()


async def _exited(pid: int, bound: float) -> None:
    """Return once `pid` (a child of ours) exited; TimeoutError after `bound` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(readable, bound)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


class StopBound:
    """A stop of the stack always ends: KILL_GRACE after the longest stop_timeout (after the
    kill, on a second signal), a fork server that has still not said every end is killed."""

    def __init__(self, running: RunningStack, link: ForkServerLink, console: Console) -> None:
        self.running = running
        self.link = link
        self.console = console
        self.timer: asyncio.TimerHandle | None = None

    def arm(self, after_kill: bool = False) -> None:
        longest = max((rt.spec.stop_timeout for rt in self.running.services.values()), default=0.0)
        bound = KILL_GRACE + (0.0 if after_kill else longest)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(bound, self._kill_fork_server, bound)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _kill_fork_server(self, bound: float) -> None:
        self.timer = None
        server = self.link.server
        if server is None or not self.link.pending:
            return
        waited = ", ".join(sorted(rt.name for rt in self.running.services.values() if not rt.settled.is_set())) or "per-connection sandboxes"
        self.console.note(f"still waiting after {bound:g} s for the end of: {waited}; killing the fork server (every sandbox dies with it)")
        try:
            os.kill(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
