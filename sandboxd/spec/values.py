"""Plain values of a spec (what YAML gives: strings, numbers, booleans) to what sandboxd uses.

Each `parse_*` takes one plain value and returns it checked and converted (an `Address`, seconds,
bytes, a signal number ...), or raises ValueError with a message that says what was expected and
what was got (`describe`). They know nothing of YAML nodes, files or lines: nodes.py wraps them so
that a problem names its place. `parse_address`, `parse_duration` and `parse_size` are also used
on their own, by the command line and the tests.
"""

from __future__ import annotations

import ipaddress
import math
import os
import posixpath
import re
import signal
from typing import TypeGuard, get_args

from sandboxd.spec.model import Address, Family


def describe(value: object) -> str:
    """A value as a message names it: `a boolean (true)`, `a list`, `'text'`, `42`."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if value is None or isinstance(value, (list, dict)):
        return "nothing" if value is None else "a list" if isinstance(value, list) else "a mapping"
    return repr(value) if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"


def is_int(value: object) -> TypeGuard[int]:
    """Whether `value` is a whole number (YAML's `true` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def normpath(path: str) -> str:
    """An absolute path without `.`, `..` or repeated slashes (never above `/`)."""
    return "/" + posixpath.normpath(path).lstrip("/")


_FAMILIES: dict[str, Family] = {family: family for family in get_args(Family)}


def parse_address(text: str) -> Address:
    """Read `tcp:127.0.0.1:80`, `udp:[::1]:53`, `127.0.0.1:80` (tcp), `unix:/path`, `unix:@name` and so on."""
    prefix, colon, rest = text.partition(":")
    family = _FAMILIES.get(prefix)
    if family is None:
        if colon and re.fullmatch(r"[a-z][a-z0-9-]*", prefix) and not rest.isdigit():
            forms = "tcp:, udp:, unix:, unix-dgram: or unix-seqpacket:"
            raise ValueError(f"unknown address family '{prefix}'; expected {forms} or HOST:PORT for tcp")
        family, rest = "tcp", text
    if family not in ("tcp", "udp"):
        return Address(family, None, None, _unix_path(family, rest))
    host, colon, port = rest.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not colon or not host or (":" in host and not bracketed):
        raise ValueError(
            f"expected HOST:PORT with an IP address like {family}:127.0.0.1:80 or {family}:[::1]:80, got '{rest}'"
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"expected an IP address like 127.0.0.1 or [::1], got '{host}' (host names are not resolved)"
        ) from None
    if bracketed and ip.version == 4:
        raise ValueError(f"brackets are for IPv6 addresses only; write {family}:{host}:{port}")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"expected a port from 0 to 65535, got '{port}'")
    return Address(family, str(ip), int(port), None)


def _unix_path(family: str, path: str) -> str:
    if path.startswith("/"):
        path = normpath(path)
    elif path == "@" or not path.startswith("@") or "\0" in path:
        raise ValueError(f"expected an absolute path or @name after '{family}:', got '{path}'")
    if (size := len(os.fsencode(path))) >= 108:
        raise ValueError(f"expected a unix socket path shorter than 108 bytes, got {size} bytes")
    return path


_DURATION = re.compile(r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*(us|µs|ms|s|m|h)?")
_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from `"100ms"`, `"1.5s"`, `"2m"`, `"1h"`, `"250us"` or a plain number of seconds."""
    if isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _SECONDS[match[2]]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(
            f"expected a duration like '100ms', '1.5s', '2m' or a number of seconds, got {describe(value)}"
        )
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"expected a duration of zero or more, got {describe(value)}")
    return seconds


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?[bB])?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from `256M`, `1.5G`, `512MiB`, `1024k` or a plain number of bytes (binary units)."""
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(float(match[1]) * _UNITS[match[2].lower()])
    if is_int(value) and value >= 0:
        return value
    raise ValueError(f"expected a size like 256M, 1G or a number of bytes, got {describe(value)}")


def parse_memory(value: object) -> int:
    """A memory limit: a size of at least 1M."""
    size = parse_size(value)
    if size < 1 << 20:
        raise ValueError(f"expected at least 1M, got {describe(value)}")
    return size


def parse_tmpfs_size(value: object) -> int:
    """A tmpfs cap: a size of at least one page (a size of 0 would mean no cap at all)."""
    size = parse_size(value)
    if size < 4096:
        why = "; a tmpfs of size 0 would have no cap at all" if size == 0 else ""
        raise ValueError(f"expected a size of at least 4K (one page), like 64M, got {describe(value)}{why}")
    return size


def parse_signal(value: object) -> int:
    """A signal number from `SIGTERM`, `term`, `TERM` or the number itself."""
    if isinstance(value, str) and (name := "SIG" + value.upper().removeprefix("SIG")) in signal.Signals.__members__:
        return int(signal.Signals[name])
    if is_int(value) and value in signal.valid_signals():
        return value
    raise ValueError(f"expected a signal name like 'SIGTERM' or 'TERM', or a signal number, got {describe(value)}")


def parse_mode(value: object) -> int:
    """A file mode from octal text (`'0660'`, `'660'`, `'0o660'`) or a number (YAML's 0o660)."""
    if isinstance(value, str) and (match := re.fullmatch(r"(?:0o?)?([0-7]{1,3})", value)):
        return int(match[1], 8)
    if is_int(value) and 0 <= value <= 0o777:
        return value
    hint = " (a number without a leading 0 is decimal; write '0666')" if is_int(value) else ""
    raise ValueError(f"expected a file mode from 0 to 0777 like '0660' or 0o660, got {describe(value)}{hint}")


def parse_ip(text: str) -> str:
    """An IPv4 or IPv6 address in its canonical form."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got '{text}'") from None


def parse_subnet(value: object) -> str:
    """A subnet in CIDR form (no host bits set) with room for at least two services."""
    if not isinstance(value, str):
        raise ValueError(f"expected a subnet like 10.89.0.0/24 or fd00:89::/64, got {describe(value)}")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        raise ValueError(f"expected a subnet like 10.89.0.0/24 or fd00:89::/64, got '{value}' ({error})") from None
    if net.num_addresses < 4:
        raise ValueError(f"subnet '{value}' is too small: it needs room for at least two services")
    return str(net)


def parse_capability(value: object) -> str:
    """A capability's name without `CAP_` (`NET_BIND_SERVICE`), from any case, with or without it."""
    from sandboxd.kernel.abi import CAPABILITIES

    name = str(value).upper().removeprefix("CAP_") if isinstance(value, str) else ""
    if name not in CAPABILITIES:
        import difflib  # for a "did you mean" hint alone: not imported by a spec without a mistake

        close = difflib.get_close_matches(name, list(CAPABILITIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"expected a capability name like NET_BIND_SERVICE, got {describe(value)}{hint}")
    return name


def parse_syscall(value: object) -> str:
    """The name of a system call the default seccomp filter refuses (`seccomp: [...]` allows it)."""
    from sandboxd.kernel.seccomp import known_calls

    if not isinstance(value, str) or value not in known_calls():
        import difflib  # for a "did you mean" hint alone: not imported by a spec without a mistake

        close = difflib.get_close_matches(str(value), sorted(known_calls()), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the filter refuses only: {', '.join(sorted(known_calls()))}"
        raise ValueError(f"{describe(value)} is not refused by the default filter{hint}")
    return value
