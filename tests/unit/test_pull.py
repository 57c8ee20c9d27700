"""Pulling without a registry: what an `image:` value names, store names, skopeo's command line and
its failures read as one error, the layout pruned (sandboxd/store/pull.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sandboxd.errors import HostError, SpecErrors
from sandboxd.spec.reference import parse_reference
from sandboxd.store import images, pull


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SANDBOXD_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def stored(name: str, source: str, reference: str = "", digest: str = "sha256:1") -> images.Image:
    """An image written into the store as build, import or pull would leave it."""
    staging = images.staging_dir(name)
    (staging / "rootfs").mkdir()
    return images.commit(name, staging, images.ImageConfig(), source, digest, reference)


def test_store_name_is_readable_unique_and_safe_for_overlay_options() -> None:
    one = images.pulled_name(parse_reference("redis:7"))
    other = images.pulled_name(parse_reference("team/redis:7"))
    assert one.startswith("redis-7-") and other.startswith("redis-7-") and one != other
    by_digest = images.pulled_name(parse_reference("redis@sha256:" + "ab" * 32))
    assert by_digest.startswith("redis-sha256-abababababab-")
    for name in (one, by_digest, images.pulled_name(parse_reference("localhost:5000/" + "a" * 100 + ":Tag_1"))):
        assert images.NAME.fullmatch(name) and ":" not in name and "," not in name


def test_local_image_of_the_name_wins_over_the_registry(tmp_path: Path) -> None:
    stored(images.pulled_name(parse_reference("busybox")), "pull", "docker.io/library/busybox:latest")
    assert images.find("busybox").source == "pull"  # type: ignore[union-attr]
    stored("busybox", "import")
    assert images.find("busybox").source == "import"  # type: ignore[union-attr]
    assert images.find("docker.io/library/busybox").source == "pull"  # type: ignore[union-attr]
    assert pull.is_local("busybox", tmp_path) and not pull.is_local("busybox:latest", tmp_path)


def test_definition_beside_the_spec_folder_wins_over_the_registry(tmp_path: Path) -> None:
    (tmp_path / "images" / "tiny").mkdir(parents=True)
    (tmp_path / "images" / "tiny" / "build").write_text("#!/bin/sh\n")
    (tmp_path / "images" / "tiny" / "build").chmod(0o755)
    assert pull.is_local("tiny", tmp_path / "specs")
    assert not pull.is_local("tiny", Path("/nonexistent"))


class Skopeo:
    """subprocess.run as skopeo answers it, the command lines recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int = 0, stderr: bytes = b"") -> None:
        self.commands: list[list[str]] = []
        self.code, self.stderr = code, stderr
        monkeypatch.setattr(pull.shutil, "which", lambda name: f"/usr/bin/{name}")
        monkeypatch.setattr(pull.os, "geteuid", lambda: 0)
        monkeypatch.setattr(pull.subprocess, "run", self.run)
        monkeypatch.setattr(pull, "import_image", lambda layout, name, pulled: stored(name, "pull", pulled.reference, "sha256:new"))

    def run(self, command: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        self.commands.append(command)
        return subprocess.CompletedProcess(command, self.code, b"", self.stderr)


def test_loopback_registry_alone_is_spoken_to_without_verified_tls(monkeypatch: pytest.MonkeyPatch, store: Path) -> None:
    skopeo = Skopeo(monkeypatch)
    pull.pull(parse_reference("127.0.0.1:5000/test/busybox:1"))
    pull.pull(parse_reference("registry.example/app:1"))
    local, remote = skopeo.commands
    name = images.pulled_name(parse_reference("127.0.0.1:5000/test/busybox:1"))
    assert local[1:] == ["copy", "--remove-signatures", "--src-tls-verify=false", "--quiet", "docker://127.0.0.1:5000/test/busybox:1", f"oci:{store / 'oci'}:{name}"]
    assert "--src-tls-verify=false" not in remote and remote[-2] == "docker://registry.example/app:1"


def test_digest_is_what_is_fetched_when_the_reference_has_tag_and_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    skopeo = Skopeo(monkeypatch)
    digest = "sha256:" + "cd" * 32
    image = pull.pull(parse_reference(f"localhost:5000/app:1@{digest}"))
    assert skopeo.commands[0][-2] == f"docker://localhost:5000/app@{digest}"
    assert image.reference == f"localhost:5000/app:1@{digest}"


def test_missing_policy_runs_no_skopeo_for_a_stored_image_and_always_does(monkeypatch: pytest.MonkeyPatch) -> None:
    skopeo = Skopeo(monkeypatch)
    reference = parse_reference("localhost:5000/app:1")
    pull.ensure_pulled(reference, "missing")
    pull.ensure_pulled(reference, "missing")
    pull.ensure_pulled(reference, "never")
    assert len(skopeo.commands) == 1
    pull.ensure_pulled(reference, "always")
    assert len(skopeo.commands) == 2


def test_pull_never_names_every_missing_image_with_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxd.spec.load import load_stack

    skopeo = Skopeo(monkeypatch)
    folder = tmp_path / "stack"
    folder.mkdir()
    (folder / "a.yaml").write_text("kind: service\nimage: localhost:5000/app:1\ncommand: [x]\n")
    (folder / "b.yaml").write_text("kind: service\ncommand: [x]\nimage: redis:7\n")
    with pytest.raises(SpecErrors) as raised:
        pull.pull_stack_images(load_stack(folder), "never")
    assert [(e.file.name, e.key) for e in raised.value.errors] == [("a.yaml", "image"), ("b.yaml", "image")]
    assert "no image 'redis:7'" in raised.value.errors[1].message and "--pull never forbids pulling docker.io/library/redis:7" in raised.value.errors[1].message
    assert "pull it from docker.io with sandboxd image pull redis:7" in raised.value.errors[1].message
    assert skopeo.commands == []


def test_missing_skopeo_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull.os, "geteuid", lambda: 0)
    monkeypatch.setattr(pull.shutil, "which", lambda name: None)
    with pytest.raises(HostError) as raised:
        pull.pull(parse_reference("localhost:5000/app:1"))
    assert raised.value.message == "pulling localhost:5000/app:1 needs skopeo, which is not installed"
    assert raised.value.hint == "install skopeo (apt-get install skopeo)"


