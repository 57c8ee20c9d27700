"""The last capability the kernel knows is asked of the kernel, never read from a file: inside a
sandbox's mount namespace, where `sandboxd exec`, health checks and reload commands drop their
bounding set, /proc/sys/kernel/cap_last_cap may be a service's own file bound over it."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from sandboxd.kernel import linux


def test_last_cap_is_the_kernels_and_reads_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    real_open = builtins.open

    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        if "cap_last_cap" in str(file):
            raise AssertionError("last_cap read /proc/sys/kernel/cap_last_cap")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    assert linux.last_cap() == expected
