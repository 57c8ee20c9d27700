"""The lines `sandboxd up` prints once every service has started (or will not): how long the
launch took, and for each service where it runs, its network and its sockets."""

from __future__ import annotations


from sandboxd.daemon.console import Console
from sandboxd.daemon.proxy import proxy_plan
from sandboxd.daemon.runtime import RunningStack, ServiceRuntime
from sandboxd.daemon.states import State
from sandboxd.spec.model import socket_namespace


def print_summary(console: Console, running: RunningStack, elapsed: float) -> None:
    services = running.services.values()
    latencies = [(rt.launch.exec_ns - rt.launch.requested_ns) / 1e6 for rt in services if rt.launch.exec_ns]
    median = f", median launch {_median(latencies):.1f} ms" if latencies else ""
    console.note(f"stack {running.instance!r}: {counted(len(services), 'service')} launched in {elapsed * 1000:.0f} ms{median}")
    for rt in services:
        where = f"pid {rt.launch.pid}" if rt.state in (State.RUNNING, State.READY) else rt.state.label
        if rt.state is State.RUNNING and rt.spec.ready != "started":
            where += ", not ready yet"
        if rt.notify.status_text:
            where += f", status: {rt.notify.status_text}"
        socks = _sockets(running, rt) + [f"uses {name}" for name in rt.spec.uses]
        console.note(f"  {rt.spec.name}: {where}; {_network(running, rt)}; " + ("; ".join(socks) or "no sockets"))


def _median(values: list[float]) -> float:
    """statistics.median's, without its import (fractions, decimal and random: some 5 ms of CPU,
    spent while the stack's services start)."""
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(values) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` and the noun in its number: "1 service", "0 services", "3 services"."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _sockets(running: RunningStack, rt: ServiceRuntime) -> list[str]:
    socks = []
    for fd, key in enumerate(rt.plan.fd_sockets, start=3):
        unit = running.socket_unit(key[0])
        inside = f" in {unit.netns if unit.netns != 'service' else rt.spec.name}'s namespace" if unit.netns != "host" else ""
        socks.append(f"{running.sockets[key].real_address()}{inside} (fd {fd} {rt.plan.fd_names[fd - 3]})")
    for key in rt.plan.proxied:
        unit = running.socket_unit(key[0])
        inside = f" in {rt.spec.name}'s namespace" if socket_namespace(unit) == rt.spec.name else ""
        socks.append(f"{running.sockets[key].real_address()}{inside} ({proxy_plan(unit, rt)})")
    return socks


def _network(running: RunningStack, rt: ServiceRuntime) -> str:
    match rt.spec.network:
        case "host":
            return "network: host (shares the host's network namespace)"
        case "none":
            return "network: none"
        case "private":
            return "network: private (lo only)"
    places = [
        f"{network.name} {' '.join(a.split('/')[0] for a in member.addresses)}"
        for network in running.networks
        for member in network.members
        if member.service == rt.spec.name
    ]
    return "on " + ", ".join(places)
