"""What a stack holds of the host while it runs, and the cleanup that gives it all back.

Made in this order, each recorded in the state file (host/state.py) as it is made, so that a later
run can remove what a killed one left: the runtime directory, the cgroup tree, the networks and
their namespaces, the bound sockets. `cleanup` undoes them in the reverse order; it runs whatever
happened, even after a Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.daemon.console import Console
from sandboxd.daemon.logs import LogFiles
from sandboxd.daemon.runtime import RunningStack
from sandboxd.errors import HostError
from sandboxd.host.cgroups import CgroupManager
from sandboxd.host.pins import close_all
from sandboxd.host.sockets import bind_sockets, close_sockets
from sandboxd.host.state import StateRecord
from sandboxd.plan.launch import UserNamespace
from sandboxd.spec.model import Stack

if TYPE_CHECKING:
    from sandboxd.host.subids import Lease


class StackResources:
    def __init__(self, running: RunningStack, cgroups: CgroupManager, console: Console, ids: Lease | None, runtime_root: Path) -> None:
        self.running = running
        self.cgroups = cgroups
        self.console = console
        self.ids = ids  # the block of subordinate ids the stack's user namespaces map to
        self.runtime_root = runtime_root
        self.record: StateRecord | None = None
        self.owns_runtime = False  # the runtime directory was made by this run (not another stack's)

    def prepare(self, detached: bool) -> None:
        """The state record, the logs, the cgroup tree, the networks and the sockets."""
        running = self.running
        running.root_dir.mkdir(exist_ok=True)
        longest = max((service.stop_timeout for service in running.stack.services), default=10.0)
        self.record = StateRecord(running.runtime_dir, stop_timeout=longest)
        if self.ids is not None:
            self.record.userns = dataclasses.asdict(self.ids.userns)
        self.record.save()
        if self.record.unsaved:
            raise HostError(f"cannot write {running.runtime_dir / 'state.json'}: {self.record.unsaved}", "make room in the runtime directory (SANDBOXD_RUNTIME_DIR, else /run/sandboxd)")
        self.console.logs = LogFiles(running.runtime_dir / "logs")
        self.console.quiet = detached
        for warning in self.cgroups.setup():
            self.console.note(f"warning: {warning}")
        # Every cgroup of the stack is made below these (a dead run's are removed deepest first):
        # recorded once here, the state file is not rewritten for each service's cgroups.
        self.record.add("cgroups", *(str(path) for path in self.cgroups.stack_dirs()))
        if running.stack.networks or any(plan.net == "join" for plan in running.plans.values()):
            self._prepare_networks()
        running.sockets = bind_sockets(running.stack.sockets, self.record, running.inside)

    def _prepare_networks(self) -> None:
        from sandboxd.host.network import Namespaces, allocation_lock, build_networks, choose_subnets, write_name_files
        from sandboxd.plan.network_steps import own_namespaces
        from sandboxd.plan.networks import plan_networks

        assert self.record is not None
        running = self.running
        running.namespaces = Namespaces()
        with allocation_lock():
            subnets = choose_subnets(running.stack, running.runtime_dir)
            self.record.subnets = [cidr for cidrs in subnets.values() for cidr in cidrs]
            self.record.save()
        running.networks = plan_networks(running.stack, subnets)
        for name, kind in own_namespaces(running.stack, running.plans).items():
            running.namespaces.create(name, kind.loopback, kind.for_userns)
        write_name_files(running.runtime_dir, running.stack, running.networks)
        build_networks(running.namespaces, running.networks)

    def stack_userns(self, stack: Stack) -> UserNamespace | None:
        """The stack's block of ids (leased when a reload brings its first user namespace)."""
        if self.ids is None and any(service.userns for service in stack.services):
            from sandboxd.host.subids import lease

            self.ids = lease(self.running.instance)
            assert self.record is not None
            self.record.userns = dataclasses.asdict(self.ids.userns)
            self.record.save()
        return self.ids.userns if self.ids is not None else None

    def cleanup(self) -> None:
        """Give back everything the stack held (the fork server is stopped already)."""
        running = self.running
        for fds in running.pinned.values():
            close_all(fds)
        if not self.owns_runtime:
            return  # nothing of ours was made: the name belongs to another stack
        if running.namespaces is not None:
            running.namespaces.close()  # the kernel frees the namespaces, with their links and bridges
        for rt in running.services.values():
            rt.close()
        if self.record is not None:
            close_sockets(running.sockets, self.record)
        self.cgroups.teardown()
        for path in (running.runtime_dir / "state.json", running.runtime_dir / "state.json.tmp", running.runtime_dir / "upgrade.json", running.runtime_dir / "upgrade.json.tmp"):
            path.unlink(missing_ok=True)
        if self.console.logs is not None:
            self.console.logs.close()
        shutil.rmtree(running.runtime_dir / "logs", ignore_errors=True)
        (running.runtime_dir / "control.sock").unlink(missing_ok=True)
        shutil.rmtree(running.runtime_dir / "etc", ignore_errors=True)
        shutil.rmtree(running.runtime_dir / "notify", ignore_errors=True)
        for directory in (running.root_dir, running.runtime_dir, self.runtime_root):
            try:
                directory.rmdir()
            except OSError:
                pass
