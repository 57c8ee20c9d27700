"""`${VAR}` in spec values, as docker compose interpolates its YAML file.

The forms (compose's, from its `template` package):

    $VAR  ${VAR}      the value of VAR; VAR unset is an error (compose warns and puts "")
    ${VAR:-default}   default if VAR is unset or empty      ${VAR-default}  only if unset
    ${VAR:?message}   an error with message if unset or empty  ${VAR?message}  only if unset
    ${VAR:+alt}       alt if VAR is set and not empty, else ""  ${VAR+alt}  alt if set
    $$                a literal $; a $ before anything else (`$1`, `$ `) stays as it is

A default, message or alt may hold variables itself; it is interpolated only when it is used.
Variable names are letters, digits and `_`, not starting with a digit.

`interpolate` walks a YAML document's nodes before any key is read and rewrites the value of
every string scalar in place, keeping its node (and so its line). Mapping keys are not
interpolated, as compose does not. A plain (unquoted) scalar is read again as YAML would read
the text it became, as a boolean or a number if it looks like one: `backlog: ${BACKLOG}` is
checked as the number it names, as if it had been written there; quoted, it stays a string.
A scalar that could not be interpolated keeps its text; its problems are the only ones told for
that node (`Interpolation.others` drops what parsing its uninterpolated text found).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from sandboxd.spec.nodes import STR_TAG, Problem

Lookup = Callable[[str], str | None]

_RETYPED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
_BRACED = re.compile(r"([_A-Za-z][_A-Za-z0-9]*)(?:(:?[-+?])(.*))?", re.DOTALL)
_FORMS = "${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}, ${NAME:+alt} or ${NAME+alt}"
_RESOLVER = Resolver()


def substitute(text: str, lookup: Lookup) -> tuple[str, list[str]]:
    """`text` with its variables replaced, and a message for each that could not be (an unset
    variable without a default, a `:?`/`?` whose variable is missing, a malformed `${`)."""
    out: list[str] = []
    errors: list[str] = []
    start = 0
    while (dollar := text.find("$", start)) != -1:
        out.append(text[start:dollar])
        after = text[dollar + 1 : dollar + 2]
        if after == "$":
            out.append("$")
            start = dollar + 2
        elif after == "{":
            end = _closing_brace(text, dollar + 1)
            if end < 0:
                errors.append(f"'${{' without its closing '}}' in {text!r}; write $$ for a literal $")
                out.append(text[dollar:])
                start = len(text)
                continue
            out.append(_braced(text[dollar + 2 : end], lookup, errors))
            start = end + 1
        elif name := _NAME.match(text, dollar + 1):
            out.append(_value(name[0], lookup, errors))
            start = name.end()
        else:
            out.append("$")
            start = dollar + 1
    out.append(text[start:])
    return "".join(out), errors


def _closing_brace(text: str, opening: int) -> int:
    """The index of the `}` that closes the `{` at `opening` (braces nest), or -1."""
    depth = 0
    for index in range(opening, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    return -1


def _value(name: str, lookup: Lookup, errors: list[str]) -> str:
    value = lookup(name)
    if value is None:
        errors.append(
            f"variable {name} is not set: set it in the environment or in the spec folder's .env, "
            f"or give a default with ${{{name}:-default}} (write $$ for a literal $)"
        )
        return ""
    return value


def _braced(inside: str, lookup: Lookup, errors: list[str]) -> str:
    """The value of `${inside}`."""
    match = _BRACED.fullmatch(inside)
    if match is None:
        errors.append(f"invalid interpolation '${{{inside}}}': expected {_FORMS}; write $$ for a literal $")
        return ""
    name, operator, word = match[1], match[2], match[3] or ""
    if operator is None:
        return _value(name, lookup, errors)
    value = lookup(name)
    missing = value is None or (operator.startswith(":") and value == "")
    if operator.endswith("-"):
        return _nested(word, lookup, errors) if missing else str(value)
    if operator.endswith("+"):
        return "" if missing else _nested(word, lookup, errors)
    if missing:  # ? and :?
        reason = _nested(word, lookup, errors)
        errors.append(f"required variable {name} is missing a value" + (f": {reason}" if reason else ""))
        return ""
    return str(value)


def _nested(word: str, lookup: Lookup, errors: list[str]) -> str:
    value, more = substitute(word, lookup)
    errors += more
    return value


@dataclass
class Interpolation:
    """What interpolating one file's documents found: its problems, and the nodes they are of."""

    problems: list[Problem] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)  # id() of the scalars that kept their text

    def others(self, problems: list[Problem]) -> list[Problem]:
        """`problems` but those of a node whose interpolation failed (told already)."""
        return [problem for problem in problems if id(problem[0]) not in self.failed]


def interpolate(documents: list[Node], variables: Mapping[str, str]) -> Interpolation:
    """Interpolate every string value of `documents` in place from `variables`."""
    found = Interpolation()
    seen: set[int] = set()  # an alias is the node of its anchor: interpolated once
    for document in documents:
        _walk(document, "", variables, found, seen)
    return found


def _walk(node: Node, path: str, variables: Mapping[str, str], found: Interpolation, seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, ScalarNode):
        if node.tag == STR_TAG and "$" in node.value:
            value, errors = substitute(node.value, variables.get)
            if errors:
                found.problems += [(node, path, error) for error in errors]
                found.failed.add(id(node))
                return
            node.value = value
            # A plain scalar: style None from the pure-Python parser, "" from libyaml.
            if not node.style and (tag := _RESOLVER.resolve(ScalarNode, value, (True, False))) in _RETYPED:  # type: ignore[no-untyped-call]
                node.tag = tag
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            _walk(value, f"{path}.{key.value}", variables, found, seen)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}[{index}]", variables, found, seen)
