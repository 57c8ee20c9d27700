"""`sandboxd logs`: what services printed, read from the stack's log files (daemon/logs.py) without
asking the supervisor anything; `-f` follows them while the supervisor lives.

The lines of several services are merged by their time stamps (a stable sort: one service's lines
with equal stamps keep their order); `--since` and `--until` keep those in a range (times.py
parses them), `--tail` the last N of what is left. `-t` shows each line's time, `--json` prints
one object a line (wire.LogLine). The log files belong to root (0600): anyone else is told so in
one line, before any file is read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sandboxd.errors import HostError
from sandboxd.wire import LogLine


def cmd_logs(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, running_stacks
    from sandboxd.daemon import logs
    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.paths import alive as _alive

    stack = choose_stack(args.project_name)
    directory = RUNTIME_ROOT / stack / "logs"
    _check_readable(directory, stack)
    names = args.services or sorted(p.name[: -len(".log")] for p in directory.glob("*.log") if p.name != "sandboxd.log")
    width = max((len(n) for n in names), default=0)
    lines = select(
        [(stamp, name, text) for name in names for stamp, text in logs.read(directory, name)], args.since, args.until, args.tail
    )
    for stamp, name, text in lines:
        _print_line(args, width, stamp, name, text)
    if args.follow:
        pid = running_stacks()[stack]
        try:
            for name, stamp, text in logs.follow(directory, names, lambda: _alive(pid)):
                if args.until and stamp >= args.until:
                    break
                _print_line(args, width, stamp, name, text)
        except KeyboardInterrupt:
            pass
    return 0


def select(lines: list[tuple[str, str, str]], since: str | None, until: str | None, tail: int | None) -> list[tuple[str, str, str]]:
    """(stamp, service, text) lines in time order, those at or after `since` and before `until`
    (log stamps, see times.py), then the last `tail` of them."""
    lines = sorted(lines, key=lambda line: line[0])
    if since:
        lines = [line for line in lines if line[0] >= since]
    if until:
        lines = [line for line in lines if line[0] < until]
    if tail is not None:
        lines = lines[-tail:] if tail else []
    return lines


def log_json(stamp: str, name: str, text: str) -> LogLine:
    """One line of `logs --json`. JSON is text: bytes of the line that are not UTF-8 become U+FFFD."""
    return {"time": stamp, "service": name, "text": text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")}


def _check_readable(directory: Path, stack: str) -> None:
    """Refuse in one line, before any is read, if the stack's log files are not readable here."""
    if os.geteuid() == 0:
        return
    readable = os.access(directory, os.R_OK | os.X_OK) and all(os.access(path, os.R_OK) for path in directory.glob("*.log"))
    if not readable:
        raise HostError(f"the logs of stack {stack!r} are readable by root only; run: sudo sandboxd logs -p {stack}")


def _print_line(args: argparse.Namespace, width: int, stamp: str, name: str, text: str) -> None:
    if args.json:
        _write_raw(json.dumps(log_json(stamp, name, text), ensure_ascii=False))
    elif args.timestamps:
        _write(f"{name.ljust(width)} | {stamp} {text}")
    else:
        _write(f"{name.ljust(width)} | {text}")


def _write(line: str) -> None:
    """On a terminal with control characters escaped (as `up` shows them); elsewhere (a pipe, a
    file) the bytes as the service printed them."""
    from sandboxd.daemon.console import escape_controls

    if sys.stdout.isatty():
        sys.stdout.write(escape_controls(line) + "\n")
        sys.stdout.flush()
    else:
        _write_raw(line)


def _write_raw(line: str) -> None:
    sys.stdout.buffer.write(line.encode("utf-8", errors="surrogateescape") + b"\n")
    sys.stdout.buffer.flush()
