"""What the services print: read from each service's output pipe a line at a time, written to its
log file at once, and held back from the terminal until the start-up summary is printed, so that
the summary comes first there. What a sandbox printed is in its log before its exit is judged
(`read_waiting`): `up -d` and the Stack API quote the last lines of a service that failed."""

from __future__ import annotations

import asyncio
import os
from collections import deque

from sandboxd.daemon.console import Console
from sandboxd.daemon.runtime import ServiceRuntime

MAX_LINE = 65536  # a longer line without a newline is shown in pieces of this size
MAX_HELD = 4 << 20  # bytes held back for the terminal until the summary; beyond, the oldest go (the log has them)


class Output:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.held: deque[tuple[str, bytes]] | None = deque()  # None once the summary is out
        self.held_bytes = 0
        self.held_dropped = 0  # lines no longer held for the terminal (they are in the logs)

    def on_output(self, rt: ServiceRuntime) -> None:
        try:
            data = os.read(rt.output.r, 65536)
        except BlockingIOError:
            return
        self._take(rt, data)
        if len(rt.output.partial) > MAX_LINE:
            self._emit(rt.spec.name, rt.output.partial)
            rt.output.partial = b""

    def read_waiting(self, rt: ServiceRuntime) -> None:
        """What is in the pipe now, the unfinished line too: a sandbox's init exited, and its last
        words go to the log before its exit is judged and said."""
        while rt.output.r >= 0:
            try:
                data = os.read(rt.output.r, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._take(rt, data)
        if rt.output.partial:
            self._emit(rt.spec.name, rt.output.partial)
            rt.output.partial = b""

    def _take(self, rt: ServiceRuntime, data: bytes) -> None:
        *lines, rt.output.partial = (rt.output.partial + data).split(b"\n")
        for line in lines:
            self._emit(rt.spec.name, line)

    def drain(self, rt: ServiceRuntime) -> None:
        """Show what is left in the pipe, the last unfinished line too, and stop reading it."""
        self.read_waiting(rt)
        asyncio.get_running_loop().remove_reader(rt.output.r)

    def release(self) -> None:
        """The summary is out: what was held is shown, and from now on every line at once."""
        held, self.held = self.held or deque(), None
        if self.held_dropped:
            self.console.note(f"{self.held_dropped} earlier lines of the services' output are not shown here (see sandboxd logs)")
        for name, line in held:
            self.console.show(name, line)

    def _emit(self, name: str, line: bytes) -> None:
        self.console.record(name, line)
        if self.held is None:
            self.console.show(name, line)
        else:
            self.held.append((name, line))
            self.held_bytes += len(line)
            while self.held_bytes > MAX_HELD:
                _name, old = self.held.popleft()
                self.held_bytes -= len(old)
                self.held_dropped += 1
