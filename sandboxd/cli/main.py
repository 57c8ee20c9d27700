"""The `sandboxd` command line.

Only what a verb needs is imported when it runs, so quick verbs stay quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sandboxd.errors import HostError, SandboxdError, SpecErrors


def _load(folder: str) -> tuple[object, object]:
    from sandboxd.host.prepare import make_plans
    from sandboxd.spec.load import load_stack

    stack = load_stack(Path(folder))
    return stack, make_plans(stack, build=False)


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

    answer = request(name, {"cmd": "apply", "folder": str(Path(args.dir).resolve()), "env": args.env}, timeout=300)
    changes = [f"{what}: {', '.join(answer[what])}" for what in ("added", "removed", "changed", "sockets_replaced") if answer[what]]
    print(f"stack {name!r} reloaded: " + ("; ".join(changes) if changes else "nothing changed"))
    return 0


def cmd_reload_stack(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, request

    stack = choose_stack(args.project_name)
    folder = args.dir or request(stack, {"cmd": "status"})["folder"]
    args.dir, args.env = folder, []
    return _reload_stack(stack, args)


def _up(args: argparse.Namespace) -> int:
    from sandboxd.host.facts import cgroup_host
    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.prepare import make_plans
    from sandboxd.spec.load import load_stack
    from sandboxd.spec.overrides import with_environment
    from sandboxd.host.state import clean_stale, instance_name
    from sandboxd.store.volumes import create, volumes_dir

    stack = with_environment(load_stack(Path(args.dir)), args.env)
    instance = instance_name(stack, args.project_name)
    if os.geteuid() != 0:
        raise HostError("sandboxd up needs root: it creates namespaces, cgroups and mounts", "run it as root (e.g. sudo sandboxd up DIR)")
    lease = None
    if any(service.userns for service in stack.services):
        from sandboxd.host.subids import lease as lease_ids

        # Held by this process and, from its fork, the fork server: the block is ours until both are gone.
        lease = lease_ids(instance)
    plans = make_plans(stack, str(RUNTIME_ROOT / instance), echo=not args.daemon, userns=lease.userns if lease else None)
    host = cgroup_host()
    from sandboxd.host.limits import enforceable_limits

    limits = enforceable_limits(stack, host)
    create(stack, plans)  # the last check is done: from here on things are made
    clean_stale()
    from sandboxd.sandbox.handle import ForkServer

    from sandboxd.host.pins import pin_mounts

    # Before the supervisor's imports (asyncio): every sandbox is a fork of this smaller process.
    fork_server = ForkServer.start()
    try:
        # After the fork, so that the fork server holds none of them: the supervisor sends them along.
        pinned = pin_mounts(stack, volumes_dir())
    except BaseException:
        fork_server.stop()
        raise
    from sandboxd.daemon.supervisor import Supervisor

    return Supervisor(stack, plans, host, instance, fork_server=fork_server, limits=limits, detached=args.daemon, pinned=pinned, ids=lease).run()


def _up_detached(args: argparse.Namespace) -> int:
    """Validate here (errors come back at once, exit 2), then start the supervisor in a session of
    its own and return once every eager service has started (or is ready, with --wait)."""
    import tempfile
    import time

    from sandboxd.cli.client import choose_stack, request, running_stacks
    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.prepare import make_plans
    from sandboxd.spec.load import load_stack
    from sandboxd.spec.overrides import with_environment
    from sandboxd.host.state import instance_name

    stack = with_environment(load_stack(Path(args.dir)), args.env)
    instance = instance_name(stack, args.project_name)
    if os.geteuid() != 0:
        raise HostError("sandboxd up needs root: it creates namespaces, cgroups and mounts", "run it as root (e.g. sudo sandboxd up DIR)")
    if instance in running_stacks():
        raise HostError(f"a stack named {instance!r} is already running", "stop it with sandboxd down -p NAME, or pick another name with -p")
    make_plans(stack, str(RUNTIME_ROOT / instance))  # builds images here, where their output is seen
    log = tempfile.TemporaryFile()
    # The supervisor is this process, forked into a session of its own: no second interpreter
    # start, no second validation. Its early errors go to `log`, which this side shows.
    daemon = os.fork()
    if daemon == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
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
        waiting_for = {"starting"} | ({"running"} if args.wait else set())
        pending = [s for s in status["services"] if s["state"] in waiting_for and not (s["state"] == "running" and s["ready"])]
        if sys.stderr.isatty():
            done = len(status["services"]) - len(pending)
            sys.stderr.write(f"\rsandboxd: {done}/{len(status['services'])} {'ready' if args.wait else 'started'}: {' '.join(s['name'] for s in pending)[:60]}\033[K")
        if not pending:
            if sys.stderr.isatty():
                sys.stderr.write("\r\033[K")
            _print_status(status, sys.stdout)
            return 0
        time.sleep(0.02)
    raise HostError(f"stack {instance!r} did not come up within {args.timeout:g} s", f"see: sandboxd logs -p {instance}")


def _print_status(status: dict[str, Any], out: Any) -> None:
    from sandboxd.daemon.console import escape_controls

    rows = [("SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "MEMORY", "CPU", "SOCKETS / STATUS")]
    for svc in status["services"]:
        socks = " ".join(s["address"] for s in svc["sockets"])
        extra = f"{socks} {escape_controls(svc['status_text'])}".strip()  # the service's STATUS=, its own text
        state = svc["state"] + (" (ready)" if svc["ready"] and svc["state"] != "ready" and svc["state"] == "running" else "")
        rows.append(
            (
                svc["name"],
                state,
                str(svc["pid"] or "-"),
                f"{svc['uptime']:.0f}s" if svc["uptime"] else "-",
                str(svc["restarts"]),
                f"{svc['memory'] / (1 << 20):.1f}M" if svc["memory"] else "-",
                f"{svc['cpu_seconds']:.2f}s",
                extra,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out.write(f"stack {status['stack']} ({status['folder']})\n")
    for row in rows:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1] + "\n")


def cmd_ps(args: argparse.Namespace) -> int:
    import json

    from sandboxd.cli.client import choose_stack, request

    status = request(choose_stack(args.project_name), {"cmd": "status", "services": args.services})
    if args.json:
        status.pop("ok", None)
        print(json.dumps(status, indent=2))
    else:
        _print_status(status, sys.stdout)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, request

    message: dict[str, Any] = {"cmd": args.verb, "services": args.services}
    if args.verb == "kill":
        message["signal"] = args.signal
    request(choose_stack(args.project_name), message)
    done = {"stop": "stopped", "start": "started", "restart": "restarted", "kill": f"sent {args.signal if args.verb == 'kill' else ''}", "reload": "reloaded"}
    for name in args.services:
        print(f"{name}: {done.get(args.verb, args.verb)}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import ask, choose_stack, connect
    from sandboxd.sandbox.execute import ExecOptions, exec_in, plan_exec, wants_tty

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SandboxdError("nothing to run: sandboxd exec [OPTIONS] SERVICE -- COMMAND [ARG…]")
    options = ExecOptions(tuple(command), args.tty, args.user or "", args.workdir or "", tuple(args.env))
    message: dict[str, Any] = {"cmd": "exec_info", "services": [args.service], "session": True}
    if options.user:
        message["user"] = options.user
    # The connection stays open while the command runs: when it closes, however this process
    # ends (SIGKILL too), the stack ends what is left of the command (see execute.py).
    with connect(choose_stack(args.project_name)) as session:
        info = ask(session, message)
        tty = wants_tty(options.tty, os.isatty(0), os.isatty(1))
        return exec_in(plan_exec(args.service, info, options, os.environ, tty))


def _exec_user(text: str) -> str:
    user, sep, group = text.partition(":")
    if not user or (sep and not group):
        raise argparse.ArgumentTypeError(f"expected USER or USER:GROUP (names or numbers), got {text!r}")
    return text


def _exec_workdir(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected an absolute path inside the sandbox, got {text!r}")
    return text


def _exec_env(text: str) -> str:
    key = text.partition("=")[0]
    if not key or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY, got {text!r}")
    return text


def cmd_down(args: argparse.Namespace) -> int:
    import time

    from sandboxd.host.paths import alive as _alive
    from sandboxd.cli.client import choose_stack, request, running_stacks
    from sandboxd.host.state import clean_stale

    name = args.project_name or (Path(args.dir).resolve().name if args.dir else None)
    cleaned = clean_stale()  # a stack whose supervisor died: remove what it left
    if name and name not in running_stacks():
        if name in cleaned:
            print(f"stack {name!r} was dead; removed what it left behind")
            return 0
        raise SandboxdError(f"no stack named {name!r} is running")
    stack = choose_stack(name)
    pid = running_stacks()[stack]
    if sys.stderr.isatty():
        sys.stderr.write(f"sandboxd: stopping stack {stack!r}…\r")
    request(stack, {"cmd": "down"})
    while _alive(pid):  # a zombie counts as gone: its parent (init, after `up -d`) reaps it when it can
        time.sleep(0.01)
    print(f"stack {stack!r} is down")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    import json

    from sandboxd.cli.client import running_stacks
    from sandboxd.host.state import clean_stale

    if os.geteuid() == 0:
        clean_stale()
    stacks = running_stacks()
    if args.json:
        print(json.dumps([{"name": name, "pid": pid} for name, pid in stacks.items()]))
    else:
        for name, pid in stacks.items():
            print(f"{name}\tpid {pid}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sandboxd.daemon import logs
    from sandboxd.cli.client import choose_stack, running_stacks
    from sandboxd.host.paths import RUNTIME_ROOT
    from sandboxd.host.paths import alive as _alive

    stack = choose_stack(args.project_name)
    directory = RUNTIME_ROOT / stack / "logs"
    names = args.services or sorted(p.name[: -len(".log")] for p in directory.glob("*.log") if p.name != "sandboxd.log")
    width = max((len(n) for n in names), default=0)
    lines = sorted((stamp, name, text) for name in names for stamp, text in logs.read(directory, name))
    if args.since:
        lines = [line for line in lines if line[0] >= args.since]
    if args.tail is not None:
        lines = lines[-args.tail :] if args.tail else []
    for _stamp, name, text in lines:
        _print_log_line(f"{name.ljust(width)} | {text}")
    if args.follow:
        pid = running_stacks()[stack]
        try:
            for name, _stamp, text in logs.follow(directory, names, lambda: _alive(pid)):
                _print_log_line(f"{name.ljust(width)} | {text}")
        except KeyboardInterrupt:
            pass
    return 0


def _print_log_line(line: str) -> None:
    """On a terminal with control characters escaped (as `up` shows them); elsewhere (a pipe, a
    file) the bytes as the service printed them."""
    from sandboxd.daemon.console import escape_controls

    if sys.stdout.isatty():
        sys.stdout.write(escape_controls(line) + "\n")
        sys.stdout.flush()
    else:
        sys.stdout.buffer.write(line.encode("utf-8", errors="surrogateescape") + b"\n")
        sys.stdout.buffer.flush()


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    from sandboxd.cli.client import choose_stack, request

    stack = choose_stack(args.project_name)
    try:
        while True:
            status = request(stack, {"cmd": "status", "services": args.services})
            if not args.once:
                sys.stdout.write("\033[H\033[2J" if sys.stdout.isatty() else "")
            print(f"{'SERVICE':20} {'STATE':10} {'MEMORY':>10} {'CPU':>10} {'PROCS':>6}")
            for svc in status["services"]:
                print(f"{svc['name']:20} {svc['state']:10} {svc['memory'] / (1 << 20):9.1f}M {svc['cpu_seconds']:9.2f}s {svc['processes']:6}")
            if args.once:
                return 0
            time.sleep(1)
    except KeyboardInterrupt:
        return 0


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    stack, plans = _load(args.dir)

    def default(value: object) -> object:
        if isinstance(value, Path):
            return str(value)
        raise TypeError(type(value))

    out = {
        "stack": dataclasses.asdict(stack),  # type: ignore[call-overload]
        "plans": {name: dataclasses.asdict(plan) for name, plan in plans.items()},  # type: ignore[attr-defined]
        # What each service's cgroup gets: its limits, and the default process limit unless it sets one.
        "limits": {s.name: dataclasses.asdict(s.limits.with_defaults()) for s in stack.services},  # type: ignore[attr-defined]
    }
    print(json.dumps(out, indent=2, default=default))
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from sandboxd.store import images

    match args.action:
        case "ls":
            found = images.list_images()
            if args.json:
                import json

                print(json.dumps([{"name": i.name, "source": i.source, "digest": i.digest, "created": i.created, "size": images.size_of(i.rootfs), "config": i.config.to_json()} for i in found], indent=2))
                return 0
            print(f"{'NAME':<24} {'SOURCE':<7} {'SIZE':>9}  {'CREATED':<20} DIGEST")
            for image in found:
                import time

                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(image.created))
                size = f"{images.size_of(image.rootfs) / (1 << 20):.1f}M"
                print(f"{image.name:<24} {image.source:<7} {size:>9}  {created:<20} {image.digest[:19]}")
            return 0
        case "build":
            _need_root("sandboxd image build")
            for target in args.names or ["."]:
                definition, name = _definition(target)
                if args.force:
                    with images.store_lock():
                        built = images.build(name, definition)
                else:
                    built = images.build_if_changed(name, definition)
                print(f"image {built.name}: {built.rootfs} ({built.digest[:19]})")
            return 0
        case "rm":
            _need_root("sandboxd image rm")
            missing = [name for name in args.names if not images.remove(name)]
            for name in missing:
                print(f"sandboxd: no image '{name}'", file=sys.stderr)
            return 1 if missing else 0
        case "import":
            _need_root("sandboxd image import")
            from sandboxd.store.oci import import_image

            image = import_image(Path(args.file), args.name)
            print(f"image {image.name}: imported from {args.file} ({image.digest[:19]})")
            return 0
    return 2


def _definition(target: str) -> tuple[Path, str]:
    """A definition folder from a path (images/NAME) or a name looked up from the current folder."""
    from sandboxd.store import images

    path = Path(target)
    if (path / images.BUILD_SCRIPT).is_file():
        return path.resolve(), path.resolve().name
    found = images.find_definition(target, Path.cwd())
    if found is None:
        raise HostError(f"no image definition '{target}': expected a folder with a build script, or images/{target}/build here or above", "give the path, like sandboxd image build images/busybox")
    return found, target


def cmd_volume(args: argparse.Namespace) -> int:
    from sandboxd.store import volumes

    if args.action == "ls":
        print(f"{'NAME':<32} {'SIZE':>9}")
        for name, size in volumes.list_volumes():
            print(f"{name:<32} {size / (1 << 20):>8.1f}M")
        return 0
    _need_root("sandboxd volume rm")
    failed = 0
    for name in args.names:
        user = volumes.in_use(name)
        if user:
            print(f"sandboxd: volume '{name}' is in use by a sandbox (pid {user}); stop its stack first", file=sys.stderr)
            failed = 1
        elif not volumes.remove(name):
            print(f"sandboxd: no volume '{name}'", file=sys.stderr)
            failed = 1
    return failed


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostError(f"{what} needs root: the store under /var/lib/sandboxd belongs to root", "run it as root")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandboxd", description="Run isolated services with sockets bound by sandboxd.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    up = verbs.add_parser("up", help="validate a spec folder and run its services (in the foreground, or -d)")
    up.add_argument("dir", help="folder of *.yaml unit specs")
    up.add_argument("-p", "--project-name", help="name of the stack (default: the folder's name)")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background; return once every eager service has started")
    up.add_argument("--wait", action="store_true", help="with -d: return once every eager service is ready")
    up.add_argument("--timeout", type=float, default=60.0, help="with -d: give up after this many seconds")
    up.add_argument("-e", "--env", action="append", default=[], metavar="SERVICE:KEY=VALUE", help="override a service's environment")
    up.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    up.set_defaults(func=cmd_up)
    for verb, text in (("ps", "show the services of a running stack"), ("status", "the same as ps")):
        ps = verbs.add_parser(verb, help=text)
        ps.add_argument("services", nargs="*")
        ps.add_argument("-p", "--project-name")
        ps.add_argument("--json", action="store_true")
        ps.set_defaults(func=cmd_ps)
    for verb, text in (("stop", "stop services"), ("start", "start stopped services"), ("restart", "stop and start services")):
        control = verbs.add_parser(verb, help=text)
        control.add_argument("services", nargs="+")
        control.add_argument("-p", "--project-name")
        control.set_defaults(func=cmd_control)
    reload = verbs.add_parser(
        "reload",
        help="SERVICE…: the services' own reload (reload_signal; with ready: notify until READY=1 again); "
        "no service: apply the changed spec to the running stack",
    )
    reload.add_argument("services", nargs="*")
    reload.add_argument("-p", "--project-name")
    reload.add_argument("--dir", help="with no service: the spec folder to apply (default: the one the stack came from)")
    reload.set_defaults(func=lambda a: cmd_control(a) if a.services else cmd_reload_stack(a))
    kill = verbs.add_parser("kill", help="send a signal to services (default SIGTERM)")
    kill.add_argument("services", nargs="+")
    kill.add_argument("-s", "--signal", default="SIGTERM")
    kill.add_argument("-p", "--project-name")
    kill.set_defaults(func=cmd_control)
    execute = verbs.add_parser(
        "exec",
        help="run a command inside a running service's sandbox",
        description="Run a command in SERVICE's namespaces, cgroup and root, confined as the service is, "
        "with a terminal allocated inside the sandbox or with pipes: never the caller's own descriptors. "
        "Options come before SERVICE.",
    )
    execute.add_argument("service")
    execute.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG…]")
    execute.add_argument("-p", "--project-name")
    terminal = execute.add_mutually_exclusive_group()
    terminal.add_argument("-t", "--tty", dest="tty", action="store_const", const=True, default=None,
                          help="a terminal inside the sandbox (default when stdin and stdout are terminals)")
    terminal.add_argument("-T", "--no-tty", dest="tty", action="store_const", const=False, help="pipes, no terminal")
    execute.add_argument("-u", "--user", type=_exec_user, help="USER[:GROUP], names or numbers (default: the service's)")
    execute.add_argument("-w", "--workdir", type=_exec_workdir, help="absolute working directory (default: the service's)")
    execute.add_argument("-e", "--env", action="append", default=[], type=_exec_env, metavar="KEY=VALUE",
                         help="set a variable (repeatable); KEY alone passes the caller's value")
    execute.set_defaults(func=cmd_exec)
    logs = verbs.add_parser("logs", help="show what services printed")
    logs.add_argument("services", nargs="*")
    logs.add_argument("-p", "--project-name")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--since", help="only lines at or after this UTC time, like 2026-11-26T06:00:00")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    logs.set_defaults(func=cmd_logs)
    stats = verbs.add_parser("stats", help="live resource use of a running stack")
    stats.add_argument("services", nargs="*")
    stats.add_argument("-p", "--project-name")
    stats.add_argument("--once", action="store_true", help="print once instead of refreshing every second")
    stats.set_defaults(func=cmd_stats)
    down = verbs.add_parser("down", help="stop a running stack and remove everything it made")
    down.add_argument("dir", nargs="?", help="the spec folder (its name is the stack's name)")
    down.add_argument("-p", "--project-name")
    down.set_defaults(func=cmd_down)
    ls = verbs.add_parser("ls", help="list the stacks running on this host")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    config = verbs.add_parser("config", help="print the resolved units and launch plans, or the validation errors")
    config.add_argument("dir")
    config.set_defaults(func=cmd_config)
    image = verbs.add_parser("image", help="build, list, import and remove root file system images")
    image_verbs = image.add_subparsers(dest="action", metavar="ACTION", required=True)
    image_build = image_verbs.add_parser("build", help="build images from definitions (images/NAME/build), if changed")
    image_build.add_argument("names", nargs="*", help="definition folders (images/NAME) or names found in images/ here or above")
    image_build.add_argument("--force", action="store_true", help="build even if the definition did not change")
    image_ls = image_verbs.add_parser("ls", help="list the stored images")
    image_ls.add_argument("--json", action="store_true")
    image_rm = image_verbs.add_parser("rm", help="remove stored images")
    image_rm.add_argument("names", nargs="+")
    image_import = image_verbs.add_parser("import", help="import an OCI image layout (folder or tar) or a docker save archive")
    image_import.add_argument("file")
    image_import.add_argument("--name", help="the image's name (default: its tag)")
    image.set_defaults(func=cmd_image)
    volume = verbs.add_parser("volume", help="list and remove named volumes")
    volume_verbs = volume.add_subparsers(dest="action", metavar="ACTION", required=True)
    volume_verbs.add_parser("ls", help="list volumes")
    volume_rm = volume_verbs.add_parser("rm", help="remove volumes and their data")
    volume_rm.add_argument("names", nargs="+")
    volume.set_defaults(func=cmd_volume)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from sandboxd import __version__

        print(__version__)
        return 0
    if not args.verb:
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
        return result
    except SpecErrors as e:
        print(f"sandboxd: {len(e.errors)} problem{'s' if len(e.errors) != 1 else ''} in {getattr(args, 'dir', '')}:", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return e.exit_code
    except SandboxdError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sandboxd ps --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
