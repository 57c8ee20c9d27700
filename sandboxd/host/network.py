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
pyroute2 is imported only by stacks that have networks or sockets bound in a service's namespace.
A reload (plan/network_steps.py) removes links one by one, both ends at once, before it gives up
a namespace, and makes new ones on the bridges that stay. A service's MAC address is made of its
first IP address (as docker did), so a link made anew for an address keeps the MAC that the
peers' neighbour caches hold for it.

Subnets not given in the spec are chosen at start, avoiding the host's routes and the subnets of
every other running sandboxd stack (recorded in their state files, read under a lock); a reload
keeps them.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sandboxd.kernel import abi, linux
from sandboxd.host.paths import RUNTIME_ROOT
from sandboxd.host.paths import alive as _alive
from sandboxd.errors import HostError
from sandboxd.plan.launch import Member, NetworkPlan
from sandboxd.plan.network_steps import NetworkSteps
from sandboxd.plan.networks import RESOLV_CONF, hosts_file
from sandboxd.spec.model import Stack

IFA_F_NODAD = 0x02  # IPv6 addresses usable at once, without duplicate address detection
BRIDGE_INDEX = 2
V4_POOLS = [ipaddress.ip_network("10.213.0.0/16"), ipaddress.ip_network("172.29.0.0/16"), ipaddress.ip_network("192.168.213.0/24")]
V6_POOL = ipaddress.ip_network("fd5b:d000::/48")

NETWORK_HINT = "check that veth and bridge links are available (modprobe veth bridge)"

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class Namespaces:
    """Network namespaces held by descriptor; entered for a moment by the calling thread only.

    `ports` numbers each network's bridge ports by service: port N is the veth `sbdN` in the
    bridge's namespace, at index BRIDGE_INDEX + 1 + N (a reload frees numbers and takes the lowest)."""

    def __init__(self) -> None:
        self.host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.fds: dict[str, int] = {}
        self.ports: dict[str, dict[str, int]] = {}

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

    def drop(self, key: str) -> None:
        """Give up one namespace: the kernel frees it, and its links, once nothing else holds it."""
        os.close(self.fds.pop(key))
        if key.startswith("network:"):
            self.ports.pop(key.removeprefix("network:"), None)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.host)


def _pyroute2() -> tuple[Any, type[Exception]]:
    """pyroute2's IPRoute class and its NetlinkError (imported only by stacks with networks)."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        # pyroute2 imports ssl, which `sandboxd up` kept from asyncio (cli/stack.py): allowed again.
        del sys.modules["ssl"]
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        raise HostError("pyroute2 is not installed; sandboxd needs it for networks", "pip install pyroute2") from None
    return IPRoute, NetlinkError


def mac_address(member: Member) -> str:
    """The member's MAC address, made of its first address (as docker did): a link made anew for
    an address, after a reload, has the MAC its peers' neighbour caches hold for it."""
    packed = ipaddress.ip_interface(member.addresses[0]).ip.packed[-4:] if member.addresses else os.urandom(4)
    return "02:42:" + ":".join(f"{b:02x}" for b in packed)


class Links:
    """Netlink sockets into the namespaces of a stack's bridges and services, opened as needed and
    closed together; links and addresses are made and removed through them. `errors`: what a
    failing netlink call raises."""

    def __init__(self, namespaces: Namespaces) -> None:
        self.namespaces = namespaces
        self.netlink, netlink_error = _pyroute2()
        self.errors: tuple[type[Exception], ...] = (OSError, netlink_error)
        self.open: dict[str, Any] = {}

    def __enter__(self) -> Links:
        return self

    def __exit__(self, *_: object) -> None:
        for links in self.open.values():
            links.close()

    def of(self, key: str) -> Any:
        if key not in self.open:
            with self.namespaces.inside(key):
                self.open[key] = self.netlink()
        return self.open[key]

    def add_bridge(self, network: NetworkPlan) -> None:
        """The network's namespace, with its bridge up in it."""
        self.namespaces.create(f"network:{network.name}", loopback=False)
        self.namespaces.ports[network.name] = {}
        bridge = self.of(f"network:{network.name}")
        bridge.link("add", ifname=network.bridge, kind="bridge", index=BRIDGE_INDEX)
        bridge.link("set", index=BRIDGE_INDEX, state="up")

    def add_member(self, network: str, member: Member) -> None:
        """A veth pair from the network's bridge into the member's namespace, with its addresses, up."""
        ports = self.namespaces.ports[network]
        number = min(set(range(len(ports) + 1)) - set(ports.values()))
        port = BRIDGE_INDEX + 1 + number
        peer = {"ifname": member.ifname, "index": member.ifindex, "address": mac_address(member), "net_ns_fd": self.namespaces.fds[member.service]}
        bridge = self.of(f"network:{network}")
        bridge.link("add", ifname=f"sbd{number}", index=port, kind="veth", peer=peer)
        ports[member.service] = number
        bridge.link("set", index=port, master=BRIDGE_INDEX, state="up")
        inside = self.of(member.service)
        # Looked up by its name: the kernel numbers the peer itself (the index asked for holds
        # only while the namespace has had no other link), and a reload makes links anew.
        (index,) = inside.link_lookup(ifname=member.ifname)
        for address in member.addresses:
            ip, prefix = address.split("/")
            inside.addr("add", index=index, address=ip, prefixlen=int(prefix), flags=IFA_F_NODAD if ":" in ip else 0)
        inside.link("set", index=index, state="up")

    def remove_member(self, network: str, service: str) -> None:
        """The service's veth pair on the network, both ends at once (its bridge port frees)."""
        number = self.namespaces.ports[network].pop(service)
        self.of(f"network:{network}").link("del", index=BRIDGE_INDEX + 1 + number)

    def forget(self, key: str) -> None:
        """Close the netlink socket into a namespace about to be given up."""
        links = self.open.pop(key, None)
        if links is not None:
            links.close()


