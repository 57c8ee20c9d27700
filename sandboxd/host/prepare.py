"""What a stack needs from the host before it starts: its images (built when their definition
changed), its launch plans made against them, and its volumes.

Spec loading and planning stay free of this I/O: `load_stack` checks the YAML, `plan_stack` turns
units plus these facts into plans, and only this module reaches for the image store.
"""

from __future__ import annotations

import glob
from pathlib import Path

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.store.images import Image, ensure, find_definition, load, state_dir
from sandboxd.host.facts import init_path, proxy_binary, static_init_path, subordinate_ids
from sandboxd.plan.launch import HostFacts, LaunchPlan, UserNamespace, plan_stack
from sandboxd.spec.model import Stack
from sandboxd.store.volumes import volumes_dir


def resolve_images(stack: Stack, echo: bool = True, build: bool = True) -> dict[str, Image]:
    """Every image the stack names, by its `image:` value; unknown names are spec errors. Without
    `build`, only what is stored counts (`sandboxd config` changes nothing)."""
    found: dict[str, Image] = {}
    errors = []
    for service in stack.services:
        if service.image == "host" or service.image in found:
            continue
        if service.image.startswith("/"):
            found[service.image] = Image(service.image, Path(service.image))
            continue
        image = ensure(service.image, stack.folder, echo=echo) if build else load(service.image)
        if image is None and not build and find_definition(service.image, stack.folder) is not None:
            errors.append(SpecError(service.file, service.line, "image", f"image '{service.image}' is not built yet: sandboxd image build {service.image}"))
        elif image is None:
            errors.append(
                SpecError(
                    service.file,
                    service.line,
                    "image",
                    f"no image '{service.image}': none in the store (sandboxd image ls) and no images/{service.image}/build "
                    f"beside {stack.folder} or a folder above it; import one with sandboxd image import FILE",
                )
            )
        else:
            found[service.image] = image
    if errors:
        raise SpecErrors(errors)
    return found


def make_plans(
    stack: Stack, runtime_dir: str = "/run/sandboxd/stack", echo: bool = True, userns: UserNamespace | None = None, build: bool = True
) -> dict[str, LaunchPlan]:
    """Plans for every service. `userns` is the block of ids the stack holds (subids.lease: only
    when starting for real); without it, user namespaces show the first block it could get."""
    images = resolve_images(stack, echo, build)
    if any(sock.proxy is not None for sock in stack.sockets):
        proxy_binary()  # a HostError now rather than clients held for ever
    if userns is None:
        userns = subordinate_ids()
    facts = HostFacts(
        init_path(),
        runtime_dir,
        userns=userns,
        volumes_dir=str(volumes_dir()),
        hidden=hidden_paths(),
        images=images,
        static_init_path=static_init_path() if images else "",
    )
    return plan_stack(stack, facts)


def hidden_paths() -> tuple[str, ...]:
    """What a sandbox on the host's root never sees, unless a mount asks for it: root's and the
    users' homes, sandboxd's state (images, volumes, id leases), the host's SSH private keys."""
    state = sorted({"/var/lib/sandboxd", str(state_dir())})
    return ("/root", "/home", *state, *sorted(glob.glob("/etc/ssh/ssh_host_*_key")))
