"""Coroutines the supervisor runs beside its callbacks (a sandbox's exit awaited, a proxy's watch,
a health check): each is held until it ends, and a failure is said at once, not lost."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from sandboxd.daemon.console import Console


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


async def held_back_at_the_end(main: Coroutine[object, object, int]) -> int:
    """Await `main`; once it has ended, SIGINT and SIGTERM are blocked (held pending, not acted on).

    Closing the event loop puts Python's own handlers back, so a Ctrl-C arriving between the loop's
    end and the clean-up would raise KeyboardInterrupt there (and a SIGTERM end the process) with
    cgroups and sockets still to remove. `drop_stop_signals` ends the hold."""
    try:
        return await main
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def signal_free_executor() -> ThreadPoolExecutor:
    """The loop's executor (asyncio.to_thread): its threads block SIGINT and SIGTERM, so the kernel
    gives those to the main thread, where the loop handles them and where `held_back_at_the_end`
    holds them (a thread that does not block them could take a late SIGTERM with its default
    action, ending the process before the clean-up)."""
    return ThreadPoolExecutor(thread_name_prefix="sandboxd", initializer=_block_stop_signals)


def drop_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on and unblock them: one held back is discarded."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Background:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.tasks: set[asyncio.Future[None]] = set()

    def spawn(self, coroutine: Coroutine[object, object, None], what: str) -> asyncio.Future[None]:
        """Run `coroutine`; should it raise, say `what` failed."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(partial(self._done, what))
        return task

    def _done(self, what: str, task: asyncio.Future[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.console.note(f"{what} failed: {error!r}")
