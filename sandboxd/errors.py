"""Every error sandboxd raises on purpose.

    SandboxdError                 base; the CLI prints it and exits non-zero
    ├── SpecErrors                all problems of one spec folder at once (exit code 2), each a SpecError
    ├── HostError                 the machine lacks something; says what to do about it (exit 1)
    └── LaunchError               a sandbox could not be set up; names the step and the path

    SpecError                     not an exception: one problem in a spec folder (file, line, key,
                                  what was expected), as SpecErrors carries it and the CLI prints it

The user never sees a traceback for any of these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class SandboxdError(Exception):
    """Base of all errors sandboxd reports to the user."""

    exit_code = 1


class SpecError:
    """One problem in one spec file. `line` is 1-based; 0 when the whole file is meant.

    A plain class, not a dataclass: the CLI imports this module for every verb, and quick verbs
    like `ps` should not pay for importing dataclasses."""

    __slots__ = ("file", "key", "line", "message")

    def __init__(self, file: Path, line: int, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpecError) and (self.file, self.line, self.key, self.message) == (other.file, other.line, other.key, other.message)

    def __hash__(self) -> int:
        return hash((self.file, self.line, self.key, self.message))

    def __repr__(self) -> str:
        return f"SpecError({self.file!r}, {self.line}, {self.key!r}, {self.message!r})"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class SpecErrors(SandboxdError):
    """All problems found in a spec folder, reported together."""

    exit_code = 2

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = sorted(errors, key=lambda e: (str(e.file), e.line, e.key, e.message))
        super().__init__("\n".join(str(e) for e in self.errors))


class HostError(SandboxdError):
    """The host cannot do what is asked; `hint` tells the user what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\n  hint: {hint}" if hint else message)


class LaunchError(SandboxdError):
    """Setting up a sandbox failed: `step` names what was being done, `detail` the errno text."""

    def __init__(self, service: str, step: str, detail: str) -> None:
        self.service = service
        self.step = step
        self.detail = detail
        super().__init__(f"{service}: {step}: {detail}")
