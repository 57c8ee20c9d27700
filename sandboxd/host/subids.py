"""The host ids each stack's user namespaces map to: a block of the `sandboxd` user's subordinate ids.

As podman and docker's userns-remap do, sandboxd takes its ids from /etc/subuid and /etc/subgid.
If the `sandboxd` user has none, it creates the (system, login-less) user with useradd and gives
it BLOCK x CREATED_BLOCKS ids after the highest range already handed out (at least 100000), in
both files; an existing entry is used as it is, whatever its size.

The user's ranges are cut into blocks of 65536 ids (uid and gid blocks paired in order):

    block 0             what sandboxes write to volumes and writable binds is stored as these ids
                        (idmapped mounts, see plan.UserNamespace); no sandbox runs as them
    block 1, 2, ...     one per running stack: its root is the block's first id, and so on

With a single block (an entry of 65536 ids made by hand or by an older sandboxd) it is both, and
only one stack runs in a user namespace at a time.

A stack holds its block by a lock, not by a record: `lease` takes an exclusive flock on
/var/lib/sandboxd/userns/<first uid>.lock, and the supervisor and its fork server keep the descriptor open for
the life of the stack. The file survives a crash, the lock does not: when a supervisor is killed,
its fork server dies with it, every sandbox with that (see sandbox/forkserver.py), and the kernel releases
the lock, so the block goes to the next stack only once nothing of the old one runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandboxd.errors import HostError
from sandboxd.plan.launch import UserNamespace

USER = "sandboxd"
BLOCK = 65536
CREATED_BLOCKS = 1024  # a storage block and 1023 stacks at once
FIRST = 100000
SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
# Host-wide, as the ids are: not below SANDBOXD_STATE_DIR, which a second store may move.
LOCK_DIR = Path("/var/lib/sandboxd/userns")


def _ranges(path: Path, user: str | None = None) -> list[tuple[int, int]]:
    """(first, count) of every range in a subordinate id file (of `user` only, if given)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and (user is None or parts[0] == user):
            found.append((int(parts[1]), int(parts[2])))
    return found


def _blocks(ranges: list[tuple[int, int]]) -> list[int]:
    """The first id of every whole block of BLOCK ids in `ranges`, lowest first."""
    return sorted(first + i * BLOCK for first, count in ranges for i in range(count // BLOCK))


@dataclass(frozen=True)
class Blocks:
    """The sandboxd user's blocks: where files are stored, and the blocks stacks run as."""

    store: tuple[int, int]  # (uid, gid)
    stacks: tuple[tuple[int, int], ...]

    def userns(self, block: tuple[int, int]) -> UserNamespace:
        return UserNamespace(block[0], block[1], BLOCK, self.store[0], self.store[1])


def read_blocks(subuid: Path = SUBUID, subgid: Path = SUBGID) -> Blocks | None:
    """The sandboxd user's blocks, or None if it has no whole block in one of the files."""
    pairs = list(zip(_blocks(_ranges(subuid, USER)), _blocks(_ranges(subgid, USER)), strict=False))
    if not pairs:
        return None
    return Blocks(pairs[0], tuple(pairs[1:]) or (pairs[0],))


def ensure_blocks(subuid: Path = SUBUID, subgid: Path = SUBGID) -> Blocks:
    """The sandboxd user's blocks, creating the user and its ranges if it has none."""
    found = read_blocks(subuid, subgid)
    if found is not None:
        return found
    _ensure_user()
    first = _free_start(subuid, subgid)
    for path in (subuid, subgid):
        if not _blocks(_ranges(path, USER)):
            with path.open("a") as f:
                f.write(f"{USER}:{first}:{BLOCK * CREATED_BLOCKS}\n")
    created = read_blocks(subuid, subgid)
    assert created is not None
    return created


def _free_start(subuid: Path, subgid: Path) -> int:
    """The first id after every range handed out in either file (at least FIRST)."""
    return max([FIRST, *(start + count for start, count in _ranges(subuid) + _ranges(subgid))])


def preview(subuid: Path = SUBUID, subgid: Path = SUBGID) -> UserNamespace:
    """What `sandboxd config` shows: the first block a stack could get (no lock, nothing created)."""
    found = read_blocks(subuid, subgid)
    if found is None:
        return UserNamespace(FIRST + BLOCK, FIRST + BLOCK, BLOCK, FIRST, FIRST)
    return found.userns(found.stacks[0])


class Lease:
    """A block held for one stack: the flock lives as long as this descriptor (and its copies in
    forked processes: the fork server's) stays open."""

    def __init__(self, userns: UserNamespace, fd: int) -> None:
        self.userns = userns
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lease(stack: str, lock_dir: Path = LOCK_DIR, subuid: Path = SUBUID, subgid: Path = SUBGID) -> Lease:
    """The lowest block no running stack holds, locked for `stack`. Raises HostError when every
    block is taken, saying how to add more."""
    blocks = ensure_blocks(subuid, subgid)
    for directory in (lock_dir.parent, lock_dir):
        directory.mkdir(mode=0o700, exist_ok=True)
    holders = []
    for block in blocks.stacks:
        fd = os.open(lock_dir / f"{block[0]}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders.append(os.pread(fd, 200, 0).decode(errors="replace").strip() or "?")
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{stack} {os.getpid()}\n".encode(), 0)
        return Lease(blocks.userns(block), fd)
    start = _free_start(subuid, subgid)
    end = start + BLOCK * CREATED_BLOCKS - 1
    raise HostError(
        f"no free block of {BLOCK} subordinate ids for stack {stack!r}'s user namespaces: the {USER} user's ranges in "
        f"{subuid} and {subgid} hold {len(blocks.stacks)}, all taken by running stacks ({', '.join(holders)})",
        f"stop one, give the {USER} user more ids (usermod --add-subuids {start}-{end} --add-subgids {start}-{end} {USER}), "
        "or set userns: false in the specs that may run as the host's root",
    )


def _ensure_user() -> None:
    try:
        import pwd

        pwd.getpwnam(USER)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise HostError(f"user namespaces need a '{USER}' user with ranges in /etc/subuid and /etc/subgid", f"create it: useradd --system {USER}")
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], capture_output=True, text=True
    )
    if result.returncode not in (0, 9):  # 9: it exists already
        raise HostError(f"cannot create the '{USER}' user: {result.stderr.strip()}", f"create it yourself: useradd --system {USER}")
