"""What `up -d`, `up` against a running stack (a reload), `down` and `ls` print with `--json`: the
shapes of wire.py's last part, built from the control socket's answers. One JSON object (or array)
on one line, so that `| jq` and a line reader both work."""

from __future__ import annotations

import json

from sandboxd.wire import ApplyResult, DownResult, ReloadResult, StackListing, StackStatus, UpResult


def print_json(value: object) -> None:
    print(json.dumps(value), flush=True)


def up_result(status: StackStatus) -> UpResult:
    """`up -d --json`: the stack, its supervisor, and the services running (or ready) now."""
    started = [svc["name"] for svc in status["services"] if svc["pid"]]
    return {"stack": status["stack"], "pid": status["pid"], "folder": status["folder"], "started": started, "services": status["services"]}


def reload_result(stack: str, applied: ApplyResult) -> ReloadResult:
    return {"stack": stack, "added": applied["added"], "removed": applied["removed"], "changed": applied["changed"],
            "sockets_replaced": applied["sockets_replaced"]}


def down_result(status: StackStatus) -> DownResult:
    """`down --json`, from the status asked just before: the services that were alive."""
    return {"stack": status["stack"], "pid": status["pid"], "stopped": [svc["name"] for svc in status["services"] if svc["pid"]]}


def listing(stacks: dict[str, int]) -> list[StackListing]:
    return [{"name": name, "pid": pid} for name, pid in stacks.items()]
