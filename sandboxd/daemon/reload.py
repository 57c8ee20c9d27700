"""A reload (`sandboxd up` against a running stack, `sandboxd reload`): the folder loaded, checked
and planned again as `up` does, then the difference applied (spec/diff.py says what differs;
reload_networks.py what it does to the networks, and what cannot change while the stack runs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sandboxd.daemon.console import Console
from sandboxd.daemon.lifecycle import Lifecycle
from sandboxd.daemon.reload_networks import NetworkReload
from sandboxd.daemon.resources import StackResources
from sandboxd.daemon.runtimes import Runtimes
from sandboxd.daemon.runtime import RunningStack
from sandboxd.daemon.stopping import Stopper
from sandboxd.errors import SpecErrors
from sandboxd.host.pins import SourceFds, close_all
from sandboxd.host.sockets import bind_sockets, close_socket
from sandboxd.plan.launch import LaunchPlan
from sandboxd.spec.model import Limits, Stack
from sandboxd.wire import ApplyResult


class Reload:
    def __init__(
        self, running: RunningStack, resources: StackResources, runtimes: Runtimes, lifecycle: Lifecycle, stopper: Stopper, console: Console
    ) -> None:
        self.running = running
        self.resources = resources
        self.runtimes = runtimes
        self.lifecycle = lifecycle
        self.stopper = stopper
        self.console = console
        self.networks = NetworkReload(running, resources, console)

    async def apply_folder(self, folder: str, env: list[str], variables: dict[str, str] | None = None, listen: list[str] | None = None) -> ApplyResult:
        """Load, validate and plan the folder again (as `up` does), then apply the difference.
        `variables`: what ${VAR} takes (the caller's); None: this process's and the folder's .env.
        `env`, `listen`: the caller's `--env` and `--listen` overrides."""
        from sandboxd.host.limits import enforceable_limits
        from sandboxd.host.pins import pin_mounts
        from sandboxd.host.prepare import make_plans
        from sandboxd.spec.load import load_stack
        from sandboxd.spec.overrides import with_overrides
        from sandboxd.store.volumes import create, volumes_dir

        try:
            stack = with_overrides(load_stack(Path(folder), variables), env, listen)
            # In a thread: an image build may take a while, and the loop supervises meanwhile.
            userns = self.resources.stack_userns(stack)
            plans = await asyncio.to_thread(make_plans, stack, str(self.running.runtime_dir), False, userns, True)
            limits = enforceable_limits(stack, self.resources.cgroups.host)
            create(stack, plans)
            pinned = pin_mounts(stack, volumes_dir())
        except SpecErrors as e:
            raise ValueError("the new spec has problems:\n  " + "\n  ".join(str(err) for err in e.errors)) from None
        if stack.name != self.running.stack.name and Path(folder).resolve() != self.running.stack.folder:
            self.console.note(f"reload from another folder: {folder}")
        return await self.apply(stack, plans, limits, pinned)

    async def apply(self, stack: Stack, plans: dict[str, LaunchPlan], limits: dict[str, Limits], pinned: dict[str, SourceFds] | None = None) -> ApplyResult:
        """Bring the running stack to a new spec: unchanged services keep running, changed ones
        restart, removed ones stop, new ones start; unchanged sockets keep their descriptors.
        A service on a network restarts in its namespace, with its addresses where it can keep
        them (reload_networks.py). `pinned` holds the new spec's bind sources (pins.py): changed
        and new services take theirs; unchanged ones keep what they held, whatever is at those
        paths now."""
        from sandboxd.spec.diff import diff

        running = self.running
        pinned = pinned if pinned is not None else {}
        change = diff(running.stack, stack)
        try:
            planned = self.networks.plan(stack, plans, set(change.changed + change.added))
        except BaseException:
            for fds in pinned.values():
                close_all(fds)
            raise
        why = planned.steps.refusal if planned is not None else ""
        restarted = planned.steps.restarted if planned is not None else {}
        changed = sorted(set(change.changed) | set(restarted))
        replaced = sorted(set(change.sockets_replaced) | set(planned.steps.sockets_rebound if planned is not None else ()))
        taken = set() if why else set(changed + change.added)
        for name in [n for n in pinned if n not in taken]:
            close_all(pinned.pop(name))
        if why:
            raise ValueError(f"cannot apply this change to the running stack: {why}; use sandboxd down and up")
        for name, reason in restarted.items():
            self.console.note(f"{name}: restarts: {reason}")
        with self.lifecycle.dependencies.held():  # a foreground stack does not end while its changed services restart
            await self._stop_and_drop(changed, change.removed)
            for key in [k for k in running.sockets if k[0] in replaced]:
                close_socket(running.sockets.pop(key))
            if planned is not None:
                await self.networks.apply(stack, planned)
            running.stack, running.limits, running.plans = stack, limits, plans
            running.pinned.update(pinned)
            self._bind_anew(stack, replaced)
            for name in changed + change.added:
                rt = self.runtimes.add(stack.service(name))
                self.runtimes.attach(rt)
                self.console.prefix_for(name)
                self.lifecycle.start_by_hand(rt)
        return {"added": change.added, "removed": change.removed, "changed": changed, "sockets_replaced": replaced}

    async def _stop_and_drop(self, changed: list[str], removed: list[str]) -> None:
        """Stop the changed and removed services and drop their runtime records."""
        services = self.running.services
        for name in changed + removed:
            await self.stopper.stop_by_hand(services[name])
        for name in removed:
            self.console.note(f"{name}: removed from the stack")
            self.runtimes.drop(services[name])
        for name in changed:
            self.runtimes.drop(services[name])

    def _bind_anew(self, stack: Stack, replaced: list[str]) -> None:
        """Bind the replaced sockets of the new spec; services that keep running mount the socket
        files made anew at their next start."""
        record = self.resources.record
        assert record is not None
        running = self.running
        running.sockets.update(bind_sockets(tuple(s for s in stack.sockets if s.name in replaced), record, running.inside))
        remade = {a.path for s in stack.sockets if s.name in replaced for a in s.listen if a.path and not a.is_abstract}
        for rt in running.services.values():
            self.runtimes.pin_own(rt, remade & rt.sources.keys())
