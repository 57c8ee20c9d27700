"""Network namespaces, internal networks and their addresses, made before any service starts.

A service that is on a network, or in whose namespace a socket is bound, gets its network
namespace from the supervisor before it starts; the sandbox joins it (setns) instead of making a
fresh one, so the namespace, its addresses and the sockets bound in it outlive restarts.

Namespaces are held by open file descriptors in the supervisor, not by bind-mounted files: when
sandboxd exits, or is killed, the kernel frees them and everything in them (veth pairs, bridges)
by itself, so a crash cannot leave a namespace or a link behind. Nothing is ever created in the
host's namespace: each network's bridge lives in a namespace of its own, so `ip link` on the host
shows nothing of sandboxd's, and the bridge has no address, no route and no forwarding; no packet
can leave the network.

Links and addresses are made through netlink with pyroute2. Its import costs about 0.2 s, so
this module is imported only by stacks that have networks or sockets bound in a service's
namespace.

Subnets not given in the spec are chosen at start, avoiding the host's routes and the subnets of
every other running sandboxd stack (recorded in their state files, read under a lock).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandboxd.kernel import abi, linux
from sandboxd.host.paths import RUNTIME_ROOT
from sandboxd.host.paths import alive as _alive
from sandboxd.errors import HostError
from sandboxd.plan.launch import NetworkPlan
from sandboxd.spec.model import Stack

IFA_F_NODAD = 0x02  # IPv6 addresses usable at once, without duplicate address detection
BRIDGE_INDEX = 2
V4_POOLS = [ipaddress.ip_network("10.213.0.0/16"), ipaddress.ip_network("172.29.0.0/16"), ipaddress.ip_network("192.168.213.0/24")]
V6_POOL = ipaddress.ip_network("fd5b:d000::/48")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class Namespaces:
    """Network namespaces held by descriptor; entered for a moment by the calling thread only."""

    def __init__(self) -> None:
        self.host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.fds: dict[str, int] = {}

    def create(self, key: str, loopback: bool = True, for_userns: bool = False) -> int:
        """A new network namespace. `for_userns`: its service runs in a user namespace of its own,
        whose capabilities do not count in a namespace owned by the host's (this one): it may bind
        ports below 1024 and open ICMP echo sockets without them, as docker sets it by default."""
        linux.unshare(abi.CLONE_NEWNET)
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if loopback:
                linux.loopback_up()
            if for_userns:
                for name, value in (("ip_unprivileged_port_start", "0"), ("ping_group_range", "0 2147483647")):
                    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:  # this thread's namespace
                        f.write(value)
        finally:
            linux.setns(self.host, abi.CLONE_NEWNET)
        self.fds[key] = fd
        return fd

    @contextmanager
    def inside(self, key: str | None) -> Iterator[None]:
        """Run the block in namespace `key` (None: the host's)."""
        if key is None:
            yield
            return
        linux.setns(self.fds[key], abi.CLONE_NEWNET)
        try:
            yield
        finally:
            linux.setns(self.host, abi.CLONE_NEWNET)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.host)


