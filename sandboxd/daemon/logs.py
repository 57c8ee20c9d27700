"""Per-service log files: what each service printed, kept in the stack's runtime directory.

One file per service (`logs/NAME.log`, and `logs/sandboxd.log` for sandboxd's own messages),
each line stamped with the UTC time it was read, rotated by size (1 MiB, three old files kept),
so logs survive a restart of the service and `sandboxd logs` can read them without asking the
supervisor anything. Standard library only: the CLI imports this module to read.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

MAX_BYTES = 1 << 20
KEEP = 3


class LogFiles:
    """The open log files. Writing never fails: a line that does not fit (the disk is full,
    ENOSPC, or the descriptors are used up) is dropped and counted, and the first line written
    after it says how many were dropped (`dropped_notice`). A line is whole or not there at all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, tuple[int, int]] = {}  # name -> (fd, size)
        self.dropped: dict[str, tuple[int, str]] = {}  # name -> (lines dropped, why), until written again

    def write(self, name: str, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # A service's text came from its bytes by surrogateescape: the file gets those bytes back.
        data = f"{stamp} {text}\n".encode("utf-8", errors="surrogateescape")
        if name in self.dropped:
            count, why = self.dropped[name]
            data = f"{stamp} {dropped_notice(count, why)}\n".encode() + data
        try:
            self._append(name, data)
        except OSError as e:
            count, _why = self.dropped.get(name, (0, ""))
            self.dropped[name] = (count + 1, e.strerror or str(e))
            return
        self.dropped.pop(name, None)

    def _append(self, name: str, data: bytes) -> None:
        """`data` at the end of the file, whole, or OSError and the file as it was."""
        fd, size = self.files.get(name, (-1, 0))
        if fd < 0:
            fd = os.open(self.directory / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            self.files[name] = (fd, size)
        try:
            written = os.write(fd, data)
            if written < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            try:
                os.ftruncate(fd, size)  # no part of a line: the next one starts where a line ended
            except OSError:
                pass
            raise
        size += len(data)
        if size >= MAX_BYTES:
            os.close(fd)
            self._rotate(name)
            fd, size = -1, 0
        self.files[name] = (fd, size)

    def _rotate(self, name: str) -> None:
        base = self.directory / f"{name}.log"
        for index in range(KEEP - 1, 0, -1):
            older = Path(f"{base}.{index}")
            if older.exists():
                os.replace(older, f"{base}.{index + 1}")
        os.replace(base, f"{base}.1")

    def close(self) -> None:
        for fd, _size in self.files.values():
            if fd >= 0:
                os.close(fd)
        self.files.clear()


def dropped_notice(count: int, why: str) -> str:
    """The line that stands for the lines that could not be written."""
    return f"sandboxd: {count} line{'' if count == 1 else 's'} dropped here ({why})"


def _lines(data: bytes) -> list[str]:
    """The lines of a log file's bytes, as text that encodes back to them (surrogateescape). Split
    at newlines only: str.splitlines would also split at the control characters a service may
    print (form feed, U+0085 and others), and the rest would be taken for a line of its own."""
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def read(directory: Path, name: str) -> list[tuple[str, str]]:
    """(timestamp, text) of every line kept for `name`, oldest first (rotated files included)."""
    lines: list[tuple[str, str]] = []
    for index in range(KEEP, -1, -1):
        path = directory / (f"{name}.log.{index}" if index else f"{name}.log")
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in _lines(content):
            stamp, _, text = line.partition(" ")
            lines.append((stamp, text))
    return lines


def follow(directory: Path, names: list[str], alive: Callable[[], bool]) -> Iterator[tuple[str, str, str]]:
    """New lines of the given logs as they are written: (name, timestamp, text), until not alive()."""
    offsets = {name: (directory / f"{name}.log").stat().st_size if (directory / f"{name}.log").exists() else 0 for name in names}
    while alive():
        quiet = True
        for name in names:
            path = directory / f"{name}.log"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < offsets[name]:
                offsets[name] = 0  # rotated
            if size > offsets[name]:
                with path.open("rb") as f:
                    f.seek(offsets[name])
                    data = f.read()
                data = data[: data.rfind(b"\n") + 1]  # whole lines only; the rest is read next time
                offsets[name] += len(data)
                quiet = False
                for line in _lines(data):
                    stamp, _, text = line.partition(" ")
                    yield name, stamp, text
        if quiet:
            time.sleep(0.1)


def tail(directory: Path, name: str, count: int) -> list[str]:
    """The text of the last `count` lines kept for `name`."""
    return [text for _stamp, text in read(directory, name)[-count:]] if count > 0 else []
