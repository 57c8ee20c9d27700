"""Named volumes: directories under /var/lib/sandboxd/volumes that outlive the stacks using them.

A `kind: volume` unit names one; the first `up` that mounts it creates it, owned by the user of the
first service (by name) that mounts it read-write, so a server that runs as its own user (postgres,
redis) can write its data there. Volumes are host-wide by name, as podman's are: two stacks that
name the same volume share it. Only `sandboxd volume rm` removes one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.store.images import private_dir, sandbox_mounts, state_dir
from sandboxd.spec.model import NAME

if TYPE_CHECKING:
    from sandboxd.plan.launch import LaunchPlan
    from sandboxd.spec.model import Stack


def volumes_dir() -> Path:
    return state_dir() / "volumes"


def owners(stack: Stack, plans: dict[str, LaunchPlan]) -> dict[str, tuple[int, int]]:
    """Each volume of the stack and the uid/gid a new directory for it gets on the host. In a user
    namespace a volume is idmapped from the stored ids (plan.UserNamespace): the service's user
    inside owns it there as store_uid + uid, whatever block of ids the stack holds."""
    found: dict[str, tuple[int, int]] = {}
    for service in stack.services:  # sorted by name
        for mount in service.mounts:
            if mount.volume and not mount.readonly and service.name in plans:
                plan = plans[service.name]
                uid_base, gid_base = (plan.userns.store_uid, plan.userns.store_gid) if plan.userns else (0, 0)
                found.setdefault(mount.volume, (uid_base + plan.uid, gid_base + plan.gid))
    return {volume.name: found.get(volume.name, (0, 0)) for volume in stack.volumes}


def create(stack: Stack, plans: dict[str, LaunchPlan]) -> list[str]:
    """Make the volumes that do not exist yet; returns their names."""
    made = []
    for name, (uid, gid) in owners(stack, plans).items():
        path = volumes_dir() / name
        private_dir(volumes_dir())
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            continue  # there already, or made by another stack a moment ago
        os.chown(path, uid, gid)
        made.append(name)
    return made


def list_volumes() -> list[tuple[str, int]]:
    """(name, bytes used) of every volume."""
    from sandboxd.store.images import size_of

    try:
        paths = sorted(p for p in volumes_dir().iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    return [(p.name, size_of(p)) for p in paths]


def remove(name: str) -> bool:
    path = volumes_dir() / name
    if not NAME.fullmatch(name) or not path.is_dir():
        return False
    shutil.rmtree(path)
    return True


def in_use(name: str) -> int:
    """A process of a sandbox that has the volume mounted, or 0."""
    suffix = f"/volumes/{name}"
    for pid, line in sandbox_mounts():
        fields = line.split()
        if len(fields) > 3 and (fields[3].endswith(suffix) or fields[3].startswith(suffix + "/")):
            return pid
    return 0
