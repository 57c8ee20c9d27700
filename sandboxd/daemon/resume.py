"""The new side of an upgrade (upgrade.py): the supervisor rebuilt from the state record, in the
same process, with the descriptors it inherited; then its loop, as after a start-up.

Rebuilt as they were: each service's state, reason, restart count and start limiter, its
sandbox's pid and pidfd (its end awaited under the same request id), output pipe and the start of
a line not ended yet, notify socket, fd store, bind sources and bind() listener; each
per-connection sandbox; the sockets, network namespaces, cgroups (taken again, not made) and the
state file's lists. Started afresh: start_timeout, the watchdog, health checks and idle_stop
(as at a launch), and a backoff's restart at the moment it was due.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
from collections.abc import Awaitable
from functools import partial
from typing import cast

from sandboxd.daemon.capture import kind_of
from sandboxd.daemon.forks import Ended, ForkServerLink
from sandboxd.daemon.logs import LogFiles
from sandboxd.daemon.notify import NotifySocket
from sandboxd.daemon.record import RecordRefused, ServiceRecord, StackRecord, unpack_spec
from sandboxd.daemon.runtime import ExitStatus, Instance, Launch, OutputPipe, ServiceRuntime, StoredFd
from sandboxd.daemon.states import ALIVE, InstanceState, State
from sandboxd.daemon.supervisor import Supervisor
from sandboxd.daemon.upgrade import HELD_SIGNALS, write_outcome
from sandboxd.host.sockets import BoundSocket
from sandboxd.host.state import StateRecord
from sandboxd.plan.launch import LaunchPlan, NetworkPlan, UserNamespace
from sandboxd.sandbox.handle import ForkServer
from sandboxd.spec.model import Limits, Service, Stack


Spec = tuple[Stack, dict[str, LaunchPlan], dict[str, Limits], tuple[NetworkPlan, ...], UserNamespace | None, dict[str, Service]]


def spec_of(record: StackRecord) -> Spec:
    """The stack, plans, limits, networks, user namespace and services the record carries."""
    value = unpack_spec(record.spec)
    if not (isinstance(value, tuple) and len(value) == 6 and isinstance(value[0], Stack) and isinstance(value[5], dict)):
        raise RecordRefused("the state record's spec is not (stack, plans, limits, networks, userns, services)")
    if sorted(value[5]) != sorted(s.name for s in record.services) or not all(isinstance(s, Service) for s in value[5].values()):
        raise RecordRefused("the state record's services do not match its spec")
    return cast(Spec, value)


def check_descriptors(record: StackRecord) -> None:
    """Every descriptor the record names is open and of the kind it says (RecordRefused)."""
    for d in record.descriptors:
        try:
            kind = kind_of(d.fd)
        except OSError:
            raise RecordRefused(f"descriptor {d.fd} ({d.what}) is not open") from None
        if kind != d.kind:
            raise RecordRefused(f"descriptor {d.fd} ({d.what}) is a {kind}, not a {d.kind}")


def take_over(record: StackRecord) -> int:
    """Rebuild the stack's supervisor from `record` and run it; the stack's exit code."""
    from sandboxd.host.facts import cgroup_host
    from sandboxd.host.subids import Lease

    stack, plans, limits, networks, userns, specs = spec_of(record)
    check_descriptors(record)
    for d in record.descriptors:
        os.set_inheritable(d.fd, False)
    server = ForkServer(_adopt_socket(record.fork_server_fd), record.fork_server_pid)
    ids = Lease(userns, record.lease_fd) if record.lease_fd >= 0 and userns is not None else None
    sup = Supervisor(stack, plans, cgroup_host(), record.instance, fork_server=server, limits=limits, detached=record.detached, pinned={}, ids=ids)
    sup.link.next_id = record.last_request_id  # request ids go on: the fork server's replies name them
    sup.running.networks = networks
    _rebuild_host(sup, record)
    for service in record.services:
        _rebuild_service(sup, service, specs[service.name])
    sup.operations.started_wall, sup.operations.exec_count = record.started_wall, record.exec_count
    sup.upgrade.upgrades = record.upgrades
    return sup.resume(_adopt_socket(record.control_fd), partial(_restore, sup, record))


def _adopt_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if not os.get_blocking(fd):
        sock.setblocking(False)
    return sock


def _rebuild_host(sup: Supervisor, record: StackRecord) -> None:
    """The state file's lists, the logs, the cgroup tree, the namespaces and the sockets."""
    running, resources = sup.running, sup.resources
    resources.owns_runtime = True
    resources.record = StateRecord(
        running.runtime_dir, record.pid, list(record.state_cgroups), list(record.state_files), list(record.state_dirs),
        list(record.state_subnets), dict(record.state_userns),
    )  # fmt: skip
    sup.console.logs = LogFiles(running.runtime_dir / "logs")
    sup.console.quiet = record.detached
    resources.cgroups.setup()  # the stack's cgroup exists: taken again, its warnings said at the start
    if record.netns:
        from sandboxd.host.network import Namespaces

        running.namespaces = Namespaces()
        running.namespaces.fds = dict(record.netns)
    for s in record.sockets:
        address = running.stack.socket(s.unit).listen[s.index]
        running.sockets[(s.unit, s.index)] = BoundSocket(s.unit, s.index, address, _adopt_socket(s.fd))


