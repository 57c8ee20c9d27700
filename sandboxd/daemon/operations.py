"""What the control socket asks of a running stack: status, stop, start, kill, exec, reload, apply a changed spec."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from sandboxd.errors import SpecErrors
from sandboxd.host.cgroups import Cgroup
from sandboxd.host.pins import SourceFds, close_all
from sandboxd.plan.launch import LaunchPlan, lookup_identity
from sandboxd.daemon.runtime import ALIVE, ServiceRuntime, State, SupervisorBase, command_env
from sandboxd.host.sockets import bind_sockets, close_socket
from sandboxd.spec.model import Limits, Stack


class Operations(SupervisorBase):
    # ── control plane ──

    def status(self, names: list[str]) -> dict[str, object]:
        chosen = [self.services[n] for n in names] if names else list(self.services.values())
        return {
            "stack": self.instance,
            "folder": str(self.stack.folder),
            "pid": os.getpid(),
            "started": self.started_wall,
            "userns": self.record.userns if self.record is not None else {},  # root inside is host uid `uid`
            "services": [_status_of(self, rt) for rt in chosen],
        }

    async def stop_service(self, name: str) -> None:
        rt = self.services[name]
        self._unwatch(rt)
        if rt.state is State.WAITING:
            self._transition(rt, State.STOPPED, "stop requested")
            return
        await self._stop(rt)

    def start_service(self, name: str) -> None:
        rt = self.services[name]
        if rt.state not in (State.STOPPED, State.EXITED, State.FAILED) or self.stopping:
            return
        rt.limiter = None  # a start by hand begins a new start-limit interval
        if rt.per_connection or rt.spec.start == "on-demand":
            self._wait_for_connection(rt)
        else:
            self._launch(rt)

    def kill_service(self, name: str, signame: str) -> None:
        rt = self.services[name]
        sig = signal.Signals[signame if signame.startswith("SIG") else f"SIG{signame}"]
        if rt.state in ALIVE:
            self._signal_init(rt, sig)

    def exec_info(self, name: str, user: str = "", session: bool = False) -> dict[str, object]:
        """What `sandboxd exec` needs to run a command confined as the service is. With `user`
        (`sandboxd exec -u USER[:GROUP]`), its ids, names looked up as the spec's `user:` is.
        With `session`, a cgroup of the command's own below the service's (`exec_cgroup`), which
        `end_exec` empties and removes when the asking connection closes."""
        rt = self.services[name]
        if rt.state not in (State.RUNNING, State.READY, State.RELOADING) or not rt.pid:
            raise ValueError(f"service {name!r} is not running ({rt.state.value})")
        uid, gid = rt.plan.uid, rt.plan.gid
        if user:
            root = rt.plan.mounts[0] if rt.plan.mounts else None
            rootfs = root.source if root is not None and root.kind == "image-root" else ""
            name_part, _, group_part = user.partition(":")
            uid, gid, problems = lookup_identity(name_part, group_part, rootfs, f"image '{rt.spec.image}'" if rootfs else "host")
            if problems:
                raise ValueError(f"{name}: -u {user}: " + "; ".join(message for _key, message in problems))
        env = list(command_env(rt).items())
        extra: dict[str, object] = {}
        if session:
            self.exec_count += 1
            exec_cgroup = rt.cgroup.path / f"sbd-exec-{self.exec_count}"
            exec_cgroup.mkdir()
            extra["exec_cgroup"] = str(exec_cgroup)
        return {
            **extra,
            "init_pid": rt.pid,
            "cgroup": str(rt.cgroup.path),
            "cgroup_procs": list(rt.cgroup.extra_procs_files),
            "capabilities": list(rt.plan.capabilities),
            "seccomp_filter": rt.plan.seccomp_filter,
            "uid": uid,
            "gid": gid,
            "env": env,
            "workdir": rt.plan.workdir,
        }

    async def end_exec(self, path: str) -> None:
        """The CLI of a `sandboxd exec` is gone (it ended, or was killed, even by SIGKILL): what
        is left of its command gets SIGHUP, and whatever is still there after HANGUP_GRACE is
        killed; then its cgroup is removed. Nothing of the command outlives its CLI by more."""
        from sandboxd.sandbox.relay import HANGUP_GRACE

        cgroup = Cgroup(Path(path))
        if cgroup.populated():
            for pid in cgroup.pids():
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + HANGUP_GRACE
            while cgroup.populated() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        cgroup.kill()
        deadline = time.monotonic() + 5.0
        while cgroup.populated() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            cgroup.remove()
        except OSError as e:
            self.console.note(f"exec: could not remove {path}: {e.strerror}")

    async def reload_service(self, name: str) -> str:
        """The service's own reload: its reload_signal to the main process; with ready: notify, wait
        for RELOADING=1 and READY=1 (up to start_timeout). Returns an error text, or ""."""
        rt = self.services[name]
        if rt.state not in (State.RUNNING, State.READY):
            return f"{name} is not running ({rt.state.value})"
        if rt.spec.reload:
            self.console.note(f"{name}: reload: running {' '.join(rt.spec.reload)} inside its sandbox")
            status = await self._run_inside(rt, list(rt.spec.reload), rt.spec.start_timeout, rt.output_w)
            if status is None:
                return f"{name}: the reload command did not finish within {rt.spec.start_timeout:g} s"
            if os.waitstatus_to_exitcode(status) != 0:
                return f"{name}: the reload command failed (exit code {os.waitstatus_to_exitcode(status)})"
        else:
            self.console.note(f"{name}: reload: sending {signal.Signals(rt.spec.reload_signal).name}")
            self._signal_init(rt, rt.spec.reload_signal)
        if rt.spec.ready != "notify":
            return ""
        deadline = time.monotonic() + rt.spec.start_timeout
        seen_reloading = False
        while time.monotonic() < deadline:
            state = self.services[name].state  # changes while we wait
            seen_reloading = seen_reloading or state is State.RELOADING
            if seen_reloading and state is State.READY:
                return ""
            if state not in (State.READY, State.RELOADING):
                return f"{name} stopped while reloading ({state.value})"
            await asyncio.sleep(0.01)
        return f"{name} did not finish reloading within {rt.spec.start_timeout:g} s"

    def request_down(self) -> None:
        if self.stop_requested is not None:
            self.stop_requested.set()

    async def apply_folder(self, folder: str, env: list[str]) -> dict[str, list[str]]:
        """Load, validate and plan the folder again (as `up` does), then apply the difference."""
        from sandboxd.cli.main import _enforceable_limits
        from sandboxd.host.pins import pin_mounts
        from sandboxd.host.prepare import make_plans
        from sandboxd.spec.load import load_stack
        from sandboxd.spec.overrides import with_environment
        from sandboxd.store.volumes import create, volumes_dir

        try:
            stack = with_environment(load_stack(Path(folder)), env)
            # In a thread: an image build may take a while, and the loop supervises meanwhile.
            userns = self._stack_userns(stack)
            plans = await asyncio.to_thread(make_plans, stack, str(self.runtime_dir), False, userns, True)
            limits = _enforceable_limits(stack, self.cgroups.host)
            create(stack, plans)
            pinned = pin_mounts(stack, volumes_dir())
        except SpecErrors as e:
            raise ValueError("the new spec has problems:\n  " + "\n  ".join(str(err) for err in e.errors)) from None
        if stack.name != self.stack.name and Path(folder).resolve() != self.stack.folder:
            self.console.note(f"reload from another folder: {folder}")
        return await self.apply(stack, plans, limits, pinned)

    async def apply(self, stack: Stack, plans: dict[str, LaunchPlan], limits: dict[str, Limits], pinned: dict[str, SourceFds] | None = None) -> dict[str, list[str]]:
        """Bring the running stack to a new spec: unchanged services keep running, changed ones
        restart, removed ones stop, new ones start; unchanged sockets keep their descriptors.
        `pinned` holds the new spec's bind sources (pins.py): changed and new services take
        theirs; unchanged ones keep what they held, whatever is at those paths now."""
        from sandboxd.spec.diff import diff, refusal

        pinned = pinned if pinned is not None else {}
        change = diff(self.stack, stack)
        why = refusal(self.stack, stack, change)
        taken = set() if why else set(change.changed + change.added)
        for name in [n for n in pinned if n not in taken]:
            close_all(pinned.pop(name))
        if why:
            raise ValueError(f"cannot apply this change to the running stack: {why}; use sandboxd down and up")
        assert self.record is not None
        for name in change.changed + change.removed:
            await self.stop_service(name)
        for name in change.removed:
            self.console.note(f"{name}: removed from the stack")
            self._drop_runtime(self.services[name])
        for name in change.changed:
            self._drop_runtime(self.services[name])
        replaced = set(change.sockets_replaced)
        for key in [k for k in self.sockets if k[0] in replaced]:
            close_socket(self.sockets.pop(key))
        self.stack, self.limits = stack, limits
        self.plans = plans
        self.pinned.update(pinned)
        fresh = bind_sockets(tuple(s for s in stack.sockets if s.name in replaced), self.record, self._inside)
        self.sockets.update(fresh)
        # Socket files made anew: services that keep running mount the new file at their next start.
        remade = {a.path for s in stack.sockets if s.name in replaced for a in s.listen if a.path and not a.is_abstract}
        for rt in self.services.values():
            self._pin_own(rt, remade & rt.sources.keys())
        loop = asyncio.get_running_loop()
        for name in change.changed + change.added:
            rt = self._add_runtime(stack.service(name))
            rt.settled = asyncio.Event()
            loop.add_reader(rt.output_r, self._on_output, rt)
            if rt.notify is not None:
                loop.add_reader(rt.notify.sock, self._on_notify, rt)
            self.console.prefix_for(name)
            self.start_service(name)
        return {"added": change.added, "removed": change.removed, "changed": change.changed, "sockets_replaced": change.sockets_replaced}



def _status_of(sup: Operations, rt: ServiceRuntime) -> dict[str, object]:
    sockets = []
    for key in rt.plan.fd_sockets + rt.plan.proxied:
        unit = next(s for s in sup.stack.sockets if s.name == key[0])
        entry = {"socket": unit.name, "address": sup.sockets[key].real_address(), "fdname": unit.fdname, "netns": unit.netns}
        if unit.proxy is not None:
            entry["proxy"] = str(unit.proxy)
        sockets.append(entry)
    stats = rt.cgroup.stats()
    alive = rt.state in (State.RUNNING, State.READY, State.RELOADING, State.STOPPING)
    return {
        "name": rt.spec.name,
        "state": rt.state.value,
        "pid": rt.pid if alive else 0,
        "uptime": round(time.monotonic() - rt.started_at, 3) if alive else 0,
        "restarts": rt.restarts,
        "ready": rt.state in (State.READY,) or (rt.state is State.RUNNING and rt.spec.ready == "started"),
        "status_text": rt.status_text,
        "sockets": sockets,
        "memory": stats.get("memory_current", 0),
        "cpu_seconds": round(stats["cpu_usec"] / 1e6, 3),
        "processes": stats["processes"],
        "instances": rt.instances,
    }

