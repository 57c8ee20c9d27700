"""Services on images: the overlay root, its writable layer, volumes, building and rebuilding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import stored_ids, write

REPO = Path(__file__).resolve().parents[2]


def sandboxd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, check=check, env={**os.environ, "NO_COLOR": "1"})


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of its own for the test session, with the busybox image of images/ built once."""
    path = tmp_path_factory.mktemp("state")
    result = subprocess.run(
        [sys.executable, "-m", "sandboxd", "image", "build", str(REPO / "images" / "busybox")],
        capture_output=True, text=True, env={**os.environ, "SANDBOXD_STATE_DIR": str(path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return path


@pytest.fixture
def store(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(state_dir))
    return state_dir


def busybox_root(store: Path) -> Path:
    """The current tree of the busybox image (images/busybox/trees/VERSION, named in image.json)."""
    meta = json.loads((store / "images" / "busybox" / "image.json").read_text())
    return store / "images" / "busybox" / "trees" / meta["tree"]


def test_service_runs_on_the_image_not_on_the_host(run_stack, spec_dir: Path, store: Path) -> None:
    write(spec_dir, "box.yaml", """
        kind: service
        image: busybox
        restart: no
        command: ["sh", "-c", "cat /etc/passwd; ls /usr/bin/python3 || echo no-python; touch /x || echo read-only; echo pid=$$$$"]
        """)
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    lines = stack.lines("box")
    assert "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" in lines  # the image's passwd, not the host's
    assert "no-python" in lines
    assert "read-only" in lines
    assert "pid=2" in lines  # the service is pid 2 under sbd-setup, on an image as on the host's root


def test_writable_layer_is_fresh_on_every_start_and_never_reaches_the_image(run_stack, spec_dir: Path, store: Path) -> None:
    write(spec_dir, "box.yaml", """
        kind: service
        image: busybox
        readonly_root: false
        restart: on-failure
        restart_delay: 10ms
        start_limit: {burst: 10, interval: 10s}
        command: ["sh", "-c", "if [ -e /etc/marker ]; then echo stale; else echo fresh; fi; echo x > /etc/marker; mkdir -p /new/dir && echo made; exit 3"]
        """)
    stack = run_stack(spec_dir)
    lines = stack.wait_lines("box", 4)
    stack.stop()
    assert lines[:4] == ["fresh", "made", "fresh", "made"]
    assert not (busybox_root(store) / "etc" / "marker").exists()
    assert not (busybox_root(store) / "new").exists()


def test_root_file_system_folder_runs_as_an_image(run_stack, spec_dir: Path, store: Path) -> None:
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: {busybox_root(store)}
        restart: no
        workdir: /etc
        command: ["/bin/sh", "-c", "pwd; cat group hostname"]
        """)
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    # The image's /etc/group (images/busybox/build); /etc/hostname is the service's own, as docker's.
    assert stack.lines("box") == ["/etc", "root:x:0:", "nogroup:x:65534:", "box"]


def test_volume_outlives_the_stack_until_removed(run_stack, spec_dir: Path, store: Path) -> None:
    volume = f"sbdtest-{os.getpid()}"
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: busybox
        user: nobody
        restart: no
        mounts: [{{volume: {volume}, target: /data}}]
        command: ["sh", "-c", "cat /data/count 2>/dev/null || echo none; echo $(( $(cat /data/count 2>/dev/null || echo 0) + 1 )) > /data/count"]
        ---
        kind: volume
        name: {volume}
        """)
    try:
        for expected in ("none", "1", "2"):
            stack = run_stack(spec_dir)
            assert stack.wait_exit() == 0, stack.err
            assert stack.lines("box") == [expected]
        path = store / "volumes" / volume
        # owned by the service's user, nobody, as a user namespace's files are stored (see test_userns.py)
        uid, gid = stored_ids()
        assert (path.stat().st_uid, path.stat().st_gid) == (uid + 65534, gid + 65534)
        assert volume in sandboxd("volume", "ls").stdout
    finally:
        sandboxd("volume", "rm", volume, check=False)
    assert not (store / "volumes" / volume).exists()


def test_volume_in_use_is_not_removed(run_stack, spec_dir: Path, store: Path) -> None:
    volume = f"sbdbusy-{os.getpid()}"
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: busybox
        mounts: [{{volume: {volume}, target: /data}}]
        command: ["sh", "-c", "echo up; exec sleep 60"]
        ---
        kind: volume
        name: {volume}
        """)
    stack = run_stack(spec_dir)
    try:
        assert stack.wait_lines("box", 1) == ["up"]  # running on the volume before it is removed
        refused = sandboxd("volume", "rm", volume, check=False)
        assert refused.returncode == 1 and "in use" in refused.stderr
        assert (store / "volumes" / volume).is_dir()
    finally:
        stack.stop()
        sandboxd("volume", "rm", volume, check=False)
    assert not (store / "volumes" / volume).exists()


def test_image_is_built_on_first_up_and_rebuilt_when_its_definition_changes(run_stack, tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "own-store"))
    definition = tmp_path / "images" / "tiny"
    definition.mkdir(parents=True)
    busybox = busybox_root(store) / "bin" / "busybox"
    build = definition / "build"
    build.write_text(f"#!/bin/sh\nset -e\nmkdir -p $ROOTFS/bin\ncp {busybox} $ROOTFS/bin/busybox\nln -s busybox $ROOTFS/bin/sh\nln -s busybox $ROOTFS/bin/cat\ncp version $ROOTFS/version\n")
    build.chmod(0o755)
    (definition / "config.json").write_text(json.dumps({"cmd": ["/bin/cat", "/version"]}))
    (definition / "version").write_text("one\n")
    folder = tmp_path / "specs" / "app"
    folder.mkdir(parents=True)
    write(folder, "app.yaml", "kind: service\nimage: tiny\nrestart: no\n")
    stack = run_stack(folder)
    assert stack.wait_exit() == 0
    assert stack.lines("app") == ["one"]
    first = json.loads(sandboxd("image", "ls", "--json").stdout)
    (definition / "version").write_text("two\n")
    stack = run_stack(folder)
    assert stack.wait_exit() == 0
    assert stack.lines("app") == ["two"]
    second = json.loads(sandboxd("image", "ls", "--json").stdout)
    assert [i["name"] for i in second] == ["tiny"] and first[0]["digest"] != second[0]["digest"]
    stack = run_stack(folder)  # unchanged: not built again
    assert stack.wait_exit() == 0
    assert json.loads(sandboxd("image", "ls", "--json").stdout)[0]["created"] == second[0]["created"]
    assert sandboxd("image", "rm", "tiny").returncode == 0
    assert sandboxd("image", "ls", "--json").stdout.strip() == "[]"


def test_failing_build_is_reported_and_nothing_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "own-store"))
    definition = tmp_path / "images" / "broken"
    definition.mkdir(parents=True)
    (definition / "build").write_text("#!/bin/sh\necho cannot make it >&2\nexit 4\n")
    (definition / "build").chmod(0o755)
    folder = tmp_path / "specs"
    folder.mkdir()
    write(folder, "app.yaml", "kind: service\nimage: broken\ncommand: [x]\n")
    result = sandboxd("up", str(folder), check=False)
    assert result.returncode == 1
    assert "building image 'broken' failed" in result.stderr and "status 4" in result.stderr
    assert not [p for p in (tmp_path / "own-store" / "images").iterdir() if p.name != ".lock"]


def test_unknown_image_is_a_spec_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "own-store"))
    folder = tmp_path / "specs"
    folder.mkdir()
    write(folder, "app.yaml", "kind: service\nimage: nosuch\ncommand: [x]\n")
    result = sandboxd("up", "--pull", "never", str(folder), check=False)  # else it is docker.io/library/nosuch, pulled
    assert result.returncode == 2
    assert "app.yaml:1: image: no image 'nosuch'" in result.stderr


def test_symlink_in_an_image_does_not_lead_a_mount_onto_the_host(run_stack, spec_dir: Path, store: Path, tmp_path: Path) -> None:
    """The image's /data points at the host's root as it is reachable while the sandbox is built;
    the bind is refused and nothing is made on the host."""
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_root(store)), str(rootfs)], check=True)
    escaped = tmp_path / "escaped"
    (rootfs / "data").symlink_to(f"/run/.sbd-oldroot{escaped}")
    source = tmp_path / "src"
    source.mkdir()
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: {rootfs}
        restart: no
        command: ["true"]
        mounts: [{{source: {source}, target: /data/inner}}]
        """)
    stack = run_stack(spec_dir)
    stack.wait_exit()
    assert "leads out of the sandbox through a symlink" in stack.err
    assert not escaped.exists()


def test_rebuilt_image_keeps_the_tree_a_running_sandbox_uses_until_it_stops(run_stack, tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "own-store"))
    definition = tmp_path / "images" / "tiny"
    definition.mkdir(parents=True)
    build = definition / "build"
    build.write_text(f"#!/bin/sh\nset -e\nmkdir -p $ROOTFS/bin\ncp {busybox_root(store) / 'bin' / 'busybox'} $ROOTFS/bin/busybox\nln -s busybox $ROOTFS/bin/sh\ncp version $ROOTFS/version\n")
    build.chmod(0o755)
    (definition / "version").write_text("one\n")
    folder = tmp_path / "specs"
    folder.mkdir()
    write(folder, "app.yaml", "kind: service\nimage: tiny\ncommand: [/bin/busybox, sh, -c, 'echo ready; while sleep 0.05; do /bin/busybox cat /version; done']\n")
    stack = run_stack(folder)
    assert stack.wait_lines("app", 2)[:2] == ["ready", "one"]  # running on tree "one" before the rebuild
    (definition / "version").write_text("two\n")
    assert sandboxd("image", "build", str(definition)).returncode == 0  # rebuilt while the sandbox runs on "one"
    refused = sandboxd("image", "rm", "tiny", check=False)
    assert refused.returncode == 1 and "in use by a running sandbox" in refused.stderr
    count = len(stack.lines("app"))
    lines = stack.wait_lines("app", count + 3)
    assert len(lines) >= count + 3 and lines[count:] == ["one"] * (len(lines) - count)  # its tree was kept whole
    assert len(list((tmp_path / "own-store" / "images" / "tiny" / "trees").iterdir())) == 2
    stack.stop()
    assert sandboxd("image", "rm", "tiny").returncode == 0
    assert not (tmp_path / "own-store" / "images" / "tiny").exists()
