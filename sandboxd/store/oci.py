"""Import container images into the image store: OCI image layouts and `docker save` archives.

Sources:
  - an OCI image layout: a folder with `oci-layout` and `index.json`, or a tar archive of one
    (`skopeo copy ... oci-archive:x.tar`; `docker save` of Docker >= 25 writes one too and adds a
    docker `manifest.json`, which is then only read for the image's name);
  - a classic `docker save` archive: `manifest.json` naming a config file and the layer tars.

The layers become one flattened tree, the one overlayfs would show: an entry replaces what a lower
layer has at its path (two directories merge), `DIR/.wh.NAME` removes DIR/NAME and
`DIR/.wh..wh..opq` empties DIR. A layer's whiteouts are applied before its other entries, so an
opaque directory keeps what its own layer puts in it. An entry that lands on a lower layer's file
replaces the file instead of writing into it: writing into a device node would reach the device.
Owners (numeric), modes with setuid and sticky bits, hard links, device nodes and file capabilities
(the security.capability xattr of a PAX header) are kept; other xattrs are not.

Why a chrooted child: a layer is untrusted input, and its symlinks (`evil -> /`, then
`evil/etc/owned`) would lead a plain extraction out of the tree. In a child whose root is the tree,
every path, absolute symlinks too, resolves inside it, as it will for the service. The parent reads
and checks (digests, entry names), the child only writes:

    parent                                         child
    verify blob digests, open each layer,
    list its entries, refuse `..` in names
    pipe(); fork() ──────────────────────────────► chroot(rootfs); chdir("/")
                                                   per layer: whiteouts, then the other entries;
                                                   create missing /proc /sys /dev /tmp /run /etc
    read the pipe to its end ◄──────────────────── exit 0, or the error as text and exit 1
    waitpid(); HostError(text) unless it exited 0

Image names: the `name` given, else one made from what the image was called where it came from (the
`io.containerd.image.name` annotation, the first RepoTags entry of manifest.json, or the
`org.opencontainers.image.ref.name` annotation, in that order): registry and namespace dropped, the
tag appended with "-" unless it is "latest" ("docker.io/library/busybox:1.36" -> "busybox-1.36").
A ref.name that is only a tag (skopeo writes that) is the tag of the file's stem ("busybox.tar" with
"1.36" -> "busybox-1.36"). Without any, the file's stem. Made names are lower-cased, runs of other
characters than a-z 0-9 _ . - become "-", ends that are not a letter or digit are cut, and the name
is cut to 63 characters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sandboxd.kernel import linux
from sandboxd.store import images
from sandboxd.errors import HostError
from sandboxd.spec.model import NAME  # image names follow the rule of unit names

TOP_DIRECTORIES = images.TOP_DIRECTORIES

_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]{64}|[0-9a-f]{128})")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
REF_NAME = "org.opencontainers.image.ref.name"  # the annotation that names an entry of index.json
_OPAQUE = ".wh..wh..opq"
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
_CAPABILITY = "SCHILY.xattr.security.capability"
_DAMAGED = "the image is damaged or incomplete; export or download it again"


@dataclass(frozen=True)
class _Layer:
    path: str  # inside the source
    media_type: str  # "" when the source does not say (docker save)
    digest: str  # "" when the source does not say


@dataclass(frozen=True)
class _Manifest:
    layers: tuple[_Layer, ...]
    config: images.ImageConfig
    digest: str
    reference: str  # what the image was called where it came from; "" if unknown


@dataclass(frozen=True)
class Pulled:
    """What pull.py says of an image it copied into a layout of many images."""

    tag: str  # its entry in index.json (org.opencontainers.image.ref.name)
    reference: str  # the fully qualified reference it was pulled by


def import_image(source: Path, name: str | None = None, pulled: Pulled | None = None) -> images.Image:
    """Unpack the image at `source` (a layout folder or an archive) into the store as `name`;
    with `pulled`, the layout's entry of that tag, stored as a pulled image."""
    if name is not None and not NAME.fullmatch(name):
        raise HostError(f"'{name}' is not a valid image name", "use 1 to 63 of a-z 0-9 _ . - starting with a letter or digit")
    if os.geteuid() != 0:
        raise HostError("importing an image needs root (layers hold files of many owners)", "run it as root")
    if not source.exists():
        raise HostError(f"{source}: no such file or folder", "give an OCI layout folder, an oci-archive tar or a `docker save` tar")
    stack = ExitStack()
    try:
        files = _Source(source)
        stack.callback(files.close)
        manifest = _read_manifest(files, pulled.tag if pulled else "")
        layers = [(f"layer {n} ({layer.digest or layer.path})", _open_layer(files, layer, n, stack)) for n, layer in enumerate(manifest.layers, 1)]
        name = name or _default_name(manifest.reference, source)
        staging = images.staging_dir(name)
        try:
            rootfs = staging / "rootfs"
            rootfs.mkdir()
            rootfs.chmod(0o755)
            _unpack_in_chroot(rootfs, layers)
            with images.store_lock():
                if pulled is not None:
                    return images.commit(name, staging, manifest.config, "pull", manifest.digest, pulled.reference)
                return images.commit(name, staging, manifest.config, "import", manifest.digest)
        except BaseException:
            if staging.exists():
                images.remove_tree(staging)
            raise
    finally:
        stack.close()


