"""reload: what changed between two specs of one stack, and what a reload does to its networks."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.errors import HostError
from sandboxd.plan.launch import HostFacts, PathFacts
from sandboxd.plan.network_steps import Networked, NetworkSteps, network_steps, own_namespaces
from sandboxd.plan.networks import plan_networks
from sandboxd.plan.stack import plan_stack
from sandboxd.spec.diff import diff
from sandboxd.spec.model import Stack
from .spec_snippets import STEM_SERVICE, StackOf

FACTS = HostFacts("/run/sandboxd/x", architecture="x86_64", paths=PathFacts({"/bin/x": False}))
BACK = "kind: network\nname: back\nsubnet: [10.9.0.0/24, 'fd00:9::/64']\n"
FRONT = "kind: network\nname: front\nsubnet: 10.8.0.0/24\n"


def _on(name: str, network: str = "[back]", extra: str = "") -> str:
    return f"kind: service\nname: {name}\ncommand: [x]\nnetwork: {network}\n{extra}---\n"


def _networked(stack: Stack, previous: Networked | None = None) -> Networked:
    subnets = {n.name: n.subnet for n in stack.networks}
    networks = plan_networks(stack, subnets, previous.networks if previous else ())
    return Networked(stack, own_namespaces(stack, plan_stack(stack, FACTS)), networks)


def _reload(old: Stack, new: Stack) -> tuple[NetworkSteps, Networked, Networked]:
    """The steps from `old` to `new`, with the services that restart anyway as the reload gives them."""
    before = _networked(old)
    after = _networked(new, before)
    change = diff(old, new)
    return network_steps(before, after, set(change.changed + change.added)), before, after


def _addresses(networked: Networked) -> dict[tuple[str, str], tuple[str, ...]]:
    return {(n.name, m.service): m.addresses for n in networked.networks for m in n.members}


def test_moving_a_unit_in_its_file_changes_nothing(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", {"api.yaml": STEM_SERVICE + "---\nkind: socket\nlisten: tcp:127.0.0.1:80\n"})
    b = stack_of(tmp_path / "s", {"api.yaml": "\n\n# moved down\nkind: service\ncommand: [x]\n---\nkind: socket\nlisten: tcp:127.0.0.1:80\n"})
    change = diff(a, b)
    assert change.empty and change.sockets_kept == ["api"]


def test_a_changed_socket_restarts_its_service_and_keeps_the_others(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(
        tmp_path / "s",
        {"api.yaml": STEM_SERVICE + "---\nkind: socket\nlisten: tcp:127.0.0.1:80\n", "db.yaml": "kind: service\ncommand: [y]\n"},
    )
    b = stack_of(
        tmp_path / "s",
        {"api.yaml": STEM_SERVICE + "---\nkind: socket\nlisten: tcp:127.0.0.1:81\n", "new.yaml": "kind: service\ncommand: [z]\n"},
    )
    change = diff(a, b)
    assert (change.added, change.removed, change.changed, change.sockets_replaced) == (["new"], ["db"], ["api"], ["api"])
    steps = network_steps(Networked(a, {}, ()), Networked(b, {}, ()), set(change.changed + change.added))
    assert steps == NetworkSteps()  # nothing of networks to do, nothing refused


def test_a_changed_service_on_a_network_restarts_in_its_namespace_with_its_address(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + _on("worker") + BACK)
    b = stack_of(tmp_path / "s", _on("api", extra="environment: {GREETING: new}\n") + _on("worker") + BACK)
    steps, before, after = _reload(a, b)
    assert diff(a, b).changed == ["api"]
    assert steps.refusal == "" and not steps.restarted
    # Its namespace, its link and its address stay: nothing of the network is touched.
    assert (steps.namespaces_closed, steps.namespaces_made, steps.links_removed, steps.links_added) == ([], {}, [], [])
    assert _addresses(after) == _addresses(before) == {("back", "api"): ("10.9.0.2/24", "fd00:9::2/64"), ("back", "worker"): ("10.9.0.3/24", "fd00:9::3/64")}


def test_a_service_added_to_a_network_takes_a_free_address_and_the_others_keep_theirs(tmp_path: Path, stack_of: StackOf) -> None:
    # "aaa" comes first by name: at a fresh start it would take .2; in a reload the running keep theirs.
    a = stack_of(tmp_path / "s", _on("api") + _on("worker") + BACK)
    b = stack_of(tmp_path / "s", _on("aaa") + _on("api") + _on("worker") + BACK)
    steps, before, after = _reload(a, b)
    assert steps.refusal == "" and not steps.restarted and steps.links_removed == []
    assert [(net, m.service, m.addresses) for net, m in steps.links_added] == [("back", "aaa", ("10.9.0.4/24", "fd00:9::4/64"))]
    assert list(steps.namespaces_made) == ["aaa"]
    assert _addresses(after)[("back", "api")] == _addresses(before)[("back", "api")]


def test_a_removed_service_gives_up_its_link_and_namespace_and_its_address_is_free_again(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + _on("worker") + BACK)
    b = stack_of(tmp_path / "s", _on("worker") + _on("zzz") + BACK)
    steps, _, after = _reload(a, b)
    assert steps.links_removed == [("back", "api")] and steps.namespaces_closed == ["api"]
    assert _addresses(after) == {("back", "worker"): ("10.9.0.3/24", "fd00:9::3/64"), ("back", "zzz"): ("10.9.0.2/24", "fd00:9::2/64")}
    assert not steps.restarted and steps.refusal == ""


def test_a_service_moved_between_networks_keeps_its_namespace_and_changes_its_links(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + _on("web", "[back, front]") + BACK + "---\n" + FRONT)
    b = stack_of(tmp_path / "s", _on("api", "[front]") + _on("web", "[back, front]") + BACK + "---\n" + FRONT)
    steps, _, after = _reload(a, b)
    assert diff(a, b).changed == ["api"] and not steps.restarted
    assert steps.namespaces_closed == [] and steps.namespaces_made == {}
    assert steps.links_removed == [("back", "api")]
    assert [(net, m.service, m.ifname, m.addresses) for net, m in steps.links_added] == [("front", "api", "sbd-front", ("10.8.0.3/24",))]
    assert _addresses(after)[("front", "web")] == ("10.8.0.2/24",)  # web was there first, by name: it keeps .2


def test_a_fixed_address_moves_a_changed_service_and_says_so(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + BACK)
    b = stack_of(tmp_path / "s", _on("api", "[{name: back, address: 10.9.0.7}]") + BACK)
    steps, _, _ = _reload(a, b)
    assert steps.refusal == ""
    assert steps.links_removed == [("back", "api")] and [m.addresses for _, m in steps.links_added] == [("10.9.0.7/24", "fd00:9::2/64")]
    assert steps.moved == ["api: on back 10.9.0.7 fd00:9::2 (was 10.9.0.2 fd00:9::2)"]


def test_an_address_of_an_unchanged_service_given_to_another_is_refused(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + _on("worker") + BACK)
    b = stack_of(tmp_path / "s", _on("api") + _on("worker") + _on("new", "[{name: back, address: 10.9.0.3}]") + BACK)
    steps, _, _ = _reload(a, b)
    assert steps.refusal == (
        "address 10.9.0.3 on network 'back' is held by service 'worker', which did not change, "
        "and the new spec gives it to service 'new' (address:); give 'new' another address"
    )


def test_a_new_subnet_restarts_every_service_on_the_network_with_new_addresses(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + _on("worker") + BACK)
    b = stack_of(tmp_path / "s", _on("api") + _on("worker") + BACK.replace("10.9.0.0/24", "10.7.0.0/24"))
    steps, _, after = _reload(a, b)
    assert steps.refusal == "" and diff(a, b).changed == []
    assert steps.restarted == {name: "network 'back' has new subnets (10.7.0.0/24, fd00:9::/64)" for name in ("api", "worker")}
    assert steps.links_removed == [("back", "api"), ("back", "worker")] and len(steps.links_added) == 2
    # The IPv6 subnet stayed: there they keep their addresses; IPv4 ones are new.
    assert _addresses(after) == {("back", "api"): ("10.7.0.2/24", "fd00:9::2/64"), ("back", "worker"): ("10.7.0.3/24", "fd00:9::3/64")}
    assert steps.namespaces_closed == [] and steps.networks_added == steps.networks_removed == []


def test_a_new_network_is_made_and_a_network_left_by_all_is_removed(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", _on("api") + BACK)
    b = stack_of(tmp_path / "s", _on("api", "[front]") + FRONT)
    steps, _, _ = _reload(a, b)
    assert (steps.networks_added, steps.networks_removed) == (["front"], ["back"])
    assert steps.links_removed == [("back", "api")] and [(net, m.service) for net, m in steps.links_added] == [("front", "api")]
    assert steps.namespaces_closed == [] and steps.refusal == ""


def test_a_socket_in_a_namespace_made_anew_is_bound_anew_and_its_service_restarts(tmp_path: Path, stack_of: StackOf) -> None:
    # api leaves the network and the socket bound in its namespace stays: its namespace is now
    # made for `network: none` (lo down), so it is made anew and the socket is bound anew in it.
    sock = "kind: socket\nname: s\nservice: worker\nnetns: api\nlisten: tcp:0.0.0.0:80\n---\n"
    a = stack_of(tmp_path / "s", _on("api") + _on("worker") + sock + BACK)
    b = stack_of(tmp_path / "s", _on("api", "none") + _on("worker") + sock + BACK)
    steps, _, _ = _reload(a, b)
    assert steps.namespaces_closed == ["api"] and list(steps.namespaces_made) == ["api"]
    assert steps.sockets_rebound == ["s"]
    assert steps.restarted == {"worker": "socket 's' is bound anew, in a namespace made anew"}


def test_a_socket_now_bound_inside_an_unchanged_service_restarts_it_in_a_namespace_sandboxd_makes(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", "kind: service\nname: p\ncommand: [x]\n---\nkind: service\nname: q\ncommand: [x]\n")
    b = stack_of(tmp_path / "s", "kind: service\nname: p\ncommand: [x]\n---\nkind: service\nname: q\ncommand: [x]\n---\n"
                 "kind: socket\nname: s\nservice: q\nnetns: p\nlisten: tcp:0.0.0.0:80\n")
    steps, _, _ = _reload(a, b)
    assert list(steps.namespaces_made) == ["p"]
    assert steps.restarted == {"p": "sandboxd makes its network namespace now (a socket is bound inside it)"}


def test_a_full_subnet_is_said_with_the_network_and_the_service(tmp_path: Path, stack_of: StackOf) -> None:
    tiny = "kind: network\nname: back\nsubnet: 10.9.0.0/30\n"
    stack = stack_of(tmp_path / "s", _on("a") + _on("b") + tiny)
    with pytest.raises(HostError, match="network 'back' has no free address left in 10.9.0.0/30 for service 'b'"):
        plan_networks(stack, {"back": ("10.9.0.0/30",)})
