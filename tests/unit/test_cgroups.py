"""cgroups: host detection and the manager, against fake cgroup trees (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.cgroups import CgroupManager, CgroupMode, detect
from sandboxd.errors import HostError

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
LEGACY = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


def test_hybrid_host_tracks_through_the_unified_mount():
    host = detect(Path("/sys/fs/cgroup"), HYBRID, "4:memory:/x\n0::/\n")
    assert host.mode is CgroupMode.HYBRID
    assert host.base == Path("/sys/fs/cgroup/unified/sandboxd")


def test_unified_host_nests_below_our_own_cgroup():
    host = detect(Path("/sys/fs/cgroup"), UNIFIED, "0::/user.slice/session-3.scope\n")
    assert host.mode is CgroupMode.UNIFIED
    assert host.base == Path("/sys/fs/cgroup/user.slice/session-3.scope/sandboxd")


def test_cgroup_v1_only_host_is_refused_with_a_hint():
    with pytest.raises(HostError) as e:
        detect(Path("/sys/fs/cgroup"), LEGACY, "4:memory:/\n")
    assert "sandboxd needs cgroup2" in e.value.message
    assert "unified_cgroup_hierarchy" in e.value.hint


def test_manager_creates_and_removes_service_cgroups_in_a_fake_v2_tree(tmp_path):
    mountinfo = f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    (tmp_path / "svc.scope").mkdir()
    host = detect(tmp_path, mountinfo, "0::/svc.scope\n")
    manager = CgroupManager(host, "stack")
    manager.setup()
    web = manager.create("web")
    assert web.path == tmp_path / "svc.scope/sandboxd/stack/web"
    assert web.extra_procs_files == ()
    assert web.path.is_dir() and not web.populated()
    (web.path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert web.populated()
    (web.path / "cgroup.events").unlink()
    manager.teardown()
    assert not (tmp_path / "svc.scope/sandboxd").exists()
    assert (tmp_path / "svc.scope").is_dir()  # our own cgroup is never removed


def test_limits_the_host_cannot_enforce_are_named_with_the_reason(tmp_path):
    from sandboxd.cgroups import CgroupHost, unenforceable
    from sandboxd.spec import Limits

    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "memory.limit_in_bytes").write_text("max")
    host = CgroupHost(CgroupMode.HYBRID, tmp_path / "unified", "/", {"memory": memory})
    assert unenforceable(host, Limits(memory=64 << 20)) == []
    assert unenforceable(host, Limits(memory=64 << 20, swap=0, pids=10)) == [
        "swap: this kernel cannot set memory.memsw.limit_in_bytes (memory.memsw.usage_in_bytes is missing: swap accounting is off; boot with swapaccount=1)",
        "pids: the pids controller is not available on this host (hybrid cgroups)",
    ]


def test_unified_host_enables_controllers_along_sandboxds_subtree(tmp_path):
    from sandboxd.spec import Limits

    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    host = detect(tmp_path, f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n", "0::/\n")
    manager = CgroupManager(host, "stack")
    manager.setup()
    for directory in (tmp_path / "sandboxd", tmp_path / "sandboxd/stack"):
        (directory / "cgroup.subtree_control").write_text("")
    web = manager.create("web", Limits(memory=64 << 20, pids=32, cpu=0.5))
    assert (web.path / "memory.max").read_text() == str(64 << 20)
    assert (web.path / "pids.max").read_text() == "32"
    assert (web.path / "cpu.max").read_text() == "50000 100000"
    assert (tmp_path / "sandboxd/cgroup.subtree_control").read_text() == "+cpu +memory +pids"
