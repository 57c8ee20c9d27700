"""The times `sandboxd logs --since/--until` take, as `docker logs` takes them: a duration back
from now (`10m`, `2h`, `30s`, `1h30m`, `1.5h`, `500ms`), a time (RFC 3339, `2026-11-26T06:00:00Z`,
`2026-11-26T06:00:00+01:00`, or without an offset, `2026-11-26T06:00:00` or `2026-11-26`, which
is this machine's local time, as docker reads it), or seconds since the epoch (`1764136800`).
Pure: `now` is given. Each bound becomes the text of a log stamp (logs.py writes them in UTC,
all of one width), which orders as the times do."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # as daemon/logs.py writes each line's time
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_EXAMPLES = "like 10m, 2h, 30s, 1h30m, 2026-11-26T06:00:00Z or 2026-11-26T06:00:00 (local time)"


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (`10m`, `1h30m`, `1.5h`, `500ms`), or None if `text` is not one."""
    if not text or _PART.sub("", text):
        return None
    return sum(float(number) * UNITS[unit] for number, unit in _PART.findall(text))


def parse_moment(text: str, now: datetime) -> datetime:
    """The time `text` names (a duration back from `now`, a time or epoch seconds), aware, in
    UTC; ValueError saying what was expected otherwise."""
    text = text.strip()
    seconds = parse_duration(text)
    if seconds is not None:
        return now.astimezone(UTC) - timedelta(seconds=seconds)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return datetime.fromtimestamp(float(text), UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected a duration or a time, {_EXAMPLES}; got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as docker takes a time without an offset
    return moment.astimezone(UTC)


def as_stamp(moment: datetime) -> str:
    """The log stamp of an aware time: what the lines' stamps are compared with."""
    return moment.astimezone(UTC).strftime(STAMP)


def stamp_bound(text: str) -> str:
    """argparse type of --since and --until: the stamp of the time given, measured from now."""
    try:
        return as_stamp(parse_moment(text, datetime.now(UTC)))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
