"""reload: what changed between two specs of one stack."""

from __future__ import annotations

import textwrap
from pathlib import Path

from sandboxd.spec.diff import diff, refusal
from sandboxd.spec.load import load_stack
from sandboxd.spec.model import Stack


def stack(folder: Path, files: dict[str, str]) -> Stack:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return load_stack(folder)


def test_moving_a_unit_in_its_file_changes_nothing(tmp_path: Path) -> None:
    a = stack(tmp_path / "s", {"api.yaml": "kind: service\ncommand: [x]\n---\nkind: socket\nlisten: tcp:127.0.0.1:80\n"})
    b = stack(tmp_path / "s", {"api.yaml": "\n\n# moved down\nkind: service\ncommand: [x]\n---\nkind: socket\nlisten: tcp:127.0.0.1:80\n"})
    change = diff(a, b)
    assert change.empty and change.sockets_kept == ["api"]


def test_a_changed_socket_restarts_its_service_and_keeps_the_others(tmp_path: Path) -> None:
    a = stack(
        tmp_path / "s",
        {"api.yaml": "kind: service\ncommand: [x]\n---\nkind: socket\nlisten: tcp:127.0.0.1:80\n", "db.yaml": "kind: service\ncommand: [y]\n"},
    )
    b = stack(
        tmp_path / "s",
        {"api.yaml": "kind: service\ncommand: [x]\n---\nkind: socket\nlisten: tcp:127.0.0.1:81\n", "new.yaml": "kind: service\ncommand: [z]\n"},
    )
    change = diff(a, b)
    assert (change.added, change.removed, change.changed, change.sockets_replaced) == (["new"], ["db"], ["api"], ["api"])
    assert refusal(a, b, change) == ""


def test_changes_to_networks_are_refused(tmp_path: Path) -> None:
    a = stack(tmp_path / "s", {"net.yaml": "kind: network\nname: n\n---\nkind: service\nname: a\ncommand: [x]\nnetwork: [n]\n"})
    b = stack(tmp_path / "s", {"net.yaml": "kind: network\nname: n\nsubnet: 10.77.0.0/24\n---\nkind: service\nname: a\ncommand: [x]\nnetwork: [n]\n"})
    assert refusal(a, b, diff(a, b)) == "the networks changed"
