"""Networks in specs and plans: validation messages, addresses, hosts files (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.plan.launch import HostFacts, PathFacts
from sandboxd.plan.networks import hosts_file, net_mode, plan_networks
from sandboxd.plan.stack import plan_stack
from sandboxd.spec.model import Attachment, socket_namespace
from .spec_snippets import NETWORK, SERVICE, Problems, StackOf


BAD = [
    (
        "unknown network",
        SERVICE + "network: [bakc]\n---\n" + NETWORK,
        ["stack.yaml:4: network[0]: no network 'bakc'; did you mean 'back'?"],
    ),
    (
        "unknown mode",
        SERVICE + "network: bridge\n",
        ["stack.yaml:4: network: expected one of: private, none, host, or a list of network names, got 'bridge'"],
    ),
    (
        "address outside the subnet",
        SERVICE + "network: [{name: back, address: 10.8.0.5}]\n---\n" + NETWORK,
        ["stack.yaml:4: network[0]: 10.8.0.5 is outside the subnet 10.9.0.0/24 of network 'back'"],
    ),
    (
        "address taken twice",
        SERVICE + "network: [{name: back, address: 10.9.0.5}]\n---\n"
        "kind: service\nname: b\ncommand: [x]\nnetwork: [{name: back, address: 10.9.0.5}]\n---\n" + NETWORK,
        ["stack.yaml:9: network[0]: 10.9.0.5 on network 'back' is already taken by service 'a'"],
    ),
    (
        "address without a subnet of its version",
        SERVICE + "network: [{name: back, address: 'fd00::5'}]\n---\nkind: network\nname: back\nsubnet: 10.9.0.0/24\n",
        ["stack.yaml:4: network[0]: fd00::5: network 'back' has no IPv6 subnet; give it one (subnet:) to fix addresses in it"],
    ),
    (
        "overlapping subnets",
        NETWORK + "---\nkind: network\nname: front\nsubnet: 10.9.0.128/25\n",
        ["stack.yaml:7: subnet: 10.9.0.128/25 overlaps 10.9.0.0/24 of network 'back' (stack.yaml:3)"],
    ),
    (
        "network that is not internal",
        "kind: network\nname: back\ninternal: false\n",
        [
            "stack.yaml:3: internal: expected true (networks are internal: no address on the host, no route, no forwarding; "
            "others are not supported yet), got a boolean (false)"
        ],
    ),
    (
        "socket in the namespace of a host service",
        SERVICE + "network: host\n---\nkind: socket\nname: a\nnetns: service\nlisten: tcp:0.0.0.0:80\n",
        [
            "stack.yaml:8: netns: service 'a' runs in the host's network namespace (network: host), so it has no namespace "
            "of its own to bind in; use netns: host"
        ],
    ),
    (
        "socket in the namespace of a missing service",
        SERVICE + "---\nkind: socket\nname: a\nnetns: b\nlisten: tcp:0.0.0.0:80\n",
        ["stack.yaml:7: netns: expected host, service or a service name, got 'b'; services in this folder: a"],
    ),
    (
        "two sockets on one address in one namespace",
        SERVICE + "---\nkind: socket\nname: s1\nservice: a\nnetns: service\nlisten: tcp:0.0.0.0:80\n"
        "---\nkind: socket\nname: s2\nservice: a\nnetns: a\nlisten: tcp:127.0.0.1:80\n",
        ["stack.yaml:15: listen: tcp:127.0.0.1:80 overlaps tcp:0.0.0.0:80 of socket 's1' (stack.yaml:9)"],
    ),
    (
        "client on no shared network",
        SERVICE + "network: [back]\n---\nkind: service\nname: c\ncommand: [x]\nuses: [a]\n"
        "---\nkind: socket\nname: a\nnetns: service\nlisten: tcp:0.0.0.0:80\n---\n" + NETWORK,
        ["stack.yaml:9: uses[0]: socket 'a' listens on tcp:0.0.0.0:80, but 'c' shares no network with 'a'; attach it to one of: back"],
    ),
    (
        "socket on loopback inside a namespace",
        SERVICE + "network: [back]\n---\nkind: service\nname: c\ncommand: [x]\nuses: [a]\nnetwork: [back]\n"
        "---\nkind: socket\nname: a\nnetns: service\nlisten: tcp:127.0.0.1:80\n---\n" + NETWORK,
        [
            "stack.yaml:9: uses[0]: socket 'a' listens on tcp:127.0.0.1:80, but it listens on loopback inside the namespace of 'a', "
            "which only 'a' reaches; listen on 0.0.0.0 or [::]"
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_network_spec_is_reported_exactly(tmp_path: Path, problems: Problems, text: str, expected: list[str]) -> None:
    assert problems(tmp_path, text) == expected


def test_same_port_in_two_namespaces_is_no_clash(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(
        tmp_path,
        SERVICE + "---\nkind: service\nname: b\ncommand: [x]\n---\n"
        "kind: socket\nname: a\nnetns: service\nlisten: tcp:0.0.0.0:80\n---\nkind: socket\nname: b\nnetns: service\nlisten: tcp:0.0.0.0:80\n",
    )
    assert [socket_namespace(s) for s in stack.sockets] == ["a", "b"]


def test_client_on_a_shared_network_may_use_a_socket_in_the_servers_namespace(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(
        tmp_path,
        SERVICE + "network: [back]\n---\nkind: service\nname: c\ncommand: [x]\nuses: [a]\n"
        "network: [{name: back, address: [10.9.0.9, 'fd00:9::9']}]\n---\nkind: socket\nname: a\nnetns: service\nlisten: tcp:0.0.0.0:80\n---\n" + NETWORK,
    )
    assert stack.service("c").network == (Attachment("back", ("10.9.0.9", "fd00:9::9"), 10),)


def test_addresses_are_fixed_ones_then_in_name_order_from_the_second_host(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(
        tmp_path,
        "kind: service\nname: b\ncommand: [x]\nnetwork: [back]\n---\nkind: service\nname: a\ncommand: [x]\nnetwork: [back]\n---\n"
        "kind: service\nname: c\ncommand: [x]\nnetwork: [{name: back, address: 10.9.0.2}]\n---\n" + NETWORK,
    )
    (network,) = plan_networks(stack, {"back": ("10.9.0.0/24", "fd00:9::/64")})
    assert network.bridge == "sbd-back"
    assert [(m.service, m.ifname, m.ifindex, m.addresses) for m in network.members] == [
        ("a", "sbd-back", 2, ("10.9.0.3/24", "fd00:9::2/64")),
        ("b", "sbd-back", 2, ("10.9.0.4/24", "fd00:9::3/64")),
        ("c", "sbd-back", 2, ("10.9.0.2/24", "fd00:9::4/64")),
    ]
    hosts = hosts_file(stack.service("a"), (network,))
    assert "10.9.0.4\tb\n" in hosts and "fd00:9::4\tc\n" in hosts and hosts.startswith("127.0.0.1\tlocalhost\n")


def test_services_on_networks_join_a_namespace_made_before_they_start(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(
        tmp_path,
        SERVICE + "network: [back]\n---\nkind: service\nname: h\ncommand: [x]\nnetwork: host\n---\n"
        "kind: service\nname: n\ncommand: [x]\nnetwork: none\n---\nkind: service\nname: p\ncommand: [x]\n---\n"
        "kind: socket\nname: p\nnetns: service\nlisten: udp:0.0.0.0:53\n---\n" + NETWORK,
    )
    assert {s.name: net_mode(stack, s) for s in stack.services} == {"a": "join", "h": "host", "n": "none", "p": "join"}
    plans = plan_stack(stack, HostFacts("/run/sandboxd/x", architecture="x86_64", paths=PathFacts({"/bin/x": False})))
    assert plans["a"].clone_flags & 0x40000000 == 0  # no fresh network namespace: it joins its own
    assert plans["n"].clone_flags & 0x40000000
    assert ("bind", "/etc/hosts", "/run/sandboxd/x/etc/a/hosts") in [(m.kind, m.target, m.source) for m in plans["a"].mounts]
    assert not any(m.kind == "sysfs" for m in plans["h"].mounts)
