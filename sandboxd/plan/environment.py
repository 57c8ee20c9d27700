"""A service's environment, and the one builder of the variables sandboxd gives its processes:
LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES (sd_listen_fds(3)), NOTIFY_SOCKET, WATCHDOG_USEC and
WATCHDOG_PID (sd_notify(3), sd_watchdog_enabled(3)).

The planner sets them for a service; the supervisor sets the LISTEN_* ones again where it hands a
sandbox other descriptors than its plan's (a per-connection instance, the fd store's additions),
and the fork server for the proxy it starts. All of them through here, so that the pid a program
checks LISTEN_PID against is said once: SERVICE_PID_IN_SANDBOX.

The fork server imports this module: it stays small (no YAML).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandboxd.plan.launch import PlannedImage
    from sandboxd.spec.model import Service

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NOTIFY_PATH_IN_SANDBOX = "/run/.sbd-notify"

# The service is the first child of the init (pid 1) in a fresh pid namespace, so it is pid 2.
SERVICE_PID_IN_SANDBOX = 2

LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def uses_notify(service: Service) -> bool:
    """Whether the service gets a NOTIFY_SOCKET (readiness, status, watchdog, fd store)."""
    return service.ready == "notify" or service.watchdog > 0 or service.fdstore_max > 0


def listen_environment(count: int, names: Sequence[str] | None = None, pid: int = SERVICE_PID_IN_SANDBOX) -> dict[str, str]:
    """The variables that pass descriptors 3 .. 3+count-1 to process `pid` (the service, unless
    said otherwise), with their names if `names` is given."""
    env = {"LISTEN_FDS": str(count), "LISTEN_PID": str(pid)}
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env


def with_descriptors(env: tuple[tuple[str, str], ...], names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """A plan's environment for a launch that passes the descriptors `names` instead of its plan's."""
    kept = [(key, value) for key, value in env if key not in LISTEN_VARIABLES]
    return (*kept, *listen_environment(len(names), names).items())


def base_environment(service: Service, image: PlannedImage | None) -> dict[str, str]:
    """PATH, then the image's Env, then the spec's `environment:` (each overriding the one before)."""
    env = {"PATH": DEFAULT_PATH}
    if image is not None:
        env.update(dict(image.config.env))
    env.update(dict(service.environment))
    return env


def service_environment(service: Service, base: dict[str, str], fd_names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The environment a service starts with: `base`, and what sandboxd gives it (notify socket,
    watchdog, descriptors)."""
    env = dict(base)
    if uses_notify(service):
        env["NOTIFY_SOCKET"] = NOTIFY_PATH_IN_SANDBOX
    if service.watchdog:
        env["WATCHDOG_USEC"] = str(int(service.watchdog * 1_000_000))
        env["WATCHDOG_PID"] = str(SERVICE_PID_IN_SANDBOX)
    if fd_names:
        env.update(listen_environment(len(fd_names), fd_names))
    return tuple(env.items())
