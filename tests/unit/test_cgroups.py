"""cgroups: host detection and the manager, against fake cgroup trees (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.host.cgroups import CgroupHost, CgroupManager, CgroupMode, cgroup_manager, detect
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
    manager = cgroup_manager(host, "stack")
    manager.setup()
    web = manager.create("web")
    assert web.path == tmp_path / "svc.scope/sandboxd/stack/web"
    assert web.v1_tasks_files == ()
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
    manager = cgroup_manager(host, "stack")
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
    (tmp_path / "unified").mkdir(parents=True)
    memory, pids = tmp_path / "memory/session", tmp_path / "pids"
    memory.mkdir(parents=True)
    pids.mkdir()
    (memory / "memory.limit_in_bytes").write_text("max")
    (pids / "cgroup.procs").write_text("")
    return CgroupHost(CgroupMode.HYBRID, tmp_path / "unified", "/", {"memory": memory, "pids": pids})


def _unified_manager(tmp_path: Path) -> CgroupManager:
    """The manager of stack `stack` on a fake unified tree whose controllers the test wrote, with
    sandboxd's and the stack's directories there already (a fake tree makes no files of its own)."""
    host = detect(tmp_path, f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n", "0::/\n")
    manager = cgroup_manager(host, "stack")
    for directory in (tmp_path / "sandboxd", tmp_path / "sandboxd/stack"):
        directory.mkdir(parents=True)
        (directory / "cgroup.subtree_control").write_text("")
    return manager


def test_every_service_gets_a_memory_cgroup_and_the_default_process_limit(tmp_path):
    manager = cgroup_manager(_hybrid(tmp_path), "stack")
    assert manager.setup() == []
    web = manager.create("web")
    assert web.v1 == {"memory": tmp_path / "memory/session/sandboxd/stack/web", "pids": tmp_path / "pids/sandboxd/stack/web"}
    assert (web.v1["pids"] / "pids.max").read_text() == str(DEFAULT_PIDS)
    assert not (web.v1["memory"] / "memory.limit_in_bytes").exists()  # accounted, not limited
    assert web.v1_tasks_files == tuple(str(web.v1[c] / "tasks") for c in ("memory", "pids"))
    db = manager.create("db", Limits(pids=10_000))
    assert (db.v1["pids"] / "pids.max").read_text() == "10000"


def test_per_connection_instance_has_its_own_memory_cgroup_and_shares_its_services_others(tmp_path):
    manager = cgroup_manager(_hybrid(tmp_path), "stack")
    manager.setup()
    echo = manager.create("echo")
    one = manager.create("echo@1", parent=echo)
    assert one.path == tmp_path / "unified/sandboxd/stack/echo/echo@1"
    assert one.v1 == {"memory": echo.v1["memory"] / "echo@1"}
    assert one.joined == {"pids": echo.v1["pids"]}  # the service's process limit holds all its instances
    assert not (one.v1["memory"] / "pids.max").exists()
    assert one.v1_tasks_files == (str(echo.v1["memory"] / "echo@1/tasks"), str(echo.v1["pids"] / "tasks"))
    manager.remove(one)
    assert not (echo.v1["memory"] / "echo@1").exists() and echo.v1["pids"].is_dir()  # the service's stays


def test_hybrid_host_without_a_pids_hierarchy_says_what_services_do_not_get(tmp_path):
    host = _hybrid(tmp_path)
    host.v1.pop("pids")
    manager = cgroup_manager(host, "stack")
    assert manager.setup() == ["services get no default process limit (no v1 pids hierarchy)"]
    assert set(manager.create("web").v1) == {"memory"}


def test_unified_host_accounts_memory_and_limits_processes_of_every_service(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    manager = _unified_manager(tmp_path)
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
    manager = cgroup_manager(host, "stack")
    warnings = manager.setup()  # svc.scope has no cgroup.subtree_control to write in this fake tree
    assert [w.split(" (")[0] for w in warnings] == ["the memory services use is not accounted to each", "services get no default process limit"]
    assert "cannot enable memory in" in warnings[0]
    assert not (manager.create("web").path / "pids.max").exists()


def test_a_renewed_cgroup_keeps_its_limits(tmp_path):
    manager = cgroup_manager(_hybrid(tmp_path), "stack")
    manager.setup()
    web = manager.create("web")
    web.killed = True  # as after cgroup.kill: the v2 directory is made anew before the next launch
    web.renew()
    assert web.path.is_dir() and not web.killed
    assert (web.v1["pids"] / "pids.max").read_text() == str(DEFAULT_PIDS)


def test_a_renewed_cgroup_on_a_unified_host_gets_its_limits_written_again(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    manager = _unified_manager(tmp_path)
    manager.setup()
    web = manager.create("web", Limits(memory=64 << 20))
    for file in web.path.iterdir():  # the kernel removes a cgroup's files with it; a fake tree must be emptied
        file.unlink()
    web.killed = True
    web.renew()
    assert (web.path / "memory.max").read_text() == str(64 << 20)
    assert (web.path / "pids.max").read_text() == str(DEFAULT_PIDS)


# ── one interface, one implementation per mode ──


def _unified(tmp_path: Path) -> CgroupHost:
    """A fake unified tree in which sandboxd runs in the root cgroup, every controller delegated."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    for directory in (tmp_path, tmp_path / "sandboxd", tmp_path / "sandboxd/stack"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.subtree_control").write_text("")
    return detect(tmp_path, f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n", "0::/\n")


def test_the_manager_is_chosen_once_from_the_hosts_mode(tmp_path):
    from sandboxd.host.cgroups import HybridCgroups, UnifiedCgroups

    assert type(cgroup_manager(_unified(tmp_path / "u"), "stack")) is UnifiedCgroups
    assert type(cgroup_manager(_hybrid(tmp_path / "h"), "stack")) is HybridCgroups


def test_unified_limits_are_written_in_cgroup2s_own_terms(tmp_path):
    manager = cgroup_manager(_unified(tmp_path), "stack")
    manager.setup()
    web = manager.create("web", Limits(memory=64 << 20, memory_high=48 << 20, swap=16 << 20, cpu=2, cpu_weight=50, io_weight=300))
    written = {file.name: value for file, value in web.settings}
    assert written == {
        "memory.max": str(64 << 20),
        "memory.high": str(48 << 20),
        "memory.swap.max": str(16 << 20),  # swap alone
        "pids.max": str(DEFAULT_PIDS),
        "cpu.max": "200000 100000",
        "cpu.weight": "50",
        "io.weight": "300",
    }
    assert all(file.parent == web.path for file, _ in web.settings) and web.v1 == {}


def test_hybrid_limits_go_to_the_v1_controllers_in_their_terms_and_order(tmp_path):
    host = _hybrid(tmp_path)
    for controller in ("cpu", "blkio"):
        host.v1[controller] = tmp_path / controller
        host.v1[controller].mkdir()
    manager = cgroup_manager(host, "stack")
    manager.setup()
    web = manager.create("web", Limits(memory=64 << 20, swap=16 << 20, cpu=0.25, cpu_weight=50, io_weight=300))
    assert [(str(file.relative_to(tmp_path)), value) for file, value in web.settings] == [
        ("memory/session/sandboxd/stack/web/memory.limit_in_bytes", str(64 << 20)),
        ("memory/session/sandboxd/stack/web/memory.memsw.limit_in_bytes", str(80 << 20)),  # memory and swap together, after memory
        ("pids/sandboxd/stack/web/pids.max", str(DEFAULT_PIDS)),
        ("cpu/sandboxd/stack/web/cpu.cfs_period_us", "100000"),  # the period before the quota
        ("cpu/sandboxd/stack/web/cpu.cfs_quota_us", "25000"),
        ("cpu/sandboxd/stack/web/cpu.shares", "512"),
        ("blkio/sandboxd/stack/web/blkio.bfq.weight", "30"),
    ]
    assert sorted(web.v1) == ["blkio", "cpu", "memory", "pids"]
    assert not list(web.path.iterdir())  # nothing of the limits in the cgroup2 directory


def test_the_layout_says_where_a_stacks_cgroups_are_in_both_modes(tmp_path):
    for host in (_unified(tmp_path / "u"), _hybrid(tmp_path / "h")):
        manager = cgroup_manager(host, "stack")
        manager.setup()
        web = manager.create("web")
        (web.path / "cgroup.subtree_control").write_text("")  # as the kernel makes it
        one = manager.create("web@1", parent=web)
        assert web.path == host.stack_dir("stack") / "web" and one.path == host.stack_dir("stack") / "web/web@1"
        for controller, path in web.v1.items():
            assert path == host.v1_stack_dir(controller, "stack") / "web"


def test_teardown_removes_the_stacks_v1_directories_and_the_shared_ones_once_empty(tmp_path):
    host = _hybrid(tmp_path)
    host.v1.pop("pids")  # no limit files: a fake tree keeps what the kernel would remove with the directory
    manager = cgroup_manager(host, "stack")
    manager.setup()
    manager.create("web")
    other = cgroup_manager(host, "other")
    other.setup()
    other.create("db")
    manager.teardown()
    assert not host.v1_stack_dir("memory", "stack").exists()
    assert host.v1_stack_dir("memory", "other").is_dir()  # another stack's, and the shared parent with it
    other.teardown()
    assert not (host.v1["memory"] / "sandboxd").exists()
    assert not host.base.exists()


def test_stats_read_the_memory_of_whichever_hierarchy_holds_it(tmp_path):
    unified = cgroup_manager(_unified(tmp_path / "u"), "stack")
    unified.setup()
    web = unified.create("web")
    (web.path / "memory.current").write_text("4096\n")
    (web.path / "memory.peak").write_text("8192\n")
    (web.path / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n")
    (web.path / "pids.events").write_text("max 3\n")
    (web.path / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\n")
    assert web.stats() == {"cpu_usec": 1500, "processes": 0, "memory_current": 4096, "memory_peak": 8192, "oom_kills": 1, "pids_limit_hits": 3}
    hybrid = cgroup_manager(_hybrid(tmp_path / "h"), "stack")
    hybrid.setup()
    db = hybrid.create("db")
    (db.v1["memory"] / "memory.usage_in_bytes").write_text("100\n")
    (db.v1["memory"] / "memory.max_usage_in_bytes").write_text("200\n")
    (db.v1["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (db.v1["pids"] / "pids.events").write_text("max 0\n")
    assert db.stats() == {"cpu_usec": 0, "processes": 0, "memory_current": 100, "memory_peak": 200, "oom_kills": 2, "pids_limit_hits": 0}
    db.mark()
    (db.v1["memory"] / "memory.oom_control").write_text("oom_kill 3\n")
    assert db.why_failed() == "oom-killed"


def test_whether_cgroup_kill_exists_is_learnt_once_from_the_kernel(tmp_path):
    from sandboxd.host.cgroups import kill_supported

    mountinfo = f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    assert detect(tmp_path, mountinfo, "0::/\n", release="5.14.0-362.el9.x86_64").kill
    assert not detect(tmp_path, mountinfo, "0::/\n", release="5.10.0-28-amd64").kill
    assert kill_supported("6.18.44-fc-v1045") and not kill_supported("4.19.0")
    manager = cgroup_manager(detect(tmp_path, mountinfo, "0::/\n", release="6.1.0"), "stack")
    manager.setup()
    web = manager.create("web")
    assert web.can_kill
    web.kill()  # through cgroup.kill, without looking for the file first
    assert (web.path / "cgroup.kill").read_text() == "1" and web.killed


def test_only_the_cgroups_package_names_the_cgroup_mount():
    import sandboxd

    package = Path(sandboxd.__file__).parent
    naming = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "/sys/fs/cgroup" in p.read_text())
    assert naming and all(name.startswith("host/cgroups/") for name in naming), naming


def test_every_cgroup_of_a_stack_is_below_one_of_the_directories_its_state_file_records(tmp_path):
    for host in (_unified(tmp_path / "u"), _hybrid(tmp_path / "h")):
        manager = cgroup_manager(host, "stack")
        manager.setup()
        recorded = manager.stack_dirs()
        assert recorded[0] == host.stack_dir("stack")
        assert recorded[1:] == [host.v1_stack_dir(controller, "stack") for controller in host.v1]
        web = manager.create("web")
        (web.path / "cgroup.subtree_control").write_text("")
        one = manager.create("web@1", parent=web)
        for path in [web.path, one.path, *web.v1.values(), *one.v1.values()]:
            assert any(path.is_relative_to(directory) and path != directory for directory in recorded)


def test_a_cgroup_just_made_starts_from_zero_counters_and_later_launches_read_them(tmp_path):
    manager = cgroup_manager(_hybrid(tmp_path), "stack")
    manager.setup()
    db = manager.create("db")
    oom_control = db.v1["memory"] / "memory.oom_control"
    oom_control.write_text("oom_kill 2\n")  # what a fake tree says; a new cgroup of the kernel's says 0
    db.mark()  # the first launch: nothing read
    assert db.baseline == {"oom_kills": 0, "pids_limit_hits": 0}
    db.mark()  # a restart: read
    assert db.baseline["oom_kills"] == 2 and db.why_failed() == ""
    oom_control.write_text("oom_kill 3\n")
    assert db.why_failed() == "oom-killed"


def test_a_cgroup_whose_directory_was_there_already_reads_its_counters_at_once(tmp_path):
    manager = cgroup_manager(_hybrid(tmp_path), "stack")
    manager.setup()
    (tmp_path / "memory/session/sandboxd/stack/db").mkdir(parents=True)  # left by someone
    (tmp_path / "memory/session/sandboxd/stack/db/memory.oom_control").write_text("oom_kill 4\n")
    db = manager.create("db")
    db.mark()
    assert db.baseline["oom_kills"] == 4


def test_an_empty_cgroup_is_removed_with_one_rmdir_per_directory(tmp_path, monkeypatch):
    from sandboxd.host.cgroups import Cgroup
    from sandboxd.host.cgroups import group

    (tmp_path / "v2/web@1").mkdir(parents=True)
    (tmp_path / "memory/web@1").mkdir(parents=True)
    cgroup = Cgroup(tmp_path / "v2/web@1", v1={"memory": tmp_path / "memory/web@1"}, can_kill=True)

    def no_listing(path):
        raise AssertionError(f"{path} listed")

    monkeypatch.setattr(group.os, "scandir", no_listing)  # an ended instance: nothing to look for
    cgroup.remove()
    assert not (tmp_path / "v2/web@1").exists() and not (tmp_path / "memory/web@1").exists()


def test_a_cgroup_with_a_child_cgroup_is_removed_child_first(tmp_path):
    from sandboxd.host.cgroups import Cgroup

    (tmp_path / "v2/web@1/exec-1").mkdir(parents=True)  # a `sandboxd exec` command's
    (tmp_path / "memory/web@1").mkdir(parents=True)
    Cgroup(tmp_path / "v2/web@1", v1={"memory": tmp_path / "memory/web@1"}, can_kill=True).remove()
    assert not (tmp_path / "v2/web@1").exists() and not (tmp_path / "memory/web@1").exists()
