"""Images, volumes and proxies in the spec and the plan: checked without root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxd.store import images
from sandboxd.errors import SpecErrors
from sandboxd.store.images import Image, ImageConfig
from sandboxd.host.prepare import survey
from sandboxd.plan.launch import HostFacts, LaunchPlan
from sandboxd.plan.stack import plan_stack
from sandboxd.daemon.proxy import proxy_target
from sandboxd.host.listening import listen_forms as _listen_forms
from sandboxd.spec.values import parse_address
from .spec_snippets import SERVICE, Problems, StackOf

PlanWith = Callable[..., LaunchPlan]


def make_rootfs(root: Path) -> Path:
    for directory in ("bin", "etc", "srv"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "bin" / "sh").write_text("")
    (root / "bin" / "serve").write_text("")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nweb:x:101:102::/srv:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nweb:x:102:\nstaff:x:50:\n")
    return root


@pytest.fixture
def plan_with(tmp_path: Path, stack_of: StackOf) -> PlanWith:
    """`plan_with(text, config)`: the plan of the first service of the spec `text` (in the folder
    tmp_path/stack), on a host where the image `web` is a tiny root file system with `config`."""

    def plan(text: str, config: ImageConfig = ImageConfig()) -> LaunchPlan:
        rootfs = make_rootfs(tmp_path / "rootfs")
        stack = stack_of(tmp_path / "stack", text)
        facts = HostFacts(architecture="x86_64", volumes_dir="/var/lib/sandboxd/volumes", images={"web": Image("web", rootfs, config)})
        return plan_stack(stack, survey(stack, facts))[stack.services[0].name]

    return plan


def test_image_service_runs_its_command_on_an_overlay_of_the_image(tmp_path: Path, plan_with: PlanWith) -> None:
    plan = plan_with("kind: service\nname: a\nimage: web\ncommand: [serve, --fast]\n")
    assert plan.argv == ("serve", "--fast")
    assert plan.mounts[0].kind == "image-root"
    assert plan.mounts[0].source == str(tmp_path / "rootfs")
    assert plan.mounts[0].readonly is True


def test_writable_root_is_asked_for_with_readonly_root_false(plan_with: PlanWith) -> None:
    plan = plan_with("kind: service\nname: a\nimage: web\ncommand: [serve]\nreadonly_root: false\n")
    assert plan.mounts[0].readonly is False


def test_command_replaces_cmd_and_keeps_entrypoint_as_docker_does(plan_with: PlanWith) -> None:
    config = ImageConfig(env=(("PATH", "/bin"), ("MODE", "image")), entrypoint=("/bin/sh", "-c"), cmd=("serve",), workdir="/srv", user="web")
    plan = plan_with("kind: service\nname: a\nimage: web\n", config)
    assert plan.argv == ("/bin/sh", "-c", "serve")
    assert (plan.workdir, plan.uid, plan.gid) == ("/srv", 101, 102)
    assert dict(plan.env)["PATH"] == "/bin"
    plan = plan_with("kind: service\nname: a\nimage: web\ncommand: [echo hi]\nworkdir: /\nenvironment: {MODE: spec}\n", config)
    assert plan.argv == ("/bin/sh", "-c", "echo hi")
    assert plan.workdir == "/"
    assert dict(plan.env)["MODE"] == "spec"


def test_user_names_are_looked_up_in_the_image(plan_with: PlanWith) -> None:
    plan = plan_with("kind: service\nname: a\nimage: web\ncommand: [serve]\nuser: web\ngroup: staff\n")
    assert (plan.uid, plan.gid) == (101, 50)
    with pytest.raises(SpecErrors) as caught:
        plan_with("kind: service\nname: a\nimage: web\ncommand: [serve]\nuser: nosuch\n")
    assert "no user 'nosuch' in the image 'web''s /etc/passwd" in str(caught.value)


def test_program_is_looked_for_in_the_image_not_on_the_host(plan_with: PlanWith) -> None:
    with pytest.raises(SpecErrors) as caught:
        plan_with("kind: service\nname: a\nimage: web\ncommand: [python3]\n")
    assert "program 'python3' not found in PATH" in str(caught.value)
    assert "of image 'web'" in str(caught.value)


def test_image_without_command_or_cmd_is_refused(plan_with: PlanWith) -> None:
    with pytest.raises(SpecErrors) as caught:
        plan_with("kind: service\nname: a\nimage: web\n")
    assert "image 'web' has no Entrypoint or Cmd" in str(caught.value)


def test_mount_targets_missing_in_an_image_are_made_in_its_overlay(plan_with: PlanWith) -> None:
    plan = plan_with("kind: service\nname: a\nimage: web\ncommand: [serve]\nmounts: [{source: /, target: /deep/new/dir}]\n")
    assert [m.kind for m in plan.mounts if m.target == "/deep/new/dir"] == ["bind"]


def test_volume_mount_binds_the_volume_directory_read_write(plan_with: PlanWith) -> None:
    plan = plan_with("kind: service\nname: a\nimage: web\ncommand: [serve]\nmounts: [{volume: data, target: /srv/data}]\n---\nkind: volume\nname: data\n")
    bind = next(m for m in plan.mounts if m.target == "/srv/data")
    assert (bind.source, bind.readonly) == ("/var/lib/sandboxd/volumes/data", False)


def test_proxied_socket_is_not_passed_to_the_program(plan_with: PlanWith) -> None:
    plan = plan_with(
        """
        kind: service
        name: a
        image: web
        command: [serve]
        ---
        kind: socket
        name: a
        listen: [tcp:127.0.0.1:8080, unix:/run/a.sock]
        proxy: tcp:127.0.0.1:80
        """,
    )
    assert plan.fd_sockets == ()
    assert plan.proxied == (("a", 0), ("a", 1))
    assert not any(key.startswith("LISTEN_") for key, _ in plan.env)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SERVICE + "readonly_root: false\n", "stack.yaml:4: readonly_root: a writable root needs an image"),
        ("kind: service\nname: a\nimage: ./nope\ncommand: [x]\n", "stack.yaml:3: image: image folder './nope' does not exist"),
        ("kind: service\nname: a\nimage: Bad/Name\ncommand: [x]\n", "stack.yaml:3: image: expected host, a folder (/path, ./path) or an image name"),
        (SERVICE + "mounts: [{volume: dat, target: /d}]\n---\nkind: volume\nname: data\n", "stack.yaml:4: mounts[0]: no volume 'dat'; did you mean 'data'?"),
        (SERVICE + "mounts: [{volume: data, source: /, target: /d}]\n", "stack.yaml:4: mounts[0].source: expected either source (a host path) or volume (a volume's name), got both"),
        (SERVICE + "mounts: [{target: /d}]\n", "stack.yaml:4: mounts[0].source: expected either source (a host path) or volume (a volume's name), got neither"),
        (SERVICE + "---\nkind: socket\nname: a\nlisten: tcp:127.0.0.1:1\nproxy: udp:127.0.0.1:53\n", "stack.yaml:8: proxy: expected a stream address to forward to (tcp: or unix:), got udp:127.0.0.1:53"),
        (SERVICE + "---\nkind: socket\nname: a\nlisten: tcp:127.0.0.1:1\nproxy: tcp:127.0.0.1:0\n", "stack.yaml:8: proxy: expected the port the program listens on, got 0"),
        (SERVICE + "---\nkind: socket\nname: a\nlisten: tcp:127.0.0.1:1\nproxy: tcp:127.0.0.1:80\naccept: true\n", "stack.yaml:8: proxy: proxy: and accept: true exclude each other"),
        (SERVICE + "---\nkind: socket\nname: a\nlisten: udp:127.0.0.1:1\nproxy: tcp:127.0.0.1:80\n", "stack.yaml:7: listen: udp:127.0.0.1:1 is not a stream socket; a proxy forwards"),
    ],
)
def test_bad_image_volume_and_proxy_keys_are_reported(tmp_path: Path, problems: Problems, text: str, expected: str) -> None:
    found = problems(tmp_path / "stack", text)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_image_folder_is_taken_relative_to_the_spec_folder(tmp_path: Path, stack_of: StackOf) -> None:
    make_rootfs(tmp_path / "stack" / "root")
    stack = stack_of(tmp_path / "stack", "kind: service\nname: a\nimage: ./root\ncommand: [serve]\n")
    assert stack.services[0].image == str(tmp_path / "stack" / "root")


def test_volume_defaults_to_read_write_and_host_source_to_read_only(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(tmp_path / "stack", SERVICE + "mounts: [{volume: v, target: /v}, {source: /, target: /h}]\n---\nkind: volume\nname: v\n")
    assert [(m.volume, m.readonly) for m in stack.services[0].mounts] == [("v", False), ("", True)]
    assert [v.name for v in stack.volumes] == ["v"]


def test_definition_is_found_beside_the_spec_folder_or_above(tmp_path: Path) -> None:
    definition = tmp_path / "images" / "tiny"
    definition.mkdir(parents=True)
    (definition / "build").write_text("#!/bin/sh\n")
    assert images.find_definition("tiny", tmp_path / "specs" / "app") == definition
    assert images.find_definition("other", tmp_path / "specs" / "app") is None


def test_definition_digest_changes_with_any_file(tmp_path: Path) -> None:
    (tmp_path / "build").write_text("#!/bin/sh\n")
    first = images.definition_digest(tmp_path)
    (tmp_path / "extra.conf").write_text("x")
    second = images.definition_digest(tmp_path)
    (tmp_path / "build").chmod(0o755)
    assert len({first, second, images.definition_digest(tmp_path)}) == 3


def test_listening_forms_cover_any_address_and_dual_stack() -> None:
    forms = _listen_forms("127.0.0.1", 6379)
    assert forms["tcp"] == {"0100007F:18EB", "00000000:18EB"}
    assert "0000000000000000FFFF00000100007F:18EB" in forms["tcp6"]
    assert "00000000000000000000000000000000:18EB" in forms["tcp6"]
    assert set(_listen_forms("::1", 80)) == {"tcp6"}


def test_proxy_reaches_unix_targets_through_the_sandbox_root() -> None:
    assert proxy_target(parse_address("unix:/run/redis.sock"), 42) == "/proc/42/root/run/redis.sock"
    assert proxy_target(parse_address("tcp:[::1]:80"), 42) == "[::1]:80"


def test_bind_is_intercepted_for_a_handoff_unless_the_service_waits_for_readiness(plan_with: PlanWith) -> None:
    base = "kind: service\nname: a\nimage: web\ncommand: [serve]\n{extra}---\nkind: socket\nname: a\nlisten: tcp:127.0.0.1:8080\nproxy: tcp:127.0.0.1:80\n{sock}"
    assert plan_with(base.format(extra="", sock="")).intercept_bind is True
    assert plan_with(base.format(extra="", sock="handoff: false\n")).intercept_bind is False
    health = "ready: {exec: [serve, --check]}\n"
    assert plan_with(base.format(extra=health, sock="")).intercept_bind is False
    assert plan_with(base.format(extra=health, sock="handoff: true\n")).intercept_bind is True
