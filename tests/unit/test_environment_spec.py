"""Environment as compose has it: `${VAR}` interpolation, `.env`, `env_file:`, env files' syntax,
the precedence of it all, and a reload that sees a changed file."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.errors import SpecErrors
from sandboxd.spec.diff import diff
from sandboxd.spec.envfile import parse_env_file
from sandboxd.spec.interpolate import substitute
from sandboxd.spec.load import interpolation_variables, load_stack
from sandboxd.spec.model import EnvFile
from sandboxd.spec.overrides import with_environment
from .spec_snippets import SERVICE, Problems, WriteSpecs

VARIABLES = {"SET": "value", "EMPTY": "", "PORT": "8080"}


@pytest.fixture(autouse=True)
def _no_stray_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names these tests use are not in the environment the tests run in, unless a test sets them."""
    for name in ("SET", "EMPTY", "PORT", "UNSET", "NAME", "TAG", "BACKLOG", "DEBUG", "FROM_ENV", "ONLY_DOTENV", "BOTH"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("template", "result"),
    [
        ("$SET", "value"),
        ("${SET}", "value"),
        ("a${SET}b$SET.c", "avaluebvalue.c"),
        ("${UNSET:-default}", "default"),
        ("${EMPTY:-default}", "default"),
        ("${SET:-default}", "value"),
        ("${UNSET-default}", "default"),
        ("${EMPTY-default}", ""),
        ("${SET:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${UNSET:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
        ("${SET:?message}", "value"),
        ("${EMPTY?message}", ""),
        ("${UNSET:-${PORT}0}", "80800"),
        ("${UNSET:-{braced}}", "{braced}"),
        ("$$SET", "$SET"),
        ("$${SET}", "${SET}"),
        ("cost: 5$ or $1 or $", "cost: 5$ or $1 or $"),
        ("$$$SET", "$value"),
    ],
)
def test_every_form_of_interpolation_gives_what_compose_gives(template: str, result: str) -> None:
    assert substitute(template, VARIABLES.get) == (result, [])


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("$UNSET", "variable UNSET is not set: set it in the environment or in the spec folder's .env, or give a default with ${UNSET:-default} (write $$ for a literal $)"),
        ("${UNSET}", "variable UNSET is not set"),
        ("${UNSET:?say why}", "required variable UNSET is missing a value: say why"),
        ("${EMPTY:?need $SET}", "required variable EMPTY is missing a value: need value"),
        ("${UNSET?}", "required variable UNSET is missing a value"),
        ("${1X}", "invalid interpolation '${1X}'"),
        ("${SET:x}", "invalid interpolation '${SET:x}'"),
        ("${SET", "'${' without its closing '}'"),
    ],
)
def test_what_cannot_be_interpolated_is_said(template: str, message: str) -> None:
    value, errors = substitute(template, VARIABLES.get)
    assert len(errors) == 1 and errors[0].startswith(message)


def test_a_default_is_interpolated_only_when_used() -> None:
    assert substitute("${SET:-$UNSET}", VARIABLES.get) == ("value", [])


ENV_FILE = """\
# a comment, then a blank line

PLAIN=some value   # an inline comment
export EXPORTED=yes
COLON: style
SINGLE='$SET and \\n stay'
DOUBLE="tab\\there, \\"quoted\\", \\$SET, $SET"
MULTI="first
second"
EMPTY_VALUE=
HASH=a#b
EARLIER=${PLAIN}!
INHERITED
NOT_INHERITED
"""


def test_env_file_is_read_as_compose_reads_it() -> None:
    values, problems = parse_env_file(ENV_FILE, {"SET": "value", "INHERITED": "from outside"}.get)
    assert problems == []
    assert values == {
        "PLAIN": "some value",
        "EXPORTED": "yes",
        "COLON": "style",
        "SINGLE": "$SET and \\n stay",
        "DOUBLE": 'tab\there, "quoted", $SET, value',
        "MULTI": "first\nsecond",
        "EMPTY_VALUE": "",
        "HASH": "a#b",
        "EARLIER": "some value!",
        "INHERITED": "from outside",
    }


def test_env_file_problems_name_their_line_and_variable() -> None:
    source = 'GOOD=1\nBAD KEY=2\nNEEDS=${UNSET}\n\nQ="x" y\nW@=1\nOPEN="never\nclosed\n'
    values, problems = parse_env_file(source, {}.get)
    assert values == {"GOOD": "1"}
    assert [(line, key, message.split(":")[0]) for line, key, message in problems] == [
        (2, "BAD", "a variable name cannot contain a space; expected KEY=VALUE"),
        (3, "NEEDS", "variable UNSET is not set"),
        (5, "Q", "unexpected text after the closing quote"),
        (6, "W@", "unexpected character '@' in variable name 'W@'"),
        (7, "OPEN", 'unterminated quoted value "never'),
    ]


