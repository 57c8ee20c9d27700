"""Root file system images: a store of flattened trees, built from definitions or imported.

    /var/lib/sandboxd/                  (or $SANDBOXD_STATE_DIR)
      images/NAME/trees/VERSION/        the trees a service with `image: NAME` runs on (read-only lower
                                        layer of its overlay); older versions stay while mounted
      images/NAME/image.json            the current version, where it came from, the digest of its
                                        definition or manifest, the reference it was pulled by, and
                                        the defaults of an OCI config (env, entrypoint, cmd, workdir,
                                        user)
      oci/                              the OCI layout pulls go through, its blobs shared (pull.py)
      volumes/NAME/                     named volumes (see volumes.py)

A definition is a folder `images/NAME/` with an executable `build` that fills `$ROOTFS`. It is found
in an `images/` folder beside the spec folder or beside any folder above it (the nearest wins), and
rebuilt when the sha256 of its files changes. Imported images (oci.py) have no definition and stay
until `sandboxd image rm`. Pulled images (pull.py) are stored under a name made from their
reference (`pulled_name`), which image.json keeps.

What an `image:` value names (`find`, `ensure`): a definition of that name first (built), then a
built or imported image of that name in the store, then the registry reference it reads as
(`busybox` is docker.io/library/busybox:latest), as compose takes a local image before pulling.

Why flattened trees and not one overlay lower layer per image layer: a service's root is then one
read-only lower directory plus its own upper layer, the mount is the same for built and imported
images, and whiteouts are settled once at import time instead of at every start.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd.errors import HostError
from sandboxd.spec.model import NAME  # image names follow the rule of unit names: they name directories
from sandboxd.spec.reference import BadReference, Reference, parse_reference
from sandboxd.spec.trust import untrusted

BUILD_SCRIPT = "build"
TOP_DIRECTORIES = ("proc", "sys", "dev", "tmp", "run", "etc")  # every image gets these (sandboxd mounts on them)


def state_dir() -> Path:
    return Path(os.environ.get("SANDBOXD_STATE_DIR", "/var/lib/sandboxd"))


def store_dir() -> Path:
    return state_dir() / "images"


def private_dir(path: Path) -> Path:
    """`path` and the state directory, made if missing, root's alone (0700): an image may hold
    setuid files and device nodes, a volume what a sandbox's root wrote; on the host nobody else
    may reach them (sandboxd's mounts reach them with root's rights)."""
    for directory in (state_dir(), path):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            directory.chmod(0o700)
    return path


@dataclass(frozen=True)
class ImageConfig:
    """Defaults a service takes from its image (an OCI config's Env, Entrypoint, Cmd, WorkingDir, User)."""

    env: tuple[tuple[str, str], ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    def to_json(self) -> dict[str, object]:
        return {"env": [list(p) for p in self.env], "entrypoint": list(self.entrypoint), "cmd": list(self.cmd), "workdir": self.workdir, "user": self.user}

    @staticmethod
    def from_json(data: dict[str, object]) -> ImageConfig:
        env = data.get("env") or []
        assert isinstance(env, list)
        return ImageConfig(
            env=tuple((str(k), str(v)) for k, v in env),
            entrypoint=tuple(str(a) for a in data.get("entrypoint") or []),  # type: ignore[attr-defined]
            cmd=tuple(str(a) for a in data.get("cmd") or []),  # type: ignore[attr-defined]
            workdir=str(data.get("workdir") or ""),
            user=str(data.get("user") or ""),
        )


@dataclass(frozen=True)
class Image:
    name: str
    rootfs: Path
    config: ImageConfig = field(default_factory=ImageConfig)
    source: str = "folder"  # "build", "import", "pull", or "folder" (a path given in the spec)
    digest: str = ""
    created: float = 0.0
    reference: str = ""  # a pulled image's fully qualified reference


def _meta_path(name: str) -> Path:
    return store_dir() / name / "image.json"


def load(name: str) -> Image | None:
    """The stored image `name`, or None if there is none (or only a half-written one)."""
    try:
        data = json.loads(_meta_path(name).read_text())
    except (OSError, ValueError):
        return None
    rootfs = store_dir() / name / "trees" / str(data.get("tree", ""))
    if not data.get("tree") or not rootfs.is_dir():
        return None
    config = ImageConfig.from_json(data.get("config") or {})
    return Image(name, rootfs, config, data.get("source", ""), data.get("digest", ""), data.get("created", 0.0), data.get("reference", ""))


def list_images() -> list[Image]:
    try:
        names = sorted(p.name for p in store_dir().iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    return [image for name in names if (image := load(name)) is not None]


def staging_dir(name: str) -> Path:
    """An empty directory in the store, on the same file system, to fill before `commit`."""
    private_dir(store_dir())
    _sweep_staging()
    staging = store_dir() / f".{name}.{os.getpid()}.{time.monotonic_ns()}"
    staging.mkdir(mode=0o755)
    return staging


def _sweep_staging() -> None:
    """Remove staging directories of builds and imports whose process is gone (killed midway)."""
    for path in store_dir().glob(".*.*.*"):
        _, pid, stamp = path.name.rsplit(".", 2)
        if path.is_dir() and pid.isdigit() and stamp.isdigit() and not Path(f"/proc/{pid}").exists():
            remove_tree(path)


def commit(name: str, staging: Path, config: ImageConfig, source: str, digest: str, reference: str = "") -> Image:
    """Make `staging/rootfs` the image `name`. Each version is a tree of its own under
    images/NAME/trees/, and image.json (replaced atomically) names the current one: sandboxes that
    run on an older tree keep it whole, and it is removed once no sandbox has it mounted."""
    final = store_dir() / name
    (final / "trees").mkdir(parents=True, exist_ok=True)
    tree = f"{int(time.time())}-{os.getpid()}-{time.monotonic_ns()}"
    (staging / "rootfs").rename(final / "trees" / tree)
    meta = {"name": name, "source": source, "digest": digest, "created": time.time(), "tree": tree, "config": config.to_json(), "reference": reference}
    (final / "image.json.tmp").write_text(json.dumps(meta, indent=1))
    (final / "image.json.tmp").rename(final / "image.json")
    remove_tree(staging)
    collect(name)
    image = load(name)
    assert image is not None
    return image


def sandbox_mounts() -> Iterator[tuple[int, str]]:
    """(pid, mountinfo line) of every mount that a process in a sandboxd cgroup sees."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if "/sandboxd/" not in (entry / "cgroup").read_text():
                continue
            lines = (entry / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            yield int(entry.name), line


def trees_in_use() -> set[str]:
    """The image trees that a sandbox has mounted (its overlay's lowerdir), on this host. The
    sandbox attaches a copy of the tree below its own root at a path that ends with the tree's
    (sandbox/child.py, `image_root`), and the overlay's options name that path."""
    marker = f"{store_dir()}/"
    return {
        option[option.index(marker) :]
        for _pid, line in sandbox_mounts()
        for option in line.rsplit(" ", 1)[-1].split(",")
        if option.startswith("lowerdir=") and marker in option
    }


def collect(name: str) -> None:
    """Remove the trees of image `name` that are neither current nor mounted by a sandbox."""
    current = load(name)
    used = trees_in_use()
    for tree in (store_dir() / name / "trees").glob("*"):
        if (current is None or tree != current.rootfs) and str(tree) not in used:
            remove_tree(tree)


def remove(name: str) -> bool:
    """Remove image `name`; refused (HostError) while a sandbox runs on it."""
    if not NAME.fullmatch(name):
        return False
    path = store_dir() / name
    if not path.is_dir():
        return False
    with store_lock():
        used = [tree for tree in trees_in_use() if tree.startswith(f"{path}/")]
        if used:
            raise HostError(f"image '{name}' is in use by a running sandbox", "stop the stacks that use it first")
        trash = store_dir() / f".{name}.rm.{os.getpid()}.{time.monotonic_ns()}"
        path.rename(trash)
        remove_tree(trash)
    return True


def remove_tree(path: Path) -> None:
    # Images hold read-only directories (a Debian tree has some); make them writable on the way.
    def retry(function: object, failed: str, _exc: object) -> None:
        os.chmod(os.path.dirname(failed), 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            shutil.rmtree(failed, ignore_errors=True)
        else:
            os.unlink(failed)

    shutil.rmtree(path, onerror=retry)


def size_of(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


# ── definitions ──


def find_definition(name: str, spec_folder: Path) -> Path | None:
    """`images/NAME/` beside the spec folder or beside any folder above it; the nearest wins.
    Its build script runs as root, so it must be root's (or the caller's) and writable by no one
    else, as must the folders that hold it (`images/NAME`, `images/`, and those above them, as
    trust.py says): an `images/` in /tmp made by someone else is refused."""
    for folder in [spec_folder, *spec_folder.parents]:
        candidate = folder / "images" / name
        if (candidate / BUILD_SCRIPT).is_file():
            found = untrusted(candidate / BUILD_SCRIPT, strict=3)
            if found is not None:
                raise HostError(
                    f"refusing to run {candidate / BUILD_SCRIPT} as root: {found.path} is {found.why}",
                    f"make it root's and writable by root alone ({found.fix})",
                )
            return candidate
    return None


def definition_digest(definition: Path) -> str:
    """sha256 over the definition's files: their paths, modes and contents."""
    import hashlib  # here, not at the top: the supervisor that imports this module never hashes (OpenSSL's libcrypto is 4 MiB)

    digest = hashlib.sha256()
    for path in sorted(p for p in definition.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(definition)).encode() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def build(name: str, definition: Path, echo: bool = True) -> Image:
    """Run the definition's build script into a staging directory and commit the result."""
    staging = staging_dir(name)
    rootfs = staging / "rootfs"
    rootfs.mkdir(mode=0o755)
    script = definition / BUILD_SCRIPT
    env = {**os.environ, "ROOTFS": str(rootfs), "IMAGE_NAME": name}
    try:
        # Its output goes to stderr, with sandboxd's own messages (stdout may be JSON).
        result = subprocess.run([str(script)], cwd=definition, env=env, stdout=sys.stderr.fileno() if echo else subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    except OSError as e:
        remove_tree(staging)
        raise HostError(f"cannot run {script}: {e.strerror}", f"make it executable: chmod +x {script}") from None
    if result.returncode != 0:
        remove_tree(staging)
        output = (result.stdout or b"").decode(errors="replace").strip().splitlines()[-5:] if not echo else []
        detail = ("; last lines: " + " | ".join(output)) if output else ""
        raise HostError(f"building image '{name}' failed: {script} exited with status {result.returncode}{detail}", "fix the build script; its output says why")
    for top in TOP_DIRECTORIES:
        (rootfs / top).mkdir(mode=0o755, exist_ok=True)
    return commit(name, staging, _config_of(definition), "build", definition_digest(definition))


def _config_of(definition: Path) -> ImageConfig:
    """A definition may set defaults in `config.json` ({"cmd": [...], "env": {...}, "workdir", "user"})."""
    path = definition / "config.json"
    if not path.is_file():
        return ImageConfig()
    data = json.loads(path.read_text())
    env = data.get("env") or {}
    return ImageConfig(
        env=tuple((str(k), str(v)) for k, v in (env.items() if isinstance(env, dict) else env)),
        entrypoint=tuple(data.get("entrypoint") or ()),
        cmd=tuple(data.get("cmd") or ()),
        workdir=str(data.get("workdir") or ""),
        user=str(data.get("user") or ""),
    )


def ensure(name: str, spec_folder: Path, echo: bool = True) -> Image | None:
    """The image an `image:` value names for a stack in `spec_folder`: built first if its
    definition is new or changed. None if there is neither a definition nor a stored image of that
    name, nor a pulled image of the reference it reads as (pull.py pulls before this is asked)."""
    definition = find_definition(name, spec_folder) if NAME.fullmatch(name) else None
    if definition is None:
        return find(name)
    return build_if_changed(name, definition, echo)


def find(value: str) -> Image | None:
    """The stored image an `image:` value names, without building or pulling: a built or imported
    image of that name, else the image pulled by the reference it reads as."""
    local = local_image(value)
    if local is not None:
        return local
    try:
        reference = parse_reference(value)
    except BadReference:
        return None
    pulled = load(pulled_name(reference))
    return pulled if pulled is not None and pulled.reference == str(reference) else None


def local_image(value: str) -> Image | None:
    """The built or imported image named `value`, if the store has one."""
    image = load(value) if NAME.fullmatch(value) else None
    return image if image is not None and image.source != "pull" else None


def pulled_name(reference: Reference) -> str:
    """The store name of a pulled image: its repository's last part and its tag (or digest) to be
    read, and a hash of the whole reference to tell `a/app:1` from `b/app:1`. Never a name a
    definition would choose by accident, and free of the `:` and `,` an overlay's options split on."""
    import hashlib  # as in definition_digest

    label = reference.tag or reference.digest.replace(":", "-")[:19]
    tail = re.sub(r"[^a-z0-9_.-]+", "-", f"{reference.repository.rsplit('/', 1)[-1]}-{label}".lower())
    return f"{tail[:50].strip('_.-')}-{hashlib.sha256(str(reference).encode()).hexdigest()[:10]}"


def missing_image(value: str, spec_folder: Path) -> str:
    """Why `value` names no image, for a spec error."""
    try:
        reference: Reference | None = parse_reference(value)
    except BadReference:
        reference = None
    pull = f"; pull it from {reference.registry} with sandboxd image pull {value}" if reference is not None else ""
    return (
        f"no image '{value}': none in the store (sandboxd image ls) and no images/{value}/build "
        f"beside {spec_folder} or a folder above it; import one with sandboxd image import FILE{pull}"
    )


def build_if_changed(name: str, definition: Path, echo: bool = True) -> Image:
    with store_lock():  # two stacks that start at once build an image once
        stored = load(name)
        if stored is not None and stored.source == "build" and stored.digest == definition_digest(definition):
            return stored
        return build(name, definition, echo=echo)


@contextmanager
def store_lock() -> Iterator[None]:
    private_dir(store_dir())
    fd = os.open(store_dir() / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
