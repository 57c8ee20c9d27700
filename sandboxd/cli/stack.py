"""The verbs on a whole stack: `up` (in the foreground, or `-d`: detached), `reload` with no
service (apply the changed spec), `down`, `ls` and `config` (the resolved units and plans).

`up` runs the supervisor in this process. Its order matters: the fork server is started first,
before the specs are read and before the supervisor's imports (asyncio), so that every sandbox
is a fork of that smaller process.
`up -d` validates and builds here, then forks this process into a session of its own to be the
supervisor, and polls the control socket until the stack is up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

from sandboxd.errors import HostError, SandboxdError

ASK_TIMEOUT = 10.0  # seconds for a stack to answer `down` (it answers at once, then stops)
DOWN_GRACE = 10.0  # seconds past the stop timeouts before `down` escalates, and between its steps

if TYPE_CHECKING:
    from collections.abc import Callable

    from sandboxd.sandbox.handle import ForkServer
    from sandboxd.spec.model import Stack
    from sandboxd.wire import ApplyRequest, ServiceStatus, StackStatus


def cmd_up(args: argparse.Namespace) -> int:
    if not args.daemon:
        from sandboxd.cli.client import running_stacks
        from sandboxd.host.state import clean_name

        name = clean_name(args.project_name or Path(args.dir).resolve().name)
        if name in running_stacks():
            return _reload_stack(name, args)
    if args.detach:
        return _up_detached(args)
    return _up(args)


def _reload_stack(name: str, args: argparse.Namespace) -> int:
    """`sandboxd up DIR` against a running stack: apply the difference (a reload)."""
    from sandboxd.cli.client import request

    variables = _variables(args)
    _pull_images(Path(args.dir), getattr(args, "pull", "missing"), variables)
    folder = str(Path(args.dir).resolve())
    message: ApplyRequest = {"cmd": "apply", "folder": folder, "env": args.env, "variables": variables, "listen": getattr(args, "listen", [])}
    answer = request(name, message, timeout=300)
    if getattr(args, "json", False):
        from sandboxd.cli.results import print_json, reload_result

        print_json(reload_result(name, answer))
        return 0
    changes = [f"{what}: {', '.join(answer[what])}" for what in ("added", "removed", "changed", "sockets_replaced") if answer[what]]
    print(f"stack {name!r} reloaded: " + ("; ".join(changes) if changes else "nothing changed"))
    return 0


def cmd_reload_stack(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, request

    stack = choose_stack(args.project_name)
    folder = args.dir or request(stack, {"cmd": "status"})["folder"]
    args.dir, args.env, args.listen = folder, [], []
    return _reload_stack(stack, args)


def _stack_to_run(args: argparse.Namespace) -> tuple[Stack, str]:
    """The stack `up` is to run (its spec folder with the -e and --listen overrides) and its
    instance name; refused unless this process is root."""
    from sandboxd.host.state import instance_name
    from sandboxd.spec.load import load_stack
    from sandboxd.spec.overrides import with_overrides

    stack = with_overrides(load_stack(Path(args.dir), _variables(args)), args.env, args.listen)
    instance = instance_name(stack, args.project_name)
    if os.geteuid() != 0:
        raise HostError("sandboxd up needs root: it creates namespaces, cgroups and mounts", "run it as root (e.g. sudo sandboxd up DIR)")
    # The supervisor `up -d` forks runs on what its parent pulled; a stack on the host's root
    # alone has nothing to pull (nor does the supervisor then load the store's hashing).
    if not args.daemon and any(service.image != "host" for service in stack.services):
        from sandboxd.store.pull import as_policy, pull_stack_images

        pull_stack_images(stack, as_policy(args.pull))
    return stack, instance


def _variables(args: argparse.Namespace) -> dict[str, str]:
    """What ${VAR} in the spec takes: this process's environment over the folder's .env, or over
    the `--env-file` files instead (SpecErrors for a problem of one of them)."""
    from sandboxd.spec.load import interpolation_variables

    return interpolation_variables(Path(args.dir), [Path(file) for file in getattr(args, "env_file", [])])


def _pull_images(folder: Path, policy: str, variables: dict[str, str]) -> None:
    """Before a running stack applies `folder`: pull its registry images here, where skopeo's
    progress is seen. A spec error is left for the stack to report, as before."""
    from sandboxd.errors import SpecErrors
    from sandboxd.spec.load import load_stack
    from sandboxd.store.pull import as_policy, pull_stack_images

    try:
        stack = load_stack(folder, variables)
    except SpecErrors:
        return
    pull_stack_images(stack, as_policy(policy))


def _up(args: argparse.Namespace) -> int:
    from sandboxd.sandbox.handle import ForkServer

    # First of all, as root: every sandbox is a fork of the fork server, and a fork costs in
    # proportion to the process forked: none of what follows (the specs, their YAML, the plans,
    # the supervisor's imports) is in it. Whoever is not root is told so after the specs' checks.
    fork_server = ForkServer.start() if os.geteuid() == 0 else None
    try:
        return _up_with(args, fork_server)
    except BaseException:
        if fork_server is not None:
            fork_server.stop()
        raise


def _up_with(args: argparse.Namespace, fork_server: ForkServer | None) -> int:
    """`up` once the fork server runs: what the supervisor needs, then the supervisor (which
    stops the fork server when it ends)."""
    from sandboxd.host.facts import cgroup_host
    from sandboxd.host.paths import RUNTIME_ROOT, sandbox_root
    from sandboxd.host.prepare import make_plans
    from sandboxd.host.state import clean_stale
    from sandboxd.store.volumes import create, volumes_dir

    stack, instance = _stack_to_run(args)
    lease = None
    if any(service.userns for service in stack.services):
        from sandboxd.host.subids import lease as lease_ids

        lease = lease_ids(instance)
        # Held by this process and the fork server: the block is ours until both are gone.
        if fork_server is not None:
            fork_server.hold([lease.fd])
    plans = make_plans(stack, str(RUNTIME_ROOT / instance), echo=not args.daemon, userns=lease.userns if lease else None)
    if fork_server is not None and lease is not None and any(plan.stores_through_ids for plan in plans.values()):
        fork_server.prepare_storage(lease.userns)  # made there while this process goes on setting up
    host = cgroup_host()
    from sandboxd.host.limits import enforceable_limits

    limits = enforceable_limits(stack, host)
    create(stack, plans)  # the last check is done: from here on things are made
    if fork_server is not None:  # compiled there while this process goes on setting up
        first = sorted(stack.services, key=lambda service: service.start != "eager")  # (a stable sort)
        fork_server.expect(str(sandbox_root(RUNTIME_ROOT / instance)), [plans[service.name] for service in first])
    clean_stale()
    from sandboxd.host.pins import pin_mounts

    # The fork server holds none of them: the supervisor sends them along.
    pinned = pin_mounts(stack, volumes_dir())
    # asyncio imports ssl for TLS transports, which the supervisor never makes (its sockets are
    # unix, TCP and UDP ones, plain): without it, OpenSSL is not loaded (4 MiB of RSS). A stack
    # with networks loads it with pyroute2 (host/network.py lets it).
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from sandboxd.daemon.supervisor import Supervisor

    return Supervisor(stack, plans, host, instance, fork_server=fork_server, limits=limits, detached=args.daemon, pinned=pinned, ids=lease).run()


def _up_detached(args: argparse.Namespace) -> int:
    """Validate here (errors come back at once, exit 2), then start the supervisor in a session of
    its own and return once every eager service has started (or is ready, with --wait)."""
    import tempfile

    from sandboxd.cli.client import running_stacks
    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.prepare import make_plans

    callers = _open_descriptors()
    stack, instance = _stack_to_run(args)
    if instance in running_stacks():
        raise HostError(f"a stack named {instance!r} is already running", "stop it with sandboxd down -p NAME, or pick another name with -p")
    make_plans(stack, str(RUNTIME_ROOT / instance))  # builds images here, where their output is seen
    log = tempfile.TemporaryFile()
    # The supervisor is this process, forked into a session of its own: no second interpreter
    # start, no second validation. Its early errors go to `log`, which this side shows.
    daemon = os.fork()
    if daemon == 0:
        _be_the_supervisor(args, instance, log, callers)
    return _wait_until_up(args, instance, daemon, log)


def _open_descriptors() -> dict[int, tuple[int, int]]:
    """The descriptors above 2 open now, each with its file's device and inode: at the start of
    `up -d`, what its caller left open (sandboxd has opened none of its own yet)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue  # the listing's own
        if int(name) > 2:
            found[int(name)] = (st.st_dev, st.st_ino)
    return found


