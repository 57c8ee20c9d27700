"""What changed between the spec a stack runs and the spec it is given again (`sandboxd up DIR`).

Units are compared by their content, not by where they are written (file and line numbers do not
count). A service is changed when its own spec changed or any socket feeding it did; sockets whose
definition did not change keep their descriptors, so their clients notice nothing.

What a change does to the stack's networks, and what of it cannot be done while the stack runs, is
decided with the plans (plan/network_steps.py): a service's network is part of its spec here, so a
service whose networks or addresses changed is changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sandboxd.spec.model import Mount, Service, Stack


def _content(unit: Any) -> Any:
    """A unit as comparable data, without its file and line numbers. A mount counts by its source
    as written, not by the path it names now: what someone did on disk since the stack started
    neither restarts a service nor changes what it mounts (pins.py)."""
    if dataclasses.is_dataclass(unit) and not isinstance(unit, type):
        skip = ("file", "line", "source") if isinstance(unit, Mount) else ("file", "line")
        return tuple((f.name, _content(getattr(unit, f.name))) for f in dataclasses.fields(unit) if f.name not in skip)
    if isinstance(unit, tuple):
        return tuple(_content(item) for item in unit)
    return unit


@dataclass
class StackDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    sockets_kept: list[str] = field(default_factory=list)
    sockets_replaced: list[str] = field(default_factory=list)  # removed, changed or added

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.sockets_replaced)


def diff(old: Stack, new: Stack) -> StackDiff:
    result = StackDiff()
    old_sockets = {s.name: s for s in old.sockets}
    new_sockets = {s.name: s for s in new.sockets}
    for name in sorted(set(old_sockets) | set(new_sockets)):
        if name in old_sockets and name in new_sockets and _content(old_sockets[name]) == _content(new_sockets[name]):
            result.sockets_kept.append(name)
        else:
            result.sockets_replaced.append(name)
    touched = {s.service for s in (*old.sockets, *new.sockets) if s.name in result.sockets_replaced}
    old_services = {s.name: s for s in old.services}
    new_services = {s.name: s for s in new.services}
    for name in sorted(set(old_services) | set(new_services)):
        if name not in new_services:
            result.removed.append(name)
        elif name not in old_services:
            result.added.append(name)
        elif _content(old_services[name]) != _content(new_services[name]) or name in touched or _moved(old, new, new_services[name]):
            result.changed.append(name)
    return result


def _moved(old: Stack, new: Stack, service: Service) -> bool:
    """Whether the service's relative mount sources now name places in another spec folder."""
    return old.folder != new.folder and any(m.given and not m.given.startswith("/") for m in service.mounts)
