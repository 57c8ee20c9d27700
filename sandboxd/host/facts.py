"""What sandboxd needs to know about the machine it runs on, each fact learnt once per process.

    architecture()     the machine, as uname says ("x86_64", "aarch64"): the seccomp table and the
                       bind handoff exist for x86_64 only
    cgroup_host()      how cgroups are mounted: mode, sandboxd's own cgroup, whether cgroup.kill
                       exists (cgroups/hierarchy.py)
    proxy_binary()     systemd-socket-proxyd, for `proxy:` sockets
    subordinate_ids()  the block of ids a stack's user namespaces would get now (subids.py)

A fact the host lacks is a HostError that says what to install, raised when first asked for, so
that a stack that does not need it (no `proxy:` socket, no image) runs without it. The prepare
step (prepare.py) hands these to the pure planner as data.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import cache

from sandboxd.errors import HostError
from sandboxd.kernel import linux
from sandboxd.host.cgroups import CgroupHost, detect
from sandboxd.host.subids import preview
from sandboxd.plan.launch import UserNamespace

PROXY_CANDIDATES = ("/usr/lib/systemd/systemd-socket-proxyd", "/lib/systemd/systemd-socket-proxyd")


@cache
def architecture() -> str:
    return linux.machine()


@cache
def cgroup_host() -> CgroupHost:
    return detect()


def _installed(name: str, before: tuple[str, ...] = (), after: tuple[str, ...] = (), usable: Callable[[str], bool] = os.path.exists) -> str | None:
    """The first of `before` that is `usable`, else `name` in PATH, else the first of `after`."""
    return next((path for path in before if usable(path)), None) or shutil.which(name) or next((path for path in after if usable(path)), None)


@cache
def proxy_binary() -> str:
    found = _installed("systemd-socket-proxyd", before=PROXY_CANDIDATES, usable=lambda path: os.access(path, os.X_OK))
    if found:
        return found
    raise HostError("sockets with proxy: need systemd-socket-proxyd, which is not installed", "apt-get install systemd (it ships the proxy)")


def subordinate_ids() -> UserNamespace:
    """The first block of ids a stack could get (no lock taken, nothing created). Not kept: a
    stack that starts takes its block with subids.lease, which may create the ranges."""
    return preview()
