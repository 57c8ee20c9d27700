"""A stack as one multi-document Kubernetes YAML, for Kubernetes 1.33.

1.33 because it is the first release in which pods with `hostUsers: false` (a user namespace of
their own, sandboxd's `userns: true`) are on by default (UserNamespacesSupport, beta); the output
is checked against 1.33's schemas with kubernetes-validate in the tests.

    a service                     a Deployment; a StatefulSet if it mounts a named volume; a Job
                                  with `restart: "no"`; an init container of each service that
                                  waits for it with `after: {condition: completed}`
    a socket bound on the host    a Service (ClusterIP) with its tcp/udp ports, to the activator's
    (or on a non-loopback address socket (activator.py) or, with proxy:, to the program's own port
    of the service's namespace)
    a volume                      a PersistentVolumeClaim (ReadWriteOnce, --volume-size)
    a network                     a NetworkPolicy between its members (policies.py)

`image: host` and folder images have no Kubernetes form: the export refuses them (SpecErrors,
exit 2) and says what to do, unless `images` gives the service a registry reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.export.activator import ACTIVATOR_IMAGE, activated, pod_address
from sandboxd.export.decisions import UNIT_KEY, Decision, UnitNotes, implied_socket, notes_for
from sandboxd.export.lines import key_lines
from sandboxd.export.pod import k8s_name, labels, pod_spec, profile_name
from sandboxd.export.policies import exposed, network_label, note_network, note_network_unit, policies, service_ports
from sandboxd.export.seccomp import localhost_profile
from sandboxd.spec.model import Service, Socket, Stack, socket_namespace

ENGINE = "kubernetes"
KUBERNETES_VERSION = "1.33"
Object = dict[str, Any]


@dataclass(frozen=True)
class KubernetesOptions:
    """What `sandboxd export kubernetes` was asked besides the folder."""

    namespace: str = ""
    images: Mapping[str, str] = field(default_factory=dict)  # service -> registry reference, in place of host/folder
    seccomp: str = "runtime-default"  # or "localhost": profiles generated from sandboxd's filter
    activator_image: str = ACTIVATOR_IMAGE
    volume_size: str = "1Gi"


@dataclass
class KubernetesExport:
    """The documents, the files to install beside them (seccomp profiles), and every decision."""

    documents: list[Object] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)


def export_kubernetes(stack: Stack, options: KubernetesOptions | None = None) -> KubernetesExport:
    """`stack` as Kubernetes objects; raises SpecErrors for a service Kubernetes cannot run."""
    options = options or KubernetesOptions()
    stack = _with_images(stack, options)
    out = KubernetesExport()
    inits = {d.service for s in stack.services for d in s.after if d.condition == "completed"}
    containers: dict[str, tuple[Object, UnitNotes]] = {}
    for service in stack.services:
        notes = notes_for(ENGINE, service)
        seccomp = _seccomp_mode(service, options)
        if seccomp == "localhost":
            out.files[f"seccomp/{profile_name(service)}"] = localhost_profile(service)
        containers[service.name] = (pod_spec(stack, service, notes, seccomp, options.activator_image), notes)
    for service in stack.services:
        pod, notes = containers[service.name]
        _lifecycle(service, notes, service.name in inits)
        _after(stack, service, pod, containers, notes)
        note_network(stack, service, notes)
        implied_socket(notes, [s.name for s in stack.sockets_of(service.name)], f"the socket {service.name}'s Service and activator")
        if service.name not in inits:
            out.documents.append(_workload(stack, service, pod, options))
        out.decisions += notes.decisions()
    for sock in stack.sockets:
        notes = notes_for(ENGINE, sock)
        if (document := _service_object(stack, sock, options, notes)) is not None:
            out.documents.append(document)
        out.decisions += notes.decisions()
    out.documents += _volumes(stack, options, out.decisions)
    out.documents += policies(stack, options.namespace)
    return out


def _with_images(stack: Stack, options: KubernetesOptions) -> Stack:
    errors: list[SpecError] = []
    services: list[Service] = []
    for service in stack.services:
        image = options.images.get(service.name, service.image)
        if image == "host" or image.startswith("/"):
            what = "the host's root (image: host)" if image == "host" else f"the folder image {image}"
            line = key_lines(service.file, service.line).get("image", service.line)
            errors.append(SpecError(service.file, line, "image", f"{what} has no Kubernetes form: a pod runs a registry image; "
                                    f"build and push one with the program, then give it (image: registry.example/{service.name}:1) "
                                    f"or pass --image {service.name}=REFERENCE to the export"))  # fmt: skip
        services.append(dataclasses.replace(service, image=image))
    unknown = sorted(set(options.images) - {s.name for s in stack.services})
    errors += [SpecError(stack.folder, 0, "", f"--image {name}=...: no service {name!r} in this stack") for name in unknown]
    if errors:
        raise SpecErrors(errors)
    return dataclasses.replace(stack, services=tuple(services))


def _seccomp_mode(service: Service, options: KubernetesOptions) -> str:
    if service.seccomp == "unconfined":
        return "unconfined"
    if isinstance(service.seccomp, tuple) or options.seccomp == "localhost":
        return "localhost"  # the calls a service needs beyond sandboxd's list may be ones the runtime's default refuses
    return "runtime-default"


def _metadata(stack: Stack, name: str, options: KubernetesOptions, extra: Mapping[str, str] | None = None) -> Object:
    metadata: Object = {"name": k8s_name(name), "labels": {**labels(stack, name), **(extra or {})}}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return metadata


def _workload(stack: Stack, service: Service, pod: Object, options: KubernetesOptions) -> Object:
    """The Deployment, StatefulSet or Job that runs the pod."""
    membership = {network_label(a.network): "member" for a in service.attachments}
    template = {"metadata": {"labels": {**labels(stack, service.name), **membership}}, "spec": pod}
    if service.restart == "no":
        pod["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(stack, service.name, options),
                "spec": {"backoffLimit": 0, "template": template}}  # fmt: skip
    pod["restartPolicy"] = "Always"
    spec: Object = {"replicas": 1, "selector": {"matchLabels": labels(stack, service.name)}, "template": template}
    if any(m.volume for m in service.mounts):
        exposing = [s for s in stack.sockets_of(service.name) if exposed(s) and service_ports(s)]
        if exposing:
            spec["serviceName"] = k8s_name(exposing[0].name)
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _metadata(stack, service.name, options), "spec": spec}
    spec["strategy"] = {"type": "Recreate"}  # one instance at a time, as sandboxd runs it
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(stack, service.name, options), "spec": spec}


def _lifecycle(service: Service, notes: UnitNotes, init: bool) -> None:
    """restart and its timing, start_limit, start, idle_stop, reload."""
    if init:
        notes.approximated("restart", "an init container of each service that waits for it", "it runs before each of them, once per pod start")
    elif service.restart == "no":
        notes.mapped("restart", "Job (restartPolicy: Never, backoffLimit: 0)")
    elif service.restart == "always":
        notes.mapped("restart", "restartPolicy: Always")
    else:
        notes.approximated("restart", "restartPolicy: Always", f"a Deployment restarts a pod after any exit; {service.restart} has no pod form")
    for key, given in (("restart_delay", service.restart_delay != 0.1), ("restart_steps", service.restart_steps), ("restart_max_delay", service.restart_max_delay != 5.0)):
        if given or notes.given(key):
            notes.unexpressible(key, "the kubelet's back-off is fixed: 10 s, doubling to 5 minutes")
        else:
            notes.approximated(key, "(the kubelet's back-off)", "10 s, doubling to 5 minutes")
    notes.unexpressible("start_limit", "the kubelet never gives up restarting (CrashLoopBackOff)") if notes.given("start_limit") else notes.approximated("start_limit", "(CrashLoopBackOff)", "restarts never end")
    if service.start == "on-demand":
        notes.unexpressible("start", "no start on the first connection: the pod runs from the start")
    else:
        notes.mapped("start", "replicas: 1")
    notes.unexpressible("idle_stop", "no stop when idle: the pod keeps running") if service.idle_stop else notes.nothing("idle_stop", "not asked for")
    if service.reload or notes.given("reload_signal"):
        notes.unexpressible("reload", "no reload verb: kubectl exec the command, or roll the Deployment") if service.reload else notes.nothing("reload", "none given")
        notes.unexpressible("reload_signal", "no reload verb: kubectl exec ... kill -HUP 1") if not service.reload else notes.nothing("reload_signal", "reload: runs instead")
    else:
        notes.nothing("reload", "none given")
        notes.nothing("reload_signal", "no reload verb: a Deployment is rolled instead")


def _after(stack: Stack, service: Service, pod: Object, containers: Mapping[str, tuple[Object, UnitNotes]], notes: UnitNotes) -> None:
    """after: `completed` dependencies as init containers (with their volumes); the others reported."""
    others = [d.service for d in service.after if d.condition != "completed"]
    for dependency in service.after:
        if dependency.condition != "completed":
            continue
        init_pod = containers[dependency.service][0]
        present = {c["name"] for c in pod.get("initContainers", [])}
        added = [c for c in (*init_pod.get("initContainers", []), *init_pod["containers"]) if c["name"] not in present]
        pod.setdefault("initContainers", []).extend(added)
        names = {v["name"] for v in pod["volumes"]}
        pod["volumes"] += [v for v in init_pod["volumes"] if v["name"] not in names]
    if others:
        notes.unexpressible("after", f"pods start independently: {', '.join(others)} is not waited for (a client of its Service is refused until it is ready, not queued)")
    elif service.after:
        notes.mapped("after", "initContainers", "each completed dependency runs to its end before the program")
    else:
        notes.nothing("after", "none given")


def _service_object(stack: Stack, sock: Socket, options: KubernetesOptions, notes: UnitNotes) -> Object | None:
    """The socket's Service (None if nobody outside the pod could reach it) and its decisions."""
    _note_socket(stack, sock, notes)
    ports = service_ports(sock)
    if sock.proxy is None and not stack.service(sock.service).command:
        notes.unexpressible("listen", "nothing binds it in the pod: the activator needs the service's command (give command:)")
        return None
    if not ports or not exposed(sock):
        inet = any(a.is_inet for a in sock.listen)
        if sock.proxy is not None and not inet:
            notes.unexpressible("listen", "a unix socket cannot leave the pod, and the program binds its own address: give the socket a tcp: address for a Service")
        elif not inet:
            notes.approximated("listen", "activator --listen (no Service)", "bound in the pod: a unix socket cannot leave it")
        else:
            notes.mapped("listen", "activator --listen (no Service)", "only reachable inside the pod, as in the service's own namespace")
        return None
    listen_ports = [a.port for a in sock.listen if a.is_inet]
    spec_ports = [{"name": f"{p['protocol'].lower()}-{port}", "protocol": p["protocol"], "port": port, "targetPort": p["port"]}
                  for p, port in zip(ports, listen_ports)]  # fmt: skip
    notes.mapped("listen", "Service ports (and the activator's --listen)" if sock.proxy is None else "Service ports, targetPort the proxy's")
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(stack, sock.name, options),
            "spec": {"type": "ClusterIP", "selector": labels(stack, sock.service), "ports": spec_ports}}  # fmt: skip


