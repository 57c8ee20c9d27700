"""What a reload does to a running stack's networks: which network namespaces, bridges and links
stay, which are made and which go, which services restart because their network changed although
their spec did not, and what cannot be done while the stack runs.

Pure: it compares the networks a stack runs with (plan_networks' result and the namespaces
sandboxd made) with those of the new spec, planned with the running ones as `previous` so that
addresses stay where they can. daemon/reload.py applies the steps; host/network.py makes and
removes namespaces and links.

What stays, and why:
- a service's network namespace, as long as its kind stays (made by sandboxd, lo up or down, for a
  user namespace or not). A changed service restarts in it as any restart does: with its
  addresses and with the sockets bound in it, whose clients wait in the queue meanwhile;
- its link (veth pair) on a network, as long as its interface name, index and addresses stay.
  Every other link of it goes and is made anew (removed before any is added);
- a bridge, as long as its network is in the spec; a network that is gone is removed after its
  links (its services have left it: they changed, so they restart without it).

A service whose spec did not change restarts only when a network it is on changed its subnets (as
compose recreates the containers of a changed network), or when sandboxd now makes its namespace,
or no longer does (a socket bound inside it came or went). Its address given to another service
(`address:`) is refused: a reload does not restart an unchanged service for another's sake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sandboxd.plan.launch import LaunchPlan, Member, NetworkPlan
from sandboxd.spec.model import Stack, socket_namespace


@dataclass(frozen=True)
class NamespaceKind:
    """What sandboxd made a service's network namespace as (host/network.py Namespaces.create)."""

    loopback: bool  # lo up (not `network: none`)
    for_userns: bool  # the service runs in a user namespace of its own (low ports allowed)


def own_namespaces(stack: Stack, plans: Mapping[str, LaunchPlan]) -> dict[str, NamespaceKind]:
    """The services whose network namespace sandboxd makes before they start, and how."""
    return {
        name: NamespaceKind(stack.service(name).network != "none", plan.userns is not None)
        for name, plan in plans.items()
        if plan.net == "join"
    }


@dataclass(frozen=True)
class Networked:
    """A stack's networks: as it runs them, or as the new spec plans them."""

    stack: Stack
    namespaces: Mapping[str, NamespaceKind]
    networks: tuple[NetworkPlan, ...]


@dataclass
class NetworkSteps:
    networks_removed: list[str] = field(default_factory=list)  # bridges removed, with their links
    networks_added: list[str] = field(default_factory=list)
    namespaces_closed: list[str] = field(default_factory=list)  # services' namespaces given up
    namespaces_made: dict[str, NamespaceKind] = field(default_factory=dict)
    # (network, service): every link that goes, removed (both ends at once) before any bridge or
    # namespace is given up, so that none lingers while the kernel frees a namespace.
    links_removed: list[tuple[str, str]] = field(default_factory=list)
    links_added: list[tuple[str, Member]] = field(default_factory=list)  # (network, member), after the removals
    restarted: dict[str, str] = field(default_factory=dict)  # unchanged services that restart: why
    sockets_rebound: list[str] = field(default_factory=list)  # bound in a namespace given up: bound anew
    moved: list[str] = field(default_factory=list)  # what is said of addresses that changed
    refusal: str = ""  # why this cannot be applied, or ""


def _members(networks: tuple[NetworkPlan, ...]) -> dict[tuple[str, str], Member]:
    return {(network.name, m.service): m for network in networks for m in network.members}


def _addresses(member: Member) -> str:
    return " ".join(a.split("/")[0] for a in member.addresses)


def network_steps(old: Networked, new: Networked, changed: set[str]) -> NetworkSteps:
    """The steps from `old` to `new`; `changed`: the services that restart or start anyway (their
    spec changed, or they are new)."""
    steps = NetworkSteps()
    old_nets, new_nets = {n.name: n for n in old.networks}, {n.name: n for n in new.networks}
    steps.networks_removed = sorted(set(old_nets) - set(new_nets))
    steps.networks_added = sorted(set(new_nets) - set(old_nets))
    kept_ns = {name for name, kind in old.namespaces.items() if new.namespaces.get(name) == kind}
    steps.namespaces_closed = sorted(set(old.namespaces) - kept_ns)
    steps.namespaces_made = {name: kind for name, kind in new.namespaces.items() if name not in kept_ns}
    old_members, new_members = _members(old.networks), _members(new.networks)
    kept = {key for key, m in old_members.items() if key[0] in new_nets and key[1] in kept_ns and new_members.get(key) == m}
    steps.links_removed = sorted(key for key in old_members if key not in kept)
    steps.links_added = [(key[0], m) for key, m in new_members.items() if key not in kept]
    closed = set(steps.namespaces_closed)
    steps.sockets_rebound = sorted(s.name for s in old.stack.sockets if socket_namespace(s) in closed)
    new_services = {s.name for s in new.stack.services}
    for name in sorted(new_services & {s.name for s in old.stack.services} - changed):
        why = _why_restarted(old, new, name, steps, kept)
        if why.startswith("refused: "):
            steps.refusal = why.removeprefix("refused: ")
            return steps
        if why:
            steps.restarted[name] = why
    for sock in new.stack.sockets:
        if sock.name in steps.sockets_rebound and sock.service not in changed | set(steps.restarted):
            steps.restarted[sock.service] = f"socket '{sock.name}' is bound anew, in a namespace made anew"
    for (network, service), m in new_members.items():
        before = old_members.get((network, service))
        if before is not None and before.addresses != m.addresses:
            steps.moved.append(f"{service}: on {network} {_addresses(m)} (was {_addresses(before)})")
    return steps


def _why_restarted(old: Networked, new: Networked, name: str, steps: NetworkSteps, kept: set[tuple[str, str]]) -> str:
    """Why an unchanged service restarts ("" if it does not; "refused: …" if it would have to and may not)."""
    if name in steps.namespaces_made:
        return "sandboxd makes its network namespace now (a socket is bound inside it)"
    if name in steps.namespaces_closed:
        return "sandboxd no longer makes its network namespace (no socket is bound inside it)"
    old_members, new_members = _members(old.networks), _members(new.networks)
    for network in sorted({net for net, svc in (*old_members, *new_members) if svc == name}):
        if (network, name) in kept:
            continue
        old_subnets = next(n.subnets for n in old.networks if n.name == network)
        new_subnets = next(n.subnets for n in new.networks if n.name == network)
        if old_subnets != new_subnets:
            return f"network '{network}' has new subnets ({', '.join(new_subnets)})"
        mine = old_members[(network, name)]
        for address in mine.addresses:
            ip = address.split("/")[0]
            taker = next((svc.name for svc in new.stack.members(network) for a in svc.attachments if a.network == network and ip in a.addresses), "")
            if taker:
                return (
                    f"refused: address {ip} on network '{network}' is held by service '{name}', which did not change, "
                    f"and the new spec gives it to service '{taker}' (address:); give '{taker}' another address"
                )
        return f"refused: service '{name}' did not change, but its place on network '{network}' would"
    return ""
