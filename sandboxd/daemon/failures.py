"""A service that failed, or crash-loops, before it was ready, said in one block: its name, why
(the reason of its state: "exited with code 3; restarting in 0.4 s", "oom-killed; killed by
SIGKILL", "could not start: STEP: DETAIL") and the last lines of its output from its log file.

The foreground supervisor says it when a service fails for good before it was ready; `up -d`
(cli/stack.py) when it gives up waiting for a stack because of one. Standard library only: the
CLI imports this module.
"""

from __future__ import annotations

from pathlib import Path

from sandboxd.daemon import logs

TAIL = 10  # lines of the service's output quoted


def failure_report(name: str, state: str, reason: str, directory: Path, count: int = TAIL) -> list[str]:
    """The lines that say why `name` (in `state`: failed or backoff) is broken, the last `count`
    lines of its log (in `directory`) quoted below, indented."""
    what = "failed" if state == "failed" else f"is crash-looping ({state})"
    lines = [f"{name} {what} before it was ready: {reason or 'no reason recorded'}"]
    printed = logs.tail(directory, name, count)
    if printed:
        lines.append(f"last {'line' if len(printed) == 1 else f'{len(printed)} lines'} of {name}'s output:")
        lines += [f"  {text}" for text in printed]
    else:
        lines.append(f"{name} printed nothing")
    return lines
