"""Unit tests of trust.py and pins.py, and of what load_stack and reload make of them: who may
change a spec folder, where a relative mount source may lead, what a held source names. No root
needed: folders belong to the caller, who counts as trusted as root does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandboxd.errors import SpecErrors
from sandboxd.host.pins import close_all, pin_mounts
from sandboxd.spec.diff import diff
from sandboxd.spec.load import load_stack
from sandboxd.spec.sources import real_path
from sandboxd.spec.trust import Untrusted, problem, untrusted
from .spec_snippets import STEM_SERVICE, Problems


def info(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "above", "expected"),
    [
        (stat.S_IFDIR | 0o755, 0, False, ""),
        (stat.S_IFDIR | 0o755, 1000, False, "owned by uid 1000"),
        (stat.S_IFDIR | 0o775, 0, False, "writable by group or others (mode 0775)"),
        (stat.S_IFREG | 0o646, 0, False, "writable by group or others (mode 0646)"),
        (stat.S_IFDIR | 0o777, 1000, False, "owned by uid 1000 and writable by group or others (mode 0777)"),
        (stat.S_IFDIR | 0o1777, 0, True, ""),  # /tmp above the folder
        (stat.S_IFDIR | 0o1777, 0, False, "writable by group or others (mode 1777)"),  # the folder itself
        (stat.S_IFDIR | 0o777, 0, True, "writable by group or others (mode 0777)"),  # above, not sticky
        (stat.S_IFDIR | 0o1777, 1000, True, "owned by uid 1000"),
    ],
)
def test_what_makes_a_path_untrusted(mode: int, uid: int, above: bool, expected: str) -> None:
    assert problem(info(mode, uid), above, caller=0) == expected


def test_the_caller_counts_as_root_does() -> None:
    assert problem(info(stat.S_IFDIR | 0o755, 1000), False, caller=1000) == ""


def test_the_fix_says_what_to_run() -> None:
    both = Untrusted(Path("/srv/x"), "owned by uid 1000 and writable by group or others (mode 0777)")
    assert both.fix == "chown root /srv/x; chmod go-w /srv/x"
    assert Untrusted(Path("/srv/x"), "writable by group or others (mode 0775)").fix == "chmod go-w /srv/x"


def test_every_folder_above_counts_and_a_sticky_one_is_fine(tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "stack").mkdir(parents=True)
    (top / "stack" / "svc.yaml").write_text("")
    assert untrusted(top / "stack") is None
    top.chmod(0o777)
    assert untrusted(top / "stack") == Untrusted(top, "writable by group or others (mode 0777)")
    top.chmod(0o1777)
    assert untrusted(top / "stack") is None
    assert untrusted(top / "stack" / "svc.yaml", strict=2) is None
    (top / "stack").chmod(0o1777)  # a sticky spec folder is still one anybody may add files to
    assert untrusted(top / "stack" / "svc.yaml", strict=2) == Untrusted(top / "stack", "writable by group or others (mode 1777)")


def test_a_symlink_is_judged_by_what_it_names(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "link").symlink_to(tmp_path / "open")
    assert untrusted(tmp_path / "link") == Untrusted(tmp_path / "open", "writable by group or others (mode 0777)")


def stack_folder(folder: Path, source: str) -> Path:
    """A spec folder of one service, svc, with one bind mount of `source` at /m (line 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "svc.yaml").write_text(STEM_SERVICE + f"mounts:\n  - {{source: {source}, target: /m}}\n")
    return folder


def test_a_symlink_out_of_the_spec_folder_is_a_spec_error_with_line_and_key(tmp_path: Path, problems: Problems) -> None:
    folder = stack_folder(tmp_path / "stack", "./link")
    (folder / "link").symlink_to("/etc")
    assert problems(folder) == [
        "svc.yaml:4: mounts[0].source: mount source './link' leads out of the spec folder <folder> (through '..' or a symlink); "
        "a relative source must stay inside it: write an absolute path if a host path outside is meant"
    ]


@pytest.mark.parametrize("source", ["../outside", "data/../../outside", "inner/escape"])
def test_dotdot_or_a_relative_symlink_out_of_the_folder_is_refused(tmp_path: Path, problems: Problems, source: str) -> None:
    (tmp_path / "outside").mkdir()
    folder = stack_folder(tmp_path / "stack", source)
    (folder / "data").mkdir()
    (folder / "inner").mkdir()
    (folder / "inner" / "escape").symlink_to("../../outside")
    [message] = problems(folder)
    assert f"mounts[0].source: mount source '{source}' leads out of the spec folder" in message


def test_an_absolute_symlink_is_refused_even_when_it_names_a_place_inside(tmp_path: Path, problems: Problems) -> None:
    folder = stack_folder(tmp_path / "stack", "./link")
    (folder / "data").mkdir()
    (folder / "link").symlink_to(folder / "data")  # RESOLVE_BENEATH refuses any absolute symlink
    [message] = problems(folder)
    assert "leads out of the spec folder" in message