def _note_socket(stack: Stack, sock: Socket, notes: UnitNotes) -> None:
    by = "the activator's" if sock.proxy is None else "(the program binds its own socket)"
    notes.mapped("service", "Service selector, and the activator in its pod")
    notes.mapped("fdname", "LISTEN_FDNAMES (activator --name)") if sock.proxy is None else notes.nothing("fdname", by)
    notes.mapped("backlog", "activator --backlog") if sock.proxy is None else notes.nothing("backlog", by)
    notes.mapped("mode", "activator --mode") if sock.proxy is None and any(a.path for a in sock.listen) else notes.nothing("mode", "no socket file")
    notes.mapped("reuseport", "activator --reuseport") if sock.reuseport else notes.nothing("reuseport", "not asked for")
    owner = socket_namespace(sock)
    if owner is None:
        moved = [str(pod_address(sock, a)) for a in sock.listen if a.is_inet] if sock.proxy is None else []
        local = any(a.is_inet and a.host in ("127.0.0.1", "::1") for a in sock.listen)
        why = "bound on the pod's addresses" + (f" ({', '.join(moved)})" if moved else "")
        if local:
            why += "; the host's own processes have no form: only the pods that use: it are let in (NetworkPolicy)"
        notes.approximated("netns", "the pod's network namespace, reached through its Service", why)
    elif owner == sock.service:
        notes.mapped("netns", "the pod's network namespace")
    else:
        notes.unexpressible("netns", f"bound in {owner}'s namespace: another pod's network namespace cannot be entered")
    if sock.accept:
        notes.approximated("accept", "activator --accept", "one process per connection, in the one pod (not a sandbox each)")
        notes.mapped("max_connections", "activator --accept MAX")
    else:
        notes.nothing("accept", "one listening socket")
        notes.nothing("max_connections", "only used with accept")
    if sock.proxy is not None:
        notes.mapped("proxy", "Service targetPort: the program's own port" if sock.proxy.is_inet else "(the program binds it in its pod)")
        notes.nothing("handoff", "the Service forwards to the program itself: nothing in between")
    else:
        notes.nothing("proxy", "none given")
        notes.nothing("handoff", "only used with proxy")


def _volumes(stack: Stack, options: KubernetesOptions, decisions: list[Decision]) -> list[Object]:
    documents: list[Object] = []
    for volume in stack.volumes:
        notes = notes_for(ENGINE, volume)
        metadata: Object = {"name": k8s_name(volume.name), "labels": {"app.kubernetes.io/part-of": k8s_name(stack.name)}}
        if options.namespace:
            metadata["namespace"] = options.namespace
        documents.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata,
                          "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": options.volume_size}}}})  # fmt: skip
        notes.approximated(UNIT_KEY, "PersistentVolumeClaim", f"sandboxd's volumes have no size: it asks for {options.volume_size} (--volume-size), ReadWriteOnce")
        decisions += notes.decisions()
    for network in stack.networks:
        notes = notes_for(ENGINE, network)
        note_network_unit(network, notes)
        decisions += notes.decisions()
    return documents

