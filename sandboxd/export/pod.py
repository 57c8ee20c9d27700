"""A service as a Kubernetes pod template: its container, its sandbox as securityContext, its
resources, probes and volumes.

What every sandboxd sandbox is, whatever its keys say, becomes the pod's defaults:
`automountServiceAccountToken: false` (a sandbox holds no credentials of the engine),
`enableServiceLinks: false` (no variables about other services), `privileged: false`, and a
memory-backed emptyDir at /tmp, /run and /dev/shm (a sandbox's own tmpfs there), so that the
root file system can stay read-only.

`pod_template` returns the template and the container's volumes; each key is decided on the
unit's record (decisions.py) where it is written into the template.
"""

from __future__ import annotations

import math
import signal
from typing import Any

from sandboxd.export.activator import activated_command, activator_init
from sandboxd.export.decisions import UnitNotes
from sandboxd.spec.model import HealthCheck, Service, Stack

Object = dict[str, Any]
PROFILE_FOLDER = "sandboxd"  # below the kubelet's seccomp folder (/var/lib/kubelet/seccomp)


def k8s_name(name: str) -> str:
    """A unit's name as a Kubernetes object name (a DNS label: no '_' or '.')."""
    return name.replace("_", "-").replace(".", "-")


def labels(stack: Stack, service: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": k8s_name(service), "app.kubernetes.io/part-of": k8s_name(stack.name)}


def container(stack: Stack, service: Service, notes: UnitNotes, seccomp: str) -> tuple[Object, list[Object]]:
    """The service's container and the volumes it mounts (with the activator's, if it has one)."""
    spec: Object = {"name": k8s_name(service.name), "image": service.image}
    notes.mapped("image", "containers[].image", "as written; the cluster pulls it")
    command, volumes = activated_command(stack, service, notes)
    if command:
        spec["command"] = list(command)
        notes.mapped("command", "containers[].command" + (" (after the activator's arguments)" if volumes else ""))
    elif "command" not in notes.made:  # not decided already: unexpressible when an activator needed it
        notes.nothing("command", "the image's entrypoint and command")
    if service.workdir:
        spec["workingDir"] = service.workdir
        notes.mapped("workdir", "containers[].workingDir")
    else:
        notes.nothing("workdir", "the image's working directory")
    spec["env"] = [{"name": key, "value": value} for key, value in service.environment]
    notes.mapped("environment", "containers[].env") if service.environment else notes.nothing("environment", "none given")
    notes.mapped("env_file", "containers[].env", "read at export time") if service.env_file else notes.nothing("env_file", "none given")
    spec["securityContext"] = security_context(service, notes, seccomp)
    spec["resources"] = resources(service, notes)
    spec.update(probes(service, notes))
    mounts, own = volume_mounts(service, notes)
    spec["volumeMounts"] = mounts + [{"name": v["name"], "mountPath": "/sandboxd", "readOnly": True} for v in volumes]
    return spec, own + volumes


def security_context(service: Service, notes: UnitNotes, seccomp: str) -> Object:
    """capabilities, no_new_privs, readonly_root, user, group, seccomp (userns is the pod's)."""
    context: Object = {"privileged": False, "allowPrivilegeEscalation": not service.no_new_privs,
                       "capabilities": {"drop": ["ALL"], **({"add": list(service.capabilities)} if service.capabilities else {})},
                       "readOnlyRootFilesystem": service.readonly_root}  # fmt: skip
    notes.mapped("capabilities", "securityContext.capabilities", "drop ALL, add the listed ones")
    notes.mapped("no_new_privs", "securityContext.allowPrivilegeEscalation")
    notes.mapped("readonly_root", "securityContext.readOnlyRootFilesystem")
    for key, field in (("user", "runAsUser"), ("group", "runAsGroup")):
        value = getattr(service, key)
        if value.isdigit():
            context[field] = int(value)
            notes.mapped(key, f"securityContext.{field}")
        elif value:
            notes.unexpressible(key, f"Kubernetes takes a number, not the name {value!r}: give {key}: a uid/gid (the image's /etc/passwd says which)")
        else:
            notes.nothing(key, "root (of the pod's user namespace, with hostUsers: false)" if key == "user" else "the user's group")
    if service.user and service.user != "0":
        context["runAsNonRoot"] = True
    if seccomp == "unconfined":
        context["seccompProfile"] = {"type": "Unconfined"}
        notes.mapped("seccomp", "securityContext.seccompProfile: Unconfined")
    elif seccomp == "runtime-default":
        context["seccompProfile"] = {"type": "RuntimeDefault"}
        notes.approximated("seccomp", "securityContext.seccompProfile: RuntimeDefault",
                           "the container runtime's default profile, not sandboxd's list (--seccomp localhost writes sandboxd's)")  # fmt: skip
    else:
        context["seccompProfile"] = {"type": "Localhost", "localhostProfile": profile_name(service)}
        notes.approximated("seccomp", "securityContext.seccompProfile: Localhost",
                           f"install seccomp/{profile_name(service)} on every node; it lacks the personality and setuid-mode checks")  # fmt: skip
    return context


def profile_name(service: Service) -> str:
    """The Localhost profile's path below the kubelet's seccomp folder."""
    return f"{PROFILE_FOLDER}/{service.name}.json"


def resources(service: Service, notes: UnitNotes) -> Object:
    """limits: memory and cpu as limits (and the same requests); the others reported."""
    limits: Object = {}
    if service.limits.memory is not None:
        limits["memory"] = str(service.limits.memory)
        notes.mapped("limits.memory", "resources.limits.memory")
    if service.limits.cpu is not None:
        limits["cpu"] = f"{math.ceil(service.limits.cpu * 1000)}m"
        notes.mapped("limits.cpu", "resources.limits.cpu")
    why = {"memory_high": "no memory.high in a pod spec (MemoryQoS is the kubelet's, alpha)", "swap": "swap is the node's (NodeSwap, LimitedSwap)",
           "pids": "the process limit is the kubelet's (podPidsLimit), for every pod of the node", "cpu_weight": "no CPU weight: requests.cpu sets the share",
           "io_weight": "no I/O weight in a pod spec"}  # fmt: skip
    for name, text in why.items():
        if getattr(service.limits, name) is not None:
            notes.unexpressible(f"limits.{name}", text)
    if service.limits.pids is None:
        notes.unexpressible("limits", f"the default process limit of {service.limits.with_defaults().pids} is the kubelet's (podPidsLimit)")
    else:
        notes.mapped("limits", "resources.limits")
    notes.nothing("limits_optional", "a pod's limits always hold")
    return {"limits": limits, "requests": dict(limits)} if limits else {}


def _probe(check: HealthCheck, threshold: int) -> Object:
    return {"exec": {"command": list(check.exec)}, "periodSeconds": max(1, math.ceil(check.interval)),
            "timeoutSeconds": max(1, math.ceil(check.timeout)), "failureThreshold": threshold}  # fmt: skip


def probes(service: Service, notes: UnitNotes) -> Object:
    """ready, start_timeout, watchdog, notify_access, fdstore_max."""
    found: Object = {}
    if isinstance(service.ready, HealthCheck):
        check = service.ready
        found["readinessProbe"] = _probe(check, check.retries)
        found["livenessProbe"] = _probe(check, check.retries)
        found["startupProbe"] = _probe(check, max(1, math.ceil(service.start_timeout / max(1, math.ceil(check.interval)))))
        notes.mapped("ready", "readinessProbe, livenessProbe (exec)", "unhealthy after retries: restarted, as sandboxd kills it")
        notes.mapped("start_timeout", "startupProbe.failureThreshold", "times periodSeconds")
    elif service.ready == "notify":
        notes.unexpressible("ready", "no NOTIFY_SOCKET in a pod: it counts as ready once started; give ready: a check ({exec: [...]}) instead")
        notes.unexpressible("start_timeout", "without a check there is nothing to time")
    else:
        notes.mapped("ready", "(no probe)", "ready once started")
        notes.nothing("start_timeout", "ready once started")
    if service.watchdog:
        notes.unexpressible("watchdog", "no WATCHDOG=1 pings in a pod: a livenessProbe from a ready: check is the nearest")
    else:
        notes.nothing("watchdog", "none asked for")
    if service.ready == "notify" or service.notify_access != "main":
        notes.unexpressible("notify_access", "no notify socket in a pod")
    else:
        notes.nothing("notify_access", "no notify socket")
    notes.unexpressible("fdstore_max", "no fd store in a pod") if service.fdstore_max else notes.nothing("fdstore_max", "no fd store")
    return found


def volume_mounts(service: Service, notes: UnitNotes) -> tuple[list[Object], list[Object]]:
    """mounts, tmpfs, tmpfs_size, shm_size: the container's mounts and the pod's volumes."""
    mounts: list[Object] = []
    volumes: list[Object] = []
    for index, mount in enumerate(service.mounts):
        if mount.volume:
            name = f"volume-{k8s_name(mount.volume)}"
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": k8s_name(mount.volume), "readOnly": mount.readonly}})
        else:
            name = f"mount-{index}"
            kind = "Directory" if mount.source is not None and mount.source.is_dir() else "File"
            volumes.append({"name": name, "hostPath": {"path": str(mount.source), "type": kind}})
        mounts.append({"name": name, "mountPath": mount.target, "readOnly": mount.readonly})
    if any(not m.volume for m in service.mounts):
        notes.approximated("mounts", "volumes[].hostPath, volumeMounts[]", "a host path must exist on every node; put the files in the image or a ConfigMap")
    elif service.mounts:
        notes.mapped("mounts", "volumes[].persistentVolumeClaim, volumeMounts[]")
    else:
        notes.nothing("mounts", "none given")
    given = {t.path: t.size for t in service.tmpfs}
    tmpfs = {"/tmp": service.tmpfs_size, "/run": service.tmpfs_size, **{p: s or service.tmpfs_size for p, s in given.items()}}
    tmpfs["/dev/shm"] = service.shm_size or service.tmpfs_size
    for index, (path, size) in enumerate(tmpfs.items()):
        volumes.append({"name": f"tmpfs-{index}", "emptyDir": {"medium": "Memory", "sizeLimit": str(size)}})
        mounts.append({"name": f"tmpfs-{index}", "mountPath": path})
    notes.mapped("tmpfs", "emptyDir (medium: Memory)") if service.tmpfs else notes.nothing("tmpfs", "none given")
    notes.mapped("tmpfs_size", "emptyDir.sizeLimit of /tmp, /run and the tmpfs entries")
    notes.mapped("shm_size", "emptyDir.sizeLimit of /dev/shm")
    return mounts, volumes


def pod_spec(stack: Stack, service: Service, notes: UnitNotes, seccomp: str, activator_image: str) -> Object:
    """The pod: its container, userns, hostname, network mode, stop timeout and signal."""
    main, volumes = container(stack, service, notes, seccomp)
    spec: Object = {"automountServiceAccountToken": False, "enableServiceLinks": False, "containers": [main], "volumes": volumes}
    init = activator_init(main, activator_image)
    if init is not None:
        spec["initContainers"] = [init]
    if service.network == "host":
        spec["hostNetwork"] = True  # decided with the other network keys (policies.py)
    if service.userns and service.network == "host":
        notes.unexpressible("userns", "Kubernetes refuses hostUsers: false with hostNetwork: the pod keeps the node's ids")
    elif service.userns:
        spec["hostUsers"] = False
        notes.mapped("userns", "hostUsers: false", "a user namespace per pod (on by default from Kubernetes 1.33)")
    else:
        notes.mapped("userns", "(hostUsers: true)", "the node's ids")
    if "." not in service.hostname:
        spec["hostname"] = service.hostname
        notes.mapped("hostname", "hostname")
    else:
        notes.unexpressible("hostname", "a pod's hostname is one DNS label: no dots")
    spec["terminationGracePeriodSeconds"] = math.ceil(service.stop_timeout)
    notes.mapped("stop_timeout", "terminationGracePeriodSeconds")
    if service.stop_signal == signal.SIGTERM:
        notes.mapped("stop_signal", "(SIGTERM, as the kubelet sends)")
    else:
        notes.unexpressible("stop_signal", f"the kubelet sends SIGTERM: {signal.Signals(service.stop_signal).name} needs lifecycle.stopSignal, alpha in 1.33")
    return spec