def test_a_symlink_inside_the_folder_is_followed_and_the_source_is_where_it_leads(tmp_path: Path) -> None:
    folder = stack_folder(tmp_path / "stack", "./current")
    (folder / "releases" / "v2").mkdir(parents=True)
    (folder / "current").symlink_to("releases/v2")
    [mount] = load_stack(folder).services[0].mounts
    assert (mount.source, mount.given) == (folder / "releases" / "v2", "./current")


def test_an_absolute_source_outside_the_folder_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    folder = stack_folder(tmp_path / "stack", str(tmp_path / "link"))
    [mount] = load_stack(folder).services[0].mounts
    assert mount.source == tmp_path / "elsewhere"


def test_a_spec_folder_others_may_write_is_refused_before_its_files_are_read(tmp_path: Path, problems: Problems) -> None:
    folder = stack_folder(tmp_path / "stack", "./missing")
    folder.chmod(0o777)
    assert problems(folder) == [
        "<folder>: refusing this spec folder: <folder> is writable by group or others (mode 0777), so someone besides root "
        "could change what sandboxd runs as root; make it root's and writable by root alone: chmod go-w <folder>"
    ]


def test_a_spec_file_others_may_write_is_refused(tmp_path: Path, problems: Problems) -> None:
    folder = stack_folder(tmp_path / "stack", "/")
    (folder / "svc.yaml").chmod(0o666)
    [message] = problems(folder)
    assert message.startswith("svc.yaml: refusing this spec file: <folder>/svc.yaml is writable by group or others (mode 0666)")
    assert message.endswith("chmod go-w <folder>/svc.yaml")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_held_source_still_names_the_folder_after_a_swap(tmp_path: Path) -> None:
    folder = stack_folder(tmp_path / "stack", "./data")
    (folder / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    stack = load_stack(folder)
    pinned = pin_mounts(stack, tmp_path / "volumes")
    try:
        (folder / "data").rename(folder / "data.old")
        (folder / "data").symlink_to(tmp_path / "elsewhere")
        assert list(pinned["svc"]) == [str(folder / "data")]  # by the plan's source path
        assert real_path(pinned["svc"][str(folder / "data")]) == folder / "data.old"
    finally:
        close_all(pinned["svc"])


def test_a_source_swapped_between_validation_and_pinning_is_refused_and_nothing_is_held(tmp_path: Path) -> None:
    folder = stack_folder(tmp_path / "stack", "./data")
    (folder / "data").mkdir()
    stack = load_stack(folder)
    (folder / "data").rmdir()
    (folder / "data").symlink_to("/etc")
    before = open_fds()
    with pytest.raises(SpecErrors) as raised:
        pin_mounts(stack, tmp_path / "volumes")
    assert [f"{e.line} {e.key}" for e in raised.value.errors] == ["4 mounts[0].source"]
    assert open_fds() == before


def test_a_volume_is_held_only_if_it_is_a_folder_of_the_volumes_folder(tmp_path: Path) -> None:
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    (volumes / "v").symlink_to("/etc")
    folder = tmp_path / "stack"
    folder.mkdir()
    (folder / "svc.yaml").write_text(STEM_SERVICE + "mounts: [{volume: v, target: /v}]\n---\nkind: volume\nname: v\n")
    with pytest.raises(SpecErrors) as raised:
        pin_mounts(load_stack(folder), volumes)
    assert [f"{e.line} {e.key}" for e in raised.value.errors] == ["3 mounts[0].volume"]
    (volumes / "v").unlink()
    (volumes / "v").mkdir()
    pinned = pin_mounts(load_stack(folder), volumes)
    assert real_path(pinned["svc"][str(volumes / "v")]) == volumes / "v"
    close_all(pinned["svc"])


def test_a_reload_counts_a_mount_by_what_was_written_not_by_what_it_names_now(tmp_path: Path) -> None:
    folder = stack_folder(tmp_path / "stack", "./current")
    (folder / "v1").mkdir()
    (folder / "v2").mkdir()
    (folder / "current").symlink_to("v1")
    before = load_stack(folder)
    (folder / "current").unlink()
    (folder / "current").symlink_to("v2")
    after = load_stack(folder)
    assert before.services[0].mounts[0].source != after.services[0].mounts[0].source
    assert diff(before, after).empty  # the running service keeps what it holds


def test_a_reload_from_another_folder_changes_a_service_with_relative_sources(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (stack_folder(tmp_path / name, "./data") / "data").mkdir()
    assert diff(load_stack(tmp_path / "a"), load_stack(tmp_path / "b")).changed == ["svc"]
