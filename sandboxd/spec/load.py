"""Read a spec folder into a `Stack`, or report every problem of it at once.

`load_stack` returns a `Stack`, or raises `SpecErrors` with every problem of the folder at once,
each naming file, line and key. In order:

    the folder      its *.yaml / *.yml files; the folder and each file must be changeable by root
                    alone (trust.py), or what they say does not count
    each file       its YAML documents, read as nodes (nodes.py), so a problem can name its line; a
                    file none of whose documents looks like a unit (`kind`, a typo of it, `command`
                    or `listen`) is not a unit file and is skipped (an app's config kept beside);
                    `${VAR}` in their values interpolated (interpolate.py) from the environment
                    and the folder's `.env`, a service's `env_file:` read into its environment
                    (envfile.py)
    each document   one unit: its `kind` picks the key table (keys.py); `name` defaults to the
                    file's stem when the file holds one unit of that kind; a service's
                    `listen:` adds the socket unit it implies (implied.py)
    all units       the checks between units (checks.py): names, addresses, `uses`, networks ...

Reading the files (spec files, `.env` and env files), checking who may change them, and opening mount sources to see what they name
(sources.py) is the only I/O done while a spec is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.spec.checks import Found, check_units
from sandboxd.spec.envfile import read_env_file, resolve_environment
from sandboxd.spec.implied import implied_found
from sandboxd.spec.interpolate import interpolate
from sandboxd.spec.keys import KINDS, unit_name
from sandboxd.spec.model import NAME, Network, Service, Socket, Stack, Volume
from sandboxd.spec.nodes import Invalid, Key, Problem, Required, fail, line_of, read_keys, value_of, with_defaults
from sandboxd.spec.trust import untrusted
from sandboxd.spec.values import describe


def load_stack(folder: Path, variables: Mapping[str, str] | None = None) -> Stack:
    """Read every spec file of `folder`; raise SpecErrors with all problems found, or return the
    stack. `${VAR}` in its values takes `variables` (default: `interpolation_variables(folder)`)."""
    root = Path(folder).resolve()
    errors: list[SpecError] = []
    found: list[Found] = []
    files = _spec_files(root)
    if (distrusted := _distrusted(root, "this spec folder")) is not None:
        raise SpecErrors([distrusted])  # what its files say does not count
    variables = interpolation_variables(root) if variables is None else variables
    for file in files:
        if (distrusted := _distrusted(file, "this spec file", checked=root)) is not None:
            errors.append(distrusted)
            continue
        errors += _load_file(file, found, variables)
    errors += check_units(found)
    if not found and not errors:
        errors.append(SpecError(root, 0, "", "no units in this folder: no YAML file in it holds a unit (a document with kind:)"))
    if errors:
        raise SpecErrors(errors)
    units = sorted((f.unit for f in found if f.unit is not None), key=lambda unit: unit.name)
    services = tuple(unit for unit in units if isinstance(unit, Service))
    sockets = tuple(unit for unit in units if isinstance(unit, Socket))
    networks = tuple(unit for unit in units if isinstance(unit, Network))
    return Stack(root, root.name, services, sockets, networks, tuple(unit for unit in units if isinstance(unit, Volume)))


def _distrusted(path: Path, what: str, checked: Path | None = None) -> SpecError | None:
    """A spec folder says what runs as root with which host paths: only root may be able to
    change it, or its files, or a folder above them (trust.py). `checked`: the spec folder,
    trusted already, where the walk up from a file may stop."""
    # A file is checked with its folder (strict=2): a sticky spec folder is no better than any other.
    try:
        found = untrusted(path, strict=1 if path.is_dir() else 2, checked=checked)
    except OSError as e:
        return SpecError(path, 0, "", f"cannot check who may change {what}: {e.strerror}")
    if found is None:
        return None
    return SpecError(
        path,
        0,
        "",
        f"refusing {what}: {found.path} is {found.why}, so someone besides root could change what sandboxd runs as root; "
        f"make it root's and writable by root alone: {found.fix}",
    )


def _spec_files(folder: Path) -> list[Path]:
    """The spec files of `folder` by name; raises SpecErrors if it has none or cannot be read."""
    try:
        paths = sorted(folder.iterdir())
    except FileNotFoundError:
        message = "spec folder does not exist"
    except OSError as error:
        message = f"cannot read the spec folder: {error.strerror}"
    else:
        if files := [p for p in paths if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()]:
            return files
        message = "no spec files (*.yaml, *.yml) in this folder"
    raise SpecErrors([SpecError(folder, 0, "", message)])


def interpolation_variables(folder: Path, env_files: Sequence[Path] = ()) -> dict[str, str]:
    """The variables `${VAR}` in a spec folder's files may use, as compose has them: this
    process's environment, over those of the folder's `.env` (or of `env_files` instead, the
    later one winning: `--env-file`). Raises SpecErrors for a problem of one of those files."""
    environ = dict(os.environ)
    dotenv = Path(folder).resolve() / ".env"
    values: dict[str, str] = {}
    errors: list[SpecError] = []
    for path in env_files or ([dotenv] if dotenv.is_file() else []):
        if not path.exists():
            errors.append(SpecError(path, 0, "", "env file does not exist"))
            continue
        if (distrusted := _distrusted(path, "this env file")) is not None:
            errors.append(distrusted)
            continue
        found, problems = read_env_file(path, lambda name: environ.get(name, values.get(name)))
        values.update(found)
        errors += problems
    if errors:
        raise SpecErrors(errors)
    return {**values, **environ}


def _load_file(file: Path, found: list[Found], variables: Mapping[str, str]) -> list[SpecError]:
    """Append the units of `file` to `found`; return its problems."""
    try:
        documents = _compose(file.read_text(encoding="utf-8"))
    except OSError as error:
        return [SpecError(file, 0, "", f"cannot read the file: {error.strerror}")]
    except UnicodeDecodeError as error:
        return [SpecError(file, 0, "", f"expected UTF-8 text, got byte 0x{error.object[error.start]:02x}")]
    except yaml.MarkedYAMLError as error:
        mark, context = error.problem_mark or error.context_mark, f" ({error.context})" if error.context else ""
        return [SpecError(file, mark.line + 1 if mark else 0, "", f"invalid YAML: {error.problem or error}{context}")]
    except yaml.YAMLError as error:
        return [SpecError(file, 0, "", f"invalid YAML: {str(error).splitlines()[0]}")]
    documents = [node for node in documents if node.tag != "tag:yaml.org,2002:null"]
    if not any(_looks_like_a_unit(node) for node in documents):
        return []  # another file kept beside the specs (an app's config.yaml): not a unit file
    interpolation = interpolate(documents, variables)
    errors = [error for node in documents for error in resolve_environment(node, file, variables, interpolation, _distrusted)]
    problems: list[Problem] = []
    kinds: list[str | None] = []
    for node in documents:
        try:
            kinds.append(_kind(node))
        except Invalid as invalid:
            problems += invalid.problems
            kinds.append(None)
    for node, kind in zip(documents, kinds):
        if kind is not None and isinstance(node, MappingNode):
            problems += _load_unit(node, kind, file, kinds.count(kind), found)
    problems = interpolation.problems + interpolation.others(problems)
    return errors + [SpecError(file, line_of(node), key.lstrip("."), message) for node, key, message in problems]


UNIT_KEYS = ("command", "listen")  # what a service and a socket cannot be without


def _looks_like_a_unit(node: Node) -> bool:
    """Whether a document is meant as a unit: a mapping with `kind`, with a key one typo away from
    it (`Kind`, `kidn`), or with `command` or `listen`; or a list of such (a unit written as a
    list item by mistake). A file none of whose documents is, is not a unit file and is left
    alone; in one that is, every document must be a unit."""
    if isinstance(node, SequenceNode):
        return any(_looks_like_a_unit(item) for item in node.value)
    if not isinstance(node, MappingNode):
        return False
    keys = [key.value for key, _ in node.value if isinstance(key.value, str)]
    if any(key in UNIT_KEYS or key.lower() == "kind" for key in keys):
        return True
    import difflib  # for a misspelt "kind" alone: not imported by a spec without a mistake

    return any(difflib.get_close_matches(key.lower(), ["kind"], cutoff=0.7) for key in keys)


# libyaml's parser, where PyYAML was built with it: the same nodes, 20 times faster than the
# pure-Python one. A file it finds fault with is read again by the pure-Python parser, so that
# what a user is told about invalid YAML stays word for word the same.
_FAST_LOADER: type[yaml.SafeLoader] | None = getattr(yaml, "CSafeLoader", None)


def _compose(text: str) -> list[Node]:
    """The YAML documents of `text`, as nodes (raises yaml.YAMLError as the pure-Python parser does)."""
    if _FAST_LOADER is not None:
        try:
            return list(yaml.compose_all(text, Loader=_FAST_LOADER))
        except yaml.YAMLError:
            pass
    return list(yaml.compose_all(text, Loader=yaml.SafeLoader))


def _kind(node: Node) -> str:
    """The kind a document names; raises Invalid if it is no mapping or names no known kind."""
    expected = "expected one of: service, socket, network, volume"
    if not isinstance(node, MappingNode):
        raise fail(node, f"expected a unit, a mapping with 'kind: service', 'kind: socket', 'kind: network' or 'kind: volume', got {describe(value_of(node))}")
    for key_node, value_node in node.value:
        if key_node.value == "kind":
            if isinstance(kind := value_of(value_node), str) and kind in KINDS:
                return kind
            raise Invalid((value_node, "kind", f"unknown kind {describe(kind)}; {expected}"))
    raise Invalid((node, "kind", f"missing key 'kind'; {expected}"))


def _load_unit(node: MappingNode, kind: str, file: Path, count: int, found: list[Found]) -> list[Problem]:
    """Read one document as a unit of `kind` (`count` of them are in its file), append what was
    found to `found` (the unit, None if it has problems, and the line of every key); return its problems."""
    cls, keys = KINDS[kind]
    default_name: object = file.stem
    if count > 1:
        default_name = Required(f"a name, since {file.name} holds more than one {kind}")
    elif not NAME.fullmatch(file.stem):
        default_name = Required(f"a name, since the file name '{file.stem}' is not a valid one")
    table = {"kind": Key(lambda node, folder: kind, kind), "name": Key(unit_name, default_name), **keys}
    values, problems = read_keys(node, table, file.parent, "a mapping")
    if kind == "service" and "command" not in values and values.get("image", "host") == "host" and "command" not in {str(k.value) for k, _ in node.value}:
        problems.append((node, ".command", "missing key 'command'; expected the program to run, as a list of strings or a string"))
    name = values.get("name", default_name)
    name = name if isinstance(name, str) else None
    unit = None
    if name is not None and not problems:
        unit = cls(name=name, file=file, line=line_of(node), **with_defaults(values, keys, name))
    lines = {"": line_of(node)}
    for key_node, value_node in node.value:
        lines.setdefault(str(key_node.value), line_of(value_node))
        for index, item in enumerate(value_node.value if isinstance(value_node, SequenceNode) else ()):
            lines.setdefault(f"{key_node.value}[{index}]", line_of(item))
    found.append(Found(kind, name, file, lines, unit))
    if isinstance(unit, Service) and unit.listen:
        found.append(implied_found(unit, lines))
    return problems

