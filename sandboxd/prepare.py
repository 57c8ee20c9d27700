"""What a stack needs from the host before it starts: its images (built when their definition
changed), its launch plans made against them, and its volumes.

Spec loading and planning stay free of this I/O: `load_stack` checks the YAML, `plan_stack` turns
units plus these facts into plans, and only this module reaches for the image store.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import SpecError, SpecErrors
from .images import Image, ensure, find_definition, load
from .plan import HostFacts, LaunchPlan, init_path, plan_stack, static_init_path
from .spec import Stack
from .volumes import volumes_dir


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


def make_plans(stack: Stack, runtime_dir: str = "/run/sandboxd/stack", echo: bool = True, subids: bool = False, build: bool = True) -> dict[str, LaunchPlan]:
    """Plans for every service; with `subids`, user namespaces get this host's subordinate range
    (which may create the sandboxd user's entry in /etc/subuid: only when starting for real)."""
    images = resolve_images(stack, echo, build)
    if any(sock.proxy is not None for sock in stack.sockets):
        from .proxy import proxy_binary

        proxy_binary()  # a HostError now rather than clients held for ever
    facts = HostFacts(init_path(), runtime_dir, volumes_dir=str(volumes_dir()), images=images, static_init_path=static_init_path() if images else "")
    plans = plan_stack(stack, facts)
    if subids and any(service.userns for service in stack.services):
        from .subids import userns_range

        plans = plan_stack(stack, dataclasses.replace(facts, userns_range=userns_range()))
    return plans
