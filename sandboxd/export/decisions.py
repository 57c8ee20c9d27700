"""What became of every key of every unit in an export: the record both engines' builders keep.

A builder (kubernetes.py, systemd.py) takes one unit at a time and says, for each key of its
kind, what the key became, through a `UnitNotes`:

    mapped          it arrives as `to` (a field path or a directive), with the same meaning
    approximated    it arrives as `to`, the nearest form the engine has; `why` says what differs
    not expressible the engine has no form for it; `why` says what was lost and what to do
    nothing to map  its value asks for nothing the engine would do otherwise (an empty list ...)

`UnitNotes.decisions()` then adds a "not expressible" decision for any key of the unit's kind
(spec/keys.py's tables) the builder said nothing about, so that a key added to the spec later is
reported, never dropped; tests/unit/test_export_keys.py fails on such a decision. Each decision
carries the unit's file and the key's line (the unit's line for a key left at its default), and
whether the spec gave the key at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sandboxd.export.lines import key_lines
from sandboxd.spec.keys import KINDS
from sandboxd.spec.model import Network, Service, Socket, Volume

Status = Literal["mapped", "approximated", "not expressible", "nothing to map"]
Unit = Service | Socket | Network | Volume
KIND_OF: dict[type, str] = {Service: "service", Socket: "socket", Network: "network", Volume: "volume"}
NO_MAPPING = "sandboxd export has no mapping for this key yet: it is left out of the output"
# A volume has no keys of its own: its decision is about the unit itself, under this key.
UNIT_KEY = "(unit)"


@dataclass(frozen=True)
class Decision:
    """What one key of one unit became in one engine's output."""

    engine: str  # "kubernetes" or "systemd"
    kind: str
    unit: str
    key: str  # the key as a spec writes it: "limits.memory", "ready", "(unit)" for a volume
    file: Path
    line: int
    given: bool  # whether the spec wrote the key (False: its default)
    status: Status
    to: str  # the field or directive it became ("" when not expressible)
    why: str

    def as_json(self) -> dict[str, object]:
        return {
            "engine": self.engine, "kind": self.kind, "unit": self.unit, "key": self.key, "file": str(self.file),
            "line": self.line, "given": self.given, "status": self.status, "to": self.to, "why": self.why,
        }  # fmt: skip

    def __str__(self) -> str:
        default = "" if self.given else " (default)"
        to = f" -> {self.to}" if self.to else ""
        return f"{self.file}:{self.line}: {self.kind} {self.unit}: {self.key}{default}: {self.status}{to}: {self.why}"


@dataclass
class UnitNotes:
    """The decisions of one engine about one unit, as its builder makes them."""

    engine: str
    unit: Unit
    lines: dict[str, int] = field(default_factory=dict)
    made: dict[str, Decision] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return KIND_OF[type(self.unit)]

    def mapped(self, key: str, to: str, why: str = "") -> None:
        self._note(key, "mapped", to, why)

    def approximated(self, key: str, to: str, why: str) -> None:
        self._note(key, "approximated", to, why)

    def unexpressible(self, key: str, why: str) -> None:
        self._note(key, "not expressible", "", why)

    def nothing(self, key: str, why: str) -> None:
        self._note(key, "nothing to map", "", why)

    def given(self, key: str) -> bool:
        """Whether the spec wrote `key` (a dotted one for a key inside a mapping: limits.memory)."""
        return key in self.lines

    def _note(self, key: str, status: Status, to: str, why: str) -> None:
        line = self.lines.get(key, self.lines.get(key.split(".")[0], self.unit.line))
        self.made[key] = Decision(self.engine, self.kind, self.unit.name, key, self.unit.file, line, self.given(key), status, to, why)

    def decisions(self) -> list[Decision]:
        """What was decided, and a "not expressible" decision for every key of the kind left out."""
        for key in expected_keys(self.kind):
            if key not in self.made:
                self.unexpressible(key, NO_MAPPING)
        return list(self.made.values())


def expected_keys(kind: str) -> list[str]:
    """The keys every unit of `kind` must have a decision for: its key table's, or the unit itself."""
    keys = list(KINDS[kind][1])
    return keys or [UNIT_KEY]


def notes_for(engine: str, unit: Unit) -> UnitNotes:
    """An empty record for `unit`, with the lines its keys were written on."""
    if isinstance(unit, Socket) and unit.implied:  # a service's listen: (spec/implied.py): written on its line, every other key a default
        return UnitNotes(engine, unit, {"listen": unit.line})
    return UnitNotes(engine, unit, key_lines(unit.file, unit.line))


def implied_socket(notes: UnitNotes, sockets: list[str], to: str) -> None:
    """A service's own `listen:`: the socket unit it implies (spec/implied.py), named after the
    service, is among the stack's sockets and exported with them; the key is mapped to it here."""
    if notes.unit.name in sockets and notes.given("listen"):
        notes.mapped("listen", to, "the implied socket's keys are decided with it")
    elif not notes.given("listen"):
        notes.nothing("listen", "no socket of its own")


def not_expressible(decisions: list[Decision]) -> list[Decision]:
    """The decisions a user should read before a move: what is lost or changed, for keys the spec gave."""
    return [d for d in decisions if d.status in ("not expressible", "approximated") and d.given]
