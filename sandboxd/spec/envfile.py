"""Env files (`.env`, `env_file:`, `--env-file`), and a service's environment as compose makes it.

An env file is read as compose's env-file reader reads one (compose-go's `dotenv` package):

    # a comment line; blank lines are skipped
    KEY=value              unquoted: up to the end of the line or a ` #` comment, spaces trimmed
    export KEY=value       `export ` is tolerated; `KEY: value` too
    KEY='$literal'         single quotes: as written, no interpolation (\\' is a quote)
    KEY="a\\n${OTHER}"      double quotes: escapes (\\n \\t \\r \\\\ \\" \\$ ...), then interpolation;
                           quoted values may span lines
    KEY                    alone: the value KEY has where the file is read (left out if none)

Unquoted and double-quoted values are interpolated (interpolate.py) from `lookup`, then from the
file's own earlier lines. Text after a closing quote other than a comment is an error (compose
would read it as the next line's key).

A service's environment, in compose's precedence (highest first): `--env SERVICE:KEY=VALUE`
(overrides.py), `environment:`, then its `env_file:` files in order, the later one winning, then
the image's Env (plan/environment.py). `resolve_environment` does the spec's part on a service's
YAML document before its keys are read: a variable of `environment` without a value (`KEY:` or
`- KEY`) takes the interpolation variables' value or is left out, as compose does; then the env
files are read (relative to the spec folder) and their variables put in `environment` before its
own, so that the key table reads one environment and a reload sees a changed file as a change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sandboxd.errors import SpecError
from sandboxd.spec.interpolate import Interpolation, Lookup, substitute
from sandboxd.spec.model import EnvFile
from sandboxd.spec.nodes import (
    STR_TAG,
    Invalid,
    Key,
    Required,
    checked,
    fail,
    line_of,
    list_of,
    read_keys,
    text,
)
from sandboxd.spec.nodes import environment as parse_environment

LineProblem = tuple[int, str, str]  # line, variable, message
Distrusted = Callable[[Path, str], SpecError | None]

_NULL_TAG = "tag:yaml.org,2002:null"
_STATEMENT = re.compile(r"[ \t]*(?:export[ \t]+)?(?P<key>[^\s=:]+)[ \t]*(?P<sep>[=:]?)[ \t]*")
_KEY = re.compile(r"[\w.\-\[\]]+")
_ESCAPE = re.compile(r"\\(?:[abfnrtv$\"\\]|0[0-7]{3})")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "$": "$$", '"': '"', "\\": "\\"}


def parse_env_file(source: str, lookup: Lookup) -> tuple[dict[str, str], list[LineProblem]]:
    """The variables of an env file's text, and its problems (line, key, message)."""
    values: dict[str, str] = {}
    problems: list[LineProblem] = []
    source = source.removeprefix("\ufeff")
    position, line = 0, 1

    def known(name: str) -> str | None:
        found = lookup(name)
        return found if found is not None else values.get(name)

    while position < len(source):
        end = len(source) if (newline := source.find("\n", position)) < 0 else newline
        raw = source[position:end]
        first = line
        if raw.strip() and not raw.lstrip().startswith("#"):
            statement = _STATEMENT.match(raw)
            key = statement["key"] if statement else raw.strip()
            if statement is None or not _KEY.fullmatch(key):
                bad = next((c for c in key if not _KEY.fullmatch(c)), key[:1])
                problems.append((line, key, f"unexpected character {bad!r} in variable name {key!r}"))
            elif not statement["sep"]:
                if raw[statement.end() :].strip():
                    problems.append((line, key, "a variable name cannot contain a space; expected KEY=VALUE"))
                elif (inherited := lookup(key)) is not None:
                    values[key] = inherited
            else:
                start = position + statement.end()
                value, end, errors = _value(source, start, known)
                line += source.count("\n", start, end)
                problems += [(first, key, error) for error in errors]
                if value is not None and not errors:
                    values[key] = value
                if value is None:  # an unterminated quote: the rest of the file is its value
                    break
        position, line = end + 1, line + 1
    return values, problems


