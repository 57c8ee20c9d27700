"""What a sandbox's processes may do: the capabilities they keep, the seccomp filter they run
under, and whether sandboxd answers their bind() calls (the proxy handoff, see daemon/proxy.py).

The filter is assembled here from the spec's `seccomp:` (kernel/seccomp.py has the table), so
that a call the filter does not refuse, or a machine without a table, is a validation error; the
handoff needs that table too, so it depends on the architecture the prepare step found.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.kernel.abi import CAPABILITIES
from sandboxd.kernel.seccomp import SeccompUnsupported, build_filter
from sandboxd.spec.model import hands_off, holds_proxy_address

if TYPE_CHECKING:
    from sandboxd.spec.model import Service, Stack

HANDOFF_ARCHITECTURES = ("x86_64",)  # where the filter that passes bind() to sandboxd exists


def capabilities(service: Service) -> tuple[int, ...]:
    """The capability numbers kept in every set; everything else is dropped before exec."""
    return tuple(sorted(CAPABILITIES[name] for name in service.capabilities))


def seccomp_filter(service: Service, architecture: str) -> str:
    """The hex of the BPF program the service runs under ("" = unconfined): the default filter,
    less the calls its `seccomp:` list allows, for the host's architecture."""
    if service.seccomp == "unconfined":
        return ""
    allow = frozenset(service.seccomp) if isinstance(service.seccomp, tuple) else frozenset()
    try:
        return build_filter(architecture, allow).hex()
    except SeccompUnsupported as e:
        raise SpecErrors([SpecError(service.file, service.line, "seccomp", f"{e}; set seccomp: unconfined")]) from None


def intercept_bind(stack: Stack, service: Service, architecture: str) -> bool:
    """Whether a `proxy:` socket of the service may be handed to the program when it binds the
    proxy's address (one listen address, a seccomp table for this machine). A socket that holds
    the proxy's address in the service's own namespace works through the handoff alone: on a
    machine without it, that is a validation error."""
    if architecture in HANDOFF_ARCHITECTURES:
        return any(hands_off(s, service) for s in stack.sockets_of(service.name))
    held = [s for s in stack.sockets_of(service.name) if holds_proxy_address(s)]
    if held:
        sock = held[0]
        message = (
            f"this socket holds {sock.proxy} inside the namespace of '{service.name}', which the program can only bind through "
            f"the handoff, and the handoff has no seccomp table for {architecture}; bind the socket in the host's namespace "
            "(netns: host) or make the program listen on another port and proxy to that"
        )
        raise SpecErrors([SpecError(sock.file, sock.line, "proxy", message)])
    return False
