"""`sandboxd export kubernetes`: its output passes Kubernetes 1.33's own schemas (kubernetes-validate,
strict: no field the API does not know), each mapped key arrives where the decision says (read
from the parsed YAML), and host and folder images are refused with what to do (exit 2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from sandboxd.cli.main import main
from sandboxd.export.activator import ACTIVATOR
from sandboxd.export.kubernetes import KubernetesOptions, export_kubernetes
from sandboxd.spec.load import load_stack

from .export_stacks import RICH, SMALL
from .spec_snippets import WriteSpecs

REPO = Path(__file__).resolve().parents[2]
VERSION = "1.33.0"
IMAGE = "registry.example/app:1"
Docs = dict[tuple[str, str], dict[str, Any]]


def validate(documents: list[dict[str, Any]]) -> None:
    """Every document against the schemas of the stated version, strictly (raises on the first fault)."""
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, VERSION, strict=True)


def export_file(folder: Path, out: Path, *args: str) -> list[dict[str, Any]]:
    """Run the verb as a user would, and read its YAML back."""
    assert main(["export", "kubernetes", str(folder), "-o", str(out), *args]) == 0
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


@pytest.mark.parametrize("folder", ["specs", "specs/examples/real"])
def test_the_repository_stacks_pass_the_schemas_given_registry_images(tmp_path: Path, folder: str) -> None:
    stack = load_stack(REPO / folder)
    images = [f"--image={s.name}={IMAGE}" for s in stack.services]
    validate(export_file(REPO / folder, tmp_path / "out.yaml", *images))


def test_the_rich_stack_passes_the_schemas(tmp_path: Path, write_specs: WriteSpecs) -> None:
    validate(export_file(rich_folder(tmp_path, write_specs), tmp_path / "out.yaml", "--namespace", "team-a"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_small_stack_passes_the_schemas(tmp_path: Path, write_specs: WriteSpecs, name: str) -> None:
    folder = write_specs(tmp_path / "stack", SMALL[name].replace("IMAGE", IMAGE))
    validate(export_file(folder, tmp_path / "out.yaml", "--seccomp", "localhost"))


def rich_folder(tmp_path: Path, write_specs: WriteSpecs | Callable[[Path, dict[str, str]], Path]) -> Path:
    folder = tmp_path / "rich"
    (folder / "app").mkdir(parents=True, exist_ok=True)
    (folder / "api.env").write_text("FROM_FILE=1\n")
    return write_specs(folder, {"stack.yaml": RICH.replace("IMAGE", IMAGE)})


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Docs:
    """The rich stack's objects by kind and name (exported once for the module's tests: they only read)."""
    tmp_path = tmp_path_factory.mktemp("rich")
    documents = export_file(rich_folder(tmp_path, write_rich), tmp_path / "out.yaml")
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def write_rich(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def workload(docs: Docs, name: str) -> dict[str, Any]:
    [found] = [d for (kind, n), d in docs.items() if n == name and kind in ("Deployment", "StatefulSet", "Job")]
    return found


def pod(docs: Docs, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = workload(docs, name)["spec"]["template"]["spec"]
    return spec


def main_container(docs: Docs, name: str) -> dict[str, Any]:
    return dict(pod(docs, name)["containers"][0])


def activator_args(docs: Docs, name: str) -> tuple[list[dict[str, Any]], list[str], int]:
    """The activator's sockets (each --listen with its options), the program's argv and --accept's MAX."""
    command = main_container(docs, name)["command"]
    assert command[0] == ACTIVATOR
    split = command.index("--")
    sockets: list[dict[str, Any]] = []
    accept = 0
    words = iter(command[1:split])
    for word in words:
        if word == "--listen":
            sockets.append({"listen": next(words)})
        elif word == "--reuseport":
            sockets[-1]["reuseport"] = True
        elif word == "--accept":
            accept = int(next(words))
        else:
            sockets[-1][word.removeprefix("--")] = next(words)
    return sockets, command[split + 1 :], accept


def volume_at(docs: Docs, name: str, path: str) -> dict[str, Any]:
    [mount] = [m for m in main_container(docs, name)["volumeMounts"] if m["mountPath"] == path]
    [volume] = [v for v in pod(docs, name)["volumes"] if v["name"] == mount["name"]]
    return {**volume, "readOnly": mount.get("readOnly", False)}


def env(docs: Docs, name: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in main_container(docs, name)["env"]}


def security(docs: Docs, name: str) -> dict[str, Any]:
    return dict(main_container(docs, name)["securityContext"])


