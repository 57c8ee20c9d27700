"""Nothing is dropped silently by `sandboxd export`: every key the spec model knows has a decision
in both engines, for every unit, and the keys an engine cannot express are reported with file,
line and key (in the decisions, on stderr, and in `export --json`).

A key added to spec/keys.py without a mapping fails `test_every_key_has_a_decision...`: the
export reports it as "no mapping yet" (never dropping it), and this test refuses that.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxd.cli.main import main
from sandboxd.export.decisions import NO_MAPPING, UNIT_KEY, Decision, expected_keys
from sandboxd.export.kubernetes import export_kubernetes
from sandboxd.export.systemd import export_systemd
from sandboxd.spec.keys import KINDS
from sandboxd.spec.model import Limits, Network, Service, Socket, Stack, Volume

from .export_stacks import RICH, SMALL
from .spec_snippets import WriteSpecs


def write_files(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def rich_folder(folder: Path, write_specs: WriteSpecs | Callable[[Path, dict[str, str]], Path], image: str) -> Path:
    (folder / "app").mkdir(parents=True, exist_ok=True)
    (folder / "api.env").write_text("FROM_FILE=1\n")
    return write_specs(folder, {"stack.yaml": RICH.replace("IMAGE", image)})


def both(stack_k8s: Stack, stack_systemd: Stack) -> list[Decision]:
    return export_kubernetes(stack_k8s).decisions + export_systemd(stack_systemd)[1]


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> list[Decision]:
    """Both engines' decisions on the rich stack (a registry image for Kubernetes, host for systemd)."""
    from sandboxd.spec.load import load_stack

    tmp_path = tmp_path_factory.mktemp("rich")
    write_specs = write_files
    kube = load_stack(rich_folder(tmp_path / "rich", write_specs, "registry.example/app:1"))
    host = load_stack(rich_folder(tmp_path / "rich-host", write_specs, "host"))
    return both(kube, host)


def test_the_rich_stack_gives_every_key_of_every_kind(tmp_path: Path, write_specs: WriteSpecs) -> None:
    from sandboxd.export.lines import key_lines
    from sandboxd.spec.load import load_stack

    stack = load_stack(rich_folder(tmp_path / "rich", write_specs, "registry.example/app:1"))
    given: dict[str, set[str]] = {kind: set() for kind in KINDS}
    units: list[Service | Socket | Network | Volume] = [*stack.services, *stack.sockets, *stack.networks, *stack.volumes]
    for unit in units:
        kind = type(unit).__name__.lower()
        given[kind] |= set(key_lines(unit.file, unit.line))
    for kind, (_cls, keys) in KINDS.items():
        assert set(keys) <= given[kind], f"the rich stack misses {kind} keys {sorted(set(keys) - given[kind])}"
    limits = {key.split(".")[1] for s in stack.services for key in key_lines(s.file, s.line) if key.startswith("limits.")}
    assert limits == set(Limits().__dataclass_fields__)


@pytest.mark.parametrize("engine", ["kubernetes", "systemd"])
def test_every_key_has_a_decision_for_every_unit_of_the_rich_stack(rich: list[Decision], engine: str) -> None:
    decisions = [d for d in rich if d.engine == engine]
    assert not [str(d) for d in decisions if d.why == NO_MAPPING]
    by_unit: dict[tuple[str, str], set[str]] = {}
    for d in decisions:
        by_unit.setdefault((d.kind, d.unit), set()).add(d.key)
    assert {kind for kind, _ in by_unit} == set(KINDS)
    for (kind, unit), keys in by_unit.items():
        assert set(expected_keys(kind)) <= keys, (unit, sorted(set(expected_keys(kind)) - keys))
    limits = {d.key for d in decisions if d.key.startswith("limits.")}
    assert limits == {f"limits.{name}" for name in Limits().__dataclass_fields__}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_key_has_a_decision_in_each_small_stack(tmp_path: Path, write_specs: WriteSpecs, name: str) -> None:
    from sandboxd.spec.load import load_stack

    kube = load_stack(write_specs(tmp_path / "k", SMALL[name].replace("IMAGE", "registry.example/app:1")))
    host = load_stack(write_specs(tmp_path / "h", SMALL[name].replace("IMAGE", "host")))
    decisions = both(kube, host)
    assert not [str(d) for d in decisions if d.why == NO_MAPPING]
    units = {(d.engine, d.kind, d.unit) for d in decisions}
    every = (("service", kube.services), ("socket", kube.sockets), ("network", kube.networks), ("volume", kube.volumes))
    assert units == {(engine, kind, u.name) for engine in ("kubernetes", "systemd") for kind, of_kind in every for u in of_kind}  # no unit left out
    for engine, kind, unit in units:
        keys = {d.key for d in decisions if (d.engine, d.kind, d.unit) == (engine, kind, unit)}
        assert set(expected_keys(kind)) <= keys


