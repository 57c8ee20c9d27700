"""Binds and tmpfs mounts anywhere, as a compose user writes them, and a hostile image or service
against them, run as root.

A target that does not exist is made inside the sandbox only: on the host's root (in place, or on
a tmpfs root) its deepest existing folder is covered by a tmpfs that binds that folder's entries
back (sbd-setup.c: cover); on an image in its overlay. The host's file system gains nothing, the
rest of the covered folder stays the host's and read-only, and what is hidden in it stays hidden.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import wait_until, write
from test_images import busybox_root, state_dir, store  # noqa: F401 - the image store's fixtures

CHECKS = r"""
cat /etc/app/config.yaml
ls /srv/app/data
( echo x > /etc/app/config.yaml ) 2>/dev/null && echo config-writable || echo config-read-only
touch /etc/app/new 2>/dev/null && echo app-writable || echo app-read-only
touch /etc/new 2>/dev/null && echo etc-writable || echo etc-read-only
touch /srv/new 2>/dev/null && echo srv-writable || echo srv-read-only
mkdir -p /var/cache/made/here/deeper && echo x > /var/cache/made/here/deeper/f && echo tmpfs-writable
( echo x > /etc/hostname ) 2>/dev/null && echo hostname-writable || echo hostname-read-only
echo "hostname=$(cat /etc/hostname)"
echo "passwd=$(md5sum < /etc/passwd)"
echo "etc=$(ls -a /etc | tr '\n' ' ')"
echo "varlib=$(ls -a /var/lib/sandboxd 2>&1 | tr '\n' ' ')"
"""

# Host folders a mount of these tests could leave something in.
WATCHED = ("/", "/etc", "/srv", "/var", "/var/cache", "/var/lib", "/run", "/var/run")


def host_entries() -> dict[str, set[str]]:
    return {path: set(os.listdir(path)) for path in WATCHED if os.path.isdir(path)}


def sources(tmp_path: Path) -> tuple[Path, Path]:
    """A config file and a data folder, outside the spec folder (absolute sources)."""
    (tmp_path / "src" / "data").mkdir(parents=True)
    (tmp_path / "src" / "data" / "hello").write_text("hi\n")
    config = tmp_path / "src" / "config.yaml"
    config.write_text("answer: 42\n")
    return config, tmp_path / "src" / "data"


def spec(name: str, config: Path, data: Path, extra: str = "", image: str = "host", tmpfs: tuple[str, ...] = ()) -> str:
    mounts = [{"source": str(config), "target": "/etc/app/config.yaml"}, {"source": str(data), "target": "/srv/app/data"}]
    return (
        f"kind: service\nname: {name}\nhostname: {name}-host\nimage: {image}\nrestart: no\n{extra}"
        f"command: {json.dumps(['/bin/sh', '-c', CHECKS])}\n"
        f"mounts: {json.dumps(mounts)}\ntmpfs: {json.dumps(['/var/cache/made/here', *tmpfs])}\n"
    )


def said(stack: object, name: str) -> dict[str, str]:
    lines = stack.lines(name)  # type: ignore[attr-defined]
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    return {**values, **{line: "" for line in lines if "=" not in line}}


def checked(stack: object) -> dict[str, str]:
    """What CHECKS printed, once it has exited 0 and found every mount as it should be."""
    assert stack.wait_exit() == 0, stack.err  # type: ignore[attr-defined]
    out = said(stack, "box")
    assert "answer: 42" in out and "hello" in out, stack.out + stack.err  # type: ignore[attr-defined]
    assert {"config-read-only", "app-read-only", "etc-read-only", "srv-read-only", "tmpfs-writable", "hostname-read-only"} <= out.keys(), stack.out  # type: ignore[attr-defined]
    assert out["hostname"] == "box-host"
    return out


def md5(path: str) -> str:
    return subprocess.run(["md5sum"], stdin=open(path, "rb"), capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("root", ["in-place", "tmpfs-root"])
@pytest.mark.parametrize("userns", [True, False])
def test_a_file_a_folder_and_a_tmpfs_are_mounted_where_nothing_was_on_the_host_root(run_stack, spec_dir: Path, tmp_path: Path, root: str, userns: bool) -> None:
    config, data = sources(tmp_path)
    before = host_entries()
    extra = f"userns: {str(userns).lower()}\n"
    write(spec_dir, "box.yaml", spec("box", config, data, extra, tmpfs=("/sbd-new-top",) if root == "tmpfs-root" else ()))
    out = checked(run_stack(spec_dir))
    assert out["passwd"] == md5("/etc/passwd")  # the rest of /etc is the host's
    host_etc = set(os.listdir("/etc")) | {".", "..", "app", "hostname"}
    assert set(out["etc"].split()) == host_etc
    if os.path.isdir("/var/lib/sandboxd"):
        assert out["varlib"].split() == [".", ".."]  # still hidden
    assert host_entries() == before, "a mount point was made on the host's file system"
    assert not os.path.exists("/etc/app") and not os.path.exists("/srv/app") and not os.path.exists("/var/cache/made")


def test_a_file_a_folder_and_a_tmpfs_are_mounted_where_nothing_was_in_an_image(run_stack, spec_dir: Path, store: Path, tmp_path: Path) -> None:
    config, data = sources(tmp_path)
    rootfs = busybox_root(store)
    before_image = set(os.listdir(rootfs / "etc"))
    before = host_entries()
    write(spec_dir, "box.yaml", spec("box", config, data, image="busybox"))
    out = checked(run_stack(spec_dir))
    assert set(out["etc"].split()) == before_image | {".", "..", "app", "hostname"}
    assert set(os.listdir(rootfs / "etc")) == before_image and host_entries() == before


def test_the_covered_folder_keeps_its_submounts_and_what_is_hidden_in_it(run_stack, spec_dir: Path, tmp_path: Path) -> None:
    """A target below /var/lib covers /var/lib: sandboxd's state folder, hidden there, stays hidden;
    /var/run (a symlink to /run on Debian) leads into the sandbox's own /run, not the host's."""
    config, _ = sources(tmp_path)
    before = host_entries()
    mounts = [{"source": str(config), "target": "/var/lib/app/config.yaml"}, {"source": str(config), "target": "/var/run/app/config.yaml"}]
    script = "cat /var/lib/app/config.yaml /run/app/config.yaml; echo \"state=$(ls -a /var/lib/sandboxd | tr '\\n' ' ')\"; ls /var/lib/dpkg/status && echo dpkg-seen"
    write(spec_dir, "box.yaml", f"kind: service\nrestart: no\ncommand: {json.dumps(['/bin/sh', '-c', script])}\nmounts: {json.dumps(mounts)}\n")
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    out = said(stack, "box")
    assert out["state"].split() == [".", ".."], stack.out
    assert "dpkg-seen" in out and stack.lines("box").count("answer: 42") == 2
    assert host_entries() == before


# ── a hostile image or service ──


def image_with(store: Path, tmp_path: Path, links: dict[str, str]) -> Path:
    """A copy of the busybox tree with these symlinks (path in the image -> target)."""
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_root(store)), str(rootfs)], check=True)
    for path, target in links.items():
        link = rootfs / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_dir() and not link.is_symlink():
            link.rmdir()
        link.symlink_to(target)
    return rootfs


@pytest.mark.parametrize("kind", ["bind", "tmpfs"])
@pytest.mark.parametrize("how", ["absolute", "dot-dot", "magic-link"])
def test_an_image_symlink_to_the_hosts_root_is_refused_and_makes_nothing_there(run_stack, spec_dir: Path, store: Path, tmp_path: Path, kind: str, how: str) -> None:
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    target = {
        "absolute": f"/run/.sbd-oldroot{host_dir}",
        "dot-dot": f"../../../../../../../../run/.sbd-oldroot{host_dir}",
        "magic-link": f"/proc/self/root/run/.sbd-oldroot{host_dir}",  # read as the path it says, never followed
    }[how]
    rootfs = image_with(store, tmp_path, {"/etc/app": target})
    config, _ = sources(tmp_path)
    mount = f"mounts: [{{source: {config}, target: /etc/app/deep/config.yaml}}]" if kind == "bind" else "tmpfs: [/etc/app/deep]"
    write(spec_dir, "box.yaml", f"kind: service\nimage: {rootfs}\nuserns: false\nrestart: no\ncommand: [\"true\"]\n{mount}\n")
    stack = run_stack(spec_dir)
    stack.wait_exit()
    assert "leads out of the sandbox" in stack.err, stack.err
    assert os.listdir(host_dir) == []


def test_an_image_symlink_to_a_host_path_stays_in_the_image(run_stack, spec_dir: Path, store: Path, tmp_path: Path) -> None:
    """/srv/app -> an absolute path that exists on the host: followed inside the image's root."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    rootfs = image_with(store, tmp_path, {"/srv/app": str(host_dir)})
    config, data = sources(tmp_path)
    write(spec_dir, "box.yaml", spec("box", config, data, "userns: false\n", image=str(rootfs)))
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    assert "hello" in said(stack, "box")
    assert os.listdir(host_dir) == [] and not (rootfs / host_dir.relative_to("/")).exists()


