"""The pytest plugin: the `sandboxd_stack` fixture (registered as the `pytest11` entry point)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sandboxd.testing.stack import Stack


@pytest.fixture
def sandboxd_stack() -> Iterator[Callable[..., Stack]]:
    """A factory: `sandboxd_stack(path, environment=...)` brings a stack up; the test's end brings it down."""
    started: list[Stack] = []

    def start(path: str | os.PathLike[str], **kwargs: Any) -> Stack:
        stack = Stack(path, **kwargs).up()
        started.append(stack)
        return stack

    yield start
    for stack in reversed(started):
        stack.down()
