"""The argparse tree of `sandboxd`: one function a group of verbs, added in the order `--help`
lists them. Each verb's `func` is its command function, imported as its sub-parser is built.

`main` builds only the sub-parser of the verb it was given (`build_parser(verb)`): the other two
dozen are not built and their command modules not imported (what they import at the top, such as
datetime for logs and stats or secrets for upgrade, would be imported for nothing). The whole tree
(`build_parser()`) is for `sandboxd --help`, a mistyped verb's error (it lists the verbs), the
shell completion and the man page (completion.py): a verb's sub-parser is the same in both.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    from collections.abc import Callable

    Verbs: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers returns
    Wanted: TypeAlias = Callable[[str], bool]  # whether a verb's sub-parser is to be built

STACK_HELP = "the stack's name (default: the one stack running)"


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, its width found as argparse finds it (shutil.get_terminal_size, less
    2) without importing shutil, which brings bz2 and lzma: argparse makes a formatter for every
    add_argument, so every verb would import them."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


def _columns() -> int:
    """What shutil.get_terminal_size().columns says: $COLUMNS, else the terminal on stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ is not None else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with _Formatter, for the top and every verb (add_subparsers makes its
    parsers of the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


# Every verb, in the order `--help` lists them.
VERBS = ("up", "ps", "status", "stop", "start", "restart", "reload", "kill", "exec", "logs", "stats", "down", "ls", "config",
         "upgrade", "reexec", "image", "volume", "export")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser of the command line; with `verb` (one of VERBS), of that verb only."""
    if verb is not None and verb not in VERBS:
        raise ValueError(f"not a verb: {verb!r}")
    wanted: Wanted = (lambda name: True) if verb is None else (lambda name: name == verb)
    parser: argparse.ArgumentParser = _Parser(
        prog="sandboxd",
        description="Run isolated services with sockets bound by sandboxd. Every verb that reports takes --json "
        "(logs and stats: one object a line); sandboxd VERB --help says what each option does.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    _add_up(verbs, wanted)
    _add_service_verbs(verbs, wanted)
    _add_exec(verbs, wanted)
    _add_logs_and_stats(verbs, wanted)
    _add_stack_verbs(verbs, wanted)
    _add_image(verbs, wanted)
    _add_volume(verbs, wanted)
    if wanted("export"):
        from sandboxd.cli.export import add_export

        add_export(verbs, _add_env_file)
    return parser


def _add_up(verbs: Verbs, wanted: Wanted) -> None:
    if not wanted("up"):
        return
    from sandboxd.cli.stack import cmd_up

    up = verbs.add_parser("up", help="validate a spec folder and run its services (in the foreground, or -d)")
    up.add_argument("dir", help="the spec folder: its *.yaml files with units (kind: ...)")
    up.add_argument("-p", "--project-name", help="name of the stack (default: the folder's name)")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background; return once every eager service has started")
    up.add_argument("--wait", action="store_true", help="with -d: return once every eager service is ready")
    up.add_argument("--timeout", type=float, default=60.0, help="with -d: give up after this many seconds")
    up.add_argument("-e", "--env", action="append", default=[], metavar="SERVICE:KEY=VALUE", help="override a service's environment")
    up.add_argument("--listen", action="append", default=[], metavar="SOCKET=ADDRESS",
                    help="bind a socket unit (or a service's listen:) on ADDRESS instead, like web=tcp:127.0.0.1:0; repeated for one socket: its addresses in order")
    _add_env_file(up)
    _add_json(up, "with -d, or against a running stack: print what was started (or changed) as one JSON object")
    up.add_argument("--pull", choices=("always", "missing", "never"), default="missing",
                    help="registry images: pull those the store lacks (missing, the default), pull all again (always), or none (never)")
    up.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    up.set_defaults(func=cmd_up)


def _add_service_verbs(verbs: Verbs, wanted: Wanted) -> None:
    """ps and status, stop, start, restart, reload and kill: the verbs on a running stack's services."""
    for verb, text in (("ps", "show the services of a running stack"), ("status", "the same as ps")):
        if not wanted(verb):
            continue
        from sandboxd.cli.services import cmd_ps

        ps = verbs.add_parser(verb, help=text)
        ps.add_argument("services", nargs="*", metavar="SERVICE", help="only these services (default: all)")
        _add_stack(ps)
        _add_json(ps, "print the status as JSON (the stack and each service's state, pid, reason, sockets)")
        ps.add_argument("--services", dest="services_only", action="store_true", help="print only the services' names, one a line (as compose's ps --services)")
        ps.set_defaults(func=cmd_ps)
    for verb, text in (("stop", "stop services"), ("start", "start stopped services"), ("restart", "stop and start services")):
        if not wanted(verb):
            continue
        from sandboxd.cli.services import cmd_control

        control = verbs.add_parser(verb, help=f"{text} (no SERVICE: every service of the stack)")
        control.add_argument("services", nargs="*", metavar="SERVICE", help="the services (default: all)")
        _add_stack(control)
        _add_json(control, "print what was done, to which services, as one JSON object")
        control.set_defaults(func=cmd_control)
    if wanted("reload"):
        _add_reload(verbs)
    if wanted("kill"):
        from sandboxd.cli.services import cmd_control

        kill = verbs.add_parser("kill", help="send a signal to services (default SIGTERM)")
        kill.add_argument("services", nargs="+", metavar="SERVICE", help="the services to signal")
        kill.add_argument("-s", "--signal", default="SIGTERM", help="the signal, by name (SIGHUP or HUP; default SIGTERM)")
        _add_stack(kill)
        _add_json(kill, "print what was done, to which services, as one JSON object")
        kill.set_defaults(func=cmd_control)


def _add_reload(verbs: Verbs) -> None:
    from sandboxd.cli.services import cmd_control
    from sandboxd.cli.stack import cmd_reload_stack

    reload = verbs.add_parser(
        "reload",
        help="SERVICE…: the services' own reload (reload_signal; with ready: notify until READY=1 again); "
        "no service: apply the changed spec to the running stack",
    )
    reload.add_argument("services", nargs="*", metavar="SERVICE", help="the services to reload (none: the whole stack's spec)")
    _add_stack(reload)
    _add_json(reload, "print what was done (or what the new spec changed) as one JSON object")
    reload.add_argument("--dir", help="with no service: the spec folder to apply (default: the one the stack came from)")
    reload.set_defaults(func=lambda a: cmd_control(a) if a.services else cmd_reload_stack(a))


def _add_exec(verbs: Verbs, wanted: Wanted) -> None:
    if not wanted("exec"):
        return
    from sandboxd.cli.run import cmd_exec, exec_env, exec_user, exec_workdir

    execute = verbs.add_parser(
        "exec",
        help="run a command inside a running service's sandbox",
        description="Run a command in SERVICE's namespaces, cgroup and root, confined as the service is, "
        "with a terminal allocated inside the sandbox or with pipes: never the caller's own descriptors. "
        "Options come before SERVICE.",
    )
    execute.add_argument("service", help="the service whose sandbox the command joins")
    execute.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG…]")
    _add_stack(execute)
    terminal = execute.add_mutually_exclusive_group()
    terminal.add_argument("-t", "--tty", dest="tty", action="store_const", const=True, default=None,
                          help="a terminal inside the sandbox (default when stdin and stdout are terminals)")
    terminal.add_argument("-T", "--no-tty", dest="tty", action="store_const", const=False, help="pipes, no terminal")
    execute.add_argument("-u", "--user", type=exec_user, help="USER[:GROUP], names or numbers (default: the service's)")
    execute.add_argument("-w", "--workdir", type=exec_workdir, help="absolute working directory (default: the service's)")
    execute.add_argument("-e", "--env", action="append", default=[], type=exec_env, metavar="KEY=VALUE",
                         help="set a variable (repeatable); KEY alone passes the caller's value")
    execute.set_defaults(func=cmd_exec)