def _rebuild_service(sup: Supervisor, rec: ServiceRecord, spec: Service) -> None:
    running = sup.running
    cgroup = sup.resources.cgroups.create(rec.name, running.limits.get(rec.name))
    cgroup.baseline, cgroup.unused = dict(rec.baseline), False
    rt = ServiceRuntime(running.stack.service(rec.name), running.plans[rec.name], cgroup, OutputPipe(rec.output_r, rec.output_w, base64.b64decode(rec.partial)))
    rt.spec = spec  # as the service changed it (WATCHDOG_USEC=)
    rt.state, rt.reason, rt.was_ready = State(rec.state), rec.reason, rec.was_ready
    launch = rec.launch
    ended = ExitStatus(launch.exit_code, launch.exit_signal) if launch.exit_code is not None or launch.exit_signal is not None else None
    rt.launch = Launch(launch.id, launch.pid, launch.pidfd, requested_ns=launch.requested_ns, exec_ns=launch.exec_ns, started_at=launch.started_at, exit=ended)
    rt.restarts.count = rec.restarts
    rt.restarts.limiter.starts.extend(rec.starts)
    if rec.notify_fd >= 0:
        rt.notify.socket = NotifySocket.adopt(running.runtime_dir / "notify" / rec.name, _adopt_socket(rec.notify_fd))
    rt.notify.status_text, rt.notify.main_pid = rec.status_text, rec.main_pid
    rt.fdstore = [StoredFd(s.name, s.fd, s.poll) for s in rec.fdstore]
    rt.sources = dict(rec.sources)
    rt.connections.counter, rt.connections.active = rec.connections, rec.active
    rt.handoff.handed_off = set(rec.handed_off)
    rt.settled.set()
    running.services[rec.name] = rt


def _restore(sup: Supervisor, record: StackRecord) -> None:
    """In the loop, before it reads anything: every end awaited again, every service's timers and
    watches as at a launch, the outcome for the CLI; then the signals held across the exec."""
    for rec in record.services:
        rt = sup.running.services[rec.name]
        if rt.state in ALIVE:
            sup.lifecycle.adopt(rt, sup.link.adopt(rt.launch.id))
            if rec.listener >= 0:
                sup.lifecycle.handoff.watch(rt, rec.listener)
                rt.handoff.handed_off = set(rec.handed_off)
            sup.proxies.adopt(rt, dict(rec.proxies))
            sup.readiness.arm(rt)
            sup.health.arm(rt)
            sup.idle.arm(rt)
        elif rt.state is State.WAITING:
            sup.activation.watch(rt)
        elif rt.state is State.BACKOFF:
            sup.lifecycle.restart_at(rt, rec.restart_at if rec.restart_at is not None else asyncio.get_running_loop().time())
        sup.readiness.fdstore.watch(rt)
    for inst in record.instances:
        rt = sup.running.services[inst.service]
        cgroup = sup.resources.cgroups.create(inst.name, parent=rt.cgroup)
        instance = Instance(rt, inst.name, cgroup, None, inst.pidfd, InstanceState(inst.state))
        sup.activation.adopt(instance, inst.id, sup.link.adopt(inst.id))
    asyncio.get_running_loop().call_soon(sup.dependencies.release)
    sup.dependencies.check_done()
    previous = f"sandboxd {record.version}"
    sup.console.note(f"upgraded in place from {previous}: pid {os.getpid()}, {len(record.services)} services and {len(record.instances)} connections carried over")
    write_outcome(sup.running.runtime_dir, record.token, True, previous=record.version, upgrades=record.upgrades, services=len(record.services))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
