"""The pytest plugin (registered as the `pytest11` entry point): the `sandboxd_stack` fixture,
and the logs of its stacks in the report of a test that fails.

    def test_web(sandboxd_stack):
        stack = sandboxd_stack("specs/", listen={"web": "tcp:127.0.0.1:0"})
        stack.wait_for_accept("web")
        ...

When such a test fails in its body, its report gets one section per stack it
started, "sandboxd stack NAME": each service's state (and why, for a failed or crash-looping
one) and the last lines of each service's log, the broken ones first; pytest prints the sections
below the traceback (`-rA` shows them for passing tests too: they are only made on failure).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from sandboxd.testing.stack import Stack

_STACKS = pytest.StashKey[list[Stack]]()


@pytest.fixture
def sandboxd_stack(request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """A factory: `sandboxd_stack(path, **options)` brings a stack up (`Stack(path,
    **options).up()`: `environment=`, `listen=`, `name=`) and returns it; the end of the test
    brings every stack it started down, the last one first."""
    started = request.node.stash.setdefault(_STACKS, [])

    def start(path: str | os.PathLike[str], **kwargs: Any) -> Stack:
        stack = Stack(path, **kwargs)
        started.append(stack)  # before up: a stack whose up failed is down already, and says so in the error
        return stack.up()

    yield start
    for stack in reversed(started):
        stack.down()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report gets the state and logs of each stack it has up."""
    report = yield
    if report.failed and report.when == "call":
        for stack in item.stash.get(_STACKS, []):
            if stack.running:
                report.sections.append((f"sandboxd stack {stack.name}", stack.failure_report()))
    return report
