"""`sandboxd upgrade [STACK]` (or `reexec`): the running supervisor executes the installed
sandboxd anew, keeping its pid, every sandbox and every socket (daemon/upgrade.py says how).

One request on the control socket: refused at once with the reason (nothing was handed over), or
accepted, after which the supervisor's process executes the new code; what became of that, the
new process (or the old one, if the new code refused the record or the exec failed) writes to
the stack's runtime directory as upgrade.json, with the token this command sent.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time

from sandboxd.errors import SandboxdError
from sandboxd.wire import UpgradeRequest


def cmd_upgrade(args: argparse.Namespace) -> int:
    from sandboxd.cli.client import choose_stack, request, running_stacks
    from sandboxd.host.paths import RUNTIME_ROOT, alive

    stack = choose_stack(args.stack or args.project_name)
    pid = running_stacks()[stack]
    token = secrets.token_hex(8)
    outcome = RUNTIME_ROOT / stack / "upgrade.json"
    message: UpgradeRequest = {"cmd": "upgrade", "token": token}
    if args.test_record_format is not None:
        message["format"] = args.test_record_format
    request(stack, message, timeout=args.timeout)
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            result = json.loads(outcome.read_text())
        except (OSError, ValueError):
            result = {}
        if isinstance(result, dict) and result.get("token") == token:
            outcome.unlink(missing_ok=True)
            break
        if not alive(pid):
            raise SandboxdError(f"stack {stack!r}: the supervisor (pid {pid}) died during the upgrade")
        if time.monotonic() > deadline:
            raise SandboxdError(f"stack {stack!r}: no outcome of the upgrade within {args.timeout:g} s")
        time.sleep(0.02)
    if args.json:
        print(json.dumps({"stack": stack, **{k: v for k, v in result.items() if k != "token"}}))
    if not result.get("ok"):
        raise SandboxdError(f"stack {stack!r} was not upgraded (it keeps running as it was): {result.get('error', 'no reason given')}")
    if not args.json:
        same = "unchanged" if result.get("pid") == pid else f"was {pid}"
        print(f"stack {stack!r} upgraded: sandboxd {result.get('previous')} -> {result.get('version')}, pid {result.get('pid')} ({same}); {result.get('services')} services kept running")
    sys.stdout.flush()
    return 0
