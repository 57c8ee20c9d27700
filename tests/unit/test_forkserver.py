"""The fork server's bookkeeping of its children (forkserver.Children): every exit status goes
once to the request whose child it was, whether the child was reaped before or after its
launch's spawner named it. And what it does ahead of the first launches (ExpectLaunches)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from sandboxd.kernel import abi
from sandboxd.plan.launch import LaunchPlan, MountOp
from sandboxd.sandbox import forkserver, ops, program, protocol
from sandboxd.sandbox.forkserver import Children
from sandboxd.sandbox.program import HostView, Trees
from sandboxd.sandbox.protocol import NOT_FORKED, ExpectLaunches, Exited, LaunchSandbox


def test_a_childs_exit_goes_to_its_request_once() -> None:
    children = Children()
    children.forked(10, 1)
    assert children.reaped(10, 0) == Exited(1, 0)
    assert children.reaped(10, 0) is None  # another process's, by then: nobody's request


def test_an_init_reaped_before_its_reply_is_reported_after_it() -> None:
    children = Children()
    children.awaiting()
    children.awaiting()
    assert children.reaped(20, 256) is None  # whose it is, no reply said yet
    assert children.launched(21, 7, reaped=False) is None
    assert children.launched(20, 8, reaped=True) == Exited(8, 256)
    assert children.reaped(21, 9) == Exited(7, 9)
    assert children.running == {} and children.unclaimed == {}


def test_a_status_kept_under_a_reused_pid_is_not_a_living_inits() -> None:
    """Its pidfd says the init named by the reply is not reaped: what was kept under its pid was
    another process's, which once had that pid."""
    children = Children()
    children.awaiting()
    children.awaiting()
    assert children.reaped(30, 1) is None
    assert children.launched(30, 4, reaped=False) is None
    assert children.reaped(30, 0) == Exited(4, 0)
    assert children.launched(31, 5, reaped=False) is None
    assert children.unclaimed == {}


def test_spawners_are_reaped_without_a_word() -> None:
    children = Children()
    children.awaiting()
    children.helpers.add(40)
    assert children.reaped(40, 0) is None
    assert children.unclaimed == {} and children.helpers == set()


def test_a_failed_launch_leaves_nothing_kept() -> None:
    """The init of a launch whose spawner failed after the clone exits unclaimed: dropped once
    no launch awaits a reply, never reported."""
    children = Children()
    children.awaiting()
    assert children.reaped(50, 127 << 8) is None
    children.not_launched()
    assert children.unclaimed == {} and children.awaited == 0
    assert children.reaped(51, 0) is None  # nothing awaited: nothing kept
    assert children.unclaimed == {}


def test_what_is_kept_unclaimed_is_bounded() -> None:
    children = Children()
    children.awaiting()
    for pid in range(1, Children.UNCLAIMED_MAX + 10):
        children.reaped(pid, 0)
    assert len(children.unclaimed) == Children.UNCLAIMED_MAX
    assert 1 not in children.unclaimed and Children.UNCLAIMED_MAX + 9 in children.unclaimed
    assert children.launched(1, 3, reaped=True) == Exited(3, NOT_FORKED)  # dropped: it says it ended


# ── ExpectLaunches: the first launches' programs compiled ahead ──


def _plan(service: str, source: str) -> LaunchPlan:
    mounts = (
        MountOp("rbind-root", "/", "/", options="in-place"),
        MountOp("proc", "/proc"),
        MountOp("dev", "/dev"),
        MountOp("mask", "/proc/kcore"),
        MountOp("tmpfs", "/tmp", options="mode=1777"),
        MountOp("bind", "/etc/hostname", source),
    )
    return LaunchPlan(service=service, argv=("/bin/serve",), env=(("PATH", "/bin"),), hostname=service, workdir="/", clone_flags=abi.CLONE_NEWNS | abi.CLONE_NEWUTS, mounts=mounts, fd_names=("http",), fd_sockets=(("http", 0),))


def _caches_cleared() -> None:
    protocol._PLANS.clear()
    program._WALKS.clear()
    ops._ENCODED.clear()
    forkserver._programs.clear()
    forkserver._ROOT_ENCODINGS.clear()


def test_an_expected_plans_first_launch_finds_its_walk_compiled_and_gets_the_same_program(monkeypatch, tmp_path: Path) -> None:
    """After ExpectLaunches, the first launch of the plan (other descriptors, its trees where every
    launch has them) compiles no walk of its own; and its program is byte for byte the one a
    fork server that was told nothing ahead compiles."""
    made: list[tuple[int, int] | None] = []

    def fake_dev(owner: tuple[int, int] | None) -> int:
        made.append(owner)
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    monkeypatch.setattr(forkserver, "detached_dev", fake_dev)
    monkeypatch.setattr(forkserver, "_spare_devs", {})
    (tmp_path / "hostname").write_text("web\n")
    plan = _plan("web", str(tmp_path / "hostname"))
    _caches_cleared()
    expected = protocol.decode_request(protocol.encode(ExpectLaunches("/run/sandboxd/st/root", (plan,))))
    assert isinstance(expected, ExpectLaunches)
    walks = []
    walk = program.RootProgram.walk
    monkeypatch.setattr(program.RootProgram, "walk", lambda self: (walks.append(self), walk(self))[1])
    forkserver._expect(expected)
    assert len(walks) == 1 and made == [None] and list(forkserver._spare_devs) == [None]
    launch = protocol.decode_request(protocol.encode(LaunchSandbox(7, plan, "/sys/fs/cgroup/x", (), "/run/sandboxd/st/root", False, 1)))
    assert isinstance(launch, LaunchSandbox) and launch.plan is expected.plans[0]
    received = forkserver._Received(20, 21, [22], [23], -1, [24])
    trees = Trees(tuple(forkserver._trees_at(1)), -1, -1, forkserver._trees_at(2)[1])
    view = HostView((False,), ())
    ahead = forkserver._compiled(launch, received, trees, view)
    assert len(walks) == 1  # the walk compiled for the expectation
    _caches_cleared()
    assert forkserver._compiled(launch, received, trees, view) == ahead
    assert len(walks) == 2


def test_a_launchs_trees_are_moved_to_the_numbers_every_launch_has_them_at() -> None:
    r, w = os.pipe()
    try:
        moved = forkserver._at_trees(r)
        assert moved == forkserver.TREES_AT == forkserver._trees_at(1)[0]
        with pytest.raises(OSError):
            os.fstat(r)  # closed where it was
        again = forkserver._at_trees(os.dup(w))
        assert again == forkserver.TREES_AT + 1  # the next free one
        os.close(again)
    finally:
        os.close(w)
        os.close(moved)


def test_below_a_limit_under_the_trees_numbers_a_tree_stays_where_it_is() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    r, w = os.pipe()
    resource.setrlimit(resource.RLIMIT_NOFILE, (forkserver.TREES_AT, hard))
    try:
        assert forkserver._at_trees(r) == r
        os.fstat(r)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(r)
        os.close(w)
