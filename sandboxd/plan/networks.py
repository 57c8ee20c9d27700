"""A service's network: its mode, its addresses on the stack's networks, its /etc/hosts.

Addresses are handed out per network, fixed ones first, then in service name order, from the
subnets the spec gives or those chosen at start (host/network.py chooses, and makes the bridges,
links and namespaces this plans).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from sandboxd.errors import HostError
from sandboxd.plan.launch import IPAddress, IPNetwork, Member, NetMode, NetworkPlan
from sandboxd.spec.model import Service, Stack


def net_mode(stack: Stack, service: Service) -> NetMode:
    """private: a fresh namespace with lo up; none: fresh, lo down; host: the host's; join: the
    namespace sandboxd makes for the service before it starts (networks, sockets bound inside)."""
    if service.network == "host":
        return "host"
    if service.attachments or stack.binds_inside(service.name):
        return "join"
    return "none" if service.network == "none" else "private"


def _ifnames(service: Service) -> list[str]:
    names = [f"sbd-{a.network}"[:15] for a in service.attachments]
    if len(set(names)) != len(names):
        names = [f"sbd{i}-{a.network}"[:15] for i, a in enumerate(service.attachments)]
    return names


def _free_hosts(net: IPNetwork, taken: set[IPAddress]) -> Iterator[IPAddress]:
    hosts = net.hosts()
    next(hosts, None)  # the first host address stays free, as a gateway would take it
    return (ip for ip in hosts if ip not in taken)


def _held_before(member: Member | None, net: IPNetwork, fixed: set[IPAddress]) -> IPAddress | None:
    """The address a member had in `net` before a reload, if it may keep it: still a host
    address of the subnet, and not one that a service is given now (`address:`)."""
    for address in member.addresses if member is not None else ():
        ip = ipaddress.ip_interface(address).ip
        if ip in net and ip not in fixed and ip != net.network_address and not (ip.version == 4 and ip == net.broadcast_address):
            return ip
    return None


def plan_networks(stack: Stack, subnets: dict[str, tuple[str, ...]], previous: tuple[NetworkPlan, ...] = ()) -> tuple[NetworkPlan, ...]:
    """Addresses for every member of every network: fixed ones first, then in service name order.

    `subnets` gives each network's subnets (the spec's, or those chosen at start). The first host
    address of each subnet is left free, as a gateway would take it, so addresses start at .2.
    `previous` (a reload: the networks the stack runs with) keeps a member's address where its
    network and its own `address:` allow: it stays in the subnet and no service is given it now.
    """
    before = {(network.name, m.service): m for network in previous for m in network.members}
    plans = []
    for network in stack.networks:
        nets = [ipaddress.ip_network(c) for c in subnets[network.name]]
        attachments = [(svc, a) for svc in stack.members(network.name) for a in svc.attachments if a.network == network.name]
        fixed_ips: set[IPAddress] = {ipaddress.ip_address(addr) for _, a in attachments for addr in a.addresses}
        kept = {
            (svc.name, net.version): ip
            for svc, a in attachments
            if not a.addresses
            for net in nets
            if (ip := _held_before(before.get((network.name, svc.name)), net, fixed_ips))
        }
        free = {net.version: _free_hosts(net, fixed_ips | set(kept.values())) for net in nets}
        members = []
        for svc, attachment in attachments:
            fixed = {ipaddress.ip_address(addr).version: addr for addr in attachment.addresses}
            addresses = []
            for net in nets:
                address = fixed.get(net.version) or kept.get((svc.name, net.version)) or next(free[net.version], None)
                if address is None:
                    raise HostError(f"network '{network.name}' has no free address left in {net} for service '{svc.name}'", "give the network a larger subnet")
                addresses.append(f"{address}/{net.prefixlen}")
            index = [a.network for a in svc.attachments].index(network.name)
            members.append(Member(svc.name, _ifnames(svc)[index], 2 + index, tuple(addresses)))
        plans.append(NetworkPlan(network.name, f"sbd-{network.name}"[:15], tuple(str(n) for n in nets), tuple(members)))
    return tuple(plans)


def hosts_file(service: Service, networks: tuple[NetworkPlan, ...]) -> str:
    """/etc/hosts for a service on networks: itself, and every service on any of its networks."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    mine = {a.network for a in service.attachments}
    seen: set[tuple[str, str]] = set()
    for network in networks:
        if network.name not in mine:
            continue
        for member in network.members:
            for address in member.addresses:
                ip = address.split("/")[0]
                if (ip, member.service) not in seen:
                    seen.add((ip, member.service))
                    lines.append(f"{ip}\t{member.service}")
    return "\n".join(lines) + "\n"


RESOLV_CONF = "# sandboxd: this sandbox reaches no DNS server; names of its networks are in /etc/hosts\nnameserver 127.0.0.1\noptions ndots:0 attempts:1 timeout:1\n"
