"""How a service ended, and whether and when it starts again: systemd's rules, as data.

    outcome      what happened                                            restarted by
    ──────────   ──────────────────────────────────────────────────────   ─────────────────────────────
    success      exit 0, or killed by SIGHUP, SIGINT, SIGTERM or SIGPIPE  on-success, always
    exit-code    a non-zero exit, or the sandbox could not be set up      on-failure, always
    signal       killed by any other signal (an abort, a crash)           on-failure, on-abnormal, on-abort, always
    timeout      not ready within start_timeout                           on-failure, on-abnormal, always
    watchdog     no WATCHDOG=1 within the watchdog interval               on-failure, on-abnormal, on-watchdog, always

The delay before a restart is `restart_delay`; with `restart_steps` it grows over that many
restarts towards `restart_max_delay` as systemd's RestartSteps= does (geometrically). Without
`restart_steps` it doubles with each restart in a row, up to `restart_max_delay` (5 s by default).
`start_limit` (5 starts within 10 s by default) marks a service failed for good, with one line
that says why, while the rest of the stack keeps running.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from typing import Literal

from sandboxd.spec.model import Restart, Service

Outcome = Literal["success", "exit-code", "signal", "timeout", "watchdog"]

CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}

RESTART_ON: dict[Restart, frozenset[Outcome]] = {
    "no": frozenset(),
    "on-success": frozenset({"success"}),
    "on-failure": frozenset({"exit-code", "signal", "timeout", "watchdog"}),
    "on-abnormal": frozenset({"signal", "timeout", "watchdog"}),
    "on-watchdog": frozenset({"watchdog"}),
    "on-abort": frozenset({"signal"}),
    "always": frozenset({"success", "exit-code", "signal", "timeout", "watchdog"}),
}


def classify(status: int) -> tuple[Outcome, str]:
    """The outcome and a description of a wait status of the sandbox's init.

    The sandbox's init (sbd-setup) exits with 128+n when the service was killed by signal n, as
    dumb-init and tini do, so such a code is read as
    that signal (a service that itself exits with 130 looks the same; systemd's own ambiguity with
    shells).
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
        sig = code - 128 if 128 < code < 128 + signal.NSIG else 0
        if not sig:
            return ("success" if code == 0 else "exit-code"), f"exited with code {code}"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return ("success" if sig in CLEAN_SIGNALS else "signal"), f"killed by {name}"


def exit_details(status: int) -> tuple[int | None, str | None]:
    """The exit code or the signal's name of a wait status, read as `classify` reads it (128+n
    from the init is signal n): one of the two is None."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
        if not 128 < code < 128 + signal.NSIG:
            return code, None
        sig = code - 128
    try:
        return None, signal.Signals(sig).name
    except ValueError:
        return None, f"signal {sig}"


def should_restart(policy: Restart, outcome: Outcome) -> bool:
    return outcome in RESTART_ON[policy]


def restart_delay(service: Service, restarts_in_a_row: int) -> float:
    """Delay before restart number `restarts_in_a_row` (1 for the first) of a streak."""
    base, top = service.restart_delay, max(service.restart_max_delay, service.restart_delay)
    n = max(restarts_in_a_row - 1, 0)
    if service.restart_steps:
        if base <= 0:
            return top * min(n, service.restart_steps) / service.restart_steps
        return float(base * (top / base) ** (min(n, service.restart_steps) / service.restart_steps))
    return float(min(base * 2**n, top))


class StartLimiter:
    """Counts starts within the start limit's interval."""

    def __init__(self, service: Service) -> None:
        self.burst = service.start_limit.burst
        self.interval = service.start_limit.interval
        self.starts: deque[float] = deque()

    def record(self, now: float) -> None:
        self.starts.append(now)

    def exhausted(self, now: float) -> bool:
        """True if another start now would be one too many within the interval."""
        while self.starts and now - self.starts[0] >= self.interval:
            self.starts.popleft()
        return len(self.starts) >= self.burst

    @property
    def in_a_row(self) -> int:
        """Starts within the current interval: how far into a streak of restarts the service is."""
        return len(self.starts)
