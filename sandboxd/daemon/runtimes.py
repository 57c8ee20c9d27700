"""Each service's runtime record as the stack gets it and as a reload drops it: its cgroup (with
its limits), its output pipe, its notify socket and the bind sources held for it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sandboxd.daemon.notify import NotifySocket
from sandboxd.daemon.output import Output
from sandboxd.daemon.readiness import Readiness
from sandboxd.daemon.resources import StackResources
from sandboxd.daemon.runtime import OutputPipe, RunningStack, ServiceRuntime
from sandboxd.errors import HostError
from sandboxd.host.pins import pin_own
from sandboxd.plan.environment import uses_notify
from sandboxd.spec.model import Service


def write_hostname_file(etc: Path, hostname: str) -> None:
    """The service's /etc/hostname (plan/mounts.py binds it), made anew: a sandbox still running
    keeps the one it was given."""
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hostname.tmp").write_text(hostname + "\n")
    os.replace(etc / "hostname.tmp", etc / "hostname")


class Runtimes:
    def __init__(self, running: RunningStack, resources: StackResources, output: Output, readiness: Readiness) -> None:
        self.running = running
        self.resources = resources
        self.output = output
        self.readiness = readiness

    def add(self, service: Service) -> ServiceRuntime:
        """A service's cgroup (with its limits), output pipe and notify socket."""
        # Made below the stack's cgroup directories, which the state file records (resources.py).
        cgroup = self.resources.cgroups.create(service.name, self.running.limits.get(service.name))
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        rt = ServiceRuntime(service, self.running.plans[service.name], cgroup, OutputPipe(r, w))
        rt.sources = self.running.pinned.pop(service.name, {})
        if uses_notify(rt.spec):
            (self.running.runtime_dir / "notify").mkdir(exist_ok=True)
            rt.notify.socket = NotifySocket(self.running.runtime_dir / "notify" / rt.spec.name)
        self.running.services[service.name] = rt
        write_hostname_file(self.running.runtime_dir / "etc" / service.name, service.hostname)
        self.pin_own(rt)
        return rt

    def attach(self, rt: ServiceRuntime) -> None:
        """Read the service's output and notify messages from the event loop."""
        loop = asyncio.get_running_loop()
        loop.add_reader(rt.output.r, self.output.on_output, rt)
        if rt.notify.socket is not None:
            loop.add_reader(rt.notify.socket.sock, self.readiness.on_notify, rt)

    def pin_own(self, rt: ServiceRuntime, paths: set[str] | None = None) -> None:
        """Hold the bind sources sandboxd made for the service itself (its notify socket, the
        hosts and resolv.conf of its networks, the socket files it uses), once they exist: those
        of `paths` anew (made anew by a reload), and every one not held yet."""
        for op in rt.plan.mounts:
            if op.kind != "bind" or (op.source in rt.sources and (paths is None or op.source not in paths)):
                continue
            try:
                fd = pin_own(op.source)
            except OSError as e:
                raise HostError(f"{rt.spec.name}: cannot open {op.source}, which sandboxd made for it: {e.strerror}", "is something else removing files there?") from None
            if op.source in rt.sources:
                os.close(rt.sources[op.source])
            rt.sources[op.source] = fd

    def drop(self, rt: ServiceRuntime) -> None:
        """A stopped service leaves the stack (a reload): what it printed last is shown, the rest goes."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(rt.output.r)
        self.output.drain(rt)
        if rt.notify.socket is not None:
            loop.remove_reader(rt.notify.socket.sock)
        rt.close()
        self.resources.cgroups.remove(rt.cgroup)
        del self.running.services[rt.spec.name]
