"""Networks and sockets' clients as NetworkPolicies: what a pod may reach and be reached by.

A sandbox with `network: private` (the default) or `none` has nothing but lo: nobody reaches it
but through the sockets sandboxd passes it, and it reaches nobody but through the sockets it
`uses:`. On Kubernetes that is:

    STACK-default-deny     every pod of the stack: no ingress, no egress
    STACK-socket-NAME      ingress to the socket's pod on its ports: from the pods that use it,
                           and from anywhere for a socket sandboxd binds on all the host's addresses
    STACK-uses-SERVICE     egress from a pod to the pods whose sockets it uses, and to DNS (port 53)
                           so that it can find their Services by name
    STACK-network-NAME     ingress and egress between the members of a `kind: network`

NetworkPolicies hold only where the cluster's network plug-in enforces them (Calico, Cilium ...),
and not for pods with hostNetwork (`network: host`).
"""

from __future__ import annotations

from typing import Any

from sandboxd.export.decisions import UnitNotes
from sandboxd.export.pod import k8s_name, labels
from sandboxd.spec.model import Network, Service, Socket, Stack, socket_namespace

Object = dict[str, Any]
PROTOCOL = {"tcp": "TCP", "udp": "UDP"}


def network_label(network: str) -> str:
    return f"sandboxd.network/{k8s_name(network)}"


def _policy(stack: Stack, name: str, selector: Object, spec: Object, namespace: str) -> Object:
    metadata: Object = {"name": k8s_name(f"{stack.name}-{name}"), "labels": {"app.kubernetes.io/part-of": k8s_name(stack.name)}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata, "spec": {"podSelector": selector, **spec}}


def service_ports(sock: Socket) -> list[Object]:
    """The ports the socket's pod is reached on: the proxy's port, or its listen addresses'."""
    if sock.proxy is not None:
        listening = [a for a in sock.listen if a.is_inet]
        return [{"protocol": "TCP", "port": sock.proxy.port}] if listening and sock.proxy.is_inet else []
    return [{"protocol": PROTOCOL[a.family], "port": a.port} for a in sock.listen if a.is_inet and a.port]


def exposed(sock: Socket) -> bool:
    """Whether a socket gets a Kubernetes Service: bound on the host, or on a non-loopback address of its own namespace."""
    inet = [a for a in sock.listen if a.is_inet]
    if socket_namespace(sock) is None:
        return bool(inet)
    return sock.proxy is None and any(a.host not in ("127.0.0.1", "::1") for a in inet)


def open_to_all(sock: Socket) -> bool:
    """A socket bound on all the host's addresses: sandboxd lets anyone connect."""
    return socket_namespace(sock) is None and any(a.is_inet and a.host in ("0.0.0.0", "::") for a in sock.listen)


def policies(stack: Stack, namespace: str) -> list[Object]:
    """The stack's NetworkPolicies."""
    found = [_policy(stack, "default-deny", {"matchLabels": {"app.kubernetes.io/part-of": k8s_name(stack.name)}}, {"policyTypes": ["Ingress", "Egress"]}, namespace)]
    for sock in stack.sockets:
        ports = service_ports(sock)
        if not ports or not exposed(sock):
            continue
        clients: list[Object] = [{"podSelector": {"matchLabels": labels(stack, s.name)}} for s in stack.services if sock.name in s.uses]
        if open_to_all(sock):
            clients = [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"namespaceSelector": {}}]
        spec = {"policyTypes": ["Ingress"], "ingress": [{"from": clients, "ports": ports}] if clients else []}
        found.append(_policy(stack, f"socket-{sock.name}", {"matchLabels": labels(stack, sock.service)}, spec, namespace))
    for service in stack.services:
        if service.uses:
            found.append(_policy(stack, f"uses-{service.name}", {"matchLabels": labels(stack, service.name)}, {"policyTypes": ["Egress"], "egress": _egress(stack, service)}, namespace))
    for network in stack.networks:
        peers = [{"podSelector": {"matchLabels": {network_label(network.name): "member"}}}]
        spec = {"policyTypes": ["Ingress", "Egress"], "ingress": [{"from": peers}], "egress": [{"to": peers}]}
        found.append(_policy(stack, f"network-{network.name}", {"matchLabels": {network_label(network.name): "member"}}, spec, namespace))
    return found


def _egress(stack: Stack, service: Service) -> list[Object]:
    rules: list[Object] = []
    for name in service.uses:
        sock = stack.socket(name)
        if ports := service_ports(sock):
            rules.append({"to": [{"podSelector": {"matchLabels": labels(stack, sock.service)}}], "ports": ports})
    rules.append({"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]})
    return rules


def note_network(stack: Stack, service: Service, notes: UnitNotes) -> None:
    """network and uses, for a service."""
    if service.network == "host":
        notes.mapped("network", "hostNetwork: true", "the node's network; NetworkPolicies do not hold for it")
    elif service.attachments:
        fixed = [a.network for a in service.attachments if a.addresses]
        if fixed:
            notes.approximated("network", "NetworkPolicy STACK-network-NAME", f"fixed addresses on {', '.join(fixed)} have no form: pod addresses are the network plug-in's")
        else:
            notes.mapped("network", "NetworkPolicy STACK-network-NAME", "only the network's members reach each other")
    else:
        notes.mapped("network", "NetworkPolicy STACK-default-deny", "no traffic but through its sockets and the ones it uses")
    if not service.uses:
        notes.nothing("uses", "none given")
        return
    unix = [n for n in service.uses if not any(a.is_inet for a in stack.socket(n).listen)]
    if unix:
        notes.unexpressible("uses", f"{', '.join(unix)}: a unix socket cannot reach another pod; give the socket a tcp: address")
    else:
        where = ", ".join(f"{n} at {k8s_name(n)}:{service_ports(stack.socket(n))[0]['port']}" for n in service.uses if service_ports(stack.socket(n)))
        notes.approximated("uses", "NetworkPolicy STACK-uses-SERVICE (egress)", f"clients reach the socket by its Service's name, not its address: {where}")


def note_network_unit(network: Network, notes: UnitNotes) -> None:
    """subnet and internal, for a network."""
    if network.subnet:
        notes.unexpressible("subnet", "pod addresses are the network plug-in's")
    else:
        notes.nothing("subnet", "chosen by sandboxd; in the cluster, by the network plug-in")
    notes.mapped("internal", "NetworkPolicy STACK-network-NAME", "members reach only each other (and the sockets they use)")