def build_networks(namespaces: Namespaces, networks: tuple[NetworkPlan, ...]) -> None:
    """Create each network's bridge in a namespace of its own and a veth pair into each member."""
    links = Links(namespaces)
    try:
        with links:
            for network in networks:
                links.add_bridge(network)
                for member in network.members:
                    links.add_member(network.name, member)
    except links.errors as e:
        raise HostError(f"cannot set up networks: {e}", NETWORK_HINT) from None


def apply_steps(namespaces: Namespaces, steps: NetworkSteps, networks: tuple[NetworkPlan, ...]) -> None:
    """A reload's steps (plan/network_steps.py): links that go first, then the bridges and the
    namespaces given up, then the namespaces, bridges and links made anew."""
    links = Links(namespaces)
    plans = {network.name: network for network in networks}
    try:
        with links:
            for network, service in steps.links_removed:
                links.remove_member(network, service)
            for key in [f"network:{name}" for name in steps.networks_removed] + steps.namespaces_closed:
                links.forget(key)
                namespaces.drop(key)
            for service, kind in steps.namespaces_made.items():
                namespaces.create(service, kind.loopback, kind.for_userns)
            for name in steps.networks_added:
                links.add_bridge(plans[name])
            for network, member in steps.links_added:
                links.add_member(network, member)
    except links.errors as e:
        raise HostError(f"cannot change the networks: {e}", NETWORK_HINT) from None


NAME_FILES = ("hosts", "resolv.conf")  # what write_name_files writes in runtime_dir/etc/NAME (runtimes.py writes hostname there)


def write_name_files(runtime_dir: Path, stack: Stack, networks: tuple[NetworkPlan, ...]) -> None:
    """The /etc/hosts and /etc/resolv.conf of every service on a network, in runtime_dir/etc/NAME.
    A hosts file is rewritten in place when it changes (a reload): sandboxes running with it bound
    see the new names at once, as compose's services resolve a new container's."""
    etc = runtime_dir / "etc"
    for service in stack.services:
        if not service.attachments:  # off every network now: its name files go, its /etc/hostname stays
            for name in NAME_FILES:
                (etc / service.name / name).unlink(missing_ok=True)
            continue
        (etc / service.name).mkdir(parents=True, exist_ok=True)
        for name, text in zip(NAME_FILES, (hosts_file(service, networks), RESOLV_CONF)):
            path = etc / service.name / name
            if not path.exists() or path.read_text() != text:
                with open(path, "w") as f:  # the same file: no rename, which a bind would not follow
                    f.write(text)
    names = {service.name for service in stack.services}
    for gone in [p for p in etc.iterdir() if p.name not in names] if etc.is_dir() else []:
        shutil.rmtree(gone, ignore_errors=True)  # a service the reload removed


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


def choose_subnets(stack: Stack, own: Path, keep: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """Every network's subnets: the spec's, or free ones (one IPv4 /24 and one IPv6 /64).
    `keep` (a reload): the subnets chosen before for networks that still give none.

    Call with the allocation lock held (see `allocation_lock`), and record the result in the
    state file before releasing it.
    """
    keep = keep or {}
    taken = _host_routes() + _other_stacks_subnets(own)
    given = [ipaddress.ip_network(c) for n in stack.networks for c in n.subnet or keep.get(n.name, ())]
    result: dict[str, tuple[str, ...]] = {}
    v6 = (n for n in V6_POOL.subnets(new_prefix=64))
    for network in stack.networks:
        if network.subnet or network.name in keep:
            result[network.name] = network.subnet or keep[network.name]
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
