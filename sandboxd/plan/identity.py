"""Who a service runs as: uid and gid from its `user:` and `group:` (numbers, or names), or without
them from its image's User (`name`, `uid`, `name:group` or `uid:gid`).

Names are resolved in the user tables of the service's root, which the prepare step read before
(HostFacts.accounts: an image's /etc/passwd and /etc/group; for the host's root, what NSS said of
the names the spec uses). `sandboxd exec -u` resolves through the same `resolve_identity`
(host/identity.py reads its tables), so a name means the same to both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandboxd.errors import SpecError
from sandboxd.plan.launch import Accounts, HostFacts, PlannedImage

if TYPE_CHECKING:
    from sandboxd.spec.model import Service

HOST = "host"  # the key of the host's accounts in HostFacts.accounts, as `image: host` names the host's root


def resolve_identity(user: str, group: str, accounts: Accounts, where: str) -> tuple[int, int, list[tuple[str, str]]]:
    """uid and gid of `user` and `group`, each a number or a name in `accounts`. A number as user
    is also the gid, unless `group` says otherwise; a name's gid is its primary group. Problems
    come back as (key, message), `where` naming the root in them ("host", "image 'busybox'")."""
    uid = gid = 0
    problems: list[tuple[str, str]] = []
    if user:
        if user.isdigit():
            uid = gid = int(user)
        elif user in accounts.users:
            uid, gid = accounts.users[user]
        else:
            problems.append(("user", f"no user '{user}' in the {where}'s /etc/passwd; use a name from it or a number"))
    if group:
        if group.isdigit():
            gid = int(group)
        elif group in accounts.groups:
            gid = accounts.groups[group]
        else:
            problems.append(("group", f"no group '{group}' in the {where}'s /etc/group; use a name from it or a number"))
    return uid, gid, problems


def names_of(service: Service, image: PlannedImage | None) -> tuple[str, str]:
    """The user and group a service names: its spec's, or without either its image's User."""
    user, group = service.user, service.group
    if not user and not group and image is not None and image.config.user:
        user, _, group = image.config.user.partition(":")
    return user, group


def service_identity(service: Service, image: PlannedImage | None, facts: HostFacts) -> tuple[int, int, list[SpecError]]:
    """uid and gid of the service, and the problems with its names as spec errors."""
    user, group = names_of(service, image)
    accounts = facts.accounts.get(service.image if image is not None else HOST, Accounts())
    where = f"image '{service.image}'" if image is not None else HOST
    uid, gid, problems = resolve_identity(user, group, accounts, where)
    return uid, gid, [SpecError(service.file, service.line, key, message) for key, message in problems]
