"""Images pulled from a registry: a local one (Debian's docker-registry on 127.0.0.1, its storage in
a temporary folder) that each test starts, pushes an image of its own making into, and stops."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import HANG, wait_until, write

BUSYBOX = Path("/bin/busybox")  # busybox-static's, which scripts/test installs
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
pytestmark = pytest.mark.skipif(shutil.which("docker-registry") is None or shutil.which("skopeo") is None, reason="needs docker-registry and skopeo")


def sandboxd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})


class Registry:
    """docker-registry serving on 127.0.0.1:PORT (a free port it chose), its log read back to count requests."""

    def __init__(self, root: Path, users: str = "") -> None:
        """`users`: htpasswd lines; with them every request needs credentials."""
        self.root = root
        config = root / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\nhttp:\n  addr: 127.0.0.1:0\n")
        if users:
            (root / "htpasswd").write_text(users)
            with open(config, "a") as text:
                text.write(f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n")
        self.log = root / "registry.log"
        with open(self.log, "wb") as log:
            # REGISTRY_* variables would override its configuration (REGISTRY_AUTH_FILE is skopeo's).
            environment = {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment)
        found = wait_until(lambda: self.proc.poll() is not None or re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text()), "the registry to listen")
        assert isinstance(found, re.Match), f"docker-registry exited: {self.log.read_text()}"
        self.address = f"127.0.0.1:{found.group(1)}"
        self.pushed = 0  # where in the log the requests of the last push end

    def requests(self, pattern: str) -> int:
        """How many GET requests since the last push the registry answered whose path holds `pattern`."""
        return len(re.findall(rf'"GET [^" ]*{re.escape(pattern)}[^" ]* HTTP/1\.1" 200', self.log.read_text()[self.pushed :]))

    def push(self, layout: Path, tag: str, repository: str, credentials: str = "") -> str:
        """Push the layout's entry `tag` as REPOSITORY:tag; the reference to it."""
        reference = f"{self.address}/{repository}:{tag}"
        login = ["--dest-creds", credentials] if credentials else []
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *login, f"oci:{layout}:{tag}", f"docker://{reference}"], check=True, capture_output=True)
        self.pushed = len(self.log.read_text())
        return reference

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(HANG)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running_registry(users: str = "") -> Iterator[Registry]:
    """A registry of its own; afterwards its process is gone and its folder removed."""
    root = Path(tempfile.mkdtemp(prefix="sandboxd-registry-"))
    try:
        server = Registry(root, users)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root)


@pytest.fixture
def registry() -> Iterator[Registry]:
    with running_registry() as server:
        yield server


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


