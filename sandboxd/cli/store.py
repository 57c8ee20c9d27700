"""The verbs on the store under /var/lib/sandboxd: `image` (build, ls, rm, pull, import) and `volume`
(ls, rm). What changes the store is refused at once unless run as root.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.errors import HostError

if TYPE_CHECKING:
    from sandboxd.store.images import Image
    from sandboxd.wire import VolumeListing


def cmd_image(args: argparse.Namespace) -> int:
    from sandboxd.store import images

    match args.action:
        case "ls":
            found = images.list_images()
            if args.json:
                import json

                print(json.dumps([_image_json(i) for i in found], indent=2))
                return 0
            print(f"{'NAME':<24} {'SOURCE':<7} {'SIZE':>9}  {'CREATED':<20} DIGEST")
            for image in found:
                import time

                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(image.created))
                size = f"{images.size_of(image.rootfs) / (1 << 20):.1f}M"
                print(f"{image.reference or image.name:<24} {image.source:<7} {size:>9}  {created:<20} {image.digest[:19]}")
            return 0
        case "build":
            _need_root("sandboxd image build")
            for target in args.names or ["."]:
                definition, name = _definition(target)
                if args.force:
                    with images.store_lock():
                        built = images.build(name, definition)
                else:
                    built = images.build_if_changed(name, definition)
                print(f"image {built.name}: {built.rootfs} ({built.digest[:19]})")
            return 0
        case "rm":
            _need_root("sandboxd image rm")
            from sandboxd.store.pull import remove

            missing = [name for name in args.names if not remove(name)]
            for name in missing:
                print(f"sandboxd: no image '{name}'", file=sys.stderr)
            return 1 if missing else 0
        case "import":
            _need_root("sandboxd image import")
            from sandboxd.store.oci import import_image

            image = import_image(Path(args.file), args.name)
            print(f"image {image.name}: imported from {args.file} ({image.digest[:19]})")
            return 0
        case "pull":
            return _pull(args.references)
    return 2


def _pull(references: list[str]) -> int:
    """`image pull REF…`: each from its registry, always asked again, as `docker pull` does."""
    from sandboxd.spec.reference import BadReference, parse_reference
    from sandboxd.store.pull import pull

    _need_root("sandboxd image pull")
    parsed = []
    for text in references:
        try:
            parsed.append(parse_reference(text))
        except BadReference as e:
            raise HostError(f"'{text}' is not an image reference: {e}", "like redis:7, docker.io/library/redis:7, localhost:5000/app:1 or NAME@sha256:DIGEST") from None
    for reference in parsed:
        image = pull(reference)
        print(f"image {reference}: pulled as {image.name} ({image.digest[:19]})")
    return 0


def _image_json(image: Image) -> dict[str, object]:
    from sandboxd.store.images import size_of

    config = image.config.to_json()
    return {"name": image.name, "source": image.source, "digest": image.digest, "created": image.created, "size": size_of(image.rootfs), "config": config, "reference": image.reference}


def _definition(target: str) -> tuple[Path, str]:
    """A definition folder from a path (images/NAME) or a name looked up from the current folder."""
    from sandboxd.store import images

    path = Path(target)
    if (path / images.BUILD_SCRIPT).is_file():
        return path.resolve(), path.resolve().name
    found = images.find_definition(target, Path.cwd())
    if found is None:
        raise HostError(f"no image definition '{target}': expected a folder with a build script, or images/{target}/build here or above", "give the path, like sandboxd image build images/busybox")
    return found, target


def cmd_volume(args: argparse.Namespace) -> int:
    from sandboxd.store import volumes

    if args.action == "ls":
        if args.json:
            import json

            listed: list[VolumeListing] = [{"name": name, "size": size} for name, size in volumes.list_volumes()]
            print(json.dumps(listed))
            return 0
        print(f"{'NAME':<32} {'SIZE':>9}")
        for name, size in volumes.list_volumes():
            print(f"{name:<32} {size / (1 << 20):>8.1f}M")
        return 0
    _need_root("sandboxd volume rm")
    failed = 0
    for name in args.names:
        user = volumes.in_use(name)
        if user:
            print(f"sandboxd: volume '{name}' is in use by a sandbox (pid {user}); stop its stack first", file=sys.stderr)
            failed = 1
        elif not volumes.remove(name):
            print(f"sandboxd: no volume '{name}'", file=sys.stderr)
            failed = 1
    return failed


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostError(f"{what} needs root: the store under /var/lib/sandboxd belongs to root", "run it as root")
