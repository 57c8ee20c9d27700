"""What the command line may change in a loaded stack: `--env SERVICE:KEY=VALUE` and
`--listen SOCKET=ADDRESS`.

Tests (and the pytest plugin) start one spec folder many times with different settings; an
environment override replaces or adds one variable of one service's environment, a listen
override gives a socket unit (or a service's `listen:`, the socket it implies) other addresses:
`--listen web=tcp:127.0.0.1:0` binds `web` on a port the kernel picks, so that many copies of a
stack run side by side. They are applied to the checked stack; a malformed override, an unknown
service or socket, or an address that is none is a SpecError on the folder, under the key
`--env` or `--listen`.
"""

from __future__ import annotations

import dataclasses

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.spec.model import Address, Stack
from sandboxd.spec.values import parse_address


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


def with_listen(stack: Stack, overrides: list[str]) -> Stack:
    """The stack with `SOCKET=ADDRESS` overrides applied: the first one of a socket replaces its
    addresses, each further one of it adds one (so `web=tcp:127.0.0.1:0 web=unix:/run/w.sock`
    gives it those two, in that order). A socket a service's `listen:` implies changes with the
    service's `listen:`."""
    given: dict[str, list[Address]] = {}
    known = {sock.name for sock in stack.sockets}
    for override in overrides:
        name, eq, text = override.partition("=")
        if name not in known or not eq:
            names = ", ".join(sorted(known)) or "none"
            raise SpecErrors([SpecError(stack.folder, 0, "--listen", f"expected SOCKET=ADDRESS with a socket of the stack ({names}), got {override!r}")])
        try:
            given.setdefault(name, []).append(parse_address(text))
        except ValueError as e:
            raise SpecErrors([SpecError(stack.folder, 0, "--listen", f"{override!r}: {e}")]) from None
    if not given:
        return stack
    sockets = tuple(dataclasses.replace(s, listen=tuple(given[s.name])) if s.name in given else s for s in stack.sockets)
    implied = {s.service: s.listen for s in sockets if s.implied and s.name in given}
    services = tuple(dataclasses.replace(s, listen=implied[s.name]) if s.name in implied else s for s in stack.services)
    return dataclasses.replace(stack, services=services, sockets=sockets)


def with_overrides(stack: Stack, env: list[str], listen: list[str] | None = None) -> Stack:
    """The stack with the command line's `--env` and `--listen` overrides applied."""
    return with_listen(with_environment(stack, env), listen or [])
