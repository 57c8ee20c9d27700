"""sandboxd's seccomp filter (kernel/seccomp.py) in the forms the engines take.

systemd: `SystemCallFilter=~` with the calls the filter refuses (less those `seccomp: [...]`
allows), `SystemCallErrorNumber=EPERM`, and for the calls whose arguments the filter reads the
directives that read the same arguments: `RestrictNamespaces=yes` (clone with CLONE_NEW*, and
clone3, which systemd then answers with ENOSYS as sandboxd does), `RestrictAddressFamilies=~AF_VSOCK`
(socket and socketpair), `LockPersonality=yes` (personality), `RestrictSUIDSGID=yes` (chmod,
mkdir, mknod, open with O_CREAT ... of setuid and setgid files), `SystemCallArchitectures=native`
(foreign architectures and x32).

Kubernetes: a Localhost profile in the OCI runtime's JSON form (the one containerd and CRI-O
read from the kubelet's seccomp folder): every call allowed but the refused ones (EPERM),
clone3 and openat2 answered with ENOSYS, socket and socketpair with AF_VSOCK refused, clone
refused when its flags hold any CLONE_NEW* bit (one rule per bit). It lacks two checks of
sandboxd's filter, which the OCI form cannot say with an allowing default: the personality
values, and the setuid and setgid mode bits; the export says so.
"""

from __future__ import annotations

import json

from sandboxd.kernel.seccomp import AF_VSOCK, CLONE_NEW_FLAGS, DENIED_X86_64, known_calls
from sandboxd.spec.model import Service

ARGUMENT_CALLS = ("clone", "clone3", "socket", "socketpair", "personality", "openat2")
# What the filter checks beyond the call's name, per systemd directive: the calls whose rule it
# stands for (allowing any of them in `seccomp:` leaves the directive out).
SYSTEMD_ARGUMENT_DIRECTIVES = (
    ("RestrictNamespaces", "yes", ("clone", "clone3", "unshare", "setns")),
    ("RestrictAddressFamilies", "~AF_VSOCK", ("socket", "socketpair")),
    ("LockPersonality", "yes", ("personality",)),
)
PROFILE_LACKS = "the personality values and the setuid/setgid mode bits sandboxd's filter also checks"


def allowed(service: Service) -> frozenset[str]:
    """The calls `seccomp: [...]` lets through (none for default; every one for unconfined)."""
    if service.seccomp == "unconfined":
        return frozenset(known_calls())
    return frozenset(service.seccomp) if isinstance(service.seccomp, tuple) else frozenset()


def mode_calls() -> frozenset[str]:
    """The calls whose mode argument the filter checks for setuid and setgid bits."""
    return frozenset(known_calls() - set(DENIED_X86_64) - set(ARGUMENT_CALLS))


def refused(service: Service) -> list[str]:
    """The calls refused by name, sorted."""
    return sorted(set(DENIED_X86_64) - allowed(service))


def systemd_directives(service: Service) -> list[tuple[str, str]]:
    """The [Service] directives that stand for the service's filter ([] when unconfined)."""
    if service.seccomp == "unconfined":
        return []
    allow = allowed(service)
    directives = [("SystemCallArchitectures", "native"), ("SystemCallFilter", "~" + " ".join(refused(service))), ("SystemCallErrorNumber", "EPERM")]
    for directive, value, calls in SYSTEMD_ARGUMENT_DIRECTIVES:
        if not allow & set(calls):
            directives.append((directive, value))
    if not allow & mode_calls():
        directives.append(("RestrictSUIDSGID", "yes"))
    return directives


def localhost_profile(service: Service) -> str:
    """The OCI seccomp profile (JSON text) of the service's filter."""
    allow = allowed(service)
    rules: list[dict[str, object]] = [{"names": refused(service), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    enosys = [name for name in ("clone3", "openat2") if name not in allow]
    if enosys:
        rules.append({"names": enosys, "action": "SCMP_ACT_ERRNO", "errnoRet": 38})
    for name in ("socket", "socketpair"):
        if name not in allow:
            rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                          "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}]})  # fmt: skip
    if "clone" not in allow:
        for bit in (1 << n for n in range(32) if CLONE_NEW_FLAGS & (1 << n)):
            rules.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                          "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}]})  # fmt: skip
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}
    return json.dumps(profile, indent=2) + "\n"
