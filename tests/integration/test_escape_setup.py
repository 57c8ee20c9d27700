"""A hostile image or service against the set-up interpreter (setup/sbd-setup.c), run as root.

What the interpreter decides on its own, and must decide as the Python walk it replaced did
(sandbox/reference.py): where a bind or a tmpfs of the spec lands once the image's symlinks
are followed, inside the sandbox only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write
from test_images import busybox_root, state_dir, store  # noqa: F401 - the image store's fixtures

CHAIN = 45  # more symlinks than the 40 the interpreter follows, fewer than 40 past its stopping point


def chain_of_links(rootfs: Path, end: str) -> str:
    """/l1 -> /l2 -> ... -> /lCHAIN -> `end` in the image; returns the chain's first link."""
    for n in range(1, CHAIN):
        (rootfs / f"l{n}").symlink_to(f"/l{n + 1}")
    (rootfs / f"l{CHAIN}").symlink_to(end)
    return "/l1"


@pytest.mark.parametrize("kind", ["bind", "tmpfs"])
def test_long_symlink_chain_in_an_image_does_not_lead_a_mount_onto_the_host(run_stack, spec_dir: Path, store: Path, tmp_path: Path, kind: str) -> None:
    """A chain of 45 symlinks ending at the host's root as it is reachable while the sandbox is
    built: the interpreter must refuse the mount (as the Python walk did: os.path.realpath has no
    limit of 40), not hand the kernel the unresolved rest, which it follows afresh onto the host
    and makes the mount point there."""
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_root(store)), str(rootfs)], check=True)
    parent = tmp_path / "host-dir"
    parent.mkdir()
    first = chain_of_links(rootfs, f"/run/.sbd-oldroot{parent}")
    source = tmp_path / "src"
    source.mkdir()
    mount = f"mounts: [{{source: {source}, target: {first}/inner}}]" if kind == "bind" else f"tmpfs: [{first}/inner]"
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: {rootfs}
        userns: false
        restart: no
        command: ["true"]
        {mount}
        """)
    stack = run_stack(spec_dir)
    stack.wait_exit()
    assert not (parent / "inner").exists(), "the interpreter made a mount point on the host's file system"
    assert "symbolic links" in stack.err or "leads out of the sandbox" in stack.err


@pytest.mark.parametrize("no_new_privs", [True, False])
def test_a_bind_over_cap_last_cap_does_not_keep_the_bounding_set(run_stack, spec_dir: Path, store: Path, tmp_path: Path, no_new_privs: bool) -> None:
    """The image's /etc/lastcap leads to /proc/sys/kernel/cap_last_cap, and the spec binds a file
    saying "0" there: the bounding set must still be emptied (it is read after pivot_root, from
    the sandbox's own /proc), or root regains every capability at the exec of its init."""
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_root(store)), str(rootfs)], check=True)
    (rootfs / "etc" / "lastcap").symlink_to("/proc/sys/kernel/cap_last_cap")
    write(spec_dir, "zero", "0\n")
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: {rootfs}
        restart: no
        no_new_privs: {str(no_new_privs).lower()}
        command: [/bin/sh, -c, "grep -E '^Cap(Prm|Eff|Bnd)' /proc/self/status"]
        mounts: [{{source: ./zero, target: /etc/lastcap}}]
        """)
    stack = run_stack(spec_dir)
    stack.wait_exit()
    caps = dict(line.split("| ", 1)[1].split(":\t") for line in stack.out.splitlines() if "Cap" in line)
    assert caps == {"CapPrm": "0000000000000000", "CapEff": "0000000000000000", "CapBnd": "0000000000000000"}, stack.out + stack.err


@pytest.mark.parametrize("userns", [True, False])
def test_a_writable_bind_keeps_a_read_only_mount_below_its_source_read_only(spec_dir: Path, tmp_path: Path, userns: bool) -> None:
    """The host has a read-only mount below a writable bind's source (in a mount namespace of
    the test's own, where sandboxd runs): what the spec makes writable is the source's own mount,
    not the host's read-only mounts under it (as docker keeps them)."""
    source = tmp_path / "src"
    archive = source / "archive"
    archive.mkdir(parents=True)
    archive.chmod(0o777)
    (archive / "f").write_text("original\n")
    write(spec_dir, "box.yaml", f"""
        kind: service
        restart: no
        userns: {str(userns).lower()}
        command: [sh, -c, "echo changed > /data/archive/f; echo made > /data/archive/new; true"]
        mounts: [{{source: {source}, target: /data, readonly: false}}]
        """)
    script = f'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && exec "$2" -m sandboxd up "$3"'
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(archive), sys.executable, str(spec_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )
    assert "box: running -> exited" in done.stderr, done.stderr
    assert (archive / "f").read_text() == "original\n" and not (archive / "new").exists(), done.stdout + done.stderr
