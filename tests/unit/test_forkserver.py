"""The fork server's bookkeeping of its children (forkserver.Children): every exit status goes
once to the request whose child it was, whether the child was reaped before or after its
launch's spawner named it."""

from __future__ import annotations

from sandboxd.sandbox.forkserver import Children
from sandboxd.sandbox.protocol import NOT_FORKED, Exited


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
