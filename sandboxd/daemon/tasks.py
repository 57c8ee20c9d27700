"""Coroutines the supervisor runs beside its callbacks (a sandbox's exit awaited, a proxy's watch,
a health check): each is held until it ends, and a failure is said at once, not lost."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from functools import partial

from sandboxd.daemon.console import Console


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
