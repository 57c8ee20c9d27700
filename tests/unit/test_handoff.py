"""The bind() listener's pidfd of the calling thread (handoff.py), on kernels with and without
PIDFD_THREAD: a thread that does not lead its group is reached through itself or its leader."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from sandboxd.daemon import handoff


def _pid_of(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))


def _in_a_thread(monkeypatch: pytest.MonkeyPatch | None) -> tuple[int, int]:
    """(the thread's id, the pid its pidfd names), from a thread that is not the first."""
    if monkeypatch is not None:
        real = os.pidfd_open

        def without_thread_flag(pid: int, flags: int = 0) -> int:
            if flags:
                raise OSError(errno.EINVAL, "unknown flag")  # a kernel before 6.9
            return real(pid, flags)

        monkeypatch.setattr(os, "pidfd_open", without_thread_flag)
    seen: list[tuple[int, int]] = []

    def run() -> None:
        tid = threading.get_native_id()
        pidfd = handoff._pidfd_of_thread(tid)
        try:
            seen.append((tid, _pid_of(pidfd)))
        finally:
            os.close(pidfd)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return seen[0]


def test_the_calling_thread_itself_where_the_kernel_has_pidfd_thread() -> None:
    try:
        os.close(os.pidfd_open(os.getpid(), handoff.PIDFD_THREAD))
    except OSError:
        pytest.skip("this kernel has no PIDFD_THREAD (before 6.9): the next test covers it")
    tid, named = _in_a_thread(None)
    assert tid != os.getpid() and named == tid


def test_its_thread_groups_leader_where_the_kernel_has_no_pidfd_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    tid, named = _in_a_thread(monkeypatch)
    assert tid != os.getpid() and named == os.getpid()
