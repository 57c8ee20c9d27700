"""Image references as docker reads them: `redis:7`, `docker.io/library/redis:7`,
`localhost:5000/app:1`, `name@sha256:…`.

    reference  := name [":" tag] ["@" digest]
    name       := [registry "/"] component ("/" component)*
    registry   := the first component, when it holds a "." or a ":" or is `localhost`
                  (host[:port]; otherwise the whole name is a repository on docker.io)
    component  := [a-z0-9]+ (("." | "_" | "__" | "-"+) [a-z0-9]+)*   (lower case only)
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}     default `latest` when there is no digest
    digest     := sha256:<64 hex> | sha512:<128 hex>

On docker.io a name of one component is an official image: `redis` is `docker.io/library/redis`.
Pure text rules, no I/O: the spec checks `image:` values with them, the store pulls by them.
Whether a bare name means a built or imported image instead is the store's business (a local
image of that name wins; see sandboxd/store/pull.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_PORT = re.compile(r"[0-9]{1,5}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_MAX_NAME = 255  # docker's limit on registry/repository


class BadReference(ValueError):
    """The text is no image reference; the message says which rule it breaks."""


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference: `registry/repository`, a tag and/or a digest."""

    registry: str  # host[:port]
    repository: str  # path components, with `library/` added for docker.io's official images
    tag: str  # "" only when a digest is given without a tag
    digest: str  # "" or algorithm:hex

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def pinned(self) -> str:
        """What is fetched: by digest when there is one (the tag is then only a label, as docker does)."""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"

    @property
    def loopback(self) -> bool:
        """Whether the registry is on this machine (localhost, 127.0.0.0/8, ::1): docker talks plain
        HTTP to those without being told, and so does sandboxd."""
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry[1:].split("]", 1)[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_reference(text: str) -> Reference:
    """`text` as docker would resolve it (see the module docstring); BadReference if it is none."""
    if not text or text != text.strip():
        raise BadReference("an image reference has no spaces around it and is not empty")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise BadReference(f"'{digest}' is not a digest (sha256: and 64 lower-case hex digits)")
    name, tag = rest, ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:  # a colon after the last slash starts the tag (before it, it is a port)
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise BadReference(f"'{tag}' is not a tag (up to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)")
    registry, repository = _split_registry(name)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"{OFFICIAL_NAMESPACE}/{repository}"
    if len(f"{registry}/{repository}") > _MAX_NAME:
        raise BadReference(f"the name is longer than {_MAX_NAME} characters")
    return Reference(registry, repository, tag or ("" if digest else DEFAULT_TAG), digest)


def _split_registry(name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        if not _is_registry(first):
            raise BadReference(f"'{first}' is not a registry host[:port]")
        registry = first
    else:
        registry, remainder = DEFAULT_REGISTRY, name
    for component in remainder.split("/"):
        if component != component.lower() and _COMPONENT.fullmatch(component.lower()):
            raise BadReference(f"repository names are lower case: '{component}'")
        if not _COMPONENT.fullmatch(component):
            raise BadReference(f"'{component}' is not a repository name component (a-z 0-9, separated by . _ __ or -)")
    return registry, remainder


def _is_registry(text: str) -> bool:
    """host, host:port, [ipv6] or [ipv6]:port."""
    if text.startswith("["):
        address, _, port = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return port == "" or (port.startswith(":") and bool(_PORT.fullmatch(port[1:])))
    host, colon, port = text.partition(":")
    return bool(_HOST.fullmatch(host)) and (not colon or bool(_PORT.fullmatch(port)))
