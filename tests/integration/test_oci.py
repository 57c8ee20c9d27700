"""Importing OCI layouts and `docker save` archives, built here with tarfile (no docker, no network)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest

from sandboxd.store import images
from sandboxd.store import oci
from sandboxd.errors import HostError
from sandboxd.kernel import linux

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
Entry = tuple[tarfile.TarInfo, bytes]


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state" / "images"


# ── building images ──


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, link: str = "", uid: int = 0, gid: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, link, uid, gid
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return entry(name, data=data, mode=mode, uid=uid, gid=gid)


def folder(name: str, mode: int = 0o755) -> Entry:
    return entry(name, tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, mode=0o777, link=target)


def layer(*entries: Entry, gzip: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout folder, written blob by blob."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        (self.path / "blobs" / "sha256" / sha256(data).split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}

    def image(self, layers: list[bytes], config: dict[str, Any] | None = None, media_type: str = GZIP_LAYER, **extra: Any) -> dict[str, Any]:
        """The descriptor of a new manifest with these layers."""
        config_blob = json.dumps({"architecture": "amd64", "os": "linux", "config": config or {}, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.blob("application/vnd.oci.image.config.v1+json", config_blob),
            "layers": [self.blob(media_type, data) for data in layers],
        }
        return self.blob("application/vnd.oci.image.manifest.v1+json", json.dumps(manifest).encode(), **extra)

    def index(self, *manifests: dict[str, Any]) -> Path:
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": list(manifests)}))
        return self.path


def archive(source: Path, target: Path) -> Path:
    """A tar of the folder `source`, names without "./" like skopeo writes them."""
    with tarfile.open(target, "w") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
    return target


def two_layer_layout(path: Path, **annotations: str) -> Path:
    lower = layer(
        folder("etc"), file("etc/keep", b"keep"), file("etc/gone", b"gone"),
        folder("opt"), file("opt/old"), folder("opt/sub"), file("opt/sub/deep"),
    )  # fmt: skip
    upper = layer(file("opt/new", b"new"), file("etc/.wh.gone"), file("opt/.wh..wh..opq"))
    layout = Layout(path)
    return layout.index(layout.image([lower, upper], annotations=annotations))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def staging_dirs(store: Path) -> list[str]:
    return [p.name for p in store.iterdir() if p.name.startswith(".") and p.name != ".lock"] if store.exists() else []


# ── tests ──


def test_whiteout_removes_file_of_lower_layer(tmp_path: Path) -> None:
    image = oci.import_image(two_layer_layout(tmp_path / "layout"), "two")
    assert (image.rootfs / "etc" / "keep").read_bytes() == b"keep"
    assert not (image.rootfs / "etc" / "gone").exists()
    assert not (image.rootfs / "etc" / ".wh.gone").exists()


def test_opaque_whiteout_empties_directory_but_keeps_entries_of_its_own_layer(tmp_path: Path) -> None:
    image = oci.import_image(two_layer_layout(tmp_path / "layout"), "two")
    assert sorted(p.name for p in (image.rootfs / "opt").iterdir()) == ["new"]


def test_layout_folder_becomes_stored_image_with_manifest_digest(tmp_path: Path, store: Path) -> None:
    layout = two_layer_layout(tmp_path / "layout")
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    image = oci.import_image(layout, "two")
    assert image == images.load("two")
    assert (image.source, image.digest, image.rootfs.parent) == ("import", digest, store / "two" / "trees")
    assert staging_dirs(store) == []


def test_oci_archive_is_imported_like_its_folder(tmp_path: Path) -> None:
    layout = two_layer_layout(tmp_path / "layout", **{"org.opencontainers.image.ref.name": "1.36"})
    from_folder = oci.import_image(layout, "folder")
    from_archive = oci.import_image(archive(layout, tmp_path / "busybox.tar"))
    assert from_archive.name == "busybox-1.36"  # skopeo's ref.name is only the tag: the file names the image
    assert tree(from_archive.rootfs) == tree(from_folder.rootfs)
    assert from_archive.digest == from_folder.digest


def test_docker_25_archive_is_read_as_oci_layout_named_by_containerd_annotation(tmp_path: Path) -> None:
    layout = two_layer_layout(tmp_path / "layout", **{"io.containerd.image.name": "docker.io/library/Busybox:1.36", "org.opencontainers.image.ref.name": "1.36"})
    (layout / "manifest.json").write_text(json.dumps([{"Config": "blobs/sha256/0", "RepoTags": ["busybox:other"], "Layers": []}]))
    image = oci.import_image(archive(layout, tmp_path / "saved.tar"))
    assert image.name == "busybox-1.36"
    assert (image.rootfs / "opt" / "new").read_bytes() == b"new"


@pytest.mark.parametrize(("machine", "expected"), [("x86_64", "amd64"), ("aarch64", "arm64")])
def test_nested_index_chooses_the_platform_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    layout = Layout(tmp_path / "layout")
    by_platform = [
        layout.image([layer(file("arch", arch.encode()))], platform={"os": "linux", "architecture": arch})
        for arch in ("arm64", "amd64")
    ]  # fmt: skip
    attestation = layout.image([layer(file("arch", b"attestation"))], platform={"os": "unknown", "architecture": "unknown"})
    nested = layout.blob("application/vnd.oci.image.index.v1+json", json.dumps({"schemaVersion": 2, "manifests": [*by_platform, attestation]}).encode())
    layout.index(nested)
    monkeypatch.setattr(linux, "machine", lambda: machine)
    image = oci.import_image(layout.path, "multi")
    assert (image.rootfs / "arch").read_text() == expected
    assert image.digest == next(d["digest"] for d in by_platform if d["platform"]["architecture"] == expected)


def test_index_without_this_machines_platform_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(*(layout.image([layer(file(arch))], platform={"os": "linux", "architecture": arch}) for arch in ("arm64", "s390x")))
    monkeypatch.setattr(linux, "machine", lambda: "x86_64")
    with pytest.raises(HostError, match=r"none for linux/amd64: linux/arm64, linux/s390x"):
        oci.import_image(layout.path, "multi")


def test_docker_save_archive_is_imported_and_named_by_its_first_repo_tag(tmp_path: Path, store: Path) -> None:
    config = json.dumps({"config": {"Cmd": ["sh"]}, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layers = [layer(folder("bin"), file("bin/sh", b"lower", 0o755), file("bin/old"), gzip=False), layer(file("bin/.wh.old"), file("bin/sh", b"upper", 0o755), gzip=False)]
    manifest = [{"Config": "abc.json", "RepoTags": ["library/busybox:1.36", "busybox:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]
    path = tmp_path / "saved.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), ("abc.json", config), ("l1/layer.tar", layers[0]), ("l2/layer.tar", layers[1])]:
            tar.addfile(entry(name, data=data)[0], io.BytesIO(data))
    image = oci.import_image(path)
    assert (image.name, image.digest, image.config.cmd) == ("busybox-1.36", sha256(config), ("sh",))
    assert (image.rootfs / "bin" / "sh").read_bytes() == b"upper"
    assert not (image.rootfs / "bin" / "old").exists()
    assert staging_dirs(store) == []


def test_image_config_defaults_are_read(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    config = {"Env": ["PATH=/usr/bin:/bin", "EMPTY=", "EQ=a=b"], "Entrypoint": ["/init", "--"], "Cmd": ["serve", "-v"], "WorkingDir": "/srv", "User": "1000:1000"}
    layout.index(layout.image([layer(file("x"))], config))
    image = oci.import_image(layout.path, "configured")
    expected = images.ImageConfig(env=(("PATH", "/usr/bin:/bin"), ("EMPTY", ""), ("EQ", "a=b")), entrypoint=("/init", "--"), cmd=("serve", "-v"), workdir="/srv", user="1000:1000")
    assert image.config == expected
    assert images.load("configured") == image


def test_missing_config_defaults_are_empty(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(file("x"))], {"Entrypoint": None, "Cmd": None}))
    assert oci.import_image(layout.path, "bare").config == images.ImageConfig()


def test_symlink_to_root_keeps_later_entries_inside_the_rootfs(tmp_path: Path) -> None:
    assert not Path("/etc/owned").exists()
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(symlink("evil", "/"), file("evil/etc/owned", b"inside"))]))
    image = oci.import_image(layout.path, "evil")
    assert not Path("/etc/owned").exists()
    assert (image.rootfs / "etc" / "owned").read_bytes() == b"inside"
    assert os.readlink(image.rootfs / "evil") == "/"


def test_entry_replaces_symlink_of_lower_layer_instead_of_writing_through_it(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    lower = layer(file("target", b"lower"), symlink("link", "target"), file("dir/x"), symlink("other", "/"))
    upper = layer(file("link", b"upper"), file("dir", b"now a file"), folder("other"))
    layout.index(layout.image([lower, upper]))
    root = oci.import_image(layout.path, "replace").rootfs
    assert (root / "target").read_bytes() == b"lower"
    assert not (root / "link").is_symlink() and (root / "link").read_bytes() == b"upper"
    assert (root / "dir").read_bytes() == b"now a file"
    assert (root / "other").is_dir() and not (root / "other").is_symlink()


def test_modes_owners_links_and_device_nodes_are_kept(tmp_path: Path) -> None:
    device = entry("dev/null", tarfile.CHRTYPE, mode=0o666)
    device[0].devmajor, device[0].devminor = 1, 3
    capability = file("bin/ping", b"ping", 0o755)
    capability[0].pax_headers = {"SCHILY.xattr.security.capability": struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0).decode("utf-8", "surrogateescape")}
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(
        folder("bin"), file("bin/su", b"su", 0o4755), capability, folder("tmp", 0o1777), folder("ro", 0o555), file("ro/inside"),
        file("home/owned", b"x", 0o600, uid=1234, gid=5678), entry("bin/su-link", tarfile.LNKTYPE, link="bin/su"),
        symlink("abs", "/bin/su"), folder("dev"), device, entry("fifo", tarfile.FIFOTYPE, mode=0o600),
    )]))  # fmt: skip
    root = oci.import_image(layout.path, "modes").rootfs
    assert stat.S_IMODE((root / "bin" / "su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "ro").stat().st_mode) == 0o555 and (root / "ro" / "inside").exists()
    owned = (root / "home" / "owned").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1234, 5678, 0o600)
    assert (root / "bin" / "su-link").stat().st_ino == (root / "bin" / "su").stat().st_ino
    assert os.readlink(root / "abs") == "/bin/su"
    null = (root / "dev" / "null").stat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode)
    assert os.getxattr(root / "bin" / "ping", "security.capability")[:8] == struct.pack("<II", 0x02000001, 1 << 13)


def test_missing_top_directories_are_created_and_a_symlinked_one_is_left(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(symlink("run", "/var/run"), folder("etc", 0o700))]))
    root = oci.import_image(layout.path, "tops").rootfs
    assert os.readlink(root / "run") == "/var/run"
    assert stat.S_IMODE((root / "etc").stat().st_mode) == 0o700
    for top in ("proc", "sys", "dev", "tmp"):
        assert stat.S_IMODE((root / top).lstat().st_mode) == 0o755 and (root / top).is_dir()


def test_entry_named_with_dotdot_is_refused_and_nothing_is_left(tmp_path: Path, store: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(file("ok")), layer(file("../escape", b"out"))]))
    with pytest.raises(HostError, match=r"layer 2 .* has an entry '../escape' that leads outside the image's root"):
        oci.import_image(layout.path, "escape")
    assert staging_dirs(store) == [] and images.load("escape") is None
    assert not (tmp_path / "escape").exists() and not (store / "escape").exists()


def test_failure_while_unpacking_is_reported_from_the_child_and_staging_removed(tmp_path: Path, store: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(file("a")), layer(entry("b", tarfile.LNKTYPE, link="missing"))]))
    with pytest.raises(HostError, match=r"unpacking the image failed: layer 2 \(sha256:[0-9a-f]+\): entry 'b': linkname 'missing' not found"):
        oci.import_image(layout.path, "broken")
    assert staging_dirs(store) == []


def test_blob_that_does_not_match_its_digest_is_refused(tmp_path: Path, store: Path) -> None:
    layout = Layout(tmp_path / "layout")
    descriptor = layout.image([layer(file("x"))])
    layout.index(descriptor)
    manifest = json.loads((layout.path / "blobs" / "sha256" / descriptor["digest"].split(":")[1]).read_text())
    layer_blob = layout.path / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    layer_blob.write_bytes(layer(file("x", b"tampered")))
    with pytest.raises(HostError, match=r"blob sha256:[0-9a-f]+ does not match its digest"):
        oci.import_image(layout.path, "tampered")
    assert staging_dirs(store) == []


def test_zstd_layer_is_refused_with_a_hint_to_use_gzip(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([layer(file("x"))], media_type="application/vnd.oci.image.layer.v1.tar+zstd"))
    with pytest.raises(HostError, match="compressed with zstd") as raised:
        oci.import_image(layout.path, "zstd")
    assert "gzip" in raised.value.hint


def test_zstd_layer_is_recognised_by_its_magic_number_too(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.index(layout.image([b"\x28\xb5\x2f\xfd" + b"\0" * 60], media_type="application/vnd.oci.image.layer.v1.tar"))
    with pytest.raises(HostError, match="compressed with zstd"):
        oci.import_image(layout.path, "zstd")


def test_invalid_explicit_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="not a valid image name"):
        oci.import_image(two_layer_layout(tmp_path / "layout"), "Not Valid")


def test_folder_that_is_no_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="neither index.json"):
        oci.import_image(tmp_path, "nothing")


@pytest.mark.parametrize(
    ("reference", "source", "expected"),
    [
        ("library/busybox:1.36", "x.tar", "busybox-1.36"),
        ("docker.io/library/debian:bookworm-slim", "x.tar", "debian-bookworm-slim"),
        ("registry:5000/team/App_Server:latest", "x.tar", "app_server"),
        ("ghcr.io/o/tool@sha256:" + "0" * 64, "x.tar", "tool"),
        ("1.36", "busybox.tar.gz", "busybox-1.36"),
        ("", "My Image.tar", "my-image"),
        ("", "___", "image"),
        ("a/" + "x" * 80 + ":v1", "x.tar", "x" * 63),
    ],
)
def test_default_name_follows_the_store_rule(reference: str, source: str, expected: str) -> None:
    name = oci._default_name(reference, Path(source))
    assert name == expected and oci.NAME.fullmatch(name)


def test_imported_image_runs_as_a_service_with_its_config_as_defaults(tmp_path: Path, run_stack: Any) -> None:
    """End to end: a two-layer OCI archive of busybox, imported by the CLI, runs with its Cmd, Env,
    WorkingDir and User, and the whiteout of its upper layer holds."""
    import subprocess
    import sys

    rootfs = tmp_path / "busybox-root"
    rootfs.mkdir()
    build = Path(__file__).resolve().parents[2] / "images" / "busybox" / "build"
    subprocess.run([str(build)], env={**os.environ, "ROOTFS": str(rootfs)}, check=True, capture_output=True)
    lower = io.BytesIO()
    with tarfile.open(fileobj=lower, mode="w:gz") as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False)
    hello = b'echo "$GREETING from $(pwd) as $(id -un)"; ls /bin/vi 2>/dev/null || echo no-vi\n'
    upper = layer(folder("srv"), file("srv/hello.sh", hello, mode=0o755), file("bin/.wh.vi"))
    layout = Layout(tmp_path / "layout")
    config = {"Cmd": ["/bin/sh", "/srv/hello.sh"], "Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/srv", "User": "nobody"}
    layout.index(layout.image([lower.getvalue(), upper], config, annotations={"org.opencontainers.image.ref.name": "1.0"}))
    tarball = archive(tmp_path / "layout", tmp_path / "hello.tar")
    result = subprocess.run([sys.executable, "-m", "sandboxd", "image", "import", str(tarball)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "image hello-1.0: imported" in result.stdout
    spec = tmp_path / "stack"
    spec.mkdir()
    (spec / "hello.yaml").write_text("kind: service\nimage: hello-1.0\nrestart: no\n")
    stack = run_stack(spec)
    assert stack.wait_exit() == 0, stack.err
    assert stack.lines("hello") == ["hello from /srv as nobody", "no-vi"]
