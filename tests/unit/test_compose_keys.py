"""A compose user's keys in a service get a pointer to what sandboxd writes instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.spec.keys import KINDS
from sandboxd.spec.nodes import COMPOSE_KEYS

from .spec_snippets import Problems, WriteSpecs

SERVICE_KEYS = KINDS["service"][1]


@pytest.mark.parametrize(
    ("key", "value", "pointer"),
    [
        ("ports", '["8080:80"]', "listen: tcp:0.0.0.0:8080 (or a list)"),
        ("depends_on", "[db]", "after: [db]"),
        ("healthcheck", "{test: [CMD, true]}", "ready: {exec: [CMD, ARG]"),
        ("volumes", '["./data:/data"]', "mounts: [{source: ./data, target: /data}]"),
        ("entrypoint", "[app]", "command: the whole argv"),
        ("build", ".", "image: NAME with a definition in images/NAME/build"),
        ("container_name", "web", "name:"),
        ("env", "{A: b}", "environment:"),
    ],
)
def test_a_compose_key_points_to_the_sandboxd_key(tmp_path: Path, write_specs: WriteSpecs, problems: Problems, key: str, value: str, pointer: str) -> None:
    write_specs(tmp_path, {"web.yaml": f"kind: service\ncommand: [app]\n{key}: {value}\n"})
    (found,) = problems(tmp_path)
    assert found.startswith(f"web.yaml:3: {key}: unknown key '{key}'; this is docker compose's key; sandboxd's: ")
    assert pointer in found


def test_no_compose_key_is_a_sandboxd_key_and_each_pointer_names_one() -> None:
    assert not set(COMPOSE_KEYS) & set(SERVICE_KEYS)
    for key, pointer in COMPOSE_KEYS.items():
        named = pointer.split(":")[0].split()[-1] if not pointer.startswith("a socket unit") else "listen"
        assert named in SERVICE_KEYS or named in KINDS["socket"][1] or named == "name", (key, pointer)


def test_a_compose_key_outside_a_service_keeps_the_nearest_match(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    write_specs(tmp_path, {"app.yaml": "kind: service\ncommand: [app]\nmounts: [{source: ., target: /t, read_only: true}]\n"})
    assert problems(tmp_path) == ["app.yaml:3: mounts[0].read_only: unknown key 'read_only'; did you mean 'readonly'?"]
