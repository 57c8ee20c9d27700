"""`sandboxd stats`: each service's CPU %, memory, processes, I/O and network bytes, refreshed every
interval, or once (`--once`); `--json` prints a wire.StackStats per sample, one a line.

CPU % is the cgroup's CPU time used between two samples over the wall time between them (100 is
one CPU's worth), so even `--once` waits one interval. Memory and CPU time come from the status
request, I/O and network bytes from the `usage` request (daemon/usage.py says where each is
read); a counter the host does not give is shown as "-" and left out of the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from sandboxd.wire import ServiceStats, ServiceStatus, ServiceUsage, StackStats

Sample = tuple[float, list[ServiceStatus], dict[str, ServiceUsage]]  # monotonic time, status, usage by name


def cmd_stats(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack

    stack = choose_stack(args.project_name)
    try:
        before = _sample(stack, args.services)
        while True:
            time.sleep(args.interval)
            after = _sample(stack, args.services)
            stats: StackStats = {
                "stack": stack,
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "interval": round(after[0] - before[0], 3),
                "services": combine(before, after),
            }
            if args.json:
                print(json.dumps(stats), flush=True)
            else:
                if not args.once and sys.stdout.isatty():
                    sys.stdout.write("\033[H\033[2J")
                sys.stdout.write(table(stats["services"]))
                sys.stdout.flush()
            if args.once:
                return 0
            before = after
    except KeyboardInterrupt:
        return 0


def _sample(stack: str, services: list[str]) -> Sample:
    from sandboxd.cli.client import request

    status = request(stack, {"cmd": "status", "services": services})
    usage = request(stack, {"cmd": "usage", "services": services})
    return time.monotonic(), status["services"], {u["name"]: u for u in usage["services"]}


def combine(before: Sample, after: Sample) -> list[ServiceStats]:
    """Each service of the later sample with its CPU % since the earlier one (0 for a service
    new since, or restarted: its CPU time went back) and its counters."""
    elapsed = max(after[0] - before[0], 1e-9)
    cpu_before = {svc["name"]: svc["cpu_seconds"] for svc in before[1]}
    result: list[ServiceStats] = []
    for svc in after[1]:
        used = svc["cpu_seconds"] - cpu_before.get(svc["name"], svc["cpu_seconds"])
        entry: ServiceStats = {
            "name": svc["name"], "state": svc["state"], "pid": svc["pid"],
            "cpu_percent": round(max(used, 0.0) / elapsed * 100, 2), "cpu_seconds": svc["cpu_seconds"],
            "memory": svc["memory"], "processes": svc["processes"],
        }
        usage = after[2].get(svc["name"])
        if usage is not None:
            for key in ("io_read_bytes", "io_write_bytes", "net_rx_bytes", "net_tx_bytes"):
                if key in usage:
                    entry[key] = usage[key]
        result.append(entry)
    return result


def table(services: list[ServiceStats]) -> str:
    """The services as `stats` prints them on a terminal."""
    rows = [("SERVICE", "STATE", "CPU %", "MEMORY", "CPU TIME", "PROCS", "NET RX / TX", "BLOCK READ / WRITE")]
    for svc in services:
        rows.append((
            svc["name"], svc["state"], f"{svc['cpu_percent']:.1f}%", f"{svc['memory'] / (1 << 20):.1f}MiB", f"{svc['cpu_seconds']:.2f}s",
            str(svc["processes"]), _pair(svc.get("net_rx_bytes"), svc.get("net_tx_bytes")),
            _pair(svc.get("io_read_bytes"), svc.get("io_write_bytes")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n" for row in rows)


def _pair(first: int | None, second: int | None) -> str:
    return "-" if first is None or second is None else f"{human_bytes(first)} / {human_bytes(second)}"


def human_bytes(count: int) -> str:
    """Bytes as docker stats shows them: 0B, 512B, 1.5kB, 12.3MB, 2.1GB (powers of 1000)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{count}B"
