"""`sandboxd exec`: run a command inside a running service's sandbox, and the checks of its
options (argparse types, so that a bad option is refused with exit code 2 before anything runs).

The command is started from this process (sandbox/execute.py); the stack is asked for what it
knows of the service, and makes the command's cgroup, on a connection held open for as long as
the command runs.
"""

from __future__ import annotations

import argparse
import os

from sandboxd.errors import SandboxdError
from sandboxd.wire import ExecInfoRequest


def cmd_exec(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import ask, choose_stack, connect
    from sandboxd.sandbox.execute import ExecOptions, exec_in, plan_exec, wants_tty

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SandboxdError("nothing to run: sandboxd exec [OPTIONS] SERVICE -- COMMAND [ARG…]")
    options = ExecOptions(tuple(command), args.tty, args.user or "", args.workdir or "", tuple(args.env))
    message: ExecInfoRequest = {"cmd": "exec_info", "services": [args.service], "session": True}
    if options.user:
        message["user"] = options.user
    # The connection stays open while the command runs: when it closes, however this process
    # ends (SIGKILL too), the stack ends what is left of the command (see execute.py).
    with connect(choose_stack(args.project_name)) as session:
        info = ask(session, message)
        tty = wants_tty(options.tty, os.isatty(0), os.isatty(1))
        return exec_in(plan_exec(args.service, info, options, os.environ, tty))


def exec_user(text: str) -> str:
    """`exec -u`: USER or USER:GROUP, each part not empty."""
    user, sep, group = text.partition(":")
    if not user or (sep and not group):
        raise argparse.ArgumentTypeError(f"expected USER or USER:GROUP (names or numbers), got {text!r}")
    return text


def exec_workdir(text: str) -> str:
    """`exec -w`: an absolute path (inside the sandbox)."""
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected an absolute path inside the sandbox, got {text!r}")
    return text


def exec_env(text: str) -> str:
    """`exec -e`: KEY=VALUE or KEY, the key not empty, no NUL byte."""
    key = text.partition("=")[0]
    if not key or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY, got {text!r}")
    return text
