"""What `sandboxd up` prints: service output prefixed with the service's name, and its own notes.

Service lines go to stdout as `name | text`, names padded to one width and coloured on a
terminal (as compose does; NO_COLOR turns colours off). sandboxd's own messages go to stderr,
prefixed `sandboxd:`, so they never mix with what a service printed.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from .logs import LogFiles

_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)


class Console:
    def __init__(self, names: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out = out
        self.err = err
        self.logs: LogFiles | None = None  # also kept in files, when the stack has a runtime directory
        self.quiet = False  # detached: nobody reads the terminal; the files are the record
        self.width = max((len(n) for n in names), default=0)
        colour = out.isatty() and "NO_COLOR" not in os.environ
        self.prefix = {}
        for index, name in enumerate(sorted(names)):
            label = name.ljust(self.width)
            if colour:
                label = f"\033[{_COLOURS[index % len(_COLOURS)]}m{label}\033[0m"
            self.prefix[name] = f"{label} | "

    def prefix_for(self, name: str) -> None:
        """A prefix for a service that joined the stack later (a reload)."""
        self.prefix.setdefault(name, f"{name.ljust(self.width)} | ")

    def line(self, name: str, data: bytes) -> None:
        text = data.decode("utf-8", errors="replace").rstrip("\r\n")
        if self.logs is not None:
            self.logs.write(name, text)
        if not self.quiet:
            self.out.write(self.prefix.get(name, f"{name} | ") + text + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        if self.logs is not None:
            self.logs.write("sandboxd", text)
        if not self.quiet:
            self.err.write(f"sandboxd: {text}\n")
            self.err.flush()
