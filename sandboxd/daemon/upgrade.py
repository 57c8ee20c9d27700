"""Upgrade in place (`sandboxd upgrade`): the running supervisor executes the installed sandboxd
anew, keeping its pid, its children (the fork server, and through it every sandbox) and every
descriptor a sandbox depends on, as systemd's daemon-reexec does.

    CLI                         old supervisor                              new sandboxd (same pid)
    ───  upgrade(token) ──────▶ settle: no launch, stop, control request,
                                health check or exec in flight (bounded;
                                activation and health checks paused)
         ◀── refused: why ───── (not settled in time; a `sandboxd exec` runs)
         ◀── {"ok": true} ───── accepted; then, in one callback of the loop:
                                the record (record.py) into a memfd;
                                `python -m sandboxd.daemon.reexec check FD`
                                run as a child with every descriptor: the
                                new code reads the record and fstats them
                                refused: resumes, writes upgrade.json ───▶
                                accepted: descriptors inheritable, SIGINT
                                and SIGTERM blocked, execve ──────────────▶ reads the record, rebuilds
                                (exec failed: resumes, writes upgrade.json)  the runtime (resume.py),
         ◀──────────────────────────────────────── upgrade.json ──────────  serves; unblocks signals

While the loop is in that callback and during the exec nothing is read: sandboxes run on,
connections wait in their sockets' queues, notify messages and output in their sockets and pipes,
the fork server's replies on its link, control requests in the control socket's backlog; the new
process takes them all from there. What cannot be carried is waited for (a launch until its
child execs, a stop until its exit, a health check until its end, a control request until it is
answered) or refused: a running `sandboxd exec` (its command's life is bound to its control
connection) is refused with the reason. A running proxy (systemd-socket-proxyd, a child of the
fork server) goes on forwarding; the new process awaits its end under its request id (proxy.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd import __version__
from sandboxd.daemon.states import ALIVE, InstanceState, State
from sandboxd.spec.model import HealthCheck

if TYPE_CHECKING:
    from sandboxd.daemon.capture import Upgradable

SETTLE_TIMEOUT = 10.0  # seconds an upgrade waits for the stack to be quiet enough to hand over
CHECK_TIMEOUT = 60.0  # seconds the new code has to read the record
OUTCOME = "upgrade.json"  # in the runtime directory: what became of the upgrade, for the CLI
HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # blocked across the exec: pending, not lost


def entry(command: str, fd: int) -> list[str]:
    """The installed sandboxd's re-exec entry: the same interpreter, the cwd kept off sys.path."""
    return [sys.executable, "-P", "-m", "sandboxd.daemon.reexec", command, str(fd)]


def write_outcome(runtime_dir: Path, token: str, ok: bool, **fields: object) -> None:
    """What became of the upgrade asked with `token`, for the CLI that waits for it (atomically)."""
    tmp = runtime_dir / f"{OUTCOME}.tmp"
    tmp.write_text(json.dumps({"token": token, "ok": ok, "pid": os.getpid(), "version": __version__, **fields}))
    os.replace(tmp, runtime_dir / OUTCOME)


