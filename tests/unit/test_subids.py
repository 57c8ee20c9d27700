"""subids: the sandboxd user's subordinate ids, cut into blocks, one leased per running stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.host import subids
from sandboxd.errors import HostError
from sandboxd.plan.launch import UserNamespace

BLOCK = subids.BLOCK


def files(tmp_path: Path, uid: str, gid: str) -> tuple[Path, Path]:
    (tmp_path / "subuid").write_text(uid)
    (tmp_path / "subgid").write_text(gid)
    return tmp_path / "subuid", tmp_path / "subgid"


def test_the_first_block_stores_files_and_the_others_run_stacks(tmp_path: Path) -> None:
    subuid, subgid = files(tmp_path, f"alice:100000:65536\nsandboxd:300000:{3 * BLOCK}\n", f"sandboxd:500000:{3 * BLOCK}\n")
    blocks = subids.read_blocks(subuid, subgid)
    assert blocks == subids.Blocks((300000, 500000), ((300000 + BLOCK, 500000 + BLOCK), (300000 + 2 * BLOCK, 500000 + 2 * BLOCK)))
    assert blocks.userns(blocks.stacks[0]) == UserNamespace(300000 + BLOCK, 500000 + BLOCK, BLOCK, 300000, 500000)


def test_a_single_block_is_both_store_and_the_one_stack(tmp_path: Path) -> None:
    subuid, subgid = files(tmp_path, "sandboxd:100000:65536\n", "sandboxd:100000:65536\n")
    assert subids.read_blocks(subuid, subgid) == subids.Blocks((100000, 100000), ((100000, 100000),))


def test_ranges_added_later_add_blocks(tmp_path: Path) -> None:
    subuid, subgid = files(tmp_path, "sandboxd:100000:65536\nsandboxd:165536:131072\n", "sandboxd:100000:196608\n")
    blocks = subids.read_blocks(subuid, subgid)
    assert blocks is not None and blocks.store == (100000, 100000) and [b[0] for b in blocks.stacks] == [165536, 231072]


def test_missing_ranges_are_added_after_the_highest_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subids, "_ensure_user", lambda: None)
    subuid, subgid = files(tmp_path, "alice:100000:65536\nbob:165536:65536\n", "alice:100000:65536\n")
    blocks = subids.ensure_blocks(subuid, subgid)
    size = BLOCK * subids.CREATED_BLOCKS
    assert subuid.read_text().endswith(f"sandboxd:231072:{size}\n")
    assert subgid.read_text().endswith(f"sandboxd:231072:{size}\n")
    assert blocks.store == (231072, 231072) and len(blocks.stacks) == subids.CREATED_BLOCKS - 1


def test_each_lease_gets_a_block_of_its_own_until_released(tmp_path: Path) -> None:
    subuid, subgid = files(tmp_path, f"sandboxd:100000:{3 * BLOCK}\n", f"sandboxd:100000:{3 * BLOCK}\n")
    first = subids.lease("a", tmp_path / "locks", subuid, subgid)
    second = subids.lease("b", tmp_path / "locks", subuid, subgid)
    assert (first.userns.uid, second.userns.uid) == (100000 + BLOCK, 100000 + 2 * BLOCK)
    assert first.userns.store_uid == second.userns.store_uid == 100000
    with pytest.raises(HostError) as refused:
        subids.lease("c", tmp_path / "locks", subuid, subgid)
    assert "a " in str(refused.value) and "b " in str(refused.value)  # who holds them
    assert "usermod --add-subuids" in refused.value.hint
    first.release()  # as when a's supervisor and fork server are gone: the kernel drops the lock
    third = subids.lease("c", tmp_path / "locks", subuid, subgid)
    assert third.userns == first.userns
    second.release()
    third.release()


def test_a_small_existing_entry_serves_one_stack_and_says_how_to_grow(tmp_path: Path) -> None:
    subuid, subgid = files(tmp_path, "sandboxd:100000:65536\n", "sandboxd:100000:65536\n")
    held = subids.lease("a", tmp_path / "locks", subuid, subgid)
    assert held.userns == UserNamespace(100000, 100000, BLOCK, 100000, 100000)
    with pytest.raises(HostError) as refused:
        subids.lease("b", tmp_path / "locks", subuid, subgid)
    assert f"usermod --add-subuids 165536-{165536 + BLOCK * subids.CREATED_BLOCKS - 1}" in refused.value.hint
    held.release()
