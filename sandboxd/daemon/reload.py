"""A reload (`sandboxd up` against a running stack, `sandboxd reload`): the folder loaded, checked
and planned again as `up` does, then the difference applied (spec/diff.py says what differs and
what cannot change while the stack runs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sandboxd.daemon.console import Console
from sandboxd.daemon.lifecycle import Lifecycle
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
        `pinned` holds the new spec's bind sources (pins.py): changed and new services take
        theirs; unchanged ones keep what they held, whatever is at those paths now."""
        from sandboxd.spec.diff import diff, refusal

        running = self.running
        pinned = pinned if pinned is not None else {}
        change = diff(running.stack, stack)
        why = refusal(running.stack, stack, change)
        taken = set() if why else set(change.changed + change.added)
        for name in [n for n in pinned if n not in taken]:
            close_all(pinned.pop(name))
        if why:
            raise ValueError(f"cannot apply this change to the running stack: {why}; use sandboxd down and up")
        record = self.resources.record
        assert record is not None
        with self.lifecycle.dependencies.held():  # a foreground stack does not end while its changed services restart
            for name in change.changed + change.removed:
                await self.stopper.stop_by_hand(running.services[name])
            for name in change.removed:
                self.console.note(f"{name}: removed from the stack")
                self.runtimes.drop(running.services[name])
            for name in change.changed:
                self.runtimes.drop(running.services[name])
            replaced = set(change.sockets_replaced)
            for key in [k for k in running.sockets if k[0] in replaced]:
                close_socket(running.sockets.pop(key))
            running.stack, running.limits, running.plans = stack, limits, plans
            running.pinned.update(pinned)
            running.sockets.update(bind_sockets(tuple(s for s in stack.sockets if s.name in replaced), record, running.inside))
            # Socket files made anew: services that keep running mount the new file at their next start.
            remade = {a.path for s in stack.sockets if s.name in replaced for a in s.listen if a.path and not a.is_abstract}
            for rt in running.services.values():
                self.runtimes.pin_own(rt, remade & rt.sources.keys())
            for name in change.changed + change.added:
                rt = self.runtimes.add(stack.service(name))
                self.runtimes.attach(rt)
                self.console.prefix_for(name)
                self.lifecycle.start_by_hand(rt)
        return {"added": change.added, "removed": change.removed, "changed": change.changed, "sockets_replaced": change.sockets_replaced}
