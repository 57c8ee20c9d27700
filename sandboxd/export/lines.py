"""The line each key of a unit was written on, read again from its spec file.

The checked model (spec/model.py) keeps the line of each unit, not of each key; an export names
the key's own line. The unit's line is the line its document's mapping starts on, so the document
is found again by that line, and its keys' lines read from the YAML nodes: `limits` and, one level
down, `limits.memory` (for a mapping value) or `mounts[1]` (for a list item). A file that cannot
be read again (changed or removed since it was loaded) gives no lines: each key then has the
unit's line, and counts as left at its default.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from sandboxd.spec.nodes import line_of


def key_lines(file: Path, unit_line: int) -> dict[str, int]:
    """The lines of the keys of the unit whose document starts on `unit_line` of `file`."""
    try:
        documents = list(yaml.compose_all(file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    for document in documents:
        if isinstance(document, MappingNode) and line_of(document) == unit_line:
            return _lines_of(document)
    return {}


def _lines_of(document: MappingNode) -> dict[str, int]:
    lines: dict[str, int] = {}
    for key_node, value_node in document.value:
        key = str(key_node.value)
        lines[key] = line_of(key_node)
        for sub, line in _inner(value_node):
            lines.setdefault(f"{key}{sub}", line)
    return lines


def _inner(node: Node) -> list[tuple[str, int]]:
    if isinstance(node, MappingNode):
        return [(f".{k.value}", line_of(k)) for k, _ in node.value]
    if isinstance(node, SequenceNode):
        return [(f"[{i}]", line_of(item)) for i, item in enumerate(node.value)]
    return []
