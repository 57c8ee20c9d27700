"""The `sandboxd` command line.

Only what a verb needs is imported when it runs, so quick verbs stay quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from .errors import HostError, SandboxdError, SpecErrors


def _load(folder: str) -> tuple[object, object]:
    from .plan import HostFacts, init_path, plan_stack
    from .spec import load_stack

    stack = load_stack(Path(folder))
    plans = plan_stack(stack, HostFacts(init_path()))
    return stack, plans


def cmd_up(args: argparse.Namespace) -> int:
    from .cgroups import detect
    from .plan import HostFacts, init_path, plan_stack
    from .spec import load_stack
    from .state import RUNTIME_ROOT, clean_stale, instance_name

    stack = load_stack(Path(args.dir))
    instance = instance_name(stack, args.project_name)
    facts = HostFacts(init_path(), str(RUNTIME_ROOT / instance))
    plans = plan_stack(stack, facts)
    if os.geteuid() != 0:
        raise HostError("sandboxd up needs root: it creates namespaces, cgroups and mounts", "run it as root (e.g. sudo sandboxd up DIR)")
    if any(service.userns for service in stack.services):
        from .subids import userns_range

        plans = plan_stack(stack, dataclasses.replace(facts, userns_range=userns_range()))
    host = detect()
    limits = _enforceable_limits(stack, host)
    clean_stale()
    from .launcher import ForkServer

    # Before the supervisor's imports (asyncio): every sandbox is a fork of this smaller process.
    fork_server = ForkServer.start()
    from .supervisor import Supervisor

    return Supervisor(stack, plans, host, instance, fork_server=fork_server, limits=limits).run()


def _enforceable_limits(stack: Any, host: Any) -> dict[str, Any]:
    """Each service's limits; a limit the host cannot enforce is a spec error (a warning with limits_optional)."""
    from .cgroups import unenforceable
    from .errors import SpecError

    errors, result = [], {}
    for service in stack.services:
        limits = service.limits
        problems = unenforceable(host, limits)
        if problems and not service.limits_optional:
            errors += [SpecError(service.file, service.line, "limits", f"{p}; remove it, or set limits_optional: true") for p in problems]
        for problem in problems if service.limits_optional else []:
            print(f"sandboxd: warning: {service.name}: limit not enforced: {problem}", file=sys.stderr)
            limits = dataclasses.replace(limits, **{problem.split(":")[0]: None})
        result[service.name] = limits
    if errors:
        raise SpecErrors(errors)
    return result


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
        "plans": {name: plan.to_wire() for name, plan in plans.items()},  # type: ignore[attr-defined]
    }
    print(json.dumps(out, indent=2, default=default))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandboxd", description="Run isolated services with sockets bound by sandboxd.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    up = verbs.add_parser("up", help="validate a spec folder and run its services in the foreground")
    up.add_argument("dir", help="folder of *.yaml unit specs")
    up.add_argument("-p", "--project-name", help="name of the stack (default: the folder's name)")
    up.set_defaults(func=cmd_up)
    config = verbs.add_parser("config", help="print the resolved units and launch plans, or the validation errors")
    config.add_argument("dir")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.verb:
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
        return result
    except SpecErrors as e:
        print(f"sandboxd: {len(e.errors)} problem{'s' if len(e.errors) != 1 else ''} in {args.dir}:", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return e.exit_code
    except SandboxdError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
