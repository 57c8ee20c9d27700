"""The verbs on the services of a running stack: `ps` (or `status`), `start`, `stop`, `restart`,
`kill` and `reload SERVICE…`, each one request on the stack's control socket. `start`, `stop` and
`restart` with no service mean every service of the stack, as in compose. (`logs` is in logs.py,
`stats` in stats.py.)
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from sandboxd.wire import ServicesResult, StackStatus


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
    if args.services_only:
        print("".join(f"{svc['name']}\n" for svc in status["services"]), end="")
    elif args.json:
        print(json.dumps({key: value for key, value in status.items() if key != "ok"}, indent=2))
    else:
        print_status(status, sys.stdout)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    import json

    from sandboxd.cli.client import choose_stack, request

    stack = choose_stack(args.project_name)
    names = args.services or [svc["name"] for svc in request(stack, {"cmd": "status"})["services"]]
    if args.verb == "kill":
        request(stack, {"cmd": "kill", "services": names, "signal": args.signal})
    else:
        request(stack, {"cmd": args.verb, "services": names})
    done = {"stop": "stopped", "start": "started", "restart": "restarted", "kill": f"sent {args.signal if args.verb == 'kill' else ''}", "reload": "reloaded"}
    if getattr(args, "json", False):
        result: ServicesResult = {"stack": stack, "services": names, "done": done.get(args.verb, args.verb)}
        print(json.dumps(result))
        return 0
    for name in names:
        print(f"{name}: {done.get(args.verb, args.verb)}")
    return 0