def _add_logs_and_stats(verbs: Verbs, wanted: Wanted) -> None:
    if wanted("logs"):
        _add_logs(verbs)
    if wanted("stats"):
        _add_stats(verbs)


def _add_logs(verbs: Verbs) -> None:
    from sandboxd.cli.logs import cmd_logs
    from sandboxd.cli.times import stamp_bound

    logs = verbs.add_parser("logs", help="show what services printed, merged by time (sandboxd's own messages: logs sandboxd)")
    logs.add_argument("services", nargs="*", metavar="SERVICE", help="only these services (default: all but sandboxd)")
    _add_stack(logs)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the stack ends (or Ctrl-C)")
    logs.add_argument("-t", "--timestamps", action="store_true", help="show each line's time (UTC, RFC 3339)")
    moment = "a duration back from now (10m, 2h, 30s, 1h30m) or a time (2026-11-26T06:00:00Z; without Z or an offset: local time)"
    logs.add_argument("--since", type=stamp_bound, metavar="WHEN", help=f"only lines at or after WHEN: {moment}")
    logs.add_argument("--until", type=stamp_bound, metavar="WHEN", help="only lines before WHEN (the same forms as --since)")
    logs.add_argument("-n", "--tail", type=int, metavar="N", help="only the last N lines (after --since and --until)")
    _add_json(logs, "one JSON object a line: time, service, text")
    logs.set_defaults(func=cmd_logs)


def _add_stats(verbs: Verbs) -> None:
    from sandboxd.cli.stats import cmd_stats

    stats = verbs.add_parser("stats", help="resource use of a running stack's services: CPU share, memory, processes, I/O and network bytes")
    stats.add_argument("services", nargs="*", metavar="SERVICE", help="only these services (default: all)")
    _add_stack(stats)
    stats.add_argument("--once", "--no-stream", action="store_true", help="print one sample (measured over one interval) and exit")
    stats.add_argument("--interval", type=_positive_seconds, default=1.0, metavar="SECONDS",
                       help="the time between samples, over which CPU %% is measured (default 1)")
    _add_json(stats, "one JSON object per sample, on a line of its own")
    stats.set_defaults(func=cmd_stats)