def test_values_anywhere_in_a_unit_are_interpolated_before_they_are_checked(tmp_path: Path, write_specs: WriteSpecs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("BACKLOG", "16")
    monkeypatch.setenv("NAME", "web")
    folder = write_specs(
        tmp_path,
        """\
        kind: service
        name: ${NAME}
        command: [serve, "--port=${PORT}", "$$HOME", "${TAG:-latest}"]
        ---
        kind: socket
        name: web
        listen: tcp:127.0.0.1:${PORT}
        backlog: ${BACKLOG}
        """,
    )
    stack = load_stack(folder)
    assert stack.service("web").command == ("serve", "--port=8080", "$HOME", "latest")
    assert (str(stack.sockets[0].listen[0]), stack.sockets[0].backlog) == ("tcp:127.0.0.1:8080", 16)


def test_a_quoted_variable_stays_a_string(tmp_path: Path, problems: Problems, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLOG", "16")
    spec = SERVICE + "---\nkind: socket\nservice: a\nlisten: unix:/run/a.sock\nbacklog: '${BACKLOG}'\n"
    assert problems(tmp_path, spec) == ["stack.yaml:8: backlog: expected a backlog from 1 to 65535, got '16'"]


def test_unset_variable_is_an_error_with_line_and_key_and_told_once(tmp_path: Path, problems: Problems) -> None:
    spec = SERVICE + "---\nkind: socket\nservice: a\nlisten: tcp:127.0.0.1:${PORT}\nbacklog: ${UNSET:?give a backlog}\n"
    assert problems(tmp_path, spec) == [
        "stack.yaml:7: listen: variable PORT is not set: set it in the environment or in the spec folder's .env, "
        "or give a default with ${PORT:-default} (write $$ for a literal $)",
        "stack.yaml:8: backlog: required variable UNSET is missing a value: give a backlog",
    ]


def test_unset_variable_deep_in_a_unit_names_its_key_path(tmp_path: Path, problems: Problems) -> None:
    spec = SERVICE + "environment: {A: '${UNSET}'}\nmounts:\n  - {source: /etc/hostname, target: /x/$UNSET}\n"
    assert [p.split(": variable")[0] for p in problems(tmp_path, spec)] == [
        "stack.yaml:4: environment.A",
        "stack.yaml:6: mounts[0].target",
    ]


def test_dotenv_gives_variables_and_the_environment_wins(tmp_path: Path, write_specs: WriteSpecs, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_specs(tmp_path, SERVICE + "environment: {A: '${ONLY_DOTENV}', B: '${BOTH}', C: '${FROM_ENV}'}\n")
    (folder / ".env").write_text("ONLY_DOTENV=dotenv\nBOTH=dotenv\n")
    monkeypatch.setenv("BOTH", "environment")
    monkeypatch.setenv("FROM_ENV", "environment")
    service = load_stack(folder).service("a")
    assert service.environment == (("A", "dotenv"), ("B", "environment"), ("C", "environment"))
    assert ("ONLY_DOTENV", "dotenv") not in service.environment  # .env is for interpolation, not the services


def test_env_file_option_replaces_dotenv_and_the_later_file_wins(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path / "stack", SERVICE + "environment: {A: '${ONLY_DOTENV:-none}', B: '${BOTH}'}\n")
    (folder / ".env").write_text("ONLY_DOTENV=dotenv\nBOTH=dotenv\n")
    (tmp_path / "one.env").write_text("BOTH=one\n")
    (tmp_path / "two.env").write_text("BOTH=two-after-${BOTH}\n")
    variables = interpolation_variables(folder, [tmp_path / "one.env", tmp_path / "two.env"])
    assert load_stack(folder, variables).service("a").environment == (("A", "none"), ("B", "two-after-one"))


def test_problems_of_dotenv_name_its_line_and_variable(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path, SERVICE)
    (folder / ".env").write_text("OK=1\nLATER=${NOWHERE}\n")
    with pytest.raises(SpecErrors) as raised:
        load_stack(folder)
    assert raised.value.exit_code == 2
    assert [(e.file.name, e.line, e.key) for e in raised.value.errors] == [(".env", 2, "LATER")]
    with pytest.raises(SpecErrors) as missing:
        interpolation_variables(folder, [tmp_path / "absent.env"])
    assert str(missing.value) == f"{tmp_path / 'absent.env'}: env file does not exist"


def test_environment_wins_over_env_files_and_the_later_file_over_the_earlier(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path, SERVICE + "env_file: [base.env, {path: local.env, required: true}, {path: absent.env, required: false}]\nenvironment: {A: spec}\n")
    (folder / "base.env").write_text("A=base\nB=base\nC=base\n")
    (folder / "local.env").write_text("B=local\nD=${C}-${A}\n")
    service = load_stack(folder).service("a")
    # an env file's ${...} looks at the variables, then the service's environment, then earlier files
    assert dict(service.environment) == {"A": "spec", "B": "local", "C": "base", "D": "base-spec"}
    assert service.environment[-1] == ("A", "spec")  # environment's own come last, in their order
    assert service.env_file == (
        EnvFile(folder / "base.env", True, 4),
        EnvFile(folder / "local.env", True, 4),
        EnvFile(folder / "absent.env", False, 4),
    )
    assert dict(with_environment(load_stack(folder), ["a:A=cli"]).service("a").environment)["A"] == "cli"


def test_env_file_may_be_one_path(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path, SERVICE + "env_file: app.env\n")
    (folder / "app.env").write_text("A=1\n")
    assert load_stack(folder).service("a").environment == (("A", "1"),)


def test_missing_env_file_is_an_error_with_file_line_and_key(tmp_path: Path, problems: Problems, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path, SERVICE + "env_file: [present.env, absent.env]\n")
    (folder / "present.env").write_text("A=${UNSET}\n")
    assert problems(folder) == [
        "present.env:1: A: variable UNSET is not set: set it in the environment or in the spec folder's .env, "
        "or give a default with ${UNSET:-default} (write $$ for a literal $)",
        f"stack.yaml:4: env_file[1]: env file {folder.resolve() / 'absent.env'} does not exist; "
        "write {path: ..., required: false} if it may be missing".replace(str(folder.resolve()), "<folder>"),
    ]


def test_malformed_env_file_key_is_reported_by_the_key_table(tmp_path: Path, problems: Problems) -> None:
    assert problems(tmp_path, SERVICE + "env_file: [{path: a.env, requried: false}]\n") == [
        "stack.yaml:4: env_file[0].requried: unknown key 'requried'; did you mean 'required'?"
    ]


def test_numbers_and_booleans_in_environment_become_strings_as_compose_writes_them(tmp_path: Path, write_specs: WriteSpecs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEBUG", "True")
    spec = SERVICE + "environment: {DEBUG: true, OFF: False, YES: yes, PORT: 8000, RATIO: 1.10, FROM_VAR: $DEBUG}\n"
    service = load_stack(write_specs(tmp_path, spec)).service("a")
    assert service.environment == (("DEBUG", "true"), ("OFF", "false"), ("YES", "yes"), ("PORT", "8000"), ("RATIO", "1.10"), ("FROM_VAR", "true"))


def test_environment_may_be_a_list_and_a_variable_without_value_takes_the_callers(tmp_path: Path, write_specs: WriteSpecs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_ENV", "outside")
    folder = write_specs(tmp_path, SERVICE + "environment: [A=1, B=x=y, C=, FROM_ENV, UNSET, ONLY_DOTENV]\n")
    (folder / ".env").write_text("ONLY_DOTENV=dotenv\n")
    assert load_stack(folder).service("a").environment == (("A", "1"), ("B", "x=y"), ("C", ""), ("FROM_ENV", "outside"), ("ONLY_DOTENV", "dotenv"))
    write_specs(folder, SERVICE + "environment: {FROM_ENV: , UNSET: ~, A: ''}\n")
    assert load_stack(folder).service("a").environment == (("FROM_ENV", "outside"), ("A", ""))


def test_list_environment_problems_name_their_item(tmp_path: Path, problems: Problems) -> None:
    assert problems(tmp_path, SERVICE + "environment: [A=1, {B: 2}, A=3]\n") == [
        "stack.yaml:4: environment[1]: expected KEY=VALUE, got a mapping",
        "stack.yaml:4: environment[2]: duplicate variable 'A' (also at line 4)",
    ]


def test_a_changed_dotenv_or_env_file_changes_the_services_that_use_them(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path, {"a.yaml": "kind: service\nname: a\ncommand: ['${TAG}']\n", "b.yaml": SERVICE.replace("name: a", "name: b") + "env_file: b.env\n", "c.yaml": SERVICE.replace("name: a", "name: c")})
    (folder / ".env").write_text("TAG=1\n")
    (folder / "b.env").write_text("B=1\n")
    before = load_stack(folder)
    (folder / ".env").write_text("TAG=2\n")
    assert diff(before, load_stack(folder)).changed == ["a"]
    (folder / "b.env").write_text("B=2\n")
    assert diff(before, load_stack(folder)).changed == ["a", "b"]


def test_an_env_file_others_may_change_is_refused(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path, SERVICE + "env_file: app.env\n")
    (folder / "app.env").write_text("A=1\n")
    (folder / "app.env").chmod(0o666)
    (folder / ".env").write_text("B=1\n")
    (folder / ".env").chmod(0o666)
    with pytest.raises(SpecErrors) as raised:
        load_stack(folder)
    assert "refusing this env file" in str(raised.value) and ".env" in str(raised.value)
    (folder / ".env").chmod(0o644)
    assert [p.split(": refusing")[0] for p in problems(folder)] == ["app.env"]


def test_an_aliased_value_is_interpolated_once(tmp_path: Path, write_specs: WriteSpecs) -> None:
    spec = "kind: service\nname: a\ncommand: [&word 'cost $$$$1', *word]\nenvironment: [DOLLAR=$$, 'RAW=$$$$']\n"
    service = load_stack(write_specs(tmp_path, spec)).service("a")
    assert service.command == ("cost $$1", "cost $$1")
    assert service.environment == (("DOLLAR", "$"), ("RAW", "$$"))