class Upgrade:
    def __init__(self, sup: Upgradable) -> None:
        self.sup = sup
        self.under_way = False
        self.upgrades = 0  # how many this process's stack has had (carried in the record)

    async def request(self, token: str, record_format: int | None = None) -> str:
        """The control verb: "" once the upgrade is accepted (the exec follows at once, its
        outcome in upgrade.json), else why it was refused (nothing was handed over)."""
        if self.under_way:
            return "upgrade refused: another upgrade is under way"
        if self.sup.running.stopping:
            return "upgrade refused: the stack is stopping"
        self.under_way = True
        paused = self._pause()
        why = await self._settle()
        if why:
            self._resume(paused)
            self.under_way = False
            return f"upgrade refused: {why}"
        asyncio.get_running_loop().call_soon(self._hand_over, token, record_format, paused)
        return ""

    # ── settling ──

    def _pause(self) -> set[str]:
        """No new sandbox is started by a connection meanwhile (connections wait in the queue)."""
        activation = self.sup.activation
        watched = set(activation.watching)
        activation.settling = True
        for name in watched:
            activation.unwatch(self.sup.running.services[name])
        return watched

    def _resume(self, paused: set[str]) -> None:
        """The upgrade did not happen: activation and health checks as before."""
        sup = self.sup
        sup.activation.settling = False
        for rt in sup.running.services.values():
            if rt.state is State.WAITING:
                sup.activation.watch(rt)
            if isinstance(rt.spec.ready, HealthCheck) and rt.state in (State.RUNNING, State.READY) and rt.timers.health is None:
                sup.health.arm(rt)

    def _hold_health_checks(self) -> None:
        for rt in self.sup.running.services.values():
            if rt.timers.health is not None:
                rt.timers.health.cancel()
                rt.timers.health = None

    async def _settle(self) -> str:
        """Wait until nothing the record cannot carry is under way; "" then, else why not."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            self._hold_health_checks()
            why, final = unsettled(self.sup)
            if not why:
                return ""
            if final:
                return why
            if time.monotonic() > deadline:
                return f"the stack did not settle within {SETTLE_TIMEOUT:g} s: {why}"
            await asyncio.sleep(0.01)

    # ── the hand-over ──

    def _hand_over(self, token: str, record_format: int | None, paused: set[str]) -> None:
        """In one callback: the record, its check by the new code, the exec. Whatever stops it,
        this process goes on as before and says why in upgrade.json."""
        sup = self.sup
        why, _final = unsettled(sup)
        error = f"the stack changed before the hand-over: {why}" if why else ""
        memfd = -1
        try:
            if not error:
                from sandboxd.daemon.capture import capture  # the record's modules (and pickle) wait for an upgrade
                from sandboxd.daemon.record import encode

                record = capture(sup, token, self.upgrades + 1, record_format)
                fds = [d.fd for d in record.descriptors]
                memfd = os.memfd_create("sandboxd-upgrade-record", 0)
                os.write(memfd, encode(record))
                error = _check_record(memfd, fds)
            if not error:
                error = _execute(memfd, fds)
        except Exception as e:  # noqa: BLE001 - whatever it was, this process goes on as before
            error = f"the state record could not be made: {e!r}"
        finally:
            if memfd >= 0:
                os.close(memfd)
        sup.console.note(f"upgrade refused: {error}")
        self._resume(paused)
        self.under_way = False
        write_outcome(sup.running.runtime_dir, token, False, error=error)


def unsettled(sup: Upgradable) -> tuple[str, bool]:
    """What is under way that the record cannot carry ("" if nothing), and whether it is for good
    (refused at once) rather than something to wait for."""
    if sup.running.stopping:
        return "the stack is stopping", True
    if sup.output.held is not None or sup.control is None:
        return "the stack is still starting", False
    if sup.link.server is None:
        return "sandboxd's fork server died and is being replaced", False
    if sup.operations.busy:
        return "a control request is under way", False
    if sup.operations.sessions:
        return f"a `sandboxd exec` is running ({', '.join(sorted(sup.operations.sessions))}): its command ends with its control connection", True
    for rt in sup.running.services.values():
        if rt.state in (State.STARTING, State.STOPPING, State.IDLE_STOPPING) or rt.launch.channel is not None:
            return f"{rt.name} is {rt.state.label}", False
        if rt.launch.verdict is not None or rt.launch.kill_timer is not None:
            return f"{rt.name} is being killed", False
        if rt.health.probe is not None:
            return f"{rt.name}: its health check is running", False
    for instance in sup.activation.instances.values():
        if instance.channel is not None or instance.state in (InstanceState.STARTING, InstanceState.STOPPING):
            return f"{instance.name} is starting", False
    known = {rt.launch.id for rt in sup.running.services.values() if rt.state in ALIVE} | set(sup.activation.instances)
    known |= {request_id for running in sup.proxies.started.values() for request_id in running.values()}
    if set(sup.link.pending) - known:
        return "a request to the fork server is under way", False
    return "", False


def _check_record(memfd: int, fds: list[int]) -> str:
    """The new code reads the record, with the descriptors it names: "" if it takes it, else why not."""
    try:
        done = subprocess.run(entry("check", memfd), pass_fds=[memfd, *fds], capture_output=True, text=True, timeout=CHECK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the installed sandboxd could not check the state record: {e}"
    try:
        verdict = json.loads(done.stdout)
    except ValueError:
        verdict = {"ok": False, "error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    if done.returncode != 0 or not isinstance(verdict, dict) or not verdict.get("ok"):
        return f"the installed sandboxd refuses the state record: {verdict.get('error') if isinstance(verdict, dict) else verdict}"
    return ""


def _execute(memfd: int, fds: list[int]) -> str:
    """execve the entry with the record; returns only if the exec failed (why, then)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.lseek(memfd, 0, os.SEEK_SET)
    for fd in (memfd, *fds):
        os.set_inheritable(fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    argv = entry("resume", memfd)
    try:
        os.execve(argv[0], argv, os.environ)
    except OSError as e:
        error = f"the exec of {argv[0]} failed: {e.strerror}"
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    for fd in fds:
        os.set_inheritable(fd, False)
    return error
