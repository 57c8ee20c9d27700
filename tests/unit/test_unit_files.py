"""Which YAML files of a spec folder are units: a file none of whose documents looks like a unit
(an app's config.yaml kept beside the specs) is left alone; a misspelled or kind-less unit is not."""

from __future__ import annotations

from pathlib import Path

from sandboxd.spec.load import load_stack

from .spec_snippets import Problems, WriteSpecs

APP_CONFIG = """
database:
  host: db
  port: 5432
name: shop
image: shop:1
features: [search, "${NOT_INTERPOLATED}"]
"""
SERVICE = "kind: service\ncommand: [sleep, '600']\n"


def test_a_yaml_file_that_holds_no_unit_is_not_read_as_one(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path / "stack", {"app.yaml": SERVICE, "config.yaml": APP_CONFIG, "list.yml": "- a\n- b\n"})
    stack = load_stack(folder)
    assert [s.name for s in stack.services] == ["app"]


def test_a_document_with_a_typo_of_kind_is_still_an_error(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path / "stack", {"app.yaml": SERVICE, "web.yaml": "kidn: service\ncommand: [x]\n"})
    assert problems(folder) == ["web.yaml:1: kind: missing key 'kind'; expected one of: service, socket, network, volume"]


def test_a_service_without_kind_is_still_an_error(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path / "stack", {"app.yaml": SERVICE, "web.yaml": "command: [x]\n"})
    assert problems(folder) == ["web.yaml:1: kind: missing key 'kind'; expected one of: service, socket, network, volume"]


def test_in_a_unit_file_every_document_must_be_a_unit(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path / "stack", {"app.yaml": SERVICE + "---\nport: 80\n"})
    assert problems(folder) == ["app.yaml:4: kind: missing key 'kind'; expected one of: service, socket, network, volume"]


def test_a_folder_with_no_unit_at_all_says_so(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path / "stack", {"config.yaml": APP_CONFIG})
    assert problems(folder) == ["<folder>: no units in this folder: no YAML file in it holds a unit (a document with kind:)"]
