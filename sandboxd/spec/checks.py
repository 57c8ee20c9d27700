"""The checks between the units of one spec folder, run once every file is read.

Each check takes every unit found (`Found`: its kind, name, file, the line of each key, and the
unit itself, or None when its document has problems) and returns the problems it sees, each
naming the file, line and key of the unit at fault. The checks name units with problems of their
own (a socket's service may exist even if that service's document is wrong), but look inside
valid ones only, so that one mistake is reported once.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sandboxd.errors import SpecError
from sandboxd.spec.model import Address, Network, Service, Socket, Volume, holds_proxy_address, socket_namespace

@dataclass(frozen=True)
class Found:
    """A unit as read from its document; `unit` is None when the document has problems."""

    kind: str
    name: str | None
    file: Path
    lines: dict[str, int]  # key path ("listen[1]") -> line; "" -> the document's line
    unit: Service | Socket | Network | Volume | None

    def key(self, key: str, index: int) -> str:
        """The key path of item `index` of list `key`, or `key` if it was not written as a list."""
        return f"{key}[{index}]" if f"{key}[{index}]" in self.lines else key

    def where(self, key: str) -> str:
        """`file:line` of `key`, for a message about another unit."""
        return f"{self.file.name}:{self.lines.get(key, self.lines[''])}"

    def error(self, key: str, message: str) -> SpecError:
        """A problem of this unit at `key` (at the unit's first line if the key is not written)."""
        return SpecError(self.file, self.lines.get(key, self.lines[""]), key, message)


def check_units(found: list[Found]) -> list[SpecError]:
    """The problems between the units of one folder (each unit's own problems are reported where it is read)."""
    return [error for check in _CHECKS for error in check(found)]


def _first_of_each(found: list[Found], kind: str) -> dict[str, Found]:
    first: dict[str, Found] = {}
    for unit in found:
        if unit.kind == kind and unit.name is not None:
            first.setdefault(unit.name, unit)
    return first


def _suggest(name: str, known: Iterable[str], kinds: str) -> str:
    import difflib  # for a "did you mean" hint alone: not imported by a spec without a mistake

    if close := difflib.get_close_matches(name, list(known), n=1):
        return f"; did you mean '{close[0]}'?"
    return f"; {kinds} in this folder: {', '.join(sorted(known))}" if known else f"; this folder has no {kinds}"


def _duplicate_names(found: list[Found]) -> list[SpecError]:
    firsts = {kind: _first_of_each(found, kind) for kind in {unit.kind for unit in found}}
    duplicates = [(unit, firsts[unit.kind][unit.name]) for unit in found if unit.name is not None]
    errors = []
    for unit, first in duplicates:
        if first is unit or (_implied(unit) and _implied(first)):
            continue  # two services of one name, reported as such
        if _implied(unit) or _implied(first):
            explicit, implied = (first, unit) if _implied(unit) else (unit, first)
            errors.append(
                explicit.error(
                    "name",
                    f"socket '{explicit.name}' is also the socket that service '{implied.name}' has through its listen: "
                    f"({implied.where('listen')}); keep one: remove listen: from the service, or remove this socket unit "
                    "(or rename it) and let the service's listen: give the address",
                )
            )
            continue
        errors.append(unit.error("name", f"duplicate {unit.kind} '{unit.name}' (also defined at {first.where('name')})"))
    return errors


def _implied(unit: Found) -> bool:
    return isinstance(unit.unit, Socket) and unit.unit.implied


def _missing_services(found: list[Found]) -> list[SpecError]:
    services = _first_of_each(found, "service")
    return [
        unit.error("service", f"no service '{name}' to pass this socket to{_suggest(name, services, 'services')}")
        for unit in found
        if isinstance(unit.unit, Socket) and (name := unit.unit.service) not in services
    ]


def _overlap(a: Address, b: Address) -> bool:
    if not (a.is_inet and b.is_inet):
        return a.path is not None and a.path == b.path
    if a.family != b.family or a.port != b.port or a.port == 0:
        return False
    host_a, host_b = ipaddress.ip_address(a.host or ""), ipaddress.ip_address(b.host or "")
    return host_a.version == host_b.version and (host_a == host_b or host_a.is_unspecified or host_b.is_unspecified)


def _clash_scope(sock: Socket, address: Address) -> str | None:
    """Unix paths share the file system; inet and abstract addresses belong to a network namespace."""
    return "" if address.path and not address.is_abstract else socket_namespace(sock) or "host"


def _address_clashes(found: list[Found]) -> list[SpecError]:
    # Only addresses of one bucket can overlap (_overlap): the same path, or the same family and
    # port; each address is compared with those of its bucket, in the order they were seen.
    seen: dict[tuple[object, ...], list[tuple[Found, str, Address, str | None]]] = {}
    errors = []
    for unit in found:
        if not isinstance(unit.unit, Socket):
            continue
        for index, address in enumerate(unit.unit.listen):
            key, scope = unit.key("listen", index), _clash_scope(unit.unit, address)
            bucket = seen.setdefault(_overlap_bucket(address), [])
            for other, other_key, other_address, other_scope in bucket:
                if scope == other_scope and _overlap(address, other_address):
                    verb = "is already used by" if address == other_address else f"overlaps {other_address} of"
                    owner = f"{other_key} of this socket" if other is unit else f"socket '{other.name}'"
                    errors.append(unit.error(key, f"{address} {verb} {owner} ({other.where(other_key)})"))
                    break
            bucket.append((unit, key, address, scope))
    return errors


def _overlap_bucket(address: Address) -> tuple[object, ...]:
    """What two addresses that _overlap share: their path, or (inet) their family and port."""
    return ("inet", address.family, address.port) if address.is_inet else ("path", address.path)


def _networks_of(service: Service | None) -> set[str]:
    return {a.network for a in service.attachments} if service else set()


def _unreachable(client: Service, sock: Socket, address: Address, services: dict[str, Found]) -> str | None:
    """Why `client` cannot reach `address` of `sock`, or None if it can."""
    owner = socket_namespace(sock)
    if owner == client.name or (owner is None and client.network == "host"):
        return None
    if address.is_abstract:
        where = f"that of '{owner}'" if owner else "the host's"
        return f"abstract sockets belong to one network namespace ({where}); use a path"
    if owner is None:
        return (
            f"it is bound in the host's network namespace, which '{client.name}' does not share; bind it in its "
            f"service's namespace (netns: service) on a network both are attached to, or use a unix socket"
        )
    if address.host and ipaddress.ip_address(address.host).is_loopback:
        return f"it listens on loopback inside the namespace of '{owner}', which only '{owner}' reaches; listen on 0.0.0.0 or [::]"
    found = services.get(owner)
    shared = _networks_of(found.unit if found and isinstance(found.unit, Service) else None)
    if shared & _networks_of(client):
        return None
    if not shared:
        return f"'{owner}' is on no network; attach '{owner}' and '{client.name}' to one (network: [NAME])"
    return f"'{client.name}' shares no network with '{owner}'; attach it to one of: {', '.join(sorted(shared))}"


def _bad_uses(found: list[Found]) -> list[SpecError]:
    sockets = _first_of_each(found, "socket")
    services = _first_of_each(found, "service")
    errors = []
    for unit in found:
        if not isinstance(unit.unit, Service):
            continue
        for index, name in enumerate(unit.unit.uses):
            key, used = unit.key("uses", index), sockets.get(name)
            if used is None:
                errors.append(unit.error(key, f"no socket '{name}' to use{_suggest(name, sockets, 'sockets')}"))
                continue
            if not isinstance(used.unit, Socket):
                continue
            for address in used.unit.listen:
                if address.is_inet or address.is_abstract:
                    why = _unreachable(unit.unit, used.unit, address, services)
                    if why:
                        errors.append(unit.error(key, f"socket '{name}' listens on {address}, but {why}"))
    return errors


def _bad_netns(found: list[Found]) -> list[SpecError]:
    services = _first_of_each(found, "service")
    errors = []
    for unit in found:
        if not isinstance(unit.unit, Socket) or unit.unit.netns == "host":
            continue
        owner = socket_namespace(unit.unit)
        assert owner is not None
        target = services.get(owner)
        if target is None:
            if unit.unit.netns != "service":
                errors.append(unit.error("netns", f"expected host, service or a service name, got '{owner}'{_suggest(owner, services, 'services')}"))
            continue
        if isinstance(target.unit, Service) and target.unit.network == "host":
            errors.append(
                unit.error(
                    "netns",
                    f"service '{owner}' runs in the host's network namespace (network: host), so it has no namespace "
                    "of its own to bind in; use netns: host",
                )
            )
    return errors


def _bad_networks(found: list[Found]) -> list[SpecError]:
    networks = _first_of_each(found, "network")
    errors: list[SpecError] = []
    subnets: list[tuple[Found, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for unit in found:
        if isinstance(unit.unit, Network):
            for cidr in unit.unit.subnet:
                net = ipaddress.ip_network(cidr)
                for other, other_net in subnets:
                    if other_net.version == net.version and net.overlaps(other_net):
                        errors.append(unit.error("subnet", f"{net} overlaps {other_net} of network '{other.name}' ({other.where('subnet')})"))
                subnets.append((unit, net))
    taken: dict[tuple[str, str], str] = {}
    for unit in found:
        if not isinstance(unit.unit, Service):
            continue
        seen: set[str] = set()
        for index, attachment in enumerate(unit.unit.attachments):
            key = unit.key("network", index)
            network = networks.get(attachment.network)
            if network is None:
                errors.append(unit.error(key, f"no network '{attachment.network}'{_suggest(attachment.network, networks, 'networks')}"))
                continue
            if attachment.network in seen:
                errors.append(unit.error(key, f"network '{attachment.network}' is listed twice"))
            seen.add(attachment.network)
            if not isinstance(network.unit, Network):
                continue
            for address in attachment.addresses:
                errors += _bad_address(unit, key, attachment.network, network.unit, address, taken)
    return errors


def _bad_address(unit: Found, key: str, name: str, network: Network, address: str, taken: dict[tuple[str, str], str]) -> list[SpecError]:
    ip = ipaddress.ip_address(address)
    nets = [ipaddress.ip_network(c) for c in network.subnet if ipaddress.ip_network(c).version == ip.version]
    if not nets:
        return [unit.error(key, f"{address}: network '{name}' has no IPv{ip.version} subnet; give it one (subnet:) to fix addresses in it")]
    net = nets[0]
    if ip not in net:
        return [unit.error(key, f"{address} is outside the subnet {net} of network '{name}'")]
    if ip == net.network_address or (ip.version == 4 and ip == net.broadcast_address):
        return [unit.error(key, f"{address} is the network or broadcast address of {net}; pick a host address")]
    owner = taken.setdefault((name, str(ip)), unit.name or "")
    if owner != unit.name:
        return [unit.error(key, f"{address} on network '{name}' is already taken by service '{owner}'")]
    return []


def _bad_activation(found: list[Found]) -> list[SpecError]:
    """accept: true needs a stream socket, and a service fed by one is started per connection only."""
    errors = []
    sockets = [unit for unit in found if isinstance(unit.unit, Socket)]
    for unit in sockets:
        assert isinstance(unit.unit, Socket)
        if unit.unit.accept:
            for index, address in enumerate(unit.unit.listen):
                if address.socktype != socket.SOCK_STREAM:
                    errors.append(unit.error(unit.key("listen", index), f"{address} is not a stream socket; accept: true needs tcp: or unix:"))
            others = [
                other.name
                for other in sockets
                if isinstance(other.unit, Socket) and other.unit.service == unit.unit.service and not other.unit.accept
            ]
            if others:
                errors.append(
                    unit.error(
                        "accept",
                        f"service '{unit.unit.service}' gets one sandbox per connection from this socket, so it cannot "
                        f"also be fed by socket(s) without accept: {', '.join(sorted(str(o) for o in others))}",
                    )
                )
    return errors


def _bad_dependencies(found: list[Found]) -> list[SpecError]:
    """`after:` must name existing services and must not go round in a circle."""
    services = _first_of_each(found, "service")
    errors = []
    graph: dict[str, list[str]] = {}
    for unit in found:
        if not isinstance(unit.unit, Service):
            continue
        graph[unit.unit.name] = []
        for index, dep in enumerate(unit.unit.after):
            if dep.service not in services:
                errors.append(unit.error(unit.key("after", index), f"no service '{dep.service}' to wait for{_suggest(dep.service, services, 'services')}"))
            elif dep.service == unit.unit.name:
                errors.append(unit.error(unit.key("after", index), "a service cannot wait for itself"))
            else:
                graph[unit.unit.name].append(dep.service)
    reported: set[frozenset[str]] = set()
    for start in sorted(graph):
        cycle = _find_cycle(graph, start)
        if cycle and frozenset(cycle) not in reported:
            reported.add(frozenset(cycle))
            unit = services[cycle[0]]
            errors.append(unit.error("after", f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}; use sockets instead, which need no order"))
    return errors


def _find_cycle(graph: dict[str, list[str]], start: str) -> list[str] | None:
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :]
        path.append(node)
        for nxt in graph.get(node, []):
            if (found := visit(nxt)) is not None:
                return found
        path.pop()
        return None

    cycle = visit(start)
    return cycle if cycle and cycle[0] == start else None


def _bad_volumes(found: list[Found]) -> list[SpecError]:
    volumes = _first_of_each(found, "volume")
    errors = []
    for unit in found:
        if isinstance(unit.unit, Service):
            for index, mount in enumerate(unit.unit.mounts):
                if mount.volume and mount.volume not in volumes:
                    errors.append(unit.error(unit.key("mounts", index), f"no volume '{mount.volume}'{_suggest(mount.volume, volumes, 'volumes')}; declare it with kind: volume"))
    return errors


def _bad_proxies(found: list[Found]) -> list[SpecError]:
    """A proxied socket is served by sandboxd's forwarder, never handed to the program itself."""
    errors = []
    for unit in found:
        sock = unit.unit
        if not isinstance(sock, Socket) or sock.proxy is None:
            continue
        if sock.accept:
            errors.append(unit.error("proxy", "proxy: and accept: true exclude each other: the proxy accepts the connections itself"))
        for index, address in enumerate(sock.listen):
            if address.socktype != socket.SOCK_STREAM:
                errors.append(unit.error(unit.key("listen", index), f"{address} is not a stream socket; a proxy forwards tcp: or unix: connections"))
        errors += _proxy_on_its_own_address(unit, sock)
    return errors


def _proxy_on_its_own_address(unit: Found, sock: Socket) -> list[SpecError]:
    """A socket bound in its service's namespace on the proxy's own address: the program's bind()
    of that address can only work through the handoff (it is given this socket), as sandboxd's
    socket holds the address; forwarding to it could never work."""
    if not holds_proxy_address(sock):
        return []
    held = f"this socket holds {sock.proxy} inside the namespace of '{sock.service}' (netns: {sock.netns})"
    if len(sock.listen) != 1:
        return [
            unit.error(
                "listen",
                f"{held}, so the program's bind() of it only works when it is given this socket (the handoff), which needs "
                f"one listen address; give this socket only that address, or proxy to another port",
            )
        ]
    if sock.handoff is False:
        return [
            unit.error(
                "handoff",
                f"{held}: with handoff: false the program's own bind() of it fails (EADDRINUSE) and nothing can be forwarded "
                f"to it; remove handoff: false (the program is given this socket when it binds {sock.proxy}), or make the "
                "program listen on another port and proxy to that",
            )
        ]
    return []


def _bad_roots(found: list[Found]) -> list[SpecError]:
    errors = []
    for unit in found:
        service = unit.unit
        if not isinstance(service, Service):
            continue
        if not service.readonly_root and service.image == "host":
            errors.append(unit.error("readonly_root", "a writable root needs an image (image: NAME or a folder): the host's root stays read-only; use tmpfs: or mounts: for what must be written"))
    return errors


_CHECKS: tuple[Callable[[list[Found]], list[SpecError]], ...] = (
    _duplicate_names,
    _missing_services,
    _address_clashes,
    _bad_uses,
    _bad_networks,
    _bad_netns,
    _bad_activation,
    _bad_dependencies,
    _bad_volumes,
    _bad_proxies,
    _bad_roots,
)
