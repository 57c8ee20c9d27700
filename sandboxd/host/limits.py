"""Which of a stack's cgroup limits this host can enforce: one it cannot is a spec error, or, with
`limits_optional: true`, a warning and the limit left out. Asked by `sandboxd up` and by a reload."""

from __future__ import annotations

import dataclasses
import sys

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.host.cgroups import CgroupHost, unenforceable
from sandboxd.spec.model import Limits, Stack


def enforceable_limits(stack: Stack, host: CgroupHost) -> dict[str, Limits]:
    """Each service's limits; a limit the host cannot enforce is a spec error (a warning with limits_optional)."""
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
