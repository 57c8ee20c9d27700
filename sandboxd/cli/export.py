"""`sandboxd export`: a spec folder as what Kubernetes or systemd runs, and what became of each key.

    sandboxd export kubernetes DIR [-o FILE] [--namespace NS] [--image SERVICE=REF] [--seccomp localhost]
    sandboxd export systemd DIR OUTDIR [--systemd-version N]
    sandboxd export --json DIR            both engines' decisions, nothing written

The output goes to stdout (Kubernetes without -o) or into the files named; every key that is not
expressible or only approximated, for keys the spec gave, is listed on stderr with file, line and
key. `--json` prints the decisions (sandboxd/export/decisions.py) as one JSON object instead.
Validation errors, `image: host` on Kubernetes among them, exit 2 as `up` and `config` do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.errors import SandboxdError, SpecErrors

if TYPE_CHECKING:
    from collections.abc import Callable

    from sandboxd.export.decisions import Decision
    from sandboxd.spec.model import Stack


def cmd_export(args: argparse.Namespace) -> int:
    from sandboxd.spec.load import interpolation_variables, load_stack

    if args.engine is None and not args.json:
        raise SandboxdError("sandboxd export: name the engine (kubernetes or systemd), or give --json for the decisions of both")
    stack = load_stack(Path(args.dir), interpolation_variables(Path(args.dir), [Path(f) for f in args.env_file]))
    if args.engine is None:
        decisions = _kubernetes(stack, args, write=False) + _systemd(stack, args, write=False)
    elif args.engine == "kubernetes":
        decisions = _kubernetes(stack, args, write=True)
    else:
        decisions = _systemd(stack, args, write=True)
    _report(decisions, args.json)
    return 0


def _kubernetes(stack: Stack, args: argparse.Namespace, write: bool) -> list[Decision]:
    import yaml

    from sandboxd.export.kubernetes import KUBERNETES_VERSION, KubernetesOptions, export_kubernetes

    if args.outdir:
        raise SandboxdError("sandboxd export kubernetes writes one file: use -o FILE (or stdout), not OUTDIR")
    images = dict(_image(text) for text in args.image)
    options = KubernetesOptions(args.namespace or "", images, args.seccomp, args.activator_image, args.volume_size)
    try:
        exported = export_kubernetes(stack, options)
    except SpecErrors as e:
        if not write:  # --json for both engines: Kubernetes' refusals are decisions too
            return [_refusal("kubernetes", error) for error in e.errors]
        raise
    if not write:
        return exported.decisions
    header = f"# sandboxd export kubernetes {stack.folder} (stack {stack.name}), for Kubernetes {KUBERNETES_VERSION}\n"
    text = header + yaml.safe_dump_all(exported.documents, sort_keys=False)
    if exported.files and not args.output:
        raise SandboxdError("this export has seccomp profiles to install: give -o FILE, and they are written beside it (seccomp/...)")
    if args.output:
        output = Path(args.output)
        output.write_text(text)
        for name, content in exported.files.items():
            (output.parent / name).parent.mkdir(parents=True, exist_ok=True)
            (output.parent / name).write_text(content)
            print(f"sandboxd: install {output.parent / name} as /var/lib/kubelet/{name} on every node", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return exported.decisions


def _systemd(stack: Stack, args: argparse.Namespace, write: bool) -> list[Decision]:
    from sandboxd.export.systemd import export_systemd

    if write and not args.outdir:
        raise SandboxdError("sandboxd export systemd DIR OUTDIR: name the folder to write the units into")
    try:
        units, decisions = export_systemd(stack, args.systemd_version)
    except SpecErrors as e:
        if not write:
            return [_refusal("systemd", error) for error in e.errors]
        raise
    if write:
        outdir = Path(args.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            (outdir / name).write_text(text)
        print(f"sandboxd: {len(units)} units written to {outdir}; start the stack with systemctl start {stack.name}.target", file=sys.stderr)
    return decisions


def _refusal(engine: str, error: object) -> Decision:
    from sandboxd.export.decisions import Decision

    file, line, key, message = (getattr(error, name) for name in ("file", "line", "key", "message"))
    return Decision(engine, "service", "", key, file, line, True, "not expressible", "", message)


def _image(text: str) -> tuple[str, str]:
    service, sep, reference = text.partition("=")
    if not sep or not service or not reference:
        raise SandboxdError(f"--image {text}: expected SERVICE=REFERENCE, like web=registry.example/web:1")
    return service, reference


def _report(decisions: list[Decision], as_json: bool) -> None:
    from sandboxd.export.decisions import not_expressible

    if as_json:
        print(json.dumps({"decisions": [d.as_json() for d in decisions]}, indent=2))
        return
    shown = not_expressible(decisions)
    for decision in shown:
        print(f"  {decision}", file=sys.stderr)
    defaults = [d for d in decisions if d.status in ("not expressible", "approximated") and not d.given]
    if shown or defaults:
        given = "1 key given is" if len(shown) == 1 else f"{len(shown)} keys given are"
        print(f"sandboxd: {given} not expressible or approximated (listed above); {len(defaults)} more "
              "for keys left at their defaults (all of them: --json)", file=sys.stderr)  # fmt: skip


def add_export(verbs: argparse._SubParsersAction[argparse.ArgumentParser], add_env_file: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `export` verb's parser (`add_env_file`: parser.py's --env-file, as up and config have it)."""
    export = verbs.add_parser(
        "export",
        help="turn a spec folder into Kubernetes objects or systemd units, listing what has no form there",
        description="Write what Kubernetes (1.33) or systemd (252 unless --systemd-version) runs for a spec folder, "
        "with the same meaning where the engine can express it; keys it cannot are listed on stderr with file, line and key.",
    )
    export.add_argument("engine", nargs="?", choices=("kubernetes", "systemd"), help="the engine (none, with --json: both engines' decisions)")
    export.add_argument("dir", help="the spec folder")
    export.add_argument("outdir", nargs="?", help="systemd: the folder to write the units into")
    export.add_argument("-o", "--output", metavar="FILE", help="kubernetes: write the YAML to FILE (and seccomp profiles beside it), not stdout")
    export.add_argument("--namespace", metavar="NS", help="kubernetes: the namespace of every object")
    export.add_argument("--image", action="append", default=[], metavar="SERVICE=REFERENCE",
                        help="kubernetes: run SERVICE from this registry image instead of its image: (needed for host and folder images)")
    export.add_argument("--seccomp", choices=("runtime-default", "localhost"), default="runtime-default",
                        help="kubernetes: the runtime's default profile, or Localhost profiles made from sandboxd's filter (written beside -o)")
    export.add_argument("--activator-image", default="sandboxd-activator:0.1.0", metavar="REFERENCE",
                        help="kubernetes: the image of the socket activator's init container (built from sandboxd/export/activator.c)")
    export.add_argument("--volume-size", default="1Gi", metavar="SIZE", help="kubernetes: the storage each volume's PersistentVolumeClaim asks for")
    export.add_argument("--systemd-version", type=int, default=252, metavar="N",
                        help="systemd: the version the units are for; directives newer than it are left out and reported (default 252)")
    export.add_argument("--json", action="store_true", help="print the mapping decisions of every key as one JSON object")
    add_env_file(export)
    export.set_defaults(func=cmd_export)
