"""Whether an address listens in the network namespace of a process, read from its
/proc/PID/net/{tcp,tcp6,unix}: no probe connection ever reaches the program listening there."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from sandboxd.spec.model import Address

TCP_LISTEN = "0A"  # the st column of a listening socket in /proc/net/tcp{,6}
UNIX_LISTENING = 1 << 16  # __SO_ACCEPTCON in the Flags column of /proc/net/unix


def _hex(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How /proc/net/tcp{,6} writes an address: host byte order within each 32-bit word."""
    packed = ip.packed
    return "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))


def listen_forms(host: str, port: int) -> dict[str, set[str]]:
    """The local addresses, per table, of a listening socket that accepts connections to host:port:
    the address itself, or any address (0.0.0.0, ::); for IPv4 also a dual-stack IPv6 socket."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        v4 = {_hex(ip), _hex(ipaddress.IPv4Address(0))}
        v6 = {_hex(mapped), _hex(ipaddress.IPv6Address(0))}
        return {"tcp": {f"{a}:{port:04X}" for a in v4}, "tcp6": {f"{a}:{port:04X}" for a in v6}}
    return {"tcp6": {f"{a}:{port:04X}" for a in {_hex(ip), _hex(ipaddress.IPv6Address(0))}}}


def listening(pid: int, target: Address) -> bool:
    """Whether `target` listens in the network namespace of process `pid`. Raises OSError once the
    process is gone."""
    if target.path is not None:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == target.path and int(fields[3], 16) & UNIX_LISTENING:
                    return True
        return False
    assert target.host is not None and target.port is not None
    for table, wanted in listen_forms(target.host, target.port).items():
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == TCP_LISTEN and fields[1] in wanted:
                        return True
        except FileNotFoundError:
            if not Path(f"/proc/{pid}").exists():
                raise
    return False
