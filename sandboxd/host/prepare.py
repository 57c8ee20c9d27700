"""The prepare step: all the I/O that planning needs, done before it, in one place.

    resolve_images   the images the stack names (built when their definition changed)
    gather_facts     HostFacts: init paths, the stack's ids, volumes, hidden paths, images, and
    survey           what planning asks of the host: the architecture, the user tables (each
                     image's files; NSS for the host names the spec uses) and what the file
                     system shows at every path planning looks at (plan.stack.paths_asked)
    make_plans       the above, then plan_stack: the plans, made purely from those facts

Spec loading and planning stay free of I/O: `load_stack` checks the YAML, `plan_stack` turns
units plus these facts into plans, and only this module reaches for the image store, NSS and
the file system on their behalf.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.host.facts import architecture, proxy_binary, subordinate_ids
from sandboxd.host.identity import host_accounts, image_accounts
from sandboxd.plan.identity import HOST
from sandboxd.plan.launch import Accounts, HostFacts, LaunchPlan, PathFacts, UserNamespace
from sandboxd.plan.stack import paths_asked, plan_stack
from sandboxd.spec.model import Stack
from sandboxd.store.images import Image, ensure, find, find_definition, missing_image, state_dir
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
        image = ensure(service.image, stack.folder, echo=echo) if build else find(service.image)
        if image is None and not build and find_definition(service.image, stack.folder) is not None:
            errors.append(SpecError(service.file, service.line, "image", f"image '{service.image}' is not built yet: sandboxd image build {service.image}"))
        elif image is None:
            errors.append(
                SpecError(service.file, service.line, "image", missing_image(service.image, stack.folder))
            )
        else:
            found[service.image] = image
    if errors:
        raise SpecErrors(errors)
    return found


def accounts_of(stack: Stack, facts: HostFacts) -> dict[str, Accounts]:
    """The user tables planning resolves names in: each image's, and the host's answers for the
    names its host-root services give."""
    accounts = {name: image_accounts(str(image.rootfs)) for name, image in facts.images.items()}
    on_host = [service for service in stack.services if service.image == "host"]
    accounts[HOST] = host_accounts([s.user for s in on_host], [s.group for s in on_host])
    return accounts


def look_at(paths: set[str]) -> PathFacts:
    """What the file system shows at `paths`: those that exist, and which of them are directories."""
    return PathFacts({path: os.path.isdir(path) for path in sorted(paths) if os.path.lexists(path)})


def survey(stack: Stack, facts: HostFacts) -> HostFacts:
    """`facts` with what planning `stack` asks of this host: the architecture, the user tables and
    the paths. Tests give it facts of their own making (images in a temporary folder)."""
    facts = dataclasses.replace(facts, architecture=architecture(), accounts=accounts_of(stack, facts))
    return dataclasses.replace(facts, paths=look_at(paths_asked(stack, facts)))


def gather_facts(stack: Stack, runtime_dir: str, echo: bool, userns: UserNamespace | None, build: bool) -> HostFacts:
    """Everything planning `stack` needs from the host (see make_plans)."""
    images = resolve_images(stack, echo, build)
    if any(sock.proxy is not None for sock in stack.sockets):
        proxy_binary()  # a HostError now rather than clients held for ever
    facts = HostFacts(
        runtime_dir,
        userns=userns if userns is not None else subordinate_ids(),
        volumes_dir=str(volumes_dir()),
        hidden=hidden_paths(),
        images=images,
    )
    return survey(stack, facts)


def make_plans(
    stack: Stack, runtime_dir: str = "/run/sandboxd/stack", echo: bool = True, userns: UserNamespace | None = None, build: bool = True
) -> dict[str, LaunchPlan]:
    """Plans for every service. `userns` is the block of ids the stack holds (subids.lease: only
    when starting for real); without it, user namespaces show the first block it could get."""
    return plan_stack(stack, gather_facts(stack, runtime_dir, echo, userns, build))


def hidden_paths() -> tuple[str, ...]:
    """What a sandbox on the host's root never sees, unless a mount asks for it: root's and the
    users' homes, sandboxd's state (images, volumes, id leases), the host's SSH private keys."""
    state = sorted({"/var/lib/sandboxd", str(state_dir())})
    try:
        keys = fnmatch.filter(os.listdir("/etc/ssh"), "ssh_host_*_key")  # glob's match, without importing glob
    except OSError:
        keys = []
    return ("/root", "/home", *state, *sorted(f"/etc/ssh/{key}" for key in keys))