def _add_stack_verbs(verbs: Verbs, wanted: Wanted) -> None:
    """down, ls and config (up, the first verb, has its own function), upgrade and reexec."""
    if any(wanted(verb) for verb in ("down", "ls", "config")):
        from sandboxd.cli.stack import cmd_config, cmd_down, cmd_ls
    if wanted("down"):
        down = verbs.add_parser("down", help="stop a running stack and remove everything it made")
        down.add_argument("dir", nargs="?", help="the spec folder (its name is the stack's name)")
        _add_stack(down)
        _add_json(down, "print the stack, its supervisor's pid and the services stopped as one JSON object")
        down.set_defaults(func=cmd_down)
    if wanted("ls"):
        ls = verbs.add_parser("ls", help="list the stacks running on this host")
        _add_json(ls, "print the stacks as a JSON array of {name, pid}")
        ls.set_defaults(func=cmd_ls)
    if wanted("config"):
        config = verbs.add_parser("config", help="print the resolved units and launch plans, or the validation errors")
        config.add_argument("dir", help="the spec folder")
        _add_json(config, "print JSON (what config always prints: the resolved units, plans and limits)")
        _add_env_file(config)
        config.set_defaults(func=cmd_config)
    for verb, text in (("upgrade", "execute the installed sandboxd in a running stack's supervisor: same pid, every service kept running"),
                       ("reexec", "the same as upgrade")):
        if not wanted(verb):
            continue
        from sandboxd.cli.upgrade import cmd_upgrade

        upgrade = verbs.add_parser(verb, help=text)
        upgrade.add_argument("stack", nargs="?", metavar="STACK", help=STACK_HELP)
        _add_stack(upgrade)
        _add_json(upgrade, "print the outcome (stack, pid, version, previous) as one JSON object")
        upgrade.add_argument("--timeout", type=_positive_seconds, default=60.0, help="give up waiting for the outcome after this many seconds")
        upgrade.add_argument("--test-record-format", type=int, help=argparse.SUPPRESS)  # tests: a record the new code must refuse
        upgrade.set_defaults(func=cmd_upgrade)


def _add_stack(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("-p", "--project-name", metavar="NAME", help=STACK_HELP)


def _add_json(verb: argparse.ArgumentParser, text: str) -> None:
    verb.add_argument("--json", action="store_true", help=text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _add_env_file(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("--env-file", action="append", default=[], metavar="FILE",
                      help="read the variables for ${VAR} in the specs from FILE instead of the spec folder's .env "
                      "(repeatable, the later file winning; the environment wins over both)")


def _add_image(verbs: Verbs, wanted: Wanted) -> None:
    if not wanted("image"):
        return
    from sandboxd.cli.store import cmd_image

    image = verbs.add_parser("image", help="build, list, pull, import and remove root file system images")
    image_verbs = image.add_subparsers(dest="action", metavar="ACTION", required=True)
    image_build = image_verbs.add_parser("build", help="build images from definitions (images/NAME/build), if changed")
    image_build.add_argument("names", nargs="*", metavar="NAME", help="definition folders (images/NAME) or names found in images/ here or above")
    image_build.add_argument("--force", action="store_true", help="build even if the definition did not change")
    image_ls = image_verbs.add_parser("ls", help="list the stored images")
    _add_json(image_ls, "print the images as a JSON array (name, source, digest, created, size, config, reference)")
    image_rm = image_verbs.add_parser("rm", help="remove stored images")
    image_rm.add_argument("names", nargs="+", metavar="NAME", help="store names, or the references pulled images were pulled by")
    image_pull = image_verbs.add_parser("pull", help="pull images from their registries (with skopeo) into the store")
    image_pull.add_argument("references", nargs="+", metavar="REFERENCE", help="like redis:7, docker.io/library/redis:7, localhost:5000/app:1, NAME@sha256:DIGEST")
    image_import = image_verbs.add_parser("import", help="import an OCI image layout (folder or tar) or a docker save archive")
    image_import.add_argument("file", help="an OCI layout folder, an OCI tar or a docker save tar")
    image_import.add_argument("--name", help="the image's name (default: its tag)")
    image.set_defaults(func=cmd_image)


def _add_volume(verbs: Verbs, wanted: Wanted) -> None:
    if not wanted("volume"):
        return
    from sandboxd.cli.store import cmd_volume

    volume = verbs.add_parser("volume", help="list and remove named volumes")
    volume_verbs = volume.add_subparsers(dest="action", metavar="ACTION", required=True)
    volume_ls = volume_verbs.add_parser("ls", help="list volumes")
    _add_json(volume_ls, "print the volumes as a JSON array of {name, size}")
    volume_rm = volume_verbs.add_parser("rm", help="remove volumes and their data")
    volume_rm.add_argument("names", nargs="+", metavar="NAME", help="the volumes (refused for one in use)")
    volume.set_defaults(func=cmd_volume)