# ── reading the source (parent) ──


class _Source:
    """The files of a layout folder or of an archive, by their path from its top."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._archive: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if not path.is_dir():
            try:
                self._archive = tarfile.open(path, "r:*")
                self._members = {_clean(m.name): m for m in self._archive.getmembers()}
            except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
                raise HostError(f"{path}: not an image archive ({e})", "give an OCI layout folder, an oci-archive tar or a `docker save` tar") from None

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()

    def has(self, name: str) -> bool:
        return (self.path / name).is_file() if self._archive is None else _clean(name) in self._members

    def open(self, name: str) -> IO[bytes]:
        if name.startswith("/") or ".." in name.split("/"):
            raise HostError(f"{self.path}: refers to '{name}', outside the image", _DAMAGED)
        file: IO[bytes] | None = None
        try:
            file = open(self.path / name, "rb") if self._archive is None else self._archive.extractfile(self._members[_clean(name)])
        except (OSError, KeyError, tarfile.TarError):
            pass
        if file is None:
            raise HostError(f"{self.path}: '{name}' is missing", _DAMAGED)
        return file

    def read(self, name: str) -> bytes:
        with self.open(name) as file:
            return file.read()

    def open_blob(self, digest: str) -> IO[bytes]:
        """A blob of an OCI layout, its digest checked, positioned at its start."""
        match = _DIGEST.fullmatch(digest)
        if match is None:
            raise HostError(f"{self.path}: unsupported digest '{digest}'", "only sha256 and sha512 digests are read")
        algorithm, expected = match.groups()
        blob = self.open(f"blobs/{algorithm}/{expected}")
        hasher = hashlib.new(algorithm)
        while chunk := blob.read(1 << 20):
            hasher.update(chunk)
        if hasher.hexdigest() != expected:
            blob.close()
            raise HostError(f"{self.path}: blob {digest} does not match its digest (its content is {algorithm}:{hasher.hexdigest()})", _DAMAGED)
        blob.seek(0)
        return blob

    def read_blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as blob:
            return blob.read()


def _clean(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _read_manifest(files: _Source, tag: str = "") -> _Manifest:
    try:
        if files.has("index.json"):
            return _read_oci(files, tag)
        if files.has("manifest.json"):
            return _read_docker(files)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise HostError(f"{files.path}: malformed image description ({type(e).__name__}: {e})", _DAMAGED) from None
    raise HostError(f"{files.path}: neither index.json (OCI layout) nor manifest.json (docker save) is there", "give an OCI layout folder, an oci-archive tar or a `docker save` tar")


def _read_oci(files: _Source, tag: str = "") -> _Manifest:
    index = json.loads(files.read("index.json"))
    if tag:  # one image of a layout that holds many
        index = {"manifests": [d for d in index.get("manifests") or [] if (d.get("annotations") or {}).get(REF_NAME) == tag][-1:]}
    descriptor = _choose(index, "index.json" + (f" (entry {tag})" if tag else ""))
    annotations = descriptor.get("annotations") or {}
    reference = annotations.get("io.containerd.image.name") or ""
    if not reference and files.has("manifest.json"):
        reference = (json.loads(files.read("manifest.json"))[0].get("RepoTags") or [""])[0]
    reference = reference or annotations.get(REF_NAME) or ""
    document = json.loads(files.read_blob(descriptor["digest"]))
    while "manifests" in document:  # an index of one manifest per platform
        descriptor = _choose(document, descriptor["digest"])
        document = json.loads(files.read_blob(descriptor["digest"]))
    config = _image_config(files.read_blob(document["config"]["digest"]))
    layers = tuple(_Layer("", str(d.get("mediaType", "")), str(d["digest"])) for d in document["layers"])
    return _Manifest(layers, config, str(descriptor["digest"]), str(reference))


def _choose(index: Any, where: str) -> dict[str, Any]:
    """The entry of an index for this machine: the only one, or the one for linux/<its architecture>."""
    entries = [d for d in index.get("manifests") or [] if (d.get("platform") or {}).get("architecture") != "unknown"]  # buildx attestations
    if not entries:
        raise HostError(f"{where} lists no image", _DAMAGED)
    if len(entries) == 1:
        return dict(entries[0])
    architecture = _ARCHITECTURES.get(linux.machine(), linux.machine())
    for entry in entries:
        target = entry.get("platform") or {}
        if target.get("architecture") == architecture and target.get("os", "linux") == "linux":
            return dict(entry)
    found = ", ".join(
        f"{p.get('os', '?')}/{p.get('architecture', '?')}" if (p := d.get("platform")) else str((d.get("annotations") or {}).get("org.opencontainers.image.ref.name", d.get("digest")))
        for d in entries
    )
    raise HostError(f"{where} lists {len(entries)} images and none for linux/{architecture}{': ' + found if found else ''}", "export one image, for this machine's platform")


def _read_docker(files: _Source) -> _Manifest:
    entries = json.loads(files.read("manifest.json"))
    if len(entries) != 1:
        raise HostError(f"{files.path}: manifest.json lists {len(entries)} images", "save one image per archive: docker save -o FILE.tar IMAGE")
    config = files.read(entries[0]["Config"])
    layers = tuple(_Layer(str(path), "", "") for path in entries[0]["Layers"])
    reference = (entries[0].get("RepoTags") or [""])[0]
    return _Manifest(layers, _image_config(config), "sha256:" + hashlib.sha256(config).hexdigest(), str(reference))


def _image_config(blob: bytes) -> images.ImageConfig:
    config = json.loads(blob).get("config") or {}

    def words(key: str) -> tuple[str, ...]:
        value = config.get(key) or ()
        return (value,) if isinstance(value, str) else tuple(str(v) for v in value)

    env = tuple((key, value) for key, _, value in (str(e).partition("=") for e in config.get("Env") or ()))
    return images.ImageConfig(env=env, entrypoint=words("Entrypoint"), cmd=words("Cmd"), workdir=str(config.get("WorkingDir") or ""), user=str(config.get("User") or ""))


def _open_layer(files: _Source, layer: _Layer, number: int, stack: ExitStack) -> tarfile.TarFile:
    """The layer's tar, its entries listed and their names checked, ready for the child."""
    what = f"{files.path}: layer {number} ({layer.digest or layer.path})"
    zstd = HostError(f"{what} is compressed with zstd, which sandboxd cannot read", "re-export the image with gzip layers, e.g. skopeo copy --dest-compress-format gzip ...")
    if "zstd" in layer.media_type:
        raise zstd
    blob = stack.enter_context(files.open_blob(layer.digest) if layer.digest else files.open(layer.path))
    if blob.read(4) == _ZSTD_MAGIC:
        raise zstd
    blob.seek(0)
    try:
        tar = stack.enter_context(tarfile.open(fileobj=blob, mode="r:*"))
        members = tar.getmembers()
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise HostError(f"{what} is not a readable tar archive ({e})", _DAMAGED) from None
    for member in members:
        if ".." in member.name.split("/") or (member.islnk() and ".." in member.linkname.split("/")):
            raise HostError(f"{what} has an entry '{member.name}' that leads outside the image's root", "the archive is damaged or hostile; do not use it")
        if _target(member.name) == "/" and not member.isdir():
            raise HostError(f"{what} has an entry '{member.name}' that would replace the image's root", "the archive is damaged or hostile; do not use it")
    tar.errorlevel = 2  # a failed chown or chmod is an error, not a debug message
    return tar