def build_networks(namespaces: Namespaces, networks: tuple[NetworkPlan, ...]) -> None:
    """Create each network's bridge in a namespace of its own and a veth pair into each member."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        # pyroute2 imports ssl, which `sandboxd up` kept from asyncio (cli/stack.py): allowed again.
        del sys.modules["ssl"]
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        raise HostError("pyroute2 is not installed; sandboxd needs it for networks", "pip install pyroute2") from None
    service_links: dict[str, IPRoute] = {}
    try:
        for network in networks:
            namespaces.create(f"network:{network.name}", loopback=False)
            with namespaces.inside(f"network:{network.name}"):
                bridge_ns = IPRoute()
            with bridge_ns:
                bridge_ns.link("add", ifname=network.bridge, kind="bridge", index=BRIDGE_INDEX)
                bridge_ns.link("set", index=BRIDGE_INDEX, state="up")
                for number, member in enumerate(network.members):
                    port = BRIDGE_INDEX + 1 + number
                    bridge_ns.link(
                        "add",
                        ifname=f"sbd{number}",
                        index=port,
                        kind="veth",
                        peer={"ifname": member.ifname, "index": member.ifindex, "net_ns_fd": namespaces.fds[member.service]},
                    )
                    bridge_ns.link("set", index=port, master=BRIDGE_INDEX, state="up")
                    if member.service not in service_links:
                        with namespaces.inside(member.service):
                            service_links[member.service] = IPRoute()
                    inside = service_links[member.service]
                    for address in member.addresses:
                        ip, prefix = address.split("/")
                        flags = IFA_F_NODAD if ":" in ip else 0
                        inside.addr("add", index=member.ifindex, address=ip, prefixlen=int(prefix), flags=flags)
                    inside.link("set", index=member.ifindex, state="up")
    except (OSError, NetlinkError) as e:
        raise HostError(f"cannot set up networks: {e}", "check that veth and bridge links are available (modprobe veth bridge)") from None
    finally:
        for links in service_links.values():
            links.close()


def _host_routes() -> list[Net]:
    """Destinations of the host's IPv4 and IPv6 routes (from /proc, no netlink needed)."""
    routes: list[Net] = []
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            dest, mask = (ipaddress.IPv4Address(int(x, 16).to_bytes(4, "little")) for x in (fields[1], fields[7]))
            if int(mask):
                routes.append(ipaddress.ip_network(f"{dest}/{mask}", strict=False))
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            dest6, prefix6 = line.split()[:2]
            if int(prefix6, 16):
                routes.append(ipaddress.ip_network(f"{ipaddress.IPv6Address(bytes.fromhex(dest6))}/{int(prefix6, 16)}", strict=False))
    except OSError:
        pass
    return routes


def _other_stacks_subnets(own: Path) -> list[Net]:
    taken: list[Net] = []
    if not RUNTIME_ROOT.is_dir():
        return taken
    for directory in RUNTIME_ROOT.iterdir():
        if directory == own:
            continue
        try:
            data = json.loads((directory / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if _alive(data.get("pid", 0)):
            taken += [ipaddress.ip_network(c) for c in data.get("subnets", [])]
    return taken


def _candidates() -> Iterator[Net]:
    for pool in V4_POOLS:
        yield from pool.subnets(new_prefix=24)


def choose_subnets(stack: Stack, own: Path) -> dict[str, tuple[str, ...]]:
    """Every network's subnets: the spec's, or free ones (one IPv4 /24 and one IPv6 /64).

    Call with the allocation lock held (see `allocation_lock`), and record the result in the
    state file before releasing it.
    """
    taken = _host_routes() + _other_stacks_subnets(own)
    given = [ipaddress.ip_network(c) for n in stack.networks for c in n.subnet]
    result: dict[str, tuple[str, ...]] = {}
    v6 = (n for n in V6_POOL.subnets(new_prefix=64))
    for network in stack.networks:
        if network.subnet:
            result[network.name] = network.subnet
            continue
        busy = taken + given + [ipaddress.ip_network(c) for cs in result.values() for c in cs]
        v4 = next((c for c in _candidates() if not any(c.overlaps(t) for t in busy if t.version == 4)), None)
        if v4 is None:
            raise HostError(f"no free IPv4 subnet for network '{network.name}'", "give it one with subnet: in its spec")
        six = next(c for c in v6 if not any(c.overlaps(t) for t in busy if t.version == 6))
        result[network.name] = (str(v4), str(six))
    return result


@contextmanager
def allocation_lock() -> Iterator[None]:
    """Serialise subnet choice between stacks: a lock on the runtime directory itself (no lock file)."""
    RUNTIME_ROOT.mkdir(parents=True, exist_ok=True)
    fd = os.open(RUNTIME_ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
