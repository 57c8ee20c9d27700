"""The user tables names are resolved in (plan/identity.py resolves, purely): an image's own
/etc/passwd and /etc/group, read inside its tree; the host's through NSS (LDAP, sssd and the like
too), asked for the names only, since NSS cannot list every user.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable

from sandboxd.kernel.linux import open_in_root
from sandboxd.plan.identity import resolve_identity
from sandboxd.plan.launch import Accounts

MAX_TABLE = 4 << 20  # bytes: a passwd or group file larger than this is not read


def _id_table(rootfs: str, path: str) -> dict[str, tuple[int, int]]:
    """name -> (id, primary group id) from an image's passwd file; name -> (gid, gid) from a group
    file. Read inside the image's tree (its symlinks cannot lead onto the host's files), a regular
    file of at most MAX_TABLE bytes; the first entry of a name counts."""
    table: dict[str, tuple[int, int]] = {}
    try:
        root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_in_root(root, path, os.O_RDONLY | os.O_NOFOLLOW)
        finally:
            os.close(root)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_TABLE:
            os.close(fd)
            return table
        with open(fd, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[2].isdigit():
                    primary = fields[3] if len(fields) >= 4 and fields[3].isdigit() else fields[2]
                    table.setdefault(fields[0], (int(fields[2]), int(primary)))
    except OSError:
        pass
    return table


def image_accounts(rootfs: str) -> Accounts:
    """The users and groups of the tree at `rootfs` (an unreadable file is an empty table)."""
    groups = _id_table(rootfs, "/etc/group")
    return Accounts(users=_id_table(rootfs, "/etc/passwd"), groups={name: gid for name, (gid, _) in groups.items()})


def host_accounts(users: Iterable[str], groups: Iterable[str]) -> Accounts:
    """What NSS says of these user and group names (numbers and names it does not know are left out)."""
    found_users: dict[str, tuple[int, int]] = {}
    for name in users:
        if name and not name.isdigit():
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            found_users[name] = (entry.pw_uid, entry.pw_gid)
    found_groups: dict[str, int] = {}
    for name in groups:
        if name and not name.isdigit():
            try:
                found_groups[name] = grp.getgrnam(name).gr_gid
            except KeyError:
                continue
    return Accounts(found_users, found_groups)


def lookup_identity(user: str, group: str, rootfs: str, where: str) -> tuple[int, int, list[tuple[str, str]]]:
    """uid and gid of `user` and `group`, each a number or a name: the host's through NSS when
    `rootfs` is "", else looked up in the passwd and group files of that tree (`sandboxd exec
    -u`). Problems come back as (key, message), `where` naming the root in them."""
    accounts = image_accounts(rootfs) if rootfs else host_accounts([user], [group])
    return resolve_identity(user, group, accounts, where)
