"""Image references resolve as docker resolves them (sandboxd/spec/reference.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.spec.reference import BadReference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("redis", "docker.io", "library/redis", "latest", ""),
        ("redis:7", "docker.io", "library/redis", "7", ""),
        ("docker.io/library/redis:7", "docker.io", "library/redis", "7", ""),
        ("docker.io/redis", "docker.io", "library/redis", "latest", ""),
        ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", ""),
        ("localhost/app", "localhost", "app", "latest", ""),
        ("localhost:5000/app:1", "localhost:5000", "app", "1", ""),
        ("127.0.0.1:5000/test/busybox:1", "127.0.0.1:5000", "test/busybox", "1", ""),
        ("registry.example/team/app:v1_2-rc.3", "registry.example", "team/app", "v1_2-rc.3", ""),
        ("[::1]:5000/app:1", "[::1]:5000", "app", "1", ""),
        ("Registry.Example/app", "Registry.Example", "app", "latest", ""),  # upper case: a host, as docker reads it
        ("my.app", "docker.io", "library/my.app", "latest", ""),  # one component: a repository, dots and all
        ("a__b/c-d--e", "docker.io", "a__b/c-d--e", "latest", ""),
        (f"busybox@{DIGEST}", "docker.io", "library/busybox", "", DIGEST),
        (f"redis:7@{DIGEST}", "docker.io", "library/redis", "7", DIGEST),
        (f"localhost:5000/app@{DIGEST}", "localhost:5000", "app", "", DIGEST),
    ],
)
def test_reference_resolves_as_docker_does(text: str, registry: str, repository: str, tag: str, digest: str) -> None:
    reference = parse_reference(text)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Redis", "lower case: 'Redis'"),
        ("team/App:1", "lower case: 'App'"),
        ("redis:", "'' is not a tag"),
        ("redis:-x", "'-x' is not a tag"),
        ("redis:" + "x" * 129, "is not a tag"),
        ("a//b", "'' is not a repository name component"),
        ("a-/b", "'a-' is not a repository name component"),
        ("_a", "'_a' is not a repository name component"),
        ("localhost:port/app", "'localhost:port' is not a registry"),
        ("bad_host.example/app", "'bad_host.example' is not a registry"),
        ("redis@sha256:1234", "'sha256:1234' is not a digest"),
        ("redis@sha256:" + "AB" * 32, "is not a digest"),
        ("redis@md5:" + "ab" * 16, "is not a digest"),
        (" redis", "no spaces"),
        ("", "not empty"),
        ("a/" * 130 + "b", "longer than 255"),
    ],
)
def test_bad_reference_says_which_rule_it_breaks(text: str, why: str) -> None:
    with pytest.raises(BadReference) as raised:
        parse_reference(text)
    assert why in str(raised.value)


def test_reference_prints_fully_qualified_and_fetches_by_digest_when_it_has_one() -> None:
    assert str(parse_reference("redis")) == "docker.io/library/redis:latest"
    both = parse_reference(f"redis:7@{DIGEST}")
    assert str(both) == f"docker.io/library/redis:7@{DIGEST}"
    assert both.pinned == f"docker.io/library/redis@{DIGEST}"
    assert parse_reference("localhost:5000/app:1").pinned == "localhost:5000/app:1"


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("localhost:5000/a", True),
        ("localhost/a", True),
        ("127.0.0.1:5000/a", True),
        ("127.8.9.10/a", True),
        ("[::1]:5000/a", True),
        ("redis", False),
        ("registry.example:5000/a", False),
        ("10.0.0.1:5000/a", False),
        ("localhost.example/a", False),
    ],
)
def test_only_loopback_registries_count_as_local(text: str, loopback: bool) -> None:
    assert parse_reference(text).loopback is loopback


@pytest.mark.parametrize("value", ["redis:7", "docker.io/library/redis:7", "localhost:5000/app:1", f"busybox@{DIGEST}", "busybox"])
def test_spec_keeps_a_registry_reference_as_written(tmp_path: Path, value: str) -> None:
    from sandboxd.spec.load import load_stack

    folder = tmp_path / "stack"
    folder.mkdir()
    (folder / "a.yaml").write_text(f"kind: service\nimage: {value}\ncommand: [x]\n")
    assert load_stack(folder).services[0].image == value


def test_spec_reports_a_bad_reference_with_file_line_key_and_the_rule(tmp_path: Path) -> None:
    from sandboxd.errors import SpecErrors
    from sandboxd.spec.load import load_stack

    folder = tmp_path / "stack"
    folder.mkdir()
    (folder / "a.yaml").write_text("kind: service\ncommand: [x]\nimage: redis:7@sha256:12\n")
    with pytest.raises(SpecErrors) as raised:
        load_stack(folder)
    assert [str(e) for e in raised.value.errors] == [
        f"{folder / 'a.yaml'}:3: image: expected host, a folder (/path, ./path) or an image name (1 to 63 of a-z, 0-9, '_', '.', '-', "
        "starting with a letter or digit (names become cgroup and file names)) or a registry reference (like redis:7, "
        "docker.io/library/redis:7, localhost:5000/app:1, NAME@sha256:DIGEST), got 'redis:7@sha256:12': 'sha256:12' is not a digest "
        "(sha256: and 64 lower-case hex digits)"
    ]
    assert raised.value.exit_code == 2