# key -> (what to read from the output, what it must be)
ARRIVES: dict[str, tuple[Callable[[Docs], object], object]] = {
    "service.command": (lambda d: activator_args(d, "api")[1], ["/usr/bin/python3", "-u", "/app/api.py", "100%", str(Path.home())]),
    "service.environment": (lambda d: (env(d, "api")["MODE"], env(d, "api")["LEVEL"]), ("fast lane", "3")),
    "service.env_file": (lambda d: env(d, "api")["FROM_FILE"], "1"),
    "service.workdir": (lambda d: main_container(d, "api")["workingDir"], "/app"),
    "service.hostname": (lambda d: pod(d, "api")["hostname"], "api-host"),
    "service.restart": (lambda d: (pod(d, "api")["restartPolicy"], workload(d, "echo")["kind"]), ("Always", "Deployment")),
    "service.restart (no)": (lambda d: [c["name"] for c in pod(d, "api")["initContainers"]][-1], "migrate"),
    "service.stop_timeout": (lambda d: pod(d, "api")["terminationGracePeriodSeconds"], 15),
    "service.mounts (path)": (lambda d: (volume_at(d, "api", "/app")["hostPath"]["type"], volume_at(d, "api", "/app")["readOnly"]), ("Directory", True)),
    "service.mounts (volume)": (lambda d: (volume_at(d, "api", "/var/lib/api")["persistentVolumeClaim"]["claimName"], workload(d, "api")["kind"]), ("data", "StatefulSet")),
    "service.uses": (lambda d: d[("NetworkPolicy", "rich-uses-api")]["spec"]["egress"][0],
                     {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cache", "app.kubernetes.io/part-of": "rich"}}}], "ports": [{"protocol": "TCP", "port": 6379}]}),
    "service.network": (lambda d: workload(d, "api")["spec"]["template"]["metadata"]["labels"]["sandboxd.network/back"], "member"),
    "service.ready": (lambda d: main_container(d, "cache")["readinessProbe"],
                      {"exec": {"command": ["/usr/bin/python3", "/app/check.py"]}, "periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 4}),
    "service.ready (liveness)": (lambda d: main_container(d, "cache")["livenessProbe"]["failureThreshold"], 4),
    "service.start_timeout": (lambda d: main_container(d, "cache")["startupProbe"]["failureThreshold"], 30),  # 90 s / 3 s
    "service.start": (lambda d: workload(d, "api")["spec"]["replicas"], 1),
    "service.after": (lambda d: pod(d, "api")["initContainers"][-1]["command"], ["/usr/bin/python3", "/app/migrate.py"]),
    "service.capabilities": (lambda d: security(d, "api")["capabilities"], {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}),
    "service.no_new_privs": (lambda d: security(d, "api")["allowPrivilegeEscalation"], False),
    "service.limits": (lambda d: main_container(d, "api")["resources"]["limits"], {"memory": "268435456", "cpu": "1500m"}),
    "service.seccomp": (lambda d: security(d, "api")["seccompProfile"], {"type": "Localhost", "localhostProfile": "sandboxd/api.json"}),
    "service.seccomp (default)": (lambda d: security(d, "cache")["seccompProfile"], {"type": "RuntimeDefault"}),
    "service.userns": (lambda d: pod(d, "api")["hostUsers"], False),
    "service.readonly_root": (lambda d: security(d, "api")["readOnlyRootFilesystem"], True),
    "service.user": (lambda d: (security(d, "api")["runAsUser"], security(d, "api")["runAsNonRoot"]), (1000, True)),
    "service.group": (lambda d: security(d, "api")["runAsGroup"], 1000),
    "service.tmpfs": (lambda d: volume_at(d, "api", "/var/cache/api")["emptyDir"], {"medium": "Memory", "sizeLimit": "8388608"}),
    "service.tmpfs_size": (lambda d: volume_at(d, "api", "/tmp")["emptyDir"], {"medium": "Memory", "sizeLimit": "33554432"}),
    "service.shm_size": (lambda d: volume_at(d, "api", "/dev/shm")["emptyDir"], {"medium": "Memory", "sizeLimit": "16777216"}),
    "service.image": (lambda d: main_container(d, "api")["image"], IMAGE),
    "socket.service": (lambda d: d[("Service", "api")]["spec"]["selector"]["app.kubernetes.io/name"], "api"),
    "socket.listen": (lambda d: (d[("Service", "api")]["spec"]["ports"], [s["listen"] for s in activator_args(d, "api")[0]]),
                      ([{"name": "tcp-8080", "protocol": "TCP", "port": 8080, "targetPort": 8080}], ["tcp:0.0.0.0:8080", "unix:/run/rich/api.sock"])),
    "socket.fdname": (lambda d: {s["name"] for s in activator_args(d, "api")[0]}, {"http"}),
    "socket.backlog": (lambda d: activator_args(d, "api")[0][0]["backlog"], "32"),
    "socket.mode": (lambda d: activator_args(d, "api")[0][1]["mode"], "0660"),
    "socket.reuseport": (lambda d: activator_args(d, "api")[0][0]["reuseport"], True),
    "socket.netns": (lambda d: activator_args(d, "cache")[0][0]["listen"], "tcp:0.0.0.0:6379"),
    "socket.accept": (lambda d: activator_args(d, "echo")[2], 16),
    "socket.max_connections": (lambda d: activator_args(d, "echo")[2], 16),
    "socket.proxy": (lambda d: (d[("Service", "web")]["spec"]["ports"][0]["targetPort"], main_container(d, "web")["command"][0]), (8001, "/usr/bin/python3")),
    "service.listen": (lambda d: (d[("Service", "metrics")]["spec"]["ports"][0]["port"], activator_args(d, "metrics")[0]), (9100, [{"listen": "tcp:0.0.0.0:9100", "name": "metrics", "backlog": "4096"}])),
    "network.internal": (lambda d: d[("NetworkPolicy", "rich-network-back")]["spec"]["egress"],
                         [{"to": [{"podSelector": {"matchLabels": {"sandboxd.network/back": "member"}}}]}]),
    "volume": (lambda d: d[("PersistentVolumeClaim", "data")]["spec"]["accessModes"], ["ReadWriteOnce"]),
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(ARRIVES))
def test_a_mapped_key_arrives(docs: Docs, key: str) -> None:
    read, expected = ARRIVES[key]
    assert read(docs) == expected


def test_every_stack_pod_is_in_the_default_deny_policy(docs: Docs) -> None:
    policy = docs[("NetworkPolicy", "rich-default-deny")]["spec"]
    assert policy == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "rich"}}, "policyTypes": ["Ingress", "Egress"]}
    for name in ("api", "cache", "echo", "web"):
        template = workload(docs, name)["spec"]["template"]
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rich"
        assert template["spec"]["automountServiceAccountToken"] is False


def test_the_activator_is_delivered_by_an_init_container_into_a_read_only_volume(docs: Docs) -> None:
    [init] = [c for c in pod(docs, "api")["initContainers"] if c["name"] == "sandboxd-activator"]
    assert init["command"] == ["/sbd-activate", "--install", ACTIVATOR]
    assert volume_at(docs, "api", "/sandboxd")["readOnly"] is True
    assert volume_at(docs, "api", "/sandboxd")["emptyDir"]["medium"] == "Memory"
    assert "initContainers" not in pod(docs, "web")  # proxy: the program binds its own port


def test_the_localhost_profile_is_sandboxds_filter_less_the_allowed_calls(tmp_path: Path, write_specs: WriteSpecs) -> None:
    export_file(rich_folder(tmp_path, write_specs), tmp_path / "out.yaml")
    profile = json.loads((tmp_path / "seccomp" / "sandboxd" / "api.json").read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    refused = profile["syscalls"][0]["names"]
    assert "mount" in refused and "unshare" in refused and "ptrace" not in refused


def test_the_namespace_is_set_on_every_object(tmp_path: Path, write_specs: WriteSpecs) -> None:
    documents = export_file(rich_folder(tmp_path, write_specs), tmp_path / "out.yaml", "--namespace", "team-a")
    assert {d["metadata"].get("namespace") for d in documents} == {"team-a"}


@pytest.mark.parametrize(("image", "said"), [("host", "the host's root (image: host)"), ("./root", "the folder image")])
def test_host_and_folder_images_are_refused_with_what_to_do(tmp_path: Path, write_specs: WriteSpecs, capsys: pytest.CaptureFixture[str], image: str, said: str) -> None:
    folder = write_specs(tmp_path / "s", SMALL["one service, one host socket"].replace("IMAGE", image))
    (folder / "root").mkdir()
    assert main(["export", "kubernetes", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder.resolve() / 'stack.yaml'}:3: image: {said}" in err
    assert "--image web=REFERENCE" in err


def test_an_image_given_on_the_command_line_replaces_host(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path / "s", SMALL["one service, one host socket"].replace("IMAGE", "host"))
    exported = export_kubernetes(load_stack(folder), KubernetesOptions(images={"web": "python:3.11"}))
    [deployment] = [d for d in exported.documents if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "python:3.11"


def decisions_of(tmp_path: Path, write_specs: WriteSpecs, text: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    exported = export_kubernetes(load_stack(write_specs(tmp_path / "s", text)))
    validate(exported.documents)
    return exported.documents, {d.key: d.status for d in exported.decisions if d.kind == "service"}


def test_a_host_network_service_keeps_the_nodes_ids_and_says_so(tmp_path: Path, write_specs: WriteSpecs) -> None:
    documents, found = decisions_of(tmp_path, write_specs, f"kind: service\nname: h\nimage: {IMAGE}\ncommand: [/bin/true]\nnetwork: host\n")
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["hostNetwork"] is True
    assert "hostUsers" not in deployment["spec"]["template"]["spec"]
    assert found["userns"] == "not expressible"


def test_a_socket_of_a_service_without_a_command_is_reported(tmp_path: Path, write_specs: WriteSpecs) -> None:
    text = f"kind: service\nname: s\nimage: {IMAGE}\n---\nkind: socket\nname: s\nlisten: tcp:0.0.0.0:80\n"
    exported = export_kubernetes(load_stack(write_specs(tmp_path / "s", text)))
    found = {(d.kind, d.key): d for d in exported.decisions}
    assert found[("socket", "listen")].status == "not expressible"
    assert found[("service", "command")].status == "not expressible"
    assert not [d for d in exported.documents if d["kind"] == "Service"]
