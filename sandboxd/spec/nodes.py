"""YAML nodes to values, with the node at fault named for every problem.

A spec file is read as YAML nodes, not plain values, so that a problem can point at its line. A
parser takes a node and the spec folder (relative paths are relative to it) and returns the value,
or raises `Invalid` with every problem of the value at once, each a `Problem`: the node at fault,
the key path below the key being read (`[1]`, `.size`) and the message. Plain values are checked
by the functions of values.py, wrapped by `scalar` and `checked`; a mapping is read against a
table of `Key`s (its parser and default) by `read_keys`, which also reports unknown and missing
keys. keys.py holds the tables of each kind of unit.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sandboxd.spec.values import describe, is_int

STR_TAG = "tag:yaml.org,2002:str"
Problem = tuple[Node, str, str]  # node at fault, key path below the parsed key, message
Parser = Callable[[Node, Path], Any]
_T = TypeVar("_T")


class Invalid(Exception):
    """What a parser raises: every problem of the value it was given, each with its node."""

    def __init__(self, *problems: Problem) -> None:
        super().__init__(problems)
        self.problems = list(problems)


def fail(node: Node, message: str) -> Invalid:
    """The one problem of `node` (raise it)."""
    return Invalid((node, "", message))


def under(prefix: str, problems: Iterable[Problem]) -> list[Problem]:
    """Problems found inside an item or key, with their key paths below `prefix` (`[2]`, `.size`)."""
    return [(node, prefix + key, message) for node, key, message in problems]


def line_of(node: Node) -> int:
    """The 1-based line a node starts on."""
    return node.start_mark.line + 1


def value_of(node: Node) -> object:
    """The plain value of a node (and of everything below it), as yaml.safe_load would give it."""
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError) as error:
        problem = error.problem if isinstance(error, yaml.MarkedYAMLError) else error
        raise fail(node, f"cannot read this value: {problem}") from None


def scalar(convert: Callable[[object], object]) -> Parser:
    """A parser from a function of the plain value that raises ValueError saying what it expected."""

    def parse(node: Node, folder: Path) -> object:
        try:
            return convert(value_of(node))
        except ValueError as error:
            raise fail(node, str(error)) from None

    return parse


def checked(test: Callable[[Any], object], expected: str, convert: Callable[[Any], object] = lambda v: v) -> Parser:
    """A parser of plain values that pass `test`, converted by `convert`; others are refused as not `expected`."""

    def check(value: object) -> object:
        if test(value):
            return convert(value)
        raise ValueError(f"expected {expected}, got {describe(value)}")

    return scalar(check)


def list_of(parse: Callable[[Node, Path], _T], what: str, single: bool = False) -> Callable[[Node, Path], tuple[_T, ...]]:
    """A parser for a list of items; with `single`, one string item may also stand alone."""

    def parse_list(node: Node, folder: Path) -> tuple[_T, ...]:
        if single and isinstance(node, ScalarNode) and isinstance(value_of(node), str):
            return (parse(node, folder),)
        if not isinstance(node, SequenceNode):
            raise fail(node, f"expected {what}, got {describe(value_of(node))}")
        items, problems = [], []
        for index, item in enumerate(node.value):
            try:
                items.append(parse(item, folder))
            except Invalid as invalid:
                problems += under(f"[{index}]", invalid.problems)
        if problems:
            raise Invalid(*problems)
        return tuple(items)

    return parse_list


def text(node: Node, folder: Path) -> str:
    """A string; a number is taken as written (`8080`, `1.10`), as it is text to the program anyway."""
    value = str(node.value) if is_int(number := value_of(node)) or isinstance(number, float) else number
    if not isinstance(value, str):
        raise fail(node, f"expected a string, got {describe(value)}")
    if "\0" in value:
        raise fail(node, "expected a string without NUL characters")
    return value


def command(node: Node, folder: Path) -> tuple[str, ...]:
    """An argv: a list of strings, or one string split into words as a shell would (no expansion)."""
    if isinstance(node, ScalarNode) and isinstance(words := value_of(node), str):
        try:
            argv = tuple(shlex.split(words))
        except ValueError as error:
            raise fail(node, f"cannot split the command into words: {str(error).lower()}") from None
    else:
        argv = list_of(text, "a list of strings or a string")(node, folder)
    if not argv or not argv[0]:
        raise fail(node, "expected a program to run, got an empty command")
    return argv


def read_mapping(node: Node, expected: str) -> tuple[dict[str, tuple[Node, Node]], list[Problem]]:
    """The keys of a mapping node in order; a repeated key is a problem and the first one counts."""
    if not isinstance(node, MappingNode):
        raise fail(node, f"expected {expected}, got {describe(value_of(node))}")
    entries: dict[str, tuple[Node, Node]] = {}
    problems: list[Problem] = []
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if not isinstance(key_node, ScalarNode):
            problems.append((key_node, "", f"expected a plain key, got {describe(value_of(key_node))}"))
        elif key in entries:
            problems.append((key_node, f".{key}", f"duplicate key '{key}' (also at line {line_of(entries[key][0])})"))
        else:
            entries[key] = (key_node, value_node)
    return entries, problems


def environment(node: Node, folder: Path) -> tuple[tuple[str, str], ...]:
    """Variable names and values, in the order written: a mapping, or a list of `KEY=VALUE`
    strings (compose's two forms). A `KEY` without a value is resolved before (envfile.py)."""
    if isinstance(node, SequenceNode):
        entries, problems = environment_list(node)
    else:
        entries, problems = read_mapping(node, "a mapping of variable names to values, or a list of KEY=VALUE strings")
    pairs = []
    for key, (key_node, value_node) in entries.items():
        if not key or "=" in key or "\0" in key:
            problems.append((key_node, f".{key}", f"expected a variable name without '=', got '{key}'"))
        try:
            pairs.append((key, env_value(value_node, folder)))
        except Invalid as invalid:
            problems += under(f".{key}", invalid.problems)
    if problems:
        raise Invalid(*problems)
    return tuple(pairs)


def environment_list(node: SequenceNode) -> tuple[dict[str, tuple[Node, Node]], list[Problem]]:
    """The `KEY=VALUE` items of a list, as read_mapping gives a mapping's entries (the item is
    the key's node, a string node of the text after `=` its value's)."""
    entries: dict[str, tuple[Node, Node]] = {}
    problems: list[Problem] = []
    for index, item in enumerate(node.value):
        words = value_of(item) if isinstance(item, ScalarNode) else None
        key, equals, value = words.partition("=") if isinstance(words, str) else ("", "", "")
        if not equals:
            problems.append((item, f"[{index}]", f"expected KEY=VALUE, got {describe(value_of(item))}"))
        elif key in entries:
            problems.append((item, f"[{index}]", f"duplicate variable '{key}' (also at line {line_of(entries[key][0])})"))
        else:
            entries[key] = (item, ScalarNode(STR_TAG, value, item.start_mark, item.end_mark, style="'"))
    return entries, problems


def env_value(node: Node, folder: Path) -> str:
    """A variable's value: a string, a number as written, a boolean as compose writes it (`true`,
    `false`; YAML 1.1's other booleans, `yes`, `on` ..., as written: compose reads them as strings)."""
    if isinstance(node, ScalarNode) and isinstance(value_of(node), bool):
        written = str(node.value)
        return written.lower() if written.lower() in ("true", "false") else written
    return text(node, folder)


@dataclass(frozen=True)
class Required:
    """The default of a key that must be given."""

    hint: str  # what to write, for the message about the missing key


@dataclass(frozen=True)
class Key:
    """One row of a key table: how a key's value is read, and what it is when the key is absent."""

    parse: Parser
    default: object  # a value, Required, or UNIT_NAME


UNIT_NAME = object()  # the default of a key that defaults to the unit's name (a socket's service, its fdname)

# docker compose's service keys that sandboxd writes differently: what to write instead, said in
# the unknown-key error of a service (keys.py's table), where a compose user puts them first.
COMPOSE_KEYS = {
    "ports": "listen: tcp:0.0.0.0:8080 (or a list): sandboxd binds the port and passes the socket in; a socket unit (kind: socket) for more options",
    "expose": "a socket unit (kind: socket, listen: ...) for each port the service serves",
    "depends_on": "after: [db] or after: [{service: db, condition: ready}] (conditions: started, ready, completed)",
    "healthcheck": "ready: {exec: [CMD, ARG], interval: 5s, timeout: 5s, retries: 3}",
    "volumes": "mounts: [{source: ./data, target: /data}] or [{volume: NAME, target: /data}] (readonly: true for :ro)",
    "entrypoint": "command: the whole argv (the entrypoint followed by its arguments)",
    "build": "image: NAME with a definition in images/NAME/build (built by sandboxd image build or at up)",
    "container_name": "name: (a unit's name; by default its file's name)",
    "env": "environment:",
    "working_dir": "workdir:",
    "networks": "network: NAME, with a unit of kind: network named NAME",
    "network_mode": "network: host, none or private (the default), or a network's name",
    "cap_add": "capabilities: [NET_BIND_SERVICE, ...]",
    "cap_drop": "capabilities: (a service has none but those listed)",
    "read_only": "readonly_root: true (the default)",
    "stop_grace_period": "stop_timeout: 10s",
    "mem_limit": "limits: {memory: 256M}",
    "cpus": "limits: {cpu: 0.5}",
    "pids_limit": "limits: {pids: 100}",
    "deploy": "limits: {memory: ..., cpu: ..., pids: ...}",
    "security_opt": "seccomp: default, unconfined, or a list of system calls to allow",
    "privileged": "capabilities: [...] (only those the service needs; there is no privileged mode)",
}


def read_keys(node: Node, table: Mapping[str, Key], folder: Path, what: str) -> tuple[dict[str, Any], list[Problem]]:
    """The parsed values of the keys present, and the problems of all keys, unknown and missing ones too."""
    entries, problems = read_mapping(node, what)
    values: dict[str, Any] = {}
    for key, (key_node, value_node) in entries.items():
        if key not in table:
            problems.append((key_node, f".{key}", f"unknown key '{key}'; {unknown_key_hint(key, table)}"))
            continue
        try:
            values[key] = table[key].parse(value_node, folder)
        except Invalid as invalid:
            problems += under(f".{key}", invalid.problems)
    for key, spec in table.items():
        if key not in entries and isinstance(spec.default, Required):
            problems.append((node, f".{key}", f"missing key '{key}'; expected {spec.default.hint}"))
    return values, problems


def unknown_key_hint(key: str, table: Mapping[str, Key]) -> str:
    """What to write instead of an unknown key: in a service, the sandboxd key for a compose key;
    else the known key it is closest to, or the list of known keys."""
    if key in COMPOSE_KEYS and "command" in table and "mounts" in table:  # a service's table
        return f"this is docker compose's key; sandboxd's: {COMPOSE_KEYS[key]}"
    import difflib  # for a "did you mean" hint alone: not imported by a spec without a mistake

    close = difflib.get_close_matches(key, list(table), n=1)
    return f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(table)}"


def with_defaults(values: dict[str, Any], table: Mapping[str, Key], name: str) -> dict[str, Any]:
    """Every key of `table`: its value from `values`, else its default (`name` for UNIT_NAME)."""
    return {key: values.get(key, name if spec.default is UNIT_NAME else spec.default) for key, spec in table.items()}

