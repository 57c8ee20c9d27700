"""The stack planner: a validated stack plus HostFacts -> one LaunchPlan per service, every
problem of every service reported together.

Planning a service is two steps. The draft takes what the spec and the facts say without looking
at any path: the image, uid and gid, the mounts asked for, the program, the environment. The plan
then checks the draft against PathFacts (mount targets, the program) and puts the steps in order.
`paths_asked` is the first step alone: the prepare step calls it to learn which paths to look at
on the host, so that planning itself never does.

Descriptor order (documented in the README): the socket units feeding a service, sorted by unit
name, and within one unit its `listen` entries in the order written. Fds start at 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.kernel.abi import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUTS
from sandboxd.plan.confinement import capabilities, intercept_bind, seccomp_filter
from sandboxd.plan.environment import base_environment, service_environment
from sandboxd.plan.identity import service_identity
from sandboxd.plan.launch import HostFacts, LaunchPlan, MountOp, PlannedImage
from sandboxd.plan.mounts import MountRequest, check_targets, nested_in_writable_errors, requested_mounts, sandboxd_binds, service_mounts, target_paths
from sandboxd.plan.networks import net_mode
from sandboxd.plan.program import no_program_error, program, program_error, program_paths
from sandboxd.spec.model import Service, Stack


@dataclass(frozen=True)
class Draft:
    """What planning makes of a service before it looks at any path."""

    image: PlannedImage | None
    rootfs: str  # the image's tree; "" for the host's root
    uid: int
    gid: int
    identity_errors: tuple[SpecError, ...]
    requests: tuple[MountRequest, ...]  # the mounts the spec asks for
    own_tmpfs: dict[str, MountOp]  # the spec's tmpfs at /tmp or /run, in place of the sandbox's own
    binds: tuple[MountOp, ...]  # what the sandbox sees the host through: the requests' and sandboxd's own
    argv: tuple[str, ...]  # empty if neither spec nor image names a program
    workdir: str
    env: dict[str, str]  # PATH, the image's, the spec's


def _image(service: Service, facts: HostFacts) -> PlannedImage | None:
    if service.image == "host":
        return None
    image = facts.images.get(service.image)
    if image is None:
        raise SpecErrors([SpecError(service.file, service.line, "image", f"image '{service.image}' is not known")])
    return image


def draft(stack: Stack, service: Service, facts: HostFacts) -> Draft:
    image = _image(service, facts)
    uid, gid, identity_errors = service_identity(service, image, facts)
    requests, own_tmpfs = requested_mounts(stack, service, facts, (uid, gid))
    argv, workdir = program(service, image)
    return Draft(
        image=image,
        rootfs=str(image.rootfs) if image else "",
        uid=uid,
        gid=gid,
        identity_errors=tuple(identity_errors),
        requests=tuple(requests),
        own_tmpfs=own_tmpfs,
        binds=(*(request.op for request in requests), *sandboxd_binds(service, facts)),
        argv=argv,
        workdir=workdir,
        env=base_environment(service, image),
    )


def paths_asked(stack: Stack, facts: HostFacts) -> set[str]:
    """Every host path planning `stack` may look at (mount targets and sources on the host's
    root, the program's candidates): what the prepare step looks at to fill PathFacts."""
    asked: set[str] = set()
    for service in stack.services:
        if service.image != "host" and service.image not in facts.images:
            continue  # planning says it is not known
        found = draft(stack, service, facts)
        asked |= target_paths(service, found.requests)
        if found.argv:
            asked |= program_paths(found.argv, found.workdir, found.env["PATH"], found.binds, found.rootfs)
    return asked


def descriptors(stack: Stack, service: Service) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """The names of the descriptors passed to the service (fds 3..), the (socket unit, listen
    index) of each, and the sockets served by sandboxd's proxy instead of passed."""
    fd_names: list[str] = []
    fd_sockets: list[tuple[str, int]] = []
    proxied: list[tuple[str, int]] = []
    for sock in stack.sockets_of(service.name):
        if sock.proxy is not None:  # served by sandboxd's proxy, not handed to the program
            proxied += [(sock.name, index) for index in range(len(sock.listen))]
            continue
        for index, _ in enumerate(sock.listen):
            fd_names.append(sock.fdname)
            fd_sockets.append((sock.name, index))
    return fd_names, fd_sockets, proxied


def plan_service(stack: Stack, service: Service, facts: HostFacts) -> LaunchPlan:
    found = draft(stack, service, facts)
    target_errors, new_tops = check_targets(service, found.requests, facts)
    errors = nested_in_writable_errors(service) + list(found.identity_errors) + target_errors
    if errors:
        raise SpecErrors(errors)
    net = net_mode(stack, service)
    mounts, hidden = service_mounts(stack, service, facts, found.image, found.requests, found.own_tmpfs, new_tops, net)
    fd_names, fd_sockets, proxied = descriptors(stack, service)
    if not found.argv:
        raise SpecErrors([no_program_error(service)])
    error = program_error(service, found.argv, found.workdir, found.env["PATH"], found.binds, found.rootfs, facts.paths, [op.target for op in hidden])
    if error:
        raise SpecErrors([error])
    return LaunchPlan(
        service=service.name,
        # The command itself: the set-up interpreter forks it and stays as its init (sbd-setup.c).
        argv=found.argv,
        env=service_environment(service, found.env, fd_names),
        hostname=service.hostname,
        workdir=found.workdir,
        clone_flags=CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (CLONE_NEWNET if net in ("private", "none") else 0),
        mounts=tuple(mounts),
        fd_names=tuple(fd_names),
        fd_sockets=tuple(fd_sockets),
        proxied=tuple(proxied),
        intercept_bind=intercept_bind(stack, service, facts.architecture),
        net=net,
        per_connection=any(sock.accept for sock in stack.sockets_of(service.name)),
        capabilities=capabilities(service),
        no_new_privs=service.no_new_privs,
        seccomp_filter=seccomp_filter(service, facts.architecture),
        uid=found.uid,
        gid=found.gid,
        userns=facts.userns if service.userns else None,
    )


def plan_stack(stack: Stack, facts: HostFacts) -> dict[str, LaunchPlan]:
    """Plan every service; all problems of all services are reported together."""
    plans: dict[str, LaunchPlan] = {}
    errors: list[SpecError] = []
    for service in stack.services:
        try:
            plans[service.name] = plan_service(stack, service, facts)
        except SpecErrors as e:
            errors += e.errors
    if errors:
        raise SpecErrors(errors)
    return plans