def test_a_key_without_a_mapping_is_reported_not_dropped(tmp_path: Path, write_specs: WriteSpecs, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxd.spec import keys as spec_keys
    from sandboxd.spec.load import load_stack

    stack = load_stack(write_specs(tmp_path, SMALL["accept mode"].replace("IMAGE", "host")))
    table = dict(spec_keys.KINDS["socket"][1])
    table["future_key"] = table["backlog"]
    monkeypatch.setitem(spec_keys.KINDS, "socket", (spec_keys.KINDS["socket"][0], table))
    found = [d for d in export_systemd(stack)[1] if d.key == "future_key"]
    assert [(d.status, d.why, d.line) for d in found] == [("not expressible", NO_MAPPING, stack.sockets[0].line)]


# Each unmappable key of the rich stack, per engine: reported as not expressible, at its own line.
UNMAPPABLE = {
    "kubernetes": [("service", "api", k) for k in ("restart_delay", "restart_steps", "restart_max_delay", "start_limit", "stop_signal", "reload_signal",
                                                    "ready", "start_timeout", "watchdog", "notify_access", "fdstore_max", "limits.memory_high",
                                                    "limits.swap", "limits.pids", "limits.cpu_weight", "limits.io_weight")]
    + [("service", "cache", "start"), ("service", "cache", "idle_stop"), ("service", "migrate", "reload"), ("network", "back", "subnet")],
    "systemd": [("service", "api", "restart_steps"), ("service", "api", "restart_max_delay"), ("service", "api", "network"),
                ("service", "cache", "idle_stop"), ("network", "back", "subnet"), ("network", "back", "internal")],
}  # fmt: skip


@pytest.mark.parametrize(("engine", "kind", "unit", "key"), [(e, *t) for e, items in UNMAPPABLE.items() for t in items])
def test_an_unmappable_key_is_reported_with_its_line(rich: list[Decision], engine: str, kind: str, unit: str, key: str) -> None:
    [decision] = [d for d in rich if (d.engine, d.kind, d.unit, d.key) == (engine, kind, unit, key)]
    assert decision.status == "not expressible"
    assert decision.given and decision.why
    text = decision.file.read_text().splitlines()
    written = text[decision.line - 1]
    assert written.split(":")[0].strip(" -") == key.split(".")[0], written


def test_accept_and_on_demand_are_reported_for_kubernetes(rich: list[Decision]) -> None:
    found = {(d.unit, d.key): d.status for d in rich if d.engine == "kubernetes"}
    assert found[("echo", "accept")] == "approximated"
    assert found[("cache", "start")] == "not expressible"


def test_a_volume_has_a_decision_of_its_own(rich: list[Decision]) -> None:
    found = {d.engine: d for d in rich if d.kind == "volume"}
    assert found["kubernetes"].key == found["systemd"].key == UNIT_KEY
    assert found["kubernetes"].to == "PersistentVolumeClaim"


def test_export_json_lists_both_engines_decisions(tmp_path: Path, write_specs: WriteSpecs, capsys: pytest.CaptureFixture[str]) -> None:
    folder = rich_folder(tmp_path / "rich", write_specs, "host")
    assert main(["export", "--json", str(folder)]) == 0
    decisions = json.loads(capsys.readouterr().out)["decisions"]
    assert {d["engine"] for d in decisions} == {"kubernetes", "systemd"}
    refused = [d for d in decisions if d["engine"] == "kubernetes"]
    assert refused and all(d["key"] == "image" and d["status"] == "not expressible" for d in refused)  # image: host
    systemd = [d for d in decisions if d["engine"] == "systemd" and d["unit"] == "api" and d["key"] == "limits.memory"]
    assert systemd == [{"engine": "systemd", "kind": "service", "unit": "api", "key": "limits.memory", "file": str(folder / "stack.yaml"),
                        "line": 30, "given": True, "status": "mapped", "to": "MemoryMax=", "why": ""}]  # fmt: skip


def test_not_expressible_keys_are_listed_on_stderr(tmp_path: Path, write_specs: WriteSpecs, capsys: pytest.CaptureFixture[str]) -> None:
    folder = rich_folder(tmp_path / "rich", write_specs, "host")
    assert main(["export", "systemd", str(folder), str(tmp_path / "units")]) == 0
    err = capsys.readouterr().err
    assert f"{folder / 'stack.yaml'}:58: service cache: idle_stop: not expressible" in err
