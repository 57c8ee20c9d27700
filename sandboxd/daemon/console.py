"""What `sandboxd up` prints: service output prefixed with the service's name, and its own notes.

Service lines go to stdout as `name | text`, names padded to one width and coloured on a
terminal (as compose does; NO_COLOR turns colours off). sandboxd's own messages go to stderr,
prefixed `sandboxd:`, so they never mix with what a service printed.

On a terminal, what a service printed is shown with its control characters escaped
(`escape_controls`): a service must not set the admin's window title, colours or cursor, nor
overwrite another service's line. The log files keep the bytes as they were printed.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from sandboxd.daemon.logs import LogFiles

_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)


# Code point -> what a terminal is shown instead: C0 (but the tab) and DEL, C1 as its UTF-8 bytes,
# and the lone surrogates that surrogateescape makes of bytes that were not UTF-8.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c != 0x09}
_ESCAPES |= {c: f"\\xc2\\x{c:02x}" for c in range(0x80, 0xA0)}
_ESCAPES |= {c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)}


def escape_controls(text: str) -> str:
    """`text` as a terminal may be shown it, as journalctl shows a message (systemd's
    utf8_escape_non_printable): each byte of a C0 control character but the tab, of DEL and of a
    C1 control character (U+0080-U+009F, which some terminals obey as ESC sequences) becomes a
    visible `\\xNN`, and so does a byte that was not UTF-8 (decoded with surrogateescape).
    Nothing is dropped: what the service printed can still be read, but cannot steer the terminal."""
    return text.translate(_ESCAPES)


def decode_output(data: bytes) -> str:
    """A service's bytes as text that encodes back to the same bytes (surrogateescape)."""
    return data.decode("utf-8", errors="surrogateescape")


def _as_printed(text: str) -> str:
    """Raw text for a pipe or file, which cannot take lone surrogates: bytes that were not UTF-8
    become U+FFFD there (the log files keep them)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


class Console:
    def __init__(self, names: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out = out
        self.err = err
        self.logs: LogFiles | None = None  # also kept in files, when the stack has a runtime directory
        self.quiet = False  # detached: nobody reads the terminal; the files are the record
        self.width = max((len(n) for n in names), default=0)
        self.escape_out = out.isatty()
        self.escape_err = err.isatty()
        colour = self.escape_out and "NO_COLOR" not in os.environ
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
        """A line a service printed: into its log file, and onto the terminal."""
        self.record(name, data)
        self.show(name, data)

    def record(self, name: str, data: bytes) -> None:
        """A line a service printed, into its log file (if the stack has them)."""
        if self.logs is not None:
            self.logs.write(name, decode_output(data).rstrip("\r\n"))

    def show(self, name: str, data: bytes) -> None:
        """A line a service printed, onto the terminal (not when detached)."""
        text = decode_output(data).rstrip("\r\n")
        if not self.quiet:
            shown = escape_controls(text) if self.escape_out else _as_printed(text)
            self.out.write(self.prefix.get(name, f"{name} | ") + shown + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        """One of sandboxd's own messages; it may quote a service (its STATUS=, a health check)."""
        if self.logs is not None:
            self.logs.write("sandboxd", text)
        if not self.quiet:
            shown = escape_controls(text) if self.escape_err else _as_printed(text)
            self.err.write(f"sandboxd: {shown}\n")
            self.err.flush()
