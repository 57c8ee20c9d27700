"""What `sandboxd stats` asks of a running stack besides its status (the `usage` request): each
service's I/O bytes, from its cgroup (host/cgroups/group.py says which file), and its network
bytes, from /proc/PID/net/dev of its init: that file shows the network namespace of the process
it is read through, so the service's own links are counted without entering its namespace. A
service in the host's namespace (network: host) has no network bytes of its own: none are given.
Read only when asked, so that `ps` and the status polls do not pay for it."""

from __future__ import annotations

import os

from sandboxd.daemon.runtime import ServiceRuntime
from sandboxd.daemon.states import ALIVE
from sandboxd.wire import ServiceUsage


def service_usage(rt: ServiceRuntime) -> ServiceUsage:
    """The counters of one service that the host gives (see ServiceUsage)."""
    usage: ServiceUsage = {"name": rt.spec.name}
    io = rt.cgroup.io_bytes()
    if io is not None:
        usage["io_read_bytes"], usage["io_write_bytes"] = io
    net = network_bytes(rt.launch.pid) if rt.state in ALIVE and rt.launch.pid else None
    if net is not None:
        usage["net_rx_bytes"], usage["net_tx_bytes"] = net
    return usage


def network_bytes(pid: int) -> tuple[int, int] | None:
    """Bytes received and sent on every link but lo of the network namespace `pid` is in, or None
    if that is this process's own namespace (the host's) or the process is gone."""
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.read().splitlines()[2:]  # two lines of headers
    except OSError:
        return None
    return parse_net_dev(lines)


def parse_net_dev(lines: list[str]) -> tuple[int, int]:
    """Received and sent bytes summed over the links of /proc/net/dev lines, lo left out:
    `  eth0: RXBYTES RXPACKETS … (8 receive fields) TXBYTES …`."""
    received = sent = 0
    for line in lines:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() == "lo" or len(fields) < 9:
            continue
        received += int(fields[0])
        sent += int(fields[8])
    return received, sent
