"""What the unit tests share: writing a spec folder, loading it, and reading its problems.

The helpers are fixtures (factories: each gives the function itself), as conftest.py is not for
importing; the spec text they write is built from spec_snippets.py.

    def test_unknown_network_is_named(tmp_path: Path, problems: Problems) -> None:
        assert problems(tmp_path, SERVICE + "network: [bakc]\n") == ["stack.yaml:4: network[0]: no network 'bakc'; ..."]
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from sandboxd.errors import SpecErrors
from sandboxd.spec.load import load_stack
from sandboxd.spec.model import Stack
from .spec_snippets import Files, Problems, StackOf, WriteSpecs


def write_specs_into(folder: Path, files: Files) -> Path:
    """Write spec files into `folder` (made if missing) in place of the ones it has; return it.
    A mapping gives each file's text by name, dedented; a plain string is the one file stack.yaml,
    dedented and from its first non-blank line (so triple-quoted text keeps its line numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in (*folder.glob("*.yaml"), *folder.glob("*.yml")):
        old.unlink()
    texts = files if isinstance(files, Mapping) else {"stack.yaml": textwrap.dedent(files).lstrip()}
    for name, text in texts.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def load_specs(folder: Path, files: Files) -> Stack:
    """Write the spec files into `folder` and load it."""
    return load_stack(write_specs_into(folder, files))


def problems_of(folder: Path, files: Files | None = None) -> list[str]:
    """The problems load_stack reports for `folder` (after writing `files` into it, if given), as
    `file:line: key: message`, with spec files by name and the folder itself written `<folder>`."""
    if files is not None:
        write_specs_into(folder, files)
    with pytest.raises(SpecErrors) as raised:
        load_stack(folder)
    root = str(folder.resolve())
    return [str(error).replace(root, "<folder>").removeprefix("<folder>/") for error in raised.value.errors]


@pytest.fixture
def write_specs() -> WriteSpecs:
    """`write_specs(folder, files)`: write spec files into a folder, in place of the ones it has."""
    return write_specs_into


@pytest.fixture
def stack_of() -> StackOf:
    """`stack_of(folder, files)`: write spec files into a folder and load it."""
    return load_specs


@pytest.fixture
def problems() -> Problems:
    """`problems(folder[, files])`: what loading the folder reports, as `file:line: key: message`."""
    return problems_of
