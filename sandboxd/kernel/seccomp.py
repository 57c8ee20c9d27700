"""A small seccomp filter generator: the default deny list of sandboxd, as classic BPF.

Why our own: the maintained libseccomp bindings for Python are the ones in libseccomp's source
tree (Debian's python3-seccomp), which need the system interpreter or a build against
libseccomp-dev; the PyPI alternatives are unmaintained ctypes wrappers. A deny list needs no more
than a chain of comparisons, so this module builds it directly and the escape suite checks it
against the real kernel (the unit tests run it through a small BPF interpreter).

The filter, in the spirit of docker's and podman's default profile:
  - a foreign architecture (or the x32 ABI on x86_64) is refused outright;
  - the calls in DENIED get EPERM: mounting, namespaces, modules, kexec, reboot, swap, the clock,
    bpf, perf, keyrings, ptrace and the other ways into another process's memory or descriptors
    (process_vm_readv/writev, pidfd_getfd, kcmp), handle-based opens, and io_uring, whose ring
    operations no seccomp filter sees (IORING_OP_BIND would get past the handoff's bind()
    interception), and so on;
  - clone3 gets ENOSYS (so libc falls back to clone, whose flags a filter can see), and clone
    with any CLONE_NEW* flag gets EPERM;
  - socket() and socketpair() with AF_VSOCK get EPERM: its port space is the VM's, not the
    network namespace's (socketpair cannot make vsock sockets anyway; refusing it keeps the
    family's code out of reach altogether);
  - personality() gets EPERM except for the values docker's profile allows: PER_LINUX (0),
    PER_LINUX32 (8), UNAME26 (0x20000), both (0x20008) and the query (0xffffffff); the flags
    that turn off address space randomisation or make data executable are refused;
  - everything else is allowed.

Arguments are compared on their low 32 bits (x86_64 is little-endian: args[0] starts at offset
16 of `struct seccomp_data`): the kernel itself reads socket's family, personality's persona and
the CLONE_NEW* flags as 32-bit values, so the high half cannot change what the call does.

`allow` names calls a service may make after all (`seccomp: [ptrace, personality]`): each name
removes its rule, argument checks included (`socket` lets AF_VSOCK through).
"""

from __future__ import annotations

import errno
import functools
import struct

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
CLONE_NEW_FLAGS = 0x7E020080  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
AF_VSOCK = 40
# docker's default profile: PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, and the query.
PERSONALITIES_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Offsets in struct seccomp_data
NR_OFFSET = 0
ARCH_OFFSET = 4
ARG0_LOW_OFFSET = 16

# BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_JUMPS = (_JEQ_K, _JGE_K, _JSET_K)

# x86_64 numbers of the calls the default filter refuses.
DENIED_X86_64 = {
    "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308, "kexec_load": 246,
    "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321,
    "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249, "ptrace": 101, "reboot": 169,
    "swapon": 167, "swapoff": 168, "open_by_handle_at": 304, "name_to_handle_at": 303, "clock_settime": 227,
    "settimeofday": 164, "adjtimex": 159, "clock_adjtime": 305, "acct": 163, "iopl": 172, "ioperm": 173,
    "lookup_dcookie": 212, "quotactl": 179, "syslog": 103, "userfaultfd": 323, "vhangup": 153,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "memfd_secret": 447,
}  # fmt: skip
CLONE = 56
CLONE3 = 435
BIND = 49
SOCKET = 41
SOCKETPAIR = 53
PERSONALITY = 135

# Calls that make a file's mode, and the argument that holds it (as systemd's RestrictSUIDSGID=):
# a setuid or setgid file written into a volume or a writable bind would be one on the host, owned
# by the ids sandboxes store files as, for any host user who can reach it. open and openat are
# checked only with O_CREAT or O_TMPFILE, when their mode means something.
SETID_BITS = 0o6000
O_CREAT = 0o100
O_TMPFILE = 0o20200000
_MODE_ARGUMENT = {
    "chmod": (90, 1), "fchmod": (91, 1), "fchmodat": (268, 2), "fchmodat2": (452, 2), "creat": (85, 1),
    "mkdir": (83, 1), "mkdirat": (258, 2), "mknod": (133, 1), "mknodat": (259, 2), "open": (2, 2), "openat": (257, 3),
}  # fmt: skip
_OPEN_FLAGS_ARGUMENT = {"open": 1, "openat": 2}
OPENAT2 = 437  # its mode is in a struct the filter cannot read: ENOSYS, and libc uses openat

# Calls the filter looks at the arguments of: (name, number), in the order they are checked.
_ARGUMENT_RULES = (
    ("socket", SOCKET), ("socketpair", SOCKETPAIR), ("personality", PERSONALITY), ("clone", CLONE),
    *((name, nr) for name, (nr, _arg) in _MODE_ARGUMENT.items()),
)  # fmt: skip


class SeccompUnsupported(Exception):
    """No syscall table for this machine's architecture."""


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