def _value(source: str, start: int, known: Lookup) -> tuple[str | None, int, list[str]]:
    """The value at `start` of `source` (just after `KEY=`), where its last line ends, and its
    problems; None for an unterminated quote."""
    line_end = len(source) if (newline := source.find("\n", start)) < 0 else newline
    if not source[start : start + 1] or source[start] not in "'\"":
        value, errors = _interpolated(source[start:line_end].partition(" #")[0].rstrip(), known)
        return value, line_end, errors
    quote, chars, escaped = source[start], [], False
    for index in range(start + 1, len(source)):
        char = source[index]
        if char == quote and not escaped:
            break
        if char == "\\" and not escaped:
            escaped = True
            continue
        chars.append("\\" + char if escaped and char != quote else char)
        escaped = False
    else:
        return None, len(source), [f"unterminated quoted value {source[start:line_end]}"]
    after_end = len(source) if (newline := source.find("\n", index)) < 0 else newline
    trailing = source[index + 1 : after_end].strip()
    errors = [f"unexpected text after the closing quote: {trailing!r}"] if trailing and not trailing.startswith("#") else []
    if quote == "'":
        return "".join(chars), after_end, errors
    value, more = _interpolated(_ESCAPE.sub(_unescape, "".join(chars)), known)
    return value, after_end, errors + more


def _interpolated(value: str, known: Lookup) -> tuple[str, list[str]]:
    result, errors = substitute(value, known)
    if "\0" in result:
        errors.append("expected a value without NUL characters")
    return result, errors


def _unescape(match: re.Match[str]) -> str:
    escape = match[0][1:]
    return chr(int(escape[1:], 8)) if escape.startswith("0") else _ESCAPES[escape]


def read_env_file(path: Path, lookup: Lookup) -> tuple[dict[str, str], list[SpecError]]:
    """The variables of the env file at `path` and its problems, each naming the file, its line
    and the variable. A missing file is a problem on line 0 (callers that allow it look first)."""
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, [SpecError(path, 0, "", "env file does not exist")]
    except OSError as error:
        return {}, [SpecError(path, 0, "", f"cannot read the env file: {error.strerror}")]
    except UnicodeDecodeError as error:
        return {}, [SpecError(path, 0, "", f"expected UTF-8 text, got byte 0x{error.object[error.start]:02x}")]
    values, problems = parse_env_file(source, lookup)
    return values, [SpecError(path, line, key, message) for line, key, message in problems]


_ENV_FILE_KEYS = {
    "path": Key(text, Required("the env file's path, relative to the spec folder or absolute")),
    "required": Key(checked(lambda v: isinstance(v, bool), "true or false"), True),
}


def _env_file(node: Node, folder: Path) -> EnvFile:
    if isinstance(node, ScalarNode):
        given, required = text(node, folder), True
    else:
        values, problems = read_keys(node, _ENV_FILE_KEYS, folder, "a path or a mapping with path and required")
        if problems:
            raise Invalid(*problems)
        given, required = values["path"], values.get("required", True)
    if not given:
        raise fail(node, "expected the env file's path, got an empty string")
    return EnvFile(Path(os.path.normpath(folder / given)), required, line_of(node))


env_file_key = list_of(_env_file, "a path, or a list of paths and {path, required} mappings", single=True)