def _be_the_supervisor(args: argparse.Namespace, instance: str, log: IO[bytes], callers: dict[int, tuple[int, int]]) -> NoReturn:
    """The forked side of `up -d`: a session of its own, no terminal, its output into `log`, none
    of the descriptors its caller left open (a pipe a script waits on to end, make's jobserver);
    runs the stack as `up --daemon -p INSTANCE` would and exits with the supervisor's code."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    for fd, identity in callers.items():
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == identity:  # still the caller's, not one of ours on its number
            os.close(fd)
    args.daemon, args.project_name = True, instance
    code = 1
    try:
        code = _up(args)
    except SandboxdError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        code = e.exit_code
    finally:
        sys.stderr.flush()
        os._exit(code)


def _wait_until_up(args: argparse.Namespace, instance: str, daemon: int, log: IO[bytes]) -> int:
    """Poll the new stack's status until every eager service has started (is ready, with --wait),
    then print it; if the supervisor exits first, show what it wrote to `log` and pass on its code.
    A service that failed (with --wait: or is in backoff, crash-looping) ends the wait at once."""
    import time

    from sandboxd.cli.client import choose_stack, request

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        finished, wait_status = os.waitpid(daemon, os.WNOHANG)
        if finished:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            return os.waitstatus_to_exitcode(wait_status) or 1
        try:
            status = request(choose_stack(instance), {"cmd": "status"}, timeout=5)
        except SandboxdError:
            time.sleep(0.02)
            continue
        broken = [s for s in status["services"] if s["state"] == "failed" or (args.wait and s["state"] == "backoff")]
        if broken:
            return _broken_stack(instance, broken)
        waiting_for = {"starting"} | ({"running"} if args.wait else set())
        pending = [s for s in status["services"] if s["state"] in waiting_for and not (s["state"] == "running" and s["ready"])]
        if sys.stderr.isatty():
            done = len(status["services"]) - len(pending)
            sys.stderr.write(f"\rsandboxd: {done}/{len(status['services'])} {'ready' if args.wait else 'started'}: {' '.join(s['name'] for s in pending)[:60]}\033[K")
        if not pending:
            if sys.stderr.isatty():
                sys.stderr.write("\r\033[K")
            _print_up(args, status)
            return 0
        time.sleep(0.02)
    raise HostError(f"stack {instance!r} did not come up within {args.timeout:g} s", f"see: sandboxd logs -p {instance}")


def _broken_stack(instance: str, broken: list[ServiceStatus]) -> int:
    """`up -d` gives up at once: each broken service, why, and the last lines of its output, to
    stderr; exit code 1. The stack keeps running (as compose leaves the other containers up)."""
    from sandboxd.daemon.console import escape_controls
    from sandboxd.daemon.failures import failure_report
    from sandboxd.host.paths import RUNTIME_ROOT

    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    for svc in broken:
        for line in failure_report(svc["name"], svc["state"], svc["reason"], RUNTIME_ROOT / instance / "logs"):
            sys.stderr.write(f"sandboxd: {escape_controls(line) if sys.stderr.isatty() else line}\n")
    names, p = " ".join(svc["name"] for svc in broken), f"-p {instance}"
    sys.stderr.write(f"sandboxd: stack {instance!r} keeps running; see sandboxd ps {p}, sandboxd logs {p} {names}; stop it with sandboxd down {p}\n")
    return 1


def _print_up(args: argparse.Namespace, status: StackStatus) -> None:
    """What `up -d` prints once the stack is up: its status table, or with --json an UpResult."""
    from sandboxd.cli.services import print_status

    if args.json:
        from sandboxd.cli.results import print_json, up_result

        print_json(up_result(status))
    else:
        print_status(status, sys.stdout)


def cmd_down(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, request, running_stacks
    from sandboxd.host.state import clean_stale

    name = args.project_name or (Path(args.dir).resolve().name if args.dir else None)
    cleaned = clean_stale()  # a stack whose supervisor died: remove what it left
    if name and name not in running_stacks():
        if name in cleaned:
            if args.json:
                from sandboxd.cli.results import print_json

                print_json({"stack": name, "pid": 0, "stopped": []})
                return 0
            print(f"stack {name!r} was dead; removed what it left behind")
            return 0
        raise SandboxdError(f"no stack named {name!r} is running")
    stack = choose_stack(name)
    pid = running_stacks()[stack]
    if sys.stderr.isatty():
        sys.stderr.write(f"sandboxd: stopping stack {stack!r}…\r")
    before = request(stack, {"cmd": "status"}, timeout=ASK_TIMEOUT) if args.json else None
    try:
        request(stack, {"cmd": "down"}, timeout=ASK_TIMEOUT)
    except HostError:
        raise  # not root: the socket was not even tried
    except (SandboxdError, OSError) as e:
        sys.stderr.write(f"sandboxd: stack {stack!r} does not answer ({e}); sending SIGTERM to its supervisor (pid {pid})\n")
        _signal(pid, signal.SIGTERM)
    _wait_until_down(stack, pid)
    if before is not None:
        from sandboxd.cli.results import down_result, print_json

        print_json(down_result(before))
        return 0
    print(f"stack {stack!r} is down")
    return 0


def _wait_until_down(stack: str, pid: int) -> None:
    """Wait for the supervisor to end, never without bound: after the stack's longest stop_timeout
    and DOWN_GRACE, a second SIGTERM (every service's cgroup is killed); DOWN_GRACE later, SIGKILL
    to the supervisor (its fork server and every sandbox die with it) and what it left is removed.
    The wait is on a pidfd of the supervisor, which turns readable the moment it exits: `down`
    returns then, not at the next tick of a poll."""
    import time

    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.state import clean_stale

    try:
        stop_timeout = float(json.loads((RUNTIME_ROOT / stack / "state.json").read_text()).get("stop_timeout", 10.0))
    except (OSError, ValueError, TypeError):
        stop_timeout = 10.0
    steps = [
        (1.0, f"waiting for stack {stack!r} (pid {pid}) to stop its services (each within its stop_timeout; the longest is {stop_timeout:g} s)", None),
        (stop_timeout + DOWN_GRACE, f"stack {stack!r} is still stopping after {stop_timeout + DOWN_GRACE:g} s: SIGTERM again, which kills every service", signal.SIGTERM),
        (stop_timeout + 2 * DOWN_GRACE, f"stack {stack!r} is still not down: SIGKILL to its supervisor (pid {pid}); its services die with it", signal.SIGKILL),
    ]
    started = time.monotonic()
    exited = _exit_waiter(pid)
    # A zombie counts as gone: its parent (init, after `up -d`) reaps it when it can.
    while not exited(steps[0][0] - (time.monotonic() - started) if steps else None):  # (None: until it exits)
        _after, text, sig = steps.pop(0)
        sys.stderr.write(f"sandboxd: {text}\n")
        if sig is not None:
            _signal(pid, sig)
    if not steps:
        clean_stale()  # what the killed supervisor could not remove itself


def _exit_waiter(pid: int) -> Callable[[float | None], bool]:
    """A function that waits up to a number of seconds (None: without end) for `pid` to have
    exited, and says whether it has."""
    import select

    from sandboxd.host.paths import alive

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return lambda timeout: True
    except OSError:  # no pidfds (a kernel before 5.3): a poll of /proc
        import time

        def poll(timeout: float | None) -> bool:
            deadline = None if timeout is None else time.monotonic() + timeout
            while alive(pid):
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
            return True

        return poll

    def wait(timeout: float | None) -> bool:
        ready, _, _ = select.select([pidfd], [], [], None if timeout is None else max(timeout, 0.0))
        if ready:
            os.close(pidfd)
        return bool(ready)

    return wait


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cmd_ls(args: argparse.Namespace) -> int:
    import json

    from sandboxd.cli.client import running_stacks
    from sandboxd.host.state import clean_stale

    if os.geteuid() == 0:
        clean_stale()
    stacks = running_stacks()
    if args.json:
        from sandboxd.cli.results import listing

        print(json.dumps(listing(stacks)))
    else:
        for name, pid in stacks.items():
            print(f"{name}\tpid {pid}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from sandboxd.host.prepare import make_plans
    from sandboxd.spec.load import load_stack

    stack = load_stack(Path(args.dir), _variables(args))
    plans = make_plans(stack, build=False)

    def default(value: object) -> object:
        if isinstance(value, Path):
            return str(value)
        raise TypeError(type(value))

    out = {
        "stack": dataclasses.asdict(stack),
        "plans": {name: dataclasses.asdict(plan) for name, plan in plans.items()},
        # What each service's cgroup gets: its limits, and the default process limit unless it sets one.
        "limits": {s.name: dataclasses.asdict(s.limits.with_defaults()) for s in stack.services},
    }
    print(json.dumps(out, indent=2, default=default))
    return 0
