"""A reload's part in the stack's networks: the new spec's networks planned against the running
ones (addresses kept where they can be), the steps between them (plan/network_steps.py), and
those steps applied once the services they concern have stopped.

Subnets a network of the new spec does not give stay those chosen at start; new ones are chosen
under the allocation lock, and recorded in the state file, beside the running ones, before the
lock is released, so that no other stack takes them meanwhile (only the new ones stay recorded
once the reload is done)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sandboxd.daemon.console import Console
from sandboxd.daemon.resources import StackResources
from sandboxd.daemon.runtime import RunningStack
from sandboxd.plan.launch import LaunchPlan, NetworkPlan
from sandboxd.plan.network_steps import Networked, NetworkSteps, network_steps, own_namespaces
from sandboxd.spec.model import Stack


@dataclass(frozen=True)
class PlannedNetworks:
    """The new spec's networks and the steps that bring the running ones there."""

    networks: tuple[NetworkPlan, ...]
    subnets: list[str]
    steps: NetworkSteps


class NetworkReload:
    def __init__(self, running: RunningStack, resources: StackResources, console: Console) -> None:
        self.running = running
        self.resources = resources
        self.console = console

    def plan(self, stack: Stack, plans: dict[str, LaunchPlan], changed: set[str]) -> PlannedNetworks | None:
        """The steps to the new spec's networks (None: neither spec has networks or namespaces
        made by sandboxd). Refused steps say why in `steps.refusal` and record nothing."""
        running = self.running
        old_ns, new_ns = own_namespaces(running.stack, running.plans), own_namespaces(stack, plans)
        if not (running.stack.networks or stack.networks or old_ns or new_ns):
            return None
        from sandboxd.host.network import allocation_lock, choose_subnets
        from sandboxd.plan.networks import plan_networks

        record = self.resources.record
        assert record is not None
        running_subnets = {network.name: network.subnets for network in running.networks}
        keep = {n.name: running_subnets[n.name] for n in stack.networks if not n.subnet and n.name in running_subnets and not _given(running.stack, n.name)}
        with allocation_lock():
            subnets = choose_subnets(stack, running.runtime_dir, keep)
            networks = plan_networks(stack, subnets, running.networks)
            steps = network_steps(Networked(running.stack, old_ns, running.networks), Networked(stack, new_ns, networks), changed)
            chosen = [cidr for cidrs in subnets.values() for cidr in cidrs]
            if not steps.refusal:
                record.subnets = sorted(set(record.subnets) | set(chosen))
                record.save()
        return PlannedNetworks(networks, chosen, steps)

    async def apply(self, stack: Stack, planned: PlannedNetworks) -> None:
        """Make the running networks those planned (their services are stopped, the sockets
        bound in namespaces given up closed), with every service's /etc/hosts up to date. In a
        thread: pyroute2's netlink sockets run an event loop of their own, which cannot run
        inside this one (a namespace is entered by the calling thread only, and left again)."""
        from sandboxd.host.network import Namespaces, apply_steps, write_name_files

        running = self.running
        if running.namespaces is None:
            running.namespaces = Namespaces()
        await asyncio.to_thread(apply_steps, running.namespaces, planned.steps, planned.networks)
        running.networks = planned.networks
        write_name_files(running.runtime_dir, stack, planned.networks)
        record = self.resources.record
        assert record is not None
        record.subnets = planned.subnets
        record.save()
        for line in planned.steps.moved:
            self.console.note(line)
        for name in planned.steps.networks_added:
            self.console.note(f"network {name}: added")
        for name in planned.steps.networks_removed:
            self.console.note(f"network {name}: removed")


def _given(stack: Stack, network: str) -> bool:
    """Whether the running spec gave the network its subnets (dropping them chooses anew)."""
    return any(n.name == network and n.subnet for n in stack.networks)
