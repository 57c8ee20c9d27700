"""Start on the first connection, one sandbox per connection, and scale to zero (idle_stop)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import signal
import time

from sandboxd.errors import LaunchError
from sandboxd.sandbox.handle import read_status
from sandboxd.daemon.restart import classify
from sandboxd.daemon.runtime import Instance, ServiceRuntime, State, SupervisorBase


class Activation(SupervisorBase):
    # ── activation: on the first connection, or one sandbox per connection ──

    def _wait_for_connection(self, rt: ServiceRuntime) -> None:
        if rt.state is not State.WAITING:
            what = "one sandbox per connection" if rt.per_connection else "the first connection"
            self._transition(rt, State.WAITING, f"starts on {what}")
        self._watch(rt)

    def _watch(self, rt: ServiceRuntime) -> None:
        if rt.watching or self.stopping:
            return
        loop = asyncio.get_running_loop()
        for key in rt.plan.fd_sockets + rt.plan.proxied:
            if rt.per_connection:
                loop.add_reader(self.sockets[key].sock, self._on_accept, rt, key)
            else:
                loop.add_reader(self.sockets[key].sock, self._on_activation, rt, key)
        rt.watching = True

    def _unwatch(self, rt: ServiceRuntime) -> None:
        if rt.watching:
            loop = asyncio.get_running_loop()
            for key in rt.plan.fd_sockets + rt.plan.proxied:
                loop.remove_reader(self.sockets[key].sock)
            rt.watching = False

    def _on_activation(self, rt: ServiceRuntime, key: tuple[str, int]) -> None:
        self._unwatch(rt)
        if rt.limiter is not None and rt.limiter.exhausted(time.monotonic()):
            limit = rt.spec.start_limit
            self._transition(
                rt,
                State.FAILED,
                f"socket {key[0]}: its service keeps failing on activation ({limit.burst} starts within "
                f"{limit.interval:g} s); no longer activated (trigger limit)",
            )
            self._check_done()
            return
        self.console.note(f"{rt.spec.name}: activated by {self.sockets[key].real_address()}")
        self._launch(rt)

    def _on_accept(self, rt: ServiceRuntime, key: tuple[str, int]) -> None:
        """Accept one connection and start a sandbox of its own for it (systemd's Accept=yes)."""
        assert self.fork_server is not None
        max_connections = min(next(s for s in self.stack.sockets if s.name == key[0]).max_connections, 65536)
        if rt.instances >= max_connections:
            self._unwatch(rt)  # further connections wait in the queue until an instance ends
            return
        try:
            conn, peer = self.sockets[key].sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        rt.instance_counter += 1
        rt.instances += 1
        self.no_instances.clear()
        name = f"{rt.spec.name}@{rt.instance_counter}"
        env = [(k, v) for k, v in rt.plan.env if not k.startswith("LISTEN_")]
        env += [("LISTEN_FDS", "1"), ("LISTEN_PID", "2"), ("LISTEN_FDNAMES", "connection")]
        if isinstance(peer, tuple):
            env += [("REMOTE_ADDR", str(peer[0])), ("REMOTE_PORT", str(peer[1]))]
        plan = dataclasses.replace(rt.plan, service=name, env=tuple(env), fd_names=("connection",), fd_sockets=())
        cgroup = self.cgroups.create(name, parent=rt.cgroup)
        launch_id = self.fork_server.next_id()
        instance = Instance(rt, name, cgroup)
        self.instances[launch_id] = instance
        netns = self.namespaces.fds[rt.spec.name] if rt.plan.net == "join" and self.namespaces else -1
        try:
            instance.channel = self.fork_server.send_launch(
                launch_id, plan, str(cgroup.path), cgroup.extra_procs_files, str(self.root_dir), rt.output_w, [conn.fileno()], netns, self._source_fds(rt)
            )
        finally:
            conn.close()  # the fork server holds its own copy now
        asyncio.get_running_loop().add_reader(instance.channel, self._on_instance_status, instance)
        if rt.instances >= max_connections:
            self._unwatch(rt)

    def _on_instance_status(self, instance: Instance) -> None:
        assert instance.channel is not None
        while True:
            try:
                kind, launched = read_status(instance.channel, instance.name)
            except LaunchError as e:
                self.console.note(f"{instance.name}: could not start: {e.step}: {e.detail}")
                continue
            if kind == "pending" and launched is not None:
                instance.pidfd = launched.pidfd
                continue
            if kind == "done":
                asyncio.get_running_loop().remove_reader(instance.channel)
                instance.channel.close()
                instance.channel = None
            return

    def _on_instance_exit(self, instance: Instance, status: int) -> None:
        if instance.channel is not None:
            self._on_instance_status(instance)
        if instance.pidfd >= 0:
            os.close(instance.pidfd)
        outcome, text = classify(status)
        if outcome != "success" and not self.stopping:
            self.console.note(f"{instance.name}: {text}")
        if instance.cgroup.populated():
            instance.cgroup.kill()
        self.cgroups.remove(instance.cgroup)
        rt = instance.rt
        rt.instances -= 1
        if not any(True for _ in self.instances.values()):
            self.no_instances.set()
        if not self.stopping and rt.state is State.WAITING:
            self._watch(rt)

    async def _stop_instances(self) -> None:
        for instance in list(self.instances.values()):
            try:
                if instance.pidfd >= 0:
                    signal.pidfd_send_signal(instance.pidfd, instance.rt.spec.stop_signal)
                else:
                    instance.cgroup.kill()
            except ProcessLookupError:
                pass
        timeout = max((i.rt.spec.stop_timeout for i in self.instances.values()), default=0.0)
        try:
            await asyncio.wait_for(self.no_instances.wait(), timeout)
        except TimeoutError:
            for instance in list(self.instances.values()):
                instance.cgroup.kill()
            await self.no_instances.wait()

    # ── scale to zero: idle_stop ──

    def _arm_idle_check(self, rt: ServiceRuntime) -> None:
        if rt.spec.idle_stop > 0 and rt.spec.start == "on-demand":
            rt.last_activity, rt.last_usage = time.monotonic(), -1
            period = max(rt.spec.idle_stop / 5, 0.05)
            rt.idle_timer = asyncio.get_running_loop().call_later(period, self._idle_check, rt, period)

    def _idle_check(self, rt: ServiceRuntime, period: float) -> None:
        rt.idle_timer = None
        if rt.state not in (State.RUNNING, State.READY):
            return
        now = time.monotonic()
        usage = rt.cgroup.cpu_usage_usec()
        listening = [self.sockets[key].sock for key in rt.plan.fd_sockets + rt.plan.proxied]
        pending = bool(select.select(listening, [], [], 0)[0])
        if pending or usage != rt.last_usage or rt.cgroup.holds_sockets_besides(listening):
            rt.last_activity, rt.last_usage = now, usage
        if now - rt.last_activity >= rt.spec.idle_stop:
            rt.idle_stopping = True
            self._begin_stop(rt, f"idle for {rt.spec.idle_stop:g} s")
            return
        rt.idle_timer = asyncio.get_running_loop().call_later(period, self._idle_check, rt, period)

