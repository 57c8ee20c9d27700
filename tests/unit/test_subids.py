"""subids: the sandboxd user's subordinate id range for user namespaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd import subids


def test_existing_range_is_used(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("alice:100000:65536\nsandboxd:300000:65536\n")
    (tmp_path / "subgid").write_text("sandboxd:300000:65536\n")
    assert subids.userns_range(tmp_path / "subuid", tmp_path / "subgid") == (300000, 65536)


def test_missing_range_is_added_after_the_highest_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subids, "_ensure_user", lambda: None)
    (tmp_path / "subuid").write_text("alice:100000:65536\nbob:165536:65536\n")
    (tmp_path / "subgid").write_text("alice:100000:65536\n")
    assert subids.userns_range(tmp_path / "subuid", tmp_path / "subgid") == (231072, 65536)
    assert (tmp_path / "subuid").read_text().endswith("sandboxd:231072:65536\n")
    assert (tmp_path / "subgid").read_text().endswith("sandboxd:231072:65536\n")
