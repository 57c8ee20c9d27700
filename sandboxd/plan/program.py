"""What a sandbox runs: the program and its arguments, where, and the check that it is there.

As docker: `command:` replaces an image's Cmd, and its Entrypoint stays. The program must exist
in the sandbox, so that a typo is a validation error, not a restart loop: it is looked for where
the sandbox will see it (through the binds that cover it, else in the root), in PATH for a bare
name. `program_paths` names the host paths that check looks at, for the prepare step.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sandboxd.errors import SpecError
from sandboxd.plan.launch import MountOp, PathFacts, PlannedImage, is_under

if TYPE_CHECKING:
    from sandboxd.spec.model import Service


def program(service: Service, image: PlannedImage | None) -> tuple[tuple[str, ...], str]:
    """argv (empty if neither the spec nor the image names a program) and the working directory."""
    argv = service.command
    if image is not None:
        argv = image.config.entrypoint + (service.command or image.config.cmd)
    workdir = service.workdir or (image.config.workdir if image else "") or "/"
    return argv, workdir


def no_program_error(service: Service) -> SpecError:
    return SpecError(service.file, service.line, "command", f"image '{service.image}' has no Entrypoint or Cmd; give the program to run with command:")


def _candidates(name: str, workdir: str, path_var: str) -> list[str]:
    """Where the sandbox looks for program `name`: the path itself (against workdir), or each PATH entry."""
    if "/" in name:
        return [posixpath.normpath(posixpath.join(workdir, name))]
    return [posixpath.join(d, name) for d in path_var.split(":") if d.startswith("/")]


def _host_path(path: str, binds: Sequence[MountOp], rootfs: str = "") -> str:
    """Where a path inside the sandbox comes from on the host (the deepest bind that covers it)."""
    for bind in sorted(binds, key=lambda b: -len(b.target)):
        if is_under(path, bind.target):
            return bind.source + path[len(bind.target) :]
    return rootfs + path


def program_paths(argv: tuple[str, ...], workdir: str, path_var: str, binds: Sequence[MountOp], rootfs: str) -> set[str]:
    """The host paths `program_error` may look at."""
    return {_host_path(candidate, binds, rootfs) for candidate in _candidates(argv[0], workdir, path_var)}


def program_error(
    service: Service, argv: tuple[str, ...], workdir: str, path_var: str, binds: Sequence[MountOp], rootfs: str, paths: PathFacts, hidden: list[str]
) -> SpecError | None:
    """The error if the program is not where the sandbox will look. A path the sandbox does not
    see (`hidden`, unless a bind brings it) does not count."""
    name = argv[0]

    def seen(path: str) -> bool:
        bound = any(is_under(path, b.target) for b in binds)
        return (bound or not any(is_under(path, h) for h in hidden)) and paths.exists(_host_path(path, binds, rootfs))

    if any(seen(c) for c in _candidates(name, workdir, path_var)):
        return None
    where = f"in PATH ({path_var})" if "/" not in name else "in the sandbox"
    image = f" of image '{service.image}'" if rootfs else ""
    return SpecError(service.file, service.line, "command", f"program {name!r} not found {where}{image}")
