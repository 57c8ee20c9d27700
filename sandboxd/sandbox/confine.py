"""The last steps of every process that enters a sandbox, and how such a process says what failed.

Shared by the sandbox's own init (child.py), the commands and proxies the fork server starts in
a running sandbox (join.py) and `sandboxd exec`'s command (execute.py). Every call goes through
a `Kernel` (kernel/seam.py), so the order is unit-tested against the recording fake.
"""

from __future__ import annotations

import os
import socket

from sandboxd.kernel import abi
from sandboxd.kernel.seam import Confining, Kernel
from sandboxd.sandbox.protocol import SetupFailed, Status, encode


class Step:
    """What a process setting itself up is doing, so that a failure names it."""

    def __init__(self, name: str = "start") -> None:
        self.name = name


def failure(step: Step, e: BaseException, code: int, path_in_detail: bool = True) -> SetupFailed:
    """The report of `e`, raised while doing `step`: an OSError's text and path, as the user
    reads them ("Permission denied (/proc)"; the text alone without `path_in_detail`), else
    what the exception is."""
    if not isinstance(e, OSError):
        return SetupFailed(step.name, repr(e), exit=code)
    path = os.fsdecode(e.filename) if isinstance(e.filename, str | bytes) and e.filename else ""  # (an fd's number: none)
    detail = (e.strerror or str(e)) + (f" ({path})" if path and path_in_detail else "")
    return SetupFailed(step.name, detail, path, code)


def become_userns_root(kernel: Confining) -> None:
    """After joining or creating a user namespace: take its root's ids (the mapped ones)."""
    kernel.setgroups([])
    kernel.setresgid(0, 0, 0)
    kernel.setresuid(0, 0, 0)


def place_fds(kernel: Confining, output_fd: int, socket_fds: list[int]) -> None:
    """stdin from /dev/null, stdout and stderr to the output pipe, sockets at 3, 4, ..."""
    high = [kernel.dup_above(fd, 100) for fd in [output_fd, *socket_fds]]
    null = kernel.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    kernel.dup2(null, 0)
    kernel.dup2(high[0], 1)
    kernel.dup2(high[0], 2)
    for index, fd in enumerate(high[1:]):
        kernel.dup2(fd, 3 + index)  # dup2 clears close-on-exec on the new descriptor


def confine(kernel: Confining, seccomp_filter: str, capabilities: tuple[int, ...], no_new_privs: bool, step: Step, uid: int = 0, gid: int = 0) -> None:
    """The last steps before exec, in the order the kernel allows them: the seccomp filter (with
    CAP_SYS_ADMIN, or after no_new_privs), the bounding set (needs CAP_SETPCAP), the user, then
    the remaining capability sets, which setuid would otherwise clear."""
    if seccomp_filter:
        step.name = "install the seccomp filter"
        if no_new_privs:
            kernel.prctl(abi.PR_SET_NO_NEW_PRIVS, 1)
        kernel.install_seccomp(bytes.fromhex(seccomp_filter))
    step.name = "drop capabilities"
    kernel.drop_bounding_set(set(capabilities))
    if uid or gid:
        step.name = f"become uid {uid} gid {gid}"
        kernel.prctl(abi.PR_SET_KEEPCAPS, 1)  # permitted capabilities survive setuid; effective are set again below
        kernel.setgroups([gid])
        kernel.setgid(gid)
        kernel.setuid(uid)
    step.name = "set capabilities"
    kernel.keep_only_capabilities(set(capabilities))
    if no_new_privs:
        kernel.prctl(abi.PR_SET_NO_NEW_PRIVS, 1)


def report(kernel: Kernel, channel: socket.socket, message: Status) -> None:
    """Say `message` on a status channel; a reader that is gone changes nothing for the sender."""
    try:
        kernel.send(channel, encode(message))
    except OSError:
        pass