def fatal(message: str) -> bytes:
    escaped = message.replace('"', '\\"')
    return f'time="2026-12-02T01:29:42Z" level=fatal msg="{escaped}"\n'.encode()


@pytest.mark.parametrize(
    ("message", "said"),
    [
        (
            'initializing source docker://localhost:1/app:1: pinging container registry localhost:1: Get "http://localhost:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused',
            'cannot pull localhost:1/app:1: registry localhost:1 cannot be reached (pinging container registry localhost:1: Get "http://localhost:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused)',
        ),
        (
            "initializing source docker://localhost:1/app:1: reading manifest 1 in localhost:1/app: manifest unknown: manifest unknown",
            "cannot pull localhost:1/app:1: registry localhost:1 has no such image (manifest unknown: manifest unknown)",
        ),
        (
            "initializing source docker://localhost:1/app:1: reading manifest 1 in localhost:1/app: unauthorized: authentication required",
            "cannot pull localhost:1/app:1: registry localhost:1 refused it (unauthorized: authentication required)",
        ),
        (
            'initializing source docker://localhost:1/app:1: pinging container registry localhost:1: Get "https://localhost:1/v2/": x509: certificate signed by unknown authority',
            'cannot pull localhost:1/app:1: no trusted TLS connection to registry localhost:1 (pinging container registry localhost:1: Get "https://localhost:1/v2/": x509: certificate signed by unknown authority)',
        ),
        ("something new", "cannot pull localhost:1/app:1 from registry localhost:1: something new"),
    ],
)
def test_skopeo_failure_is_one_error_naming_image_and_registry(monkeypatch: pytest.MonkeyPatch, message: str, said: str) -> None:
    Skopeo(monkeypatch, code=1, stderr=fatal(message))
    with pytest.raises(HostError) as raised:
        pull.pull(parse_reference("localhost:1/app:1"))
    assert raised.value.message == said and raised.value.hint


def test_refused_pull_points_at_auth_json() -> None:
    error = pull.pull_error(parse_reference("registry.example/app:1"), fatal("requested access to the resource is denied").decode())
    assert "skopeo login registry.example" in error.hint and "REGISTRY_AUTH_FILE" in error.hint


def layout_with(path: Path, entries: dict[str, list[str]]) -> dict[str, str]:
    """A layout whose entry TAG has a manifest referring to the given blob names; the manifests' digests."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    manifests, digests = [], {}
    for tag, names in entries.items():
        for name in names:
            (blobs / name).write_text(name)
        document = json.dumps({"config": {"digest": f"sha256:{names[0]}"}, "layers": [{"digest": f"sha256:{n}"} for n in names[1:]]})
        digest = f"m{tag}"
        (blobs / digest).write_text(document)
        digests[tag] = digest
        manifests.append({"digest": f"sha256:{digest}", "annotations": {"org.opencontainers.image.ref.name": tag}})
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return digests


def test_pruning_drops_an_entry_and_unnamed_ones_and_deletes_only_the_blobs_no_other_entry_uses(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    layout_with(layout, {"a": ["config-a", "base", "only-a"], "b": ["config-b", "base", "only-b"]})
    (layout / "blobs" / "sha256" / "stray").write_text("left by a killed pull")
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append({"digest": "sha256:old-manifest"})  # what a tag named before skopeo moved it
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "blobs" / "sha256" / "old-manifest").write_text("{}")
    pull.prune(layout, "a")
    assert sorted(p.name for p in (layout / "blobs" / "sha256").iterdir()) == ["base", "config-b", "mb", "only-b"]
    assert pull.entry_digest(layout, "b") == "sha256:mb" and pull.entry_digest(layout, "a") == ""
