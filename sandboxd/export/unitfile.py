"""systemd unit files as data: sections of (directive, value) lines, and their text.

A `UnitFile` is what systemd.py builds and what tests read back (`parse_unit`), so that a test
checks that a key arrives by the directive's value, not by matching text. Values are quoted as
systemd reads them: `quote_command` for ExecStart= and friends (a word with a space, a quote or a
backslash in double quotes; `$` and `%` doubled, so that systemd expands neither), `quote_assignment`
for an Environment= line, `escape_specifiers` for a path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


@dataclass
class UnitFile:
    """One unit file: its name (web.service) and its sections in order, each a list of lines."""

    name: str
    comment: str = ""
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, section: str, directive: str, value: str) -> None:
        self.sections.setdefault(section, []).append((directive, value))

    def text(self) -> str:
        lines = [f"# {line}" if line else "#" for line in self.comment.splitlines()]
        for section, entries in self.sections.items():
            lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
            lines += [f"{directive}={value}" for directive, value in entries]
        return "\n".join(lines) + "\n"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """The sections of a unit file's text, each a list of (directive, value) in order (no
    continuation lines: this module writes none)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        directive, _, value = line.partition("=")
        sections.setdefault(current, []).append((directive.strip(), value))
    return sections


def escape_specifiers(text: str) -> str:
    """`text` with systemd's `%` specifiers escaped."""
    return text.replace("%", "%%")


def _word(word: str) -> str:
    word = escape_specifiers(word).replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_command(argv: tuple[str, ...] | list[str]) -> str:
    """An argv as an Exec*= value: systemd splits it back into exactly these words."""
    return " ".join(_word(word) for word in argv)


def quote_assignment(key: str, value: str) -> str:
    """One Environment= assignment, KEY=VALUE, quoted as one word."""
    text = escape_specifiers(f"{key}={value}")
    if re.search(r"[\s\"'\\]", text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def seconds(value: float) -> str:
    """A duration as systemd reads it: whole seconds, or milliseconds (5s, 100ms, 1500ms)."""
    if value == int(value):
        return f"{int(value)}s"
    return f"{math.ceil(value * 1000)}ms"
