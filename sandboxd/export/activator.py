"""Socket activation kept on Kubernetes: sbd-activate (activator.c) delivered into the pod.

Why this mechanism: a pod has nobody who binds sockets before the program starts, and a program
written for LISTEN_FDS does not bind its own. Sidecars cannot pass descriptors into another
container's process, and sandboxd itself would need Python in every image. So a small static
program, which runs in any image, is copied by an init container (from its own image, made from
activator.c: `gcc -static -Os`, FROM scratch) into a memory-backed emptyDir mounted read-only at
/sandboxd; the service's container runs

    /sandboxd/sbd-activate --listen ADDRESS --name FDNAME ... -- PROGRAM ARGS...

which binds the sockets in the pod's network namespace, puts them on fds 3, 4 ... in the spec's
order, sets LISTEN_FDS, LISTEN_PID (its own pid, kept by exec) and LISTEN_FDNAMES, and execs the
program. `accept: true` becomes `--accept MAX`: it stays, and forks the program per connection.

The activator image (`--activator-image`, default sandboxd-activator:0.1.0), built once and pushed
to the cluster's registry:

    gcc -static -Os -o sbd-activate sandboxd/export/activator.c
    printf 'FROM scratch\nCOPY sbd-activate /sbd-activate\n' > Containerfile
    podman build -t REGISTRY/sandboxd-activator:0.1.0 . && podman push REGISTRY/sandboxd-activator:0.1.0

A socket bound on the host in sandboxd (`netns: host`), or on a network's address, is bound on
all the pod's addresses here, so that its Kubernetes Service reaches it; one bound on the loopback
of the service's own namespace keeps its address. `proxy:` sockets need no activator: the program binds its own address, and the Service
forwards to it.
"""

from __future__ import annotations

from typing import Any

from sandboxd.export.decisions import UnitNotes
from sandboxd.spec.model import Address, Service, Socket, Stack, socket_namespace

ACTIVATOR_IMAGE = "sandboxd-activator:0.1.0"
ACTIVATOR = "/sandboxd/sbd-activate"
VOLUME = "sandboxd-activator"


def pod_address(sock: Socket, address: Address) -> Address:
    """Where the activator binds `address` in the pod: on every address, unless it is the loopback
    of the service's own namespace (the host's, or a network's, addresses are not the pod's)."""
    loopback = address.host in ("127.0.0.1", "::1") and socket_namespace(sock) is not None
    if address.is_inet and not loopback:
        return Address(address.family, "::" if ":" in str(address.host) else "0.0.0.0", address.port, None)
    return address


def activated(stack: Stack, service: Service) -> list[Socket]:
    """The sockets the activator binds for `service`: those fed to it, not forwarded by a proxy."""
    return [s for s in stack.sockets_of(service.name) if s.proxy is None]


def activated_command(stack: Stack, service: Service, notes: UnitNotes) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The container's command (the activator's arguments before the program's, if it binds
    sockets) and the activator's volume ([] without one)."""
    socks = activated(stack, service)
    if not socks:
        return service.command, []
    if not service.command:
        notes.unexpressible("command", "the activator that binds its sockets needs the program's command: give command: (the image's entrypoint is not known here)")
        return (), []
    arguments: list[str] = [ACTIVATOR]
    if socks[0].accept:
        arguments += ["--accept", str(socks[0].max_connections)]
    for sock in socks:
        for address in sock.listen:
            arguments += ["--listen", str(pod_address(sock, address)), "--name", sock.fdname, "--backlog", str(sock.backlog)]
            if address.path is not None:
                arguments += ["--mode", f"{sock.mode:04o}"]
            if sock.reuseport:
                arguments.append("--reuseport")
    volume = {"name": VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}}
    return (*arguments, "--", *service.command), [volume]


def activator_init(main: dict[str, Any], image: str = ACTIVATOR_IMAGE) -> dict[str, Any] | None:
    """The init container that copies the activator into its volume (None: the pod has none)."""
    if not main.get("command") or main["command"][0] != ACTIVATOR:
        return None
    return {
        "name": VOLUME,
        "image": image,
        "command": ["/sbd-activate", "--install", ACTIVATOR],
        "volumeMounts": [{"name": VOLUME, "mountPath": "/sandboxd"}],
        "securityContext": {"privileged": False, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True, "seccompProfile": {"type": "RuntimeDefault"}},  # fmt: skip
    }