def _default_name(reference: str, source: Path) -> str:
    stem = source.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if reference and "/" not in reference and ":" not in reference:
        reference = f"{stem}:{reference}"  # only a tag
    reference = reference.split("@", 1)[0]
    base = reference.rsplit("/", 1)[-1]
    base, _, tag = base.partition(":")
    return _sanitised(base if tag in ("", "latest") else f"{base}-{tag}") or _sanitised(stem) or "image"


def _sanitised(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("_.-")[:63].rstrip("_.-")


# ── writing the tree (child) ──


def _unpack_in_chroot(rootfs: Path, layers: list[tuple[str, tarfile.TarFile]]) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status, current = 1, "chroot"
        try:
            os.close(read_end)
            os.chroot(rootfs)
            os.chdir("/")
            os.umask(0o022)
            for current, tar in layers:
                _apply_layer(tar)
            for top in TOP_DIRECTORIES:
                if not os.path.lexists("/" + top):  # a symlink stays: the sandbox child refuses it
                    os.mkdir("/" + top, 0o755)
            status = 0
        except BaseException as e:
            try:
                os.write(write_end, f"{current}: {e}".encode(errors="replace")[:4000])
            except OSError:
                pass
        finally:
            os._exit(status)
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    if code != 0:
        raise HostError(f"unpacking the image failed: {message or f'the unpacking process ended with status {code}'}", "if the archive is damaged, export the image again")


def _apply_layer(tar: tarfile.TarFile) -> None:
    members = tar.getmembers()
    for member in members:
        if _is_whiteout(member):
            _apply_whiteout(_target(member.name))
    directories = []
    for member in members:
        if _is_whiteout(member):
            continue
        path = _target(member.name)
        try:
            _make_room(path, member)
            if member.isdir():  # modes and owners at the end: a read-only directory must take its entries first
                directories.append(member)
            # a hard link shares its target's inode, whose mode and owner are already set
            tar.extract(member, "/", set_attrs=not (member.isdir() or member.islnk()), numeric_owner=True, **_TRUSTED)
            capability = member.pax_headers.get(_CAPABILITY)
            if capability is not None and member.isreg():  # after the chown, which clears it
                os.setxattr(path, "security.capability", capability.encode("utf-8", "surrogateescape"))
        except (OSError, tarfile.TarError, KeyError) as e:  # KeyError: a hard link to nothing
            raise _entry_error(member, e) from e
    for member in sorted(directories, key=lambda m: m.name, reverse=True):
        path = _target(member.name)
        try:
            tar.chown(member, path, numeric_owner=True)
            tar.utime(member, path)
            tar.chmod(member, path)
        except tarfile.TarError as e:
            raise _entry_error(member, e) from e


def _entry_error(member: tarfile.TarInfo, error: Exception) -> OSError:
    detail = error.args[0] if isinstance(error, KeyError) else error
    cause = f" ({error.__cause__})" if error.__cause__ else ""  # tarfile's "could not change owner" hides the errno
    return OSError(f"entry '{member.name}': {detail}{cause}")


def _target(name: str) -> str:
    return "/" + _clean(name)


def _is_whiteout(member: tarfile.TarInfo) -> bool:
    return os.path.basename(_target(member.name)).startswith(".wh.")


def _apply_whiteout(path: str) -> None:
    folder, name = os.path.split(path)
    if name == _OPAQUE:
        if stat.S_ISDIR(_lstat_mode(folder)):
            for entry in os.listdir(folder):
                _remove(os.path.join(folder, entry))
    elif not name.startswith(".wh..wh.") and name[4:] not in ("", ".", ".."):
        _remove(os.path.join(folder, name[4:]))


def _make_room(path: str, member: tarfile.TarInfo) -> None:
    mode = _lstat_mode(path)
    if path != "/" and mode and not (member.isdir() and stat.S_ISDIR(mode)):
        _remove(path)


def _remove(path: str) -> None:
    mode = _lstat_mode(path)
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    elif mode:
        os.unlink(path)


def _lstat_mode(path: str) -> int:
    """The mode of what is at `path` (not following a symlink there), 0 if nothing is."""
    try:
        return os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return 0
