"""Spec text that unit tests share: the smallest units, to build a test's spec from.

    SERVICE + "network: [back]\n---\n" + NETWORK

Each ends with a newline; put `---\n` between two units of one file. The helpers that write and
load such text (`stack_of`, `problems`, `write_specs`) are fixtures of conftest.py; their types
are here, for the tests' annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from sandboxd.spec.model import Stack

SERVICE = "kind: service\nname: a\ncommand: [x]\n"  # service a, running x
STEM_SERVICE = "kind: service\ncommand: [x]\n"  # a service named after its file's stem
NETWORK = "kind: network\nname: back\nsubnet: [10.9.0.0/24, 'fd00:9::/64']\n"  # network back, IPv4 and IPv6

Files = str | Mapping[str, str]  # one file's text (stack.yaml), or the text of each file by name
WriteSpecs = Callable[[Path, Files], Path]
StackOf = Callable[[Path, Files], Stack]
Problems = Callable[..., list[str]]  # (folder) or (folder, files)
