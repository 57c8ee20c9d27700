"""Which files sandboxd acts on as root: those nobody but root can change.

A spec folder decides what runs as root, with which host paths mounted; an image definition's
build script runs as root on the host. Whoever can write either, or replace it, is root. So such a
file or folder must be root's (or the caller's: a user may run `sandboxd config` on their own
folder) and writable by no one else, and so must every folder above it up to `/`, or someone could
rename it away and put their own in its place. That is sshd's StrictModes, with one difference: a
folder above it may be writable by others if it is sticky (like /tmp), because there nobody may
rename or remove an entry that is not theirs, and the entry below it is checked in turn.

The path is resolved first (symlinks followed), so the folders checked are the ones really used.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Untrusted:
    """A path someone other than root could change, and why."""

    path: Path
    why: str  # "owned by uid 1000", "writable by group or others (mode 0777)", or both

    @property
    def fix(self) -> str:
        steps = []
        if "owned by" in self.why:
            steps.append(f"chown root {self.path}")
        if "writable" in self.why:
            steps.append(f"chmod go-w {self.path}")
        return "; ".join(steps)


def problem(info: os.stat_result, above: bool, caller: int) -> str:
    """Why a file or folder with these stat results is not safe to act on as root ("" if it is).
    `above`: it is a folder above the ones that matter, where a sticky bit makes others' write
    permission harmless."""
    reasons = []
    if info.st_uid not in (0, caller):
        reasons.append(f"owned by uid {info.st_uid}")
    sticky = above and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & 0o022 and not sticky:
        reasons.append(f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})")
    return " and ".join(reasons)


def untrusted(path: Path, strict: int = 1, checked: Path | None = None) -> Untrusted | None:
    """The first of `path` and the folders above it that someone besides root (or the caller)
    could change, or None. The first `strict` of them (the path, the folder holding it, ...) may
    not be writable by others even when sticky. Raises OSError if `path` cannot be resolved.

    `checked`: a real folder found trusted already with its first `strict - 1` strict (the spec
    folder, before each of its files); the walk up stops there, rather than at `/` again."""
    real = path.resolve(strict=True)
    caller = os.geteuid()
    for index, current in enumerate([real, *real.parents]):
        if index > 0 and current == checked:
            return None
        why = problem(os.lstat(current), above=index >= strict, caller=caller)
        if why:
            return Untrusted(current, why)
    return None
