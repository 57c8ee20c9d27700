"""Start on the first connection (`start: on-demand`), or one sandbox per connection (`accept: true`).

A waiting service's sockets are watched by the event loop. On-demand: the first connection starts
the service, which takes the socket with the connection still in its queue. Accept: each
connection is accepted here and given to a sandbox of its own, an instance with a life of its own
(states.INSTANCE_LIFE); at `max_connections` instances the socket is no longer watched, and
further connections wait in its queue until an instance ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Awaitable
from functools import partial

from sandboxd.daemon.console import Console
from sandboxd.daemon.forks import Ended, ForkServerLink
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.restart import classify
from sandboxd.daemon.runtime import Instance, RunningStack, ServiceRuntime, SocketKey
from sandboxd.daemon.states import Event, InstanceEvent, State
from sandboxd.daemon.stopping import signal_init
from sandboxd.daemon.tasks import Background
from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import CgroupManager
from sandboxd.plan.environment import with_descriptors
from sandboxd.plan.launch import LaunchPlan
from sandboxd.sandbox.handle import read_status
from sandboxd.sandbox.protocol import Connection

ACCEPT_PAUSE = 1.0  # seconds without accepting after a connection could not be taken (asyncio's ACCEPT_RETRY_DELAY)


class Activation:
    def __init__(
        self, machine: ServiceMachine, running: RunningStack, link: ForkServerLink, tasks: Background, cgroups: CgroupManager, console: Console
    ) -> None:
        self.machine = machine
        self.running = running
        self.link = link
        self.tasks = tasks
        self.cgroups = cgroups
        self.console = console
        self.watching: set[str] = set()  # services whose sockets the loop watches
        self.paused: set[str] = set()  # accept-mode services not accepting for a moment (_pause)
        self.short: set[str] = set()  # ... and not accepting since the last time that was said
        self.instances: dict[int, Instance] = {}  # by request id
        self.connection_plans: dict[str, tuple[LaunchPlan, LaunchPlan]] = {}  # by service: (its plan, its connections')
        self.no_instances = asyncio.Event()
        self.no_instances.set()
        self.settling = False  # an upgrade is settling: connections wait in the queue (upgrade.py)

    # ── activation: on the first connection, or one sandbox per connection ──

    def watch(self, rt: ServiceRuntime) -> None:
        """The WATCH action (and again once an instance ends): a connection starts something."""
        if rt.spec.name in self.watching or rt.spec.name in self.paused or self.running.stopping or self.settling:
            return
        loop = asyncio.get_running_loop()
        for key in rt.plan.fd_sockets + rt.plan.proxied:
            if rt.per_connection:
                loop.add_reader(self.running.sockets[key].sock, self._on_accept, rt, key)
            else:
                loop.add_reader(self.running.sockets[key].sock, self._on_activation, rt, key)
        self.watching.add(rt.spec.name)

    def unwatch(self, rt: ServiceRuntime) -> None:
        if rt.spec.name in self.watching:
            loop = asyncio.get_running_loop()
            for key in rt.plan.fd_sockets + rt.plan.proxied:
                loop.remove_reader(self.running.sockets[key].sock)
            self.watching.discard(rt.spec.name)

    def _on_activation(self, rt: ServiceRuntime, key: SocketKey) -> None:
        self.unwatch(rt)
        if rt.restarts.limiter.exhausted(time.monotonic()):
            limit = rt.spec.start_limit
            self.machine.transition(
                rt,
                Event.TRIGGER_LIMIT,
                f"socket {key[0]}: its service keeps failing on activation ({limit.burst} starts within "
                f"{limit.interval:g} s); no longer activated (trigger limit)",
            )
            return
        self.console.note(f"{rt.spec.name}: activated by {self.running.sockets[key].real_address()}")
        self.machine.transition(rt, Event.CONNECTION, rt.restarts.reason())

    def _on_accept(self, rt: ServiceRuntime, key: SocketKey) -> None:
        """Accept one connection and start a sandbox of its own for it (systemd's Accept=yes)."""
        max_connections = min(self.running.socket_unit(key[0]).max_connections, 65536)
        if rt.connections.active >= max_connections:
            self.unwatch(rt)  # further connections wait in the queue until an instance ends
            return
        try:
            conn, peer = self.running.sockets[key].sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            self._pause(rt, key, e)  # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in the queue
            return
        try:
            self._start_instance(rt, key, conn, peer, max_connections)
            if rt.spec.name in self.short:
                self.short.discard(rt.spec.name)
                self.console.note(f"socket {key[0]}: accepting connections for {rt.spec.name} again")
        except OSError as e:
            # Accepted, but its sandbox cannot be asked for (descriptors used up, no fork server):
            # this connection is closed; the next ones wait in the queue until there is room.
            conn.close()
            rt.connections.active -= 1
            if not self.instances:
                self.no_instances.set()
            self._pause(rt, key, e)

    def _pause(self, rt: ServiceRuntime, key: SocketKey, error: OSError) -> None:
        """Stop accepting on the service's sockets for ACCEPT_PAUSE seconds (asyncio's own accept
        loop does the same): a socket whose connections cannot be taken stays readable, and
        watching it meanwhile would spin. Said once per pause."""
        self.unwatch(rt)
        if rt.spec.name not in self.short:
            self.short.add(rt.spec.name)
            self.console.note(f"socket {key[0]}: cannot accept a connection for {rt.spec.name} ({error.strerror or error}); trying again every {ACCEPT_PAUSE:g} s, connections wait in its queue")
        self.paused.add(rt.spec.name)

        def resume() -> None:
            self.paused.discard(rt.spec.name)
            if not self.running.stopping and rt.state is State.WAITING:
                self.watch(rt)

        asyncio.get_running_loop().call_later(ACCEPT_PAUSE, resume)

    def _start_instance(self, rt: ServiceRuntime, key: SocketKey, conn: socket.socket, peer: object, max_connections: int) -> None:
        """A sandbox of its own for the accepted connection `conn`."""
        rt.connections.counter += 1
        rt.connections.active += 1
        self.no_instances.clear()
        name = f"{rt.spec.name}@{rt.connections.counter}"
        env = list(with_descriptors(rt.plan.env, ("connection",)))
        if isinstance(peer, tuple):
            env += [("REMOTE_ADDR", str(peer[0])), ("REMOTE_PORT", str(peer[1]))]
        plan, connection = self._connection_plan(rt), Connection(name, tuple(env))
        netns, sources = self.running.netns_fd(rt), rt.source_fds()  # before the cgroup: either may fail
        root = str(self.running.root_dir)
        cgroup = self.cgroups.create(name, parent=rt.cgroup)
        try:
            sent = self.link.send(
                lambda server, request_id: server.send_launch(
                    request_id, plan, str(cgroup.path), cgroup.v1_tasks_files, root, rt.output.w, [conn.fileno()], netns, sources, connection
                )
            )
        except OSError:
            self.cgroups.remove(cgroup)
            raise
        conn.close()  # the fork server holds its own copy now
        instance = Instance(rt, name, cgroup, sent.channel)
        self.instances[sent.id] = instance
        # By its number: asyncio formats the repr of an object it is given to look it up first.
        asyncio.get_running_loop().add_reader(sent.channel.fileno(), self._on_instance_status, instance)
        self.link.on_end(sent, partial(self._on_end, instance, sent.id))
        if rt.connections.active >= max_connections:
            self.unwatch(rt)

    def _connection_plan(self, rt: ServiceRuntime) -> LaunchPlan:
        """What the plans of a service's connections share (the connection at fd 3), one object
        while the service's plan is the same: the fork server decodes and compiles it once."""
        made = self.connection_plans.get(rt.spec.name)
        if made is None or made[0] is not rt.plan:
            made = self.connection_plans[rt.spec.name] = (rt.plan, dataclasses.replace(rt.plan, fd_names=("connection",), fd_sockets=()))
        return made[1]

    def _on_instance_status(self, instance: Instance) -> None:
        assert instance.channel is not None
        while True:
            try:
                kind, launched = read_status(instance.channel, instance.name)
            except LaunchError as e:
                self.console.note(f"{instance.name}: could not start: {e.step}: {e.detail}")
                if instance.allows(InstanceEvent.SETUP_FAILED):
                    instance.transition(InstanceEvent.SETUP_FAILED)
                continue
            if kind == "pending" and launched is not None:
                instance.pidfd = launched.pidfd
                continue
            if kind == "done":
                asyncio.get_running_loop().remove_reader(instance.channel)
                instance.channel.close()
                instance.channel = None
                if instance.allows(InstanceEvent.LAUNCHED):
                    instance.transition(InstanceEvent.LAUNCHED)
            return

    def _on_end(self, instance: Instance, request_id: int, ended: Ended) -> None:
        try:
            self._on_instance_exit(instance, request_id, ended)
        except Exception as e:  # said as Background says a task's failure
            self.console.note(f"{instance.name}: following its sandbox failed: {e!r}")

    def adopt(self, instance: Instance, request_id: int, end: Awaitable[Ended]) -> None:
        """Follow an instance an upgrade carried over (resume.py), under its request id."""
        self.instances[request_id] = instance
        self.no_instances.clear()
        self.tasks.spawn(self._adopted(instance, request_id, end), f"{instance.name}: following its sandbox")

    async def _adopted(self, instance: Instance, request_id: int, end: Awaitable[Ended]) -> None:
        self._on_instance_exit(instance, request_id, await end)

    def _on_instance_exit(self, instance: Instance, request_id: int, ended: Ended) -> None:
        del self.instances[request_id]
        if instance.channel is not None:
            self._on_instance_status(instance)
        instance.transition(InstanceEvent.EXIT)
        if instance.pidfd >= 0:
            os.close(instance.pidfd)
        outcome, text = classify(ended.status)
        if outcome != "success" and not self.running.stopping:
            self.console.note(f"{instance.name}: {text}")
        self.cgroups.remove(instance.cgroup)  # kills what is left (its init has exited: nothing, usually)
        rt = instance.rt
        rt.connections.active -= 1
        if not self.instances:
            self.no_instances.set()
        if not self.running.stopping and rt.state is State.WAITING:
            self.watch(rt)

    async def stop_instances(self) -> None:
        """The stack goes down: stop_signal to every instance; SIGKILL to those left after stop_timeout."""
        for instance in list(self.instances.values()):
            if instance.allows(InstanceEvent.STOP):
                instance.transition(InstanceEvent.STOP)
            signal_init(instance.pidfd, instance.cgroup, instance.rt.spec.stop_signal)
        timeout = max((i.rt.spec.stop_timeout for i in self.instances.values()), default=0.0)
        try:
            await asyncio.wait_for(self.no_instances.wait(), timeout)
        except TimeoutError:
            for instance in list(self.instances.values()):
                instance.cgroup.kill()
            await self.no_instances.wait()