def resolve_environment(document: Node, file: Path, variables: Mapping[str, str], interpolation: Interpolation, distrusted: Distrusted) -> list[SpecError]:
    """A service document's `environment` made whole in place (see the module's docstring);
    the problems of its env files. Any other document, or a malformed `env_file`, is left as it
    is (the key tables tell what is wrong with it)."""
    if not isinstance(document, MappingNode):
        return []
    entries = {str(key.value): (key, value) for key, value in reversed(document.value)}  # the first of a key counts
    kind = entries.get("kind")
    if kind is None or not isinstance(kind[1], ScalarNode) or kind[1].value != "service":
        return []
    environment = entries["environment"][1] if "environment" in entries else None
    if environment is not None:
        _pass_through(environment, variables)
    if "env_file" not in entries or any(id(node) in interpolation.failed for node in _below(entries["env_file"][1])):
        return []
    listed = entries["env_file"][1]
    try:
        references = env_file_key(listed, file.parent)
    except Invalid:
        return []
    own = _own(environment, file.parent)
    merged: dict[str, tuple[str, Node]] = {}  # variable -> value, and the env_file entry it came from
    errors: list[SpecError] = []
    for index, reference in enumerate(references):
        node = listed if isinstance(listed, ScalarNode) else listed.value[index]
        if not reference.path.is_file() and not reference.path.exists():
            if reference.required:
                key = "env_file" if node is listed else f"env_file[{index}]"
                hint = "; write {path: ..., required: false} if it may be missing"
                errors.append(SpecError(file, reference.line, key, f"env file {reference.path} does not exist{hint}"))
            continue
        if (refused := distrusted(reference.path, "this env file")) is not None:
            errors.append(refused)
            continue
        earlier = {name: value for name, (value, _) in merged.items()}
        values, problems = read_env_file(reference.path, lambda name: _first(name, variables, own, earlier))
        errors += problems
        merged.update((name, (value, node)) for name, value in values.items())
    if not errors:
        _prepend(document, environment, {name: found for name, found in merged.items() if name not in own}, listed)
    return errors


def _first(name: str, *mappings: Mapping[str, str]) -> str | None:
    return next((mapping[name] for mapping in mappings if name in mapping), None)


def _below(node: Node) -> list[Node]:
    """`node` and every node inside it."""
    if isinstance(node, MappingNode):
        return [node, *(below for _, value in node.value for below in _below(value))]
    if isinstance(node, SequenceNode):
        return [node, *(below for item in node.value for below in _below(item))]
    return [node]


def _string(value: str, near: Node) -> ScalarNode:
    """A string node made here, at the place of `near` (so that a problem of it names that line)."""
    return ScalarNode(STR_TAG, value, near.start_mark, near.end_mark, style="'")


def _pass_through(environment: Node, variables: Mapping[str, str]) -> None:
    """`KEY:` (null) and `- KEY` take the value of KEY among the interpolation variables, or are
    left out when it has none (compose's "resolve")."""
    if isinstance(environment, MappingNode):
        kept = []
        for key, value in environment.value:
            if isinstance(value, ScalarNode) and value.tag == _NULL_TAG:
                if str(key.value) in variables:
                    kept.append((key, _string(variables[str(key.value)], value)))
                continue
            kept.append((key, value))
        environment.value = kept
    elif isinstance(environment, SequenceNode):
        items = []
        for item in environment.value:
            name = item.value if isinstance(item, ScalarNode) and item.tag == STR_TAG and "=" not in item.value else None
            if name is None:
                items.append(item)
            elif name in variables:
                items.append(_string(f"{name}={variables[name]}", item))
        environment.value = items


def _own(environment: Node | None, folder: Path) -> dict[str, str]:
    """The variables `environment` sets itself ({} if it has problems: the key table tells them)."""
    try:
        return dict(parse_environment(environment, folder)) if environment is not None else {}
    except Invalid:
        return {}


def _prepend(document: MappingNode, environment: Node | None, found: dict[str, tuple[str, Node]], listed: Node) -> None:
    """Put the env files' variables in `environment` before its own (or make it, if absent)."""
    if environment is None:
        pairs = [(_string(name, near), _string(value, near)) for name, (value, near) in found.items()]
        document.value.append((_string("environment", listed), MappingNode("tag:yaml.org,2002:map", pairs, listed.start_mark, listed.end_mark)))
    elif isinstance(environment, MappingNode):
        environment.value[:0] = [(_string(name, near), _string(value, near)) for name, (value, near) in found.items()]
    elif isinstance(environment, SequenceNode):
        environment.value[:0] = [_string(f"{name}={value}", near) for name, (value, near) in found.items()]
