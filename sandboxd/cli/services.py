"""The verbs on the services of a running stack: `ps` (or `status`), `start`, `stop`, `restart`,
`kill` and `reload SERVICE…` (each one request on the stack's control socket), `logs` (read from
the stack's log files, `-f` follows them while the supervisor lives) and `stats`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from sandboxd.wire import StackStatus


def print_status(status: StackStatus, out: TextIO) -> None:
    """The answer to a status request as a table, one service a row (`ps`, and `up -d` once up)."""
    from sandboxd.daemon.console import escape_controls

    rows = [("SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "MEMORY", "CPU", "SOCKETS / STATUS")]
    for svc in status["services"]:
        socks = " ".join(s["address"] for s in svc["sockets"])
        # Why it failed or is in backoff; the service's STATUS=, its own text.
        extra = " ".join(part for part in (socks, escape_controls(svc["reason"]), escape_controls(svc["status_text"])) if part)
        state = svc["state"] + (" (ready)" if svc["ready"] and svc["state"] != "ready" and svc["state"] == "running" else "")
        rows.append(
            (
                svc["name"],
                state,
                str(svc["pid"] or "-"),
                f"{svc['uptime']:.0f}s" if svc["uptime"] else "-",
                str(svc["restarts"]),
                f"{svc['memory'] / (1 << 20):.1f}M" if svc["memory"] else "-",
                f"{svc['cpu_seconds']:.2f}s",
                extra,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out.write(f"stack {status['stack']} ({status['folder']})\n")
    for row in rows:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1] + "\n")


def cmd_ps(args: argparse.Namespace) -> int:
    import json

    from sandboxd.cli.client import choose_stack, request

    status = request(choose_stack(args.project_name), {"cmd": "status", "services": args.services})
    if args.json:
        print(json.dumps({key: value for key, value in status.items() if key != "ok"}, indent=2))
    else:
        print_status(status, sys.stdout)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, request

    stack = choose_stack(args.project_name)
    if args.verb == "kill":
        request(stack, {"cmd": "kill", "services": args.services, "signal": args.signal})
    else:
        request(stack, {"cmd": args.verb, "services": args.services})
    done = {"stop": "stopped", "start": "started", "restart": "restarted", "kill": f"sent {args.signal if args.verb == 'kill' else ''}", "reload": "reloaded"}
    for name in args.services:
        print(f"{name}: {done.get(args.verb, args.verb)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sandboxd.daemon import logs
    from sandboxd.cli.client import choose_stack, running_stacks
    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.paths import alive as _alive

    stack = choose_stack(args.project_name)
    directory = RUNTIME_ROOT / stack / "logs"
    names = args.services or sorted(p.name[: -len(".log")] for p in directory.glob("*.log") if p.name != "sandboxd.log")
    width = max((len(n) for n in names), default=0)
    lines = sorted((stamp, name, text) for name in names for stamp, text in logs.read(directory, name))
    if args.since:
        lines = [line for line in lines if line[0] >= args.since]
    if args.tail is not None:
        lines = lines[-args.tail :] if args.tail else []
    for _stamp, name, text in lines:
        _print_log_line(f"{name.ljust(width)} | {text}")
    if args.follow:
        pid = running_stacks()[stack]
        try:
            for name, _stamp, text in logs.follow(directory, names, lambda: _alive(pid)):
                _print_log_line(f"{name.ljust(width)} | {text}")
        except KeyboardInterrupt:
            pass
    return 0


def _print_log_line(line: str) -> None:
    """On a terminal with control characters escaped (as `up` shows them); elsewhere (a pipe, a
    file) the bytes as the service printed them."""
    from sandboxd.daemon.console import escape_controls

    if sys.stdout.isatty():
        sys.stdout.write(escape_controls(line) + "\n")
        sys.stdout.flush()
    else:
        sys.stdout.buffer.write(line.encode("utf-8", errors="surrogateescape") + b"\n")
        sys.stdout.buffer.flush()


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    from sandboxd.cli.client import choose_stack, request

    stack = choose_stack(args.project_name)
    try:
        while True:
            status = request(stack, {"cmd": "status", "services": args.services})
            if not args.once:
                sys.stdout.write("\033[H\033[2J" if sys.stdout.isatty() else "")
            print(f"{'SERVICE':20} {'STATE':10} {'MEMORY':>10} {'CPU':>10} {'PROCS':>6}")
            for svc in status["services"]:
                print(f"{svc['name']:20} {svc['state']:10} {svc['memory'] / (1 << 20):9.1f}M {svc['cpu_seconds']:9.2f}s {svc['processes']:6}")
            if args.once:
                return 0
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
