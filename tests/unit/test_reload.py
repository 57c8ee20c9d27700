"""reload: what changed between two specs of one stack."""

from __future__ import annotations

from pathlib import Path

from sandboxd.spec.diff import diff, refusal
from .spec_snippets import STEM_SERVICE, StackOf


def test_moving_a_unit_in_its_file_changes_nothing(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", {"api.yaml": STEM_SERVICE + "---\nkind: socket\nlisten: tcp:127.0.0.1:80\n"})
    b = stack_of(tmp_path / "s", {"api.yaml": "\n\n# moved down\nkind: service\ncommand: [x]\n---\nkind: socket\nlisten: tcp:127.0.0.1:80\n"})
    change = diff(a, b)
    assert change.empty and change.sockets_kept == ["api"]


def test_a_changed_socket_restarts_its_service_and_keeps_the_others(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(
        tmp_path / "s",
        {"api.yaml": STEM_SERVICE + "---\nkind: socket\nlisten: tcp:127.0.0.1:80\n", "db.yaml": "kind: service\ncommand: [y]\n"},
    )
    b = stack_of(
        tmp_path / "s",
        {"api.yaml": STEM_SERVICE + "---\nkind: socket\nlisten: tcp:127.0.0.1:81\n", "new.yaml": "kind: service\ncommand: [z]\n"},
    )
    change = diff(a, b)
    assert (change.added, change.removed, change.changed, change.sockets_replaced) == (["new"], ["db"], ["api"], ["api"])
    assert refusal(a, b, change) == ""


def test_changes_to_networks_are_refused(tmp_path: Path, stack_of: StackOf) -> None:
    a = stack_of(tmp_path / "s", {"net.yaml": "kind: network\nname: n\n---\nkind: service\nname: a\ncommand: [x]\nnetwork: [n]\n"})
    b = stack_of(tmp_path / "s", {"net.yaml": "kind: network\nname: n\nsubnet: 10.77.0.0/24\n---\nkind: service\nname: a\ncommand: [x]\nnetwork: [n]\n"})
    assert refusal(a, b, diff(a, b)) == "the networks changed"
