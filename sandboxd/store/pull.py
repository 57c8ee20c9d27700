"""Images from registries: copied by Debian's `skopeo` into one OCI layout, then imported (oci.py).

    /var/lib/sandboxd/oci/            one OCI image layout for every pulled image; its blobs are
                                      shared, so a layer two images have in common is fetched once
                                      (skopeo does not fetch a blob the layout holds). Each pulled
                                      image is the entry of index.json named by its store name.
    /var/lib/sandboxd/images/NAME/    its flattened tree (images.py, `pulled_name`), image.json
                                      naming the reference it was pulled by

    image: value ──▶ definition images/NAME? ── yes ─▶ built (images.py)
                     stored image NAME, built or imported? ── yes ─▶ that one
                     else a registry reference (spec/reference.py) ─▶ the policy:
                        missing  pulled before? that one : pull          (the default, as compose)
                        always   pull (blobs held are not fetched again; the same manifest is
                                 not unpacked again)
                        never    pulled before? that one : spec error naming the image

A pull: `skopeo copy docker://REFERENCE oci:LAYOUT:NAME` (skopeo checks every blob against its
digest, and the manifest against a digest the reference gives), then import_image reads the
entry NAME of the layout, checking each blob's digest again as it unpacks. Afterwards the layout
keeps only the blobs its named entries use (a tag that moved leaves its old layers behind
otherwise); `image rm` drops the entry and prunes the same way. Only one pull runs at a time on
a host (a lock beside the layout: skopeo rewrites index.json). skopeo reads credentials
from the usual auth.json (`$REGISTRY_AUTH_FILE` alone if set; else
`${XDG_RUNTIME_DIR}/containers/auth.json`, or `/run/containers/0/auth.json` for root without
XDG_RUNTIME_DIR, then `~/.config/containers/auth.json`, `~/.docker/config.json`) and the registry
configuration in /etc/containers (mirrors, certificates). Registries on this machine (localhost,
127.0.0.0/8, ::1) are spoken to without verified TLS (plain HTTP when they offer no TLS), as
docker does; every other registry must have a valid certificate.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from sandboxd.errors import HostError, SpecError, SpecErrors
from sandboxd.spec.model import NAME, Stack
from sandboxd.spec.reference import Reference, parse_reference
from sandboxd.store import images
from sandboxd.store.oci import REF_NAME, Pulled, import_image

Policy = Literal["always", "missing", "never"]
POLICIES: tuple[Policy, ...] = ("always", "missing", "never")
NO_SKOPEO = "install skopeo (apt-get install skopeo)"


def as_policy(text: str) -> Policy:
    """`text` as a pull policy (the command line offers only these)."""
    if text not in POLICIES:
        raise HostError(f"unknown pull policy '{text}'", "use always, missing or never")
    return text


def layout_dir() -> Path:
    return images.state_dir() / "oci"


def pull_stack_images(stack: Stack, policy: Policy, echo: bool = True) -> None:
    """Bring into the store every registry image `stack` names, as `policy` says. With `never`,
    the images the store lacks are spec errors (exit 2), each with its file and line."""
    errors = []
    seen = set()
    for service in stack.services:
        value = service.image
        if value in seen or value == "host" or value.startswith("/") or is_local(value, stack.folder):
            continue
        seen.add(value)
        reference = parse_reference(value)  # the spec checked it
        if policy == "never" and images.find(value) is None:
            errors.append(SpecError(service.file, service.line, "image", f"{images.missing_image(value, stack.folder)}; --pull never forbids pulling {reference}"))
            continue
        ensure_pulled(reference, policy, echo)
    if errors:
        raise SpecErrors(errors)


def is_local(value: str, spec_folder: Path) -> bool:
    """Whether `value` names a definition or a built or imported image, which win over a registry."""
    return images.local_image(value) is not None or (NAME.fullmatch(value) is not None and images.find_definition(value, spec_folder) is not None)


def ensure_pulled(reference: Reference, policy: Policy, echo: bool = True) -> images.Image:
    """The stored image of `reference`, pulled first unless it is there and `policy` is not `always`."""
    stored = images.find(str(reference))
    if stored is not None and policy != "always":
        return stored
    if policy == "never":
        raise HostError(f"image {reference} is not in the store and --pull never forbids pulling it", f"pull it: sandboxd image pull {reference}")
    return pull(reference, echo, again=policy == "always")


def pull(reference: Reference, echo: bool = True, again: bool = True) -> images.Image:
    """Copy `reference` from its registry into the layout and import it (unless the manifest is
    the one stored already). Without `again`, an image another process pulled meanwhile is taken
    as it is. skopeo's progress goes to stderr when that is a terminal."""
    if os.geteuid() != 0:
        raise HostError(f"pulling {reference} needs root: the store under /var/lib/sandboxd belongs to root", "run it as root")
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise HostError(f"pulling {reference} needs skopeo, which is not installed", NO_SKOPEO)
    name = images.pulled_name(reference)
    terminal = echo and sys.stderr.isatty()
    with layout_lock() as layout:
        stored = images.find(str(reference))
        if stored is not None and not again:
            return stored
        command = [skopeo, "copy", "--remove-signatures", *(["--src-tls-verify=false"] if reference.loopback else []), *([] if terminal else ["--quiet"])]
        if terminal:
            print(f"sandboxd: pulling {reference}", file=sys.stderr, flush=True)
        # skopeo reports on stdout, which may be sandboxd's JSON: its report goes to stderr.
        result = subprocess.run(
            [*command, f"docker://{reference.pinned}", f"oci:{layout}:{name}"],
            stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno() if terminal else subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise pull_error(reference, result.stderr.decode(errors="replace"))
        if stored is None or stored.digest != entry_digest(layout, name):
            stored = import_image(layout, name, Pulled(name, str(reference)))
        prune(layout)  # the blobs of what the tag named before
        return stored


def entry_digest(layout: Path, tag: str) -> str:
    """The manifest digest of the layout's entry `tag` ("" if there is none)."""
    for descriptor in _index(layout).get("manifests") or []:
        if (descriptor.get("annotations") or {}).get(REF_NAME) == tag:
            return str(descriptor.get("digest", ""))
    return ""


def _index(layout: Path) -> dict[str, Any]:
    try:
        data = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def layout_lock() -> Iterator[Path]:
    """The layout, held by this process alone (skopeo rewrites index.json, pruning removes blobs)."""
    layout = images.private_dir(layout_dir())
    fd = os.open(images.state_dir() / "oci.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield layout
    finally:
        os.close(fd)


# ── what went wrong ──

_UNREACHABLE = ("connection refused", "no such host", "timeout", "network is unreachable", "no route to host", "connection reset", "eof")
_REFUSED = ("unauthorized", "authentication required", "denied", "forbidden")
_UNKNOWN = ("manifest unknown", "name unknown", "not found", "no image found")
_TLS = ("server gave http response to https client", "x509", "certificate", "tls")


def pull_error(reference: Reference, stderr: str) -> HostError:
    """One HostError for a failed skopeo copy: what happened, naming the image and its registry,
    and what to do about it."""
    detail = _skopeo_message(stderr)
    what = detail.lower()
    registry = reference.registry
    if any(word in what for word in _REFUSED):
        return HostError(
            f"cannot pull {reference}: registry {registry} refused it ({detail})",
            f"the image may not exist, or it needs credentials: log in with skopeo login {registry} "
            "(as root it writes /run/containers/0/auth.json), or point REGISTRY_AUTH_FILE at an auth.json",
        )
    if any(word in what for word in _UNKNOWN):
        return HostError(f"cannot pull {reference}: registry {registry} has no such image ({detail})", "check the repository's name and the tag or digest")
    if any(word in what for word in _UNREACHABLE):
        return HostError(
            f"cannot pull {reference}: registry {registry} cannot be reached ({detail})",
            "check the registry's address and this machine's network (offline? a proxy?); images already in the store need no registry (--pull missing or never)",
        )
    if any(word in what for word in _TLS):
        return HostError(
            f"cannot pull {reference}: no trusted TLS connection to registry {registry} ({detail})",
            "sandboxd speaks plain HTTP only to registries on this machine (localhost, 127.0.0.0/8, ::1); "
            f"for another registry put its CA certificate in /etc/containers/certs.d/{registry}/ca.crt",
        )
    return HostError(f"cannot pull {reference} from registry {registry}: {detail}", "see skopeo's message; try: skopeo inspect docker://" + reference.pinned)


def _skopeo_message(stderr: str) -> str:
    """The message of skopeo's last fatal line, without the "initializing source …:" prefix it repeats."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "skopeo failed without a message"
    match = re.search(r'msg="((?:[^"\\]|\\.)*)"', lines[-1])
    message = match.group(1).replace('\\"', '"') if match else lines[-1].strip()
    while (shorter := re.sub(r"^(initializing source|reading manifest [^ ]+ in) [^ ]+: ", "", message)) != message:
        message = shorter
    return message[:500]


# ── removing ──


def remove(value: str) -> bool:
    """Remove the image that `value` names (a store name or the reference it was pulled by) and,
    for a pulled one, its entry in the layout and the blobs no other entry uses."""
    name = value
    if images.load(value) is None:
        found = images.find(value)
        if found is None or found.source != "pull":
            return False
        name = found.name
    image = images.load(name)
    if not images.remove(name):
        return False
    if image is not None and image.source == "pull" and layout_dir().is_dir():
        with layout_lock() as layout:
            prune(layout, name)
    return True


def prune(layout: Path, drop: str = "") -> None:
    """Keep in the layout's index the entries that have a name (skopeo leaves the entry a tag
    named before, its name taken off), except `drop`, and delete the blobs none of them refers to."""
    index = _index(layout)
    entries = [d for d in index.get("manifests") or [] if (d.get("annotations") or {}).get(REF_NAME) not in (None, "", drop)]
    (layout / "index.json.tmp").write_text(json.dumps({**index, "manifests": entries}))
    (layout / "index.json.tmp").rename(layout / "index.json")
    used = set()
    for descriptor in entries:
        used |= _blobs_of(layout, str(descriptor.get("digest", "")))
    for blob in [*(layout / "blobs").glob("*/*"), *layout.glob("oci-put-blob*")]:  # and what a killed skopeo left
        if f"{blob.parent.name}:{blob.name}" not in used:
            blob.unlink()


def _blobs_of(layout: Path, digest: str) -> set[str]:
    """The digests a manifest (or an index of them) refers to, its own included."""
    algorithm, _, value = digest.partition(":")
    try:
        document = json.loads((layout / "blobs" / algorithm / value).read_text())
    except (OSError, ValueError):
        return {digest}
    found = {digest}
    for child in document.get("manifests") or []:
        found |= _blobs_of(layout, str(child.get("digest", "")))
    for descriptor in [document.get("config") or {}, *(document.get("layers") or [])]:
        if descriptor.get("digest"):
            found.add(str(descriptor["digest"]))
    return found
