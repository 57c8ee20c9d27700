"""A small seccomp filter generator: the default deny list of sandboxd, as classic BPF.

Why our own: the maintained libseccomp bindings for Python are the ones in libseccomp's source
tree (Debian's python3-seccomp), which need the system interpreter or a build against
libseccomp-dev; the PyPI alternatives are unmaintained ctypes wrappers. A deny list needs no more
than a chain of comparisons, so this module builds it directly (under 100 lines) and the escape
suite checks it against the real kernel.

The filter, in the spirit of docker's and podman's default profile:
  - a foreign architecture (or the x32 ABI on x86_64) is refused outright;
  - the calls in DENIED get EPERM: mounting, namespaces, modules, kexec, reboot, swap, the clock,
    bpf, perf, keyrings, ptrace, handle-based opens, and so on;
  - clone3 gets ENOSYS (so libc falls back to clone, whose flags a filter can see), and clone
    with any CLONE_NEW* flag gets EPERM;
  - everything else is allowed.
"""

from __future__ import annotations

import errno
import platform
import struct

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
CLONE_NEW_FLAGS = 0x7E020080  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME

# BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# x86_64 numbers of the calls the default filter refuses.
DENIED_X86_64 = {
    "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308, "kexec_load": 246,
    "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321,
    "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249, "ptrace": 101, "reboot": 169,
    "swapon": 167, "swapoff": 168, "open_by_handle_at": 304, "name_to_handle_at": 303, "clock_settime": 227,
    "settimeofday": 164, "adjtimex": 159, "clock_adjtime": 305, "acct": 163, "iopl": 172, "ioperm": 173,
    "lookup_dcookie": 212, "quotactl": 179, "syslog": 103, "userfaultfd": 323, "vhangup": 153,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "process_vm_writev": 311, "kcmp": 312,
}  # fmt: skip
CLONE = 56
CLONE3 = 435
BIND = 49


class SeccompUnsupported(Exception):
    """No syscall table for this machine's architecture."""


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def build_filter(allow: frozenset[str] = frozenset()) -> bytes:
    """The default filter as packed `struct sock_filter` instructions, minus the calls in `allow`."""
    if platform.machine() != "x86_64":
        raise SeccompUnsupported(f"sandboxd has no seccomp syscall table for {platform.machine()} yet")
    denied = sorted(nr for name, nr in DENIED_X86_64.items() if name not in allow)
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    body: list[tuple[int, int, str, str]] = []  # (code, k, true target, false target) with symbolic targets
    body.append((_LD_W_ABS, 4, "", ""))  # seccomp_data.arch
    body.append((_JEQ_K, AUDIT_ARCH_X86_64, "next", "kill"))
    body.append((_LD_W_ABS, 0, "", ""))  # seccomp_data.nr
    body.append((_JGE_K, X32_SYSCALL_BIT, "kill", "next"))
    for nr in denied:
        body.append((_JEQ_K, nr, "eperm", "next"))
    if "clone3" not in allow:
        body.append((_JEQ_K, CLONE3, "enosys", "next"))
    if "clone" not in allow:
        body.append((_JEQ_K, CLONE, "next", "allow"))
        body.append((_LD_W_ABS, 16, "", ""))  # the low half of clone's flags (args[0])
        body.append((_JSET_K, CLONE_NEW_FLAGS, "eperm", "allow"))
    labels = {"allow": len(body), "eperm": len(body) + 1, "enosys": len(body) + 2, "kill": len(body) + 3}
    program = b""
    for index, (code, k, true, false) in enumerate(body):
        if code in (_JEQ_K, _JGE_K, _JSET_K):
            jt = 0 if true == "next" else labels[true] - index - 1
            jf = 0 if false == "next" else labels[false] - index - 1
            program += _insn(code, k, jt, jf)
        else:
            program += _insn(code, k)
    program += _insn(_RET_K, SECCOMP_RET_ALLOW)
    program += _insn(_RET_K, eperm)
    program += _insn(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)
    program += _insn(_RET_K, SECCOMP_RET_KILL_PROCESS)
    return program


def known_calls() -> set[str]:
    return set(DENIED_X86_64) | {"clone", "clone3"}


def bind_notify_filter() -> bytes:
    """A filter that hands every bind() of the sandbox to sandboxd (the handoff of proxy.py) and
    allows everything else; the default filter, if any, is installed beside it."""
    if platform.machine() != "x86_64":
        raise SeccompUnsupported(f"sandboxd has no seccomp syscall table for {platform.machine()} yet")
    return b"".join(
        [
            _insn(_LD_W_ABS, 4),  # seccomp_data.arch
            _insn(_JEQ_K, AUDIT_ARCH_X86_64, 0, 3),
            _insn(_LD_W_ABS, 0),  # seccomp_data.nr
            _insn(_JEQ_K, BIND, 0, 1),
            _insn(_RET_K, SECCOMP_RET_USER_NOTIF),
            _insn(_RET_K, SECCOMP_RET_ALLOW),
        ]
    )