@pytest.mark.parametrize("case", ["file-on-dir", "dir-on-file"])
def test_a_file_where_a_folder_is_and_a_folder_where_a_file_is_are_refused_by_name(run_stack, spec_dir: Path, store: Path, tmp_path: Path, case: str) -> None:
    config, data = sources(tmp_path)
    source, target = (config, "/etc/app-dir") if case == "file-on-dir" else (data, "/etc/passwd")
    rootfs = image_with(store, tmp_path, {})
    (rootfs / "etc" / "app-dir").mkdir()
    write(spec_dir, "box.yaml", f"kind: service\nimage: {rootfs}\nrestart: no\ncommand: [\"true\"]\nmounts: [{{source: {source}, target: {target}}}]\n")
    stack = run_stack(spec_dir)
    stack.wait_exit()
    expected = "is a directory, and what is mounted there is a file" if case == "file-on-dir" else "is not a directory, and what is mounted there is one"
    assert f"{expected} ({target})" in stack.err, stack.err


def test_a_service_swapping_a_shared_volume_folder_for_a_symlink_never_leads_a_mount_onto_the_host(run_stack, spec_dir: Path, store: Path, tmp_path: Path) -> None:
    """The image's /etc/app leads into a volume another service rewrites as fast as it can: a
    folder, then a symlink to the host's root as the set-up sees it. Each of the binding services
    mounts in the volume's folder, or is refused, or fails as its mount point is removed; none
    writes the host (each name is opened once, without following it, and mounted on by fd)."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    rootfs = image_with(store, tmp_path, {"/etc/app": "/vol/x"})
    config, _ = sources(tmp_path)
    swap = f"while true; do rm -rf /vol/x; mkdir /vol/x; rm -rf /vol/x; ln -s /run/.sbd-oldroot{host_dir} /vol/x; done"
    units = [f"kind: volume\nname: shared\n", f"kind: service\nname: writer\nimage: {rootfs}\nuserns: false\ncommand: {json.dumps(['/bin/sh', '-c', swap])}\nmounts: [{{volume: shared, target: /vol}}]\n"]
    for n in range(8):
        units.append(
            f"kind: service\nname: binder{n}\nimage: {rootfs}\nuserns: false\nrestart: no\nafter: [writer]\n"
            f"command: [/bin/sh, -c, 'echo started']\nmounts: [{{volume: shared, target: /vol}}, {{source: {config}, target: /etc/app/config.yaml}}]\n"
        )
    write(spec_dir, "stack.yaml", "---\n".join(units))
    stack = run_stack(spec_dir)
    done = lambda: all(f"binder{n}: running -> exited" in stack.err or f"binder{n}: starting -> failed" in stack.err for n in range(8))  # noqa: E731
    wait_until(done, "every binder ran or was refused")
    # Refused on the way, or its mount point removed under it (a mount on an unlinked entry is ENOENT).
    reasons = ("leads out of the sandbox through a symlink (/etc/app/config.yaml)", "No such file or directory (/vol/x")
    assert all(any(reason in line for reason in reasons) for line in stack.err.splitlines() if "-> failed" in line), stack.err
    stack.stop()
    assert os.listdir(host_dir) == [], "a mount point was made on the host through the swapped symlink"
