"""cgroups: host detection and the manager, against fake cgroup trees (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.host.cgroups import CgroupHost, CgroupManager, CgroupMode, detect
from sandboxd.errors import HostError
from sandboxd.spec.model import DEFAULT_PIDS, Limits

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
    from sandboxd.host.cgroups import CgroupHost, unenforceable
    from sandboxd.spec.model import Limits

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
    from sandboxd.spec.model import Limits

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


def _hybrid(tmp_path: Path) -> CgroupHost:
    """A fake hybrid tree: cgroup2 for tracking, v1 memory (sandboxd in a cgroup of its own there) and pids."""
    (tmp_path / "unified").mkdir()
    memory, pids = tmp_path / "memory/session", tmp_path / "pids"
    memory.mkdir(parents=True)
    pids.mkdir()
    (memory / "memory.limit_in_bytes").write_text("max")
    (pids / "cgroup.procs").write_text("")
    return CgroupHost(CgroupMode.HYBRID, tmp_path / "unified", "/", {"memory": memory, "pids": pids})


def test_every_service_gets_a_memory_cgroup_and_the_default_process_limit(tmp_path):
    manager = CgroupManager(_hybrid(tmp_path), "stack")
    assert manager.setup() == []
    web = manager.create("web")
    assert web.v1 == {"memory": tmp_path / "memory/session/sandboxd/stack/web", "pids": tmp_path / "pids/sandboxd/stack/web"}
    assert (web.v1["pids"] / "pids.max").read_text() == str(DEFAULT_PIDS)
    assert not (web.v1["memory"] / "memory.limit_in_bytes").exists()  # accounted, not limited
    assert web.extra_procs_files == tuple(str(web.v1[c] / "cgroup.procs") for c in ("memory", "pids"))
    db = manager.create("db", Limits(pids=10_000))
    assert (db.v1["pids"] / "pids.max").read_text() == "10000"


def test_per_connection_instance_has_its_own_memory_cgroup_and_shares_its_services_others(tmp_path):
    manager = CgroupManager(_hybrid(tmp_path), "stack")
    manager.setup()
    echo = manager.create("echo")
    one = manager.create("echo@1", parent=echo)
    assert one.path == tmp_path / "unified/sandboxd/stack/echo/echo@1"
    assert one.v1 == {"memory": echo.v1["memory"] / "echo@1"}
    assert one.joined == {"pids": echo.v1["pids"]}  # the service's process limit holds all its instances
    assert not (one.v1["memory"] / "pids.max").exists()
    assert one.extra_procs_files == (str(echo.v1["memory"] / "echo@1/cgroup.procs"), str(echo.v1["pids"] / "cgroup.procs"))
    manager.remove(one)
    assert not (echo.v1["memory"] / "echo@1").exists() and echo.v1["pids"].is_dir()  # the service's stays


def test_hybrid_host_without_a_pids_hierarchy_says_what_services_do_not_get(tmp_path):
    host = _hybrid(tmp_path)
    host.v1.pop("pids")
    manager = CgroupManager(host, "stack")
    assert manager.setup() == ["services get no default process limit (no v1 pids hierarchy)"]
    assert set(manager.create("web").v1) == {"memory"}


def test_unified_host_accounts_memory_and_limits_processes_of_every_service(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    host = detect(tmp_path, f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n", "0::/\n")
    manager = CgroupManager(host, "stack")
    for directory in (tmp_path / "sandboxd", tmp_path / "sandboxd/stack"):
        directory.mkdir(parents=True)
        (directory / "cgroup.subtree_control").write_text("")
    assert manager.setup() == []
    assert (tmp_path / "sandboxd/stack/cgroup.subtree_control").read_text() == "+pids"  # a fake file keeps the last write
    web = manager.create("web")
    assert (web.path / "pids.max").read_text() == str(DEFAULT_PIDS)
    (web.path / "cgroup.subtree_control").write_text("")
    one = manager.create("web@1", parent=web)
    assert one.path == web.path / "web@1" and not (one.path / "pids.max").exists()


def test_unified_host_that_cannot_enable_controllers_warns_and_sets_no_default(tmp_path):
    (tmp_path / "svc.scope").mkdir()
    (tmp_path / "svc.scope/cgroup.controllers").write_text("memory pids\n")
    host = detect(tmp_path, f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n", "0::/svc.scope\n")
    manager = CgroupManager(host, "stack")
    warnings = manager.setup()  # svc.scope has no cgroup.subtree_control to write in this fake tree
    assert [w.split(" (")[0] for w in warnings] == ["the memory services use is not accounted to each", "services get no default process limit"]
    assert "cannot enable memory in" in warnings[0]
    assert not (manager.create("web").path / "pids.max").exists()


def test_a_renewed_cgroup_keeps_its_limits(tmp_path):
    manager = CgroupManager(_hybrid(tmp_path), "stack")
    manager.setup()
    web = manager.create("web")
    web.killed = True  # as after cgroup.kill: the v2 directory is made anew before the next launch
    web.renew()
    assert web.path.is_dir() and not web.killed
    assert (web.v1["pids"] / "pids.max").read_text() == str(DEFAULT_PIDS)


def test_a_renewed_cgroup_on_a_unified_host_gets_its_limits_written_again(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    host = detect(tmp_path, f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n", "0::/\n")
    manager = CgroupManager(host, "stack")
    for directory in (tmp_path / "sandboxd", tmp_path / "sandboxd/stack"):
        directory.mkdir(parents=True)
        (directory / "cgroup.subtree_control").write_text("")
    manager.setup()
    web = manager.create("web", Limits(memory=64 << 20))
    for file in web.path.iterdir():  # the kernel removes a cgroup's files with it; a fake tree must be emptied
        file.unlink()
    web.killed = True
    web.renew()
    assert (web.path / "memory.max").read_text() == str(64 << 20)
    assert (web.path / "pids.max").read_text() == str(DEFAULT_PIDS)