# A program as written below: instructions (code, k, label if true, label if false) and label
# definitions (a bare string). "next" is the instruction that follows.
_Line = tuple[int, int, str, str] | str


def _assemble(lines: list[_Line]) -> bytes:
    """Resolve the labels into the forward jump offsets classic BPF has (0-255 instructions)."""
    labels: dict[str, int] = {}
    index = 0
    for line in lines:
        if isinstance(line, str):
            labels[line] = index
        else:
            index += 1
    program = b""
    index = 0
    for line in lines:
        if isinstance(line, str):
            continue
        code, k, true, false = line
        offsets = []
        for target in (true, false):
            offset = 0 if target in ("next", "") else labels[target] - index - 1
            if not 0 <= offset <= 255:
                raise ValueError(f"seccomp filter: jump to {target} out of range ({offset})")
            offsets.append(offset)
        program += _insn(code, k, *offsets) if code in _JUMPS else _insn(code, k)
        index += 1
    return program


@functools.cache  # every service with the same `seccomp:` gets the same program
def build_filter(architecture: str, allow: frozenset[str] = frozenset()) -> bytes:
    """The default filter for `architecture` (the machine as uname says it) as packed
    `struct sock_filter` instructions, minus the calls in `allow`."""
    if architecture != "x86_64":
        raise SeccompUnsupported(f"sandboxd has no seccomp syscall table for {architecture or 'this machine'} yet")
    lines: list[_Line] = [
        (_LD_W_ABS, ARCH_OFFSET, "", ""),
        (_JEQ_K, AUDIT_ARCH_X86_64, "next", "kill"),
        (_LD_W_ABS, NR_OFFSET, "", ""),
        (_JGE_K, X32_SYSCALL_BIT, "kill", "next"),
    ]
    lines += [(_JEQ_K, nr, "eperm", "next") for nr in sorted(nr for name, nr in DENIED_X86_64.items() if name not in allow)]
    if "clone3" not in allow:
        lines.append((_JEQ_K, CLONE3, "enosys", "next"))
    if "openat2" not in allow:
        lines.append((_JEQ_K, OPENAT2, "enosys", "next"))
    checked = [(name, nr) for name, nr in _ARGUMENT_RULES if name not in allow]
    lines += [(_JEQ_K, nr, name, "next") for name, nr in checked]
    lines.append((_RET_K, SECCOMP_RET_ALLOW, "", ""))
    for name, _nr in checked:
        lines.append(name)
        if name in _MODE_ARGUMENT:
            if name in _OPEN_FLAGS_ARGUMENT:
                lines.append((_LD_W_ABS, ARG0_LOW_OFFSET + 8 * _OPEN_FLAGS_ARGUMENT[name], "", ""))
                lines.append((_JSET_K, O_CREAT | O_TMPFILE, "next", "allow"))
            lines.append((_LD_W_ABS, ARG0_LOW_OFFSET + 8 * _MODE_ARGUMENT[name][1], "", ""))
            lines.append((_JSET_K, SETID_BITS, "eperm", "allow"))
            continue
        lines.append((_LD_W_ABS, ARG0_LOW_OFFSET, "", ""))
        if name in ("socket", "socketpair"):
            lines.append((_JEQ_K, AF_VSOCK, "eperm", "allow"))
        elif name == "personality":
            lines += [(_JEQ_K, persona, "allow", "next") for persona in PERSONALITIES_ALLOWED]
            lines.append((_RET_K, SECCOMP_RET_ERRNO | errno.EPERM, "", ""))
        else:  # clone
            lines.append((_JSET_K, CLONE_NEW_FLAGS, "eperm", "allow"))
    lines += [
        "allow",
        (_RET_K, SECCOMP_RET_ALLOW, "", ""),
        "eperm",
        (_RET_K, SECCOMP_RET_ERRNO | errno.EPERM, "", ""),
        "enosys",
        (_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS, "", ""),
        "kill",
        (_RET_K, SECCOMP_RET_KILL_PROCESS, "", ""),
    ]
    return _assemble(lines)


def known_calls() -> set[str]:
    """The names `seccomp: [...]` accepts: every call the default filter refuses or checks."""
    return set(DENIED_X86_64) | {"clone3", "openat2"} | {name for name, _ in _ARGUMENT_RULES}


def bind_notify_filter() -> bytes:
    """A filter that hands every bind() of the sandbox to sandboxd (the handoff of proxy.py) and
    allows everything else; the default filter, if any, is installed beside it. Only planned on
    x86_64 (plan/confinement.py); on any other architecture the filter lets every call through."""
    return _assemble(
        [
            (_LD_W_ABS, ARCH_OFFSET, "", ""),
            (_JEQ_K, AUDIT_ARCH_X86_64, "next", "allow"),
            (_LD_W_ABS, NR_OFFSET, "", ""),
            (_JEQ_K, BIND, "next", "allow"),
            (_RET_K, SECCOMP_RET_USER_NOTIF, "", ""),
            "allow",
            (_RET_K, SECCOMP_RET_ALLOW, "", ""),
        ]
    )