class Layout:
    """An OCI image layout of busybox images: one layer with busybox and its sh, and optionally a
    second one with /etc/version. The first layer is the same bytes in every image made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict[str, Any]] = []
        self.base = self.blob("application/vnd.oci.image.layer.v1.tar+gzip", self.tar(("bin/busybox", BUSYBOX.read_bytes(), 0o755), ("bin/sh", None, 0o777)))

    @staticmethod
    def tar(*files: tuple[str, bytes | None, int]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data, mode in files:
                info = tarfile.TarInfo(name)
                info.mode, info.mtime = mode, 0
                if data is None:
                    info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                else:
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return gzip.compress(buffer.getvalue(), mtime=0)

    def blob(self, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}

    def image(self, tag: str, version: str = "") -> str:
        """Add an image as entry `tag`; its manifest digest."""
        layers = [self.base]
        if version:
            layers.append(self.blob("application/vnd.oci.image.layer.v1.tar+gzip", self.tar(("etc/version", f"{version}\n".encode(), 0o644))))
        config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh", "-c", "echo from the image"], "Env": ["FROM_IMAGE=yes"]}, "rootfs": {"type": "layers", "diff_ids": []}}
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": self.blob("application/vnd.oci.image.config.v1+json", json.dumps(config).encode()), "layers": layers}
        descriptor = self.blob(OCI_MANIFEST, json.dumps(manifest).encode(), annotations={"org.opencontainers.image.ref.name": tag})
        self.entries = [e for e in self.entries if e["annotations"]["org.opencontainers.image.ref.name"] != tag] + [descriptor]
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.entries}))
        return str(descriptor["digest"])


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "layout")


def base_layer_fetches(registry: Registry, layout: Layout) -> int:
    return registry.requests(f"/blobs/{layout.base['digest']}")


def test_service_runs_on_an_image_pulled_from_a_registry_and_a_second_up_pulls_nothing(run_stack, spec_dir: Path, registry: Registry, layout: Layout) -> None:
    layout.image("1", version="one")
    reference = registry.push(layout.path, "1", "test/busybox")
    write(spec_dir, "box.yaml", f"""
        kind: service
        image: {reference}
        restart: no
        command: ["sh", "-c", "cat /etc/version; echo FROM_IMAGE=$FROM_IMAGE"]
        """)
    for _ in range(2):
        stack = run_stack(spec_dir)
        assert stack.wait_exit() == 0, stack.err
        assert stack.lines("box") == ["one", "FROM_IMAGE=yes"]
    assert registry.requests("/manifests/1") == 1  # the second up asked the registry nothing
    assert base_layer_fetches(registry, layout) == 1
    listed = json.loads(sandboxd("image", "ls", "--json").stdout)
    assert [(i["reference"], i["source"]) for i in listed] == [(reference, "pull")]


def test_image_by_digest_is_pulled_and_a_digest_the_registry_lacks_is_one_clear_error(run_stack, spec_dir: Path, registry: Registry, layout: Layout) -> None:
    digest = layout.image("1")
    registry.push(layout.path, "1", "test/busybox")
    reference = f"{registry.address}/test/busybox@{digest}"
    write(spec_dir, "box.yaml", f"kind: service\nimage: {reference}\nrestart: no\n")
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    assert stack.lines("box") == ["from the image"]  # the image's Cmd
    assert json.loads(sandboxd("image", "ls", "--json").stdout)[0]["digest"] == digest
    absent = f"{registry.address}/test/busybox@sha256:{'0' * 64}"
    write(spec_dir, "box.yaml", f"kind: service\nimage: {absent}\nrestart: no\n")
    result = sandboxd("up", str(spec_dir))
    assert result.returncode == 1
    assert f"cannot pull {absent}: registry {registry.address} has no such image" in result.stderr and "hint:" in result.stderr


def test_unknown_image_is_one_error_naming_the_image_and_the_registry(spec_dir: Path, registry: Registry) -> None:
    write(spec_dir, "box.yaml", f"kind: service\nimage: {registry.address}/test/nothere:1\ncommand: [x]\n")
    result = sandboxd("up", str(spec_dir))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"sandboxd: cannot pull {registry.address}/test/nothere:1: registry {registry.address} has no such image (manifest unknown: manifest unknown)"
    assert lines[1].startswith("  hint: ") and len(lines) == 2


def test_unreachable_registry_is_one_error_with_a_hint(spec_dir: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % unused.getsockname()[1]
    write(spec_dir, "box.yaml", f"kind: service\nimage: {address}/test/busybox:1\ncommand: [x]\n")
    result = sandboxd("up", str(spec_dir))
    assert result.returncode == 1
    assert f"sandboxd: cannot pull {address}/test/busybox:1: registry {address} cannot be reached (" in result.stderr
    assert "connection refused" in result.stderr and "hint: check the registry's address" in result.stderr


def test_pull_never_with_an_image_the_store_lacks_is_a_spec_error(spec_dir: Path, registry: Registry, layout: Layout) -> None:
    layout.image("1")
    reference = registry.push(layout.path, "1", "test/busybox")
    write(spec_dir, "box.yaml", f"kind: service\nimage: {reference}\ncommand: [x]\n")
    result = sandboxd("up", "--pull", "never", str(spec_dir))
    assert result.returncode == 2
    assert f"box.yaml:1: image: no image '{reference}'" in result.stderr and f"--pull never forbids pulling {reference}" in result.stderr
    assert registry.requests("/manifests/") == 0


def test_pull_always_asks_again_without_fetching_or_unpacking_what_is_unchanged(run_stack, spec_dir: Path, registry: Registry, layout: Layout, store: Path) -> None:
    layout.image("1", version="one")
    reference = registry.push(layout.path, "1", "test/busybox")
    assert sandboxd("image", "pull", reference).returncode == 0
    created = json.loads(sandboxd("image", "ls", "--json").stdout)[0]["created"]
    write(spec_dir, "box.yaml", f"kind: service\nimage: {reference}\nrestart: no\ncommand: [sh, -c, cat /etc/version]\n")
    stack = run_stack(spec_dir, "--pull", "always")
    assert stack.wait_exit() == 0, stack.err
    assert registry.requests("/manifests/1") == 2 and base_layer_fetches(registry, layout) == 1
    assert json.loads(sandboxd("image", "ls", "--json").stdout)[0]["created"] == created
    layout.image("1", version="two")  # the tag moves to a new image
    registry.push(layout.path, "1", "test/busybox")
    stack = run_stack(spec_dir, "--pull", "always")
    assert stack.wait_exit() == 0, stack.err
    assert stack.lines("box") == ["two"]
    assert base_layer_fetches(registry, layout) == 0  # counted from the second push on: the layout has it
    assert len(list((store / "oci" / "blobs" / "sha256").iterdir())) == 4  # the base and the new layer, the config, the manifest


def test_image_pull_fetches_a_layer_two_images_share_once_and_rm_prunes_the_layout(registry: Registry, layout: Layout, store: Path) -> None:
    layout.image("1", version="one")
    layout.image("2", version="two")
    first = registry.push(layout.path, "1", "test/busybox")
    second = registry.push(layout.path, "2", "test/other")
    for reference in (first, second):
        result = sandboxd("image", "pull", reference)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"image {reference}: pulled as ")
    assert base_layer_fetches(registry, layout) == 1
    shared = store / "oci" / "blobs" / "sha256"
    assert len(list(shared.iterdir())) == 6  # the base layer, two version layers, the config they share, two manifests
    assert sandboxd("image", "rm", first).returncode == 0
    assert len(list(shared.iterdir())) == 4  # what the other image still uses
    assert [i["reference"] for i in json.loads(sandboxd("image", "ls", "--json").stdout)] == [second]
    assert sandboxd("image", "rm", second).returncode == 0
    assert list(shared.iterdir()) == []


def test_bad_reference_on_the_command_line_is_refused(registry: Registry) -> None:
    result = sandboxd("image", "pull", f"{registry.address}/Test/busybox:1")
    assert result.returncode == 1
    assert f"'{registry.address}/Test/busybox:1' is not an image reference: repository names are lower case: 'Test'" in result.stderr


def test_detached_up_pulls_before_it_forks_and_config_shows_the_pulled_image(spec_dir: Path, registry: Registry, layout: Layout) -> None:
    layout.image("1", version="one")
    reference = registry.push(layout.path, "1", "test/busybox")
    write(spec_dir, "box.yaml", f"kind: service\nimage: {reference}\ncommand: [sh, -c, 'cat /etc/version; exec sleep 60']\n")
    assert f"pull it from {registry.address} with sandboxd image pull {reference}" in sandboxd("config", str(spec_dir)).stderr  # config pulls nothing
    up = sandboxd("up", "-d", "--wait", "-p", "pulled", str(spec_dir))
    try:
        assert up.returncode == 0, up.stderr
        assert registry.requests("/manifests/1") == 1
        config = sandboxd("config", str(spec_dir))
        assert config.returncode == 0, config.stderr
        assert json.loads(config.stdout)["stack"]["services"][0]["image"] == reference
    finally:
        assert sandboxd("down", "-p", "pulled").returncode == 0


def test_up_on_a_running_stack_pulls_the_image_a_changed_service_names(spec_dir: Path, registry: Registry, layout: Layout) -> None:
    layout.image("1", version="one")
    layout.image("2", version="two")
    first = registry.push(layout.path, "1", "test/busybox")
    second = registry.push(layout.path, "2", "test/busybox")
    spec = "kind: service\nimage: {}\ncommand: [sh, -c, 'exec sleep 60']\n"
    write(spec_dir, "box.yaml", spec.format(first))
    up = sandboxd("up", "-d", "--wait", "-p", "pulled", str(spec_dir))
    try:
        assert up.returncode == 0, up.stderr
        write(spec_dir, "box.yaml", spec.format(second))
        reload = sandboxd("up", "-p", "pulled", str(spec_dir))
        assert reload.returncode == 0 and "changed: box" in reload.stdout, reload.stdout + reload.stderr
        wait_until(lambda: sandboxd("exec", "-p", "pulled", "box", "--", "sh", "-c", "cat /etc/version").stdout.strip() == "two", "the service on the new image")
    finally:
        assert sandboxd("down", "-p", "pulled").returncode == 0


def test_credentials_come_from_the_auth_json_skopeo_reads(spec_dir: Path, layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = subprocess.run(["htpasswd", "-nbB", "tester", "secret"], capture_output=True, text=True, check=True).stdout
    auth = tmp_path / "auth.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    layout.image("1")
    with running_registry(users) as registry:
        reference = registry.push(layout.path, "1", "private/busybox", credentials="tester:secret")
        auth.write_text(json.dumps({"auths": {}}))
        refused = sandboxd("image", "pull", reference)
        assert refused.returncode == 1
        assert f"cannot pull {reference}: registry {registry.address} refused it (" in refused.stderr and "REGISTRY_AUTH_FILE" in refused.stderr
        auth.write_text(json.dumps({"auths": {registry.address: {"auth": base64.b64encode(b"tester:secret").decode()}}}))
        result = sandboxd("image", "pull", reference)
        assert result.returncode == 0, result.stderr
