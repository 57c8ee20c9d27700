"""What the command line may change in a loaded stack: `--env SERVICE:KEY=VALUE`.

Tests (and the pytest plugin) start one spec folder many times with different settings; an
override replaces or adds one variable of one service's environment. It is applied to the
checked stack, so it cannot make a spec invalid; a malformed override or an unknown service is a
SpecError on the folder, under the key `--env`.
"""

from __future__ import annotations

import dataclasses

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.spec.model import Stack


def with_environment(stack: Stack, overrides: list[str]) -> Stack:
    """The stack with `SERVICE:KEY=VALUE` environment overrides applied, in order."""
    services = {s.name: s for s in stack.services}
    for override in overrides:
        name, _, assignment = override.partition(":")
        key, eq, value = assignment.partition("=")
        if name not in services or not eq or not key:
            raise SpecErrors([SpecError(stack.folder, 0, "--env", f"expected SERVICE:KEY=VALUE with a service of the stack, got {override!r}")])
        env = dict(services[name].environment)
        env[key] = value
        services[name] = dataclasses.replace(services[name], environment=tuple(env.items()))
    return dataclasses.replace(stack, services=tuple(services[s.name] for s in stack.services))
