"""The seccomp filters, run through a small classic-BPF interpreter: what each call gets."""

from __future__ import annotations

import errno
import platform
import struct

import pytest

from sandboxd.kernel import seccomp
from sandboxd.kernel.seccomp import (
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_USER_NOTIF,
    build_filter,
    bind_notify_filter,
    known_calls,
)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the table is x86_64's")

ALLOW = SECCOMP_RET_ALLOW
EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
KILL = SECCOMP_RET_KILL_PROCESS
NR = {"read": 0, "socket": 41, "socketpair": 53, "personality": 135, "clone": 56, "clone3": 435, "bind": 49, "mount": 165}
NR.update(seccomp.DENIED_X86_64)


def run(program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Evaluate a filter on one call as the kernel would: struct seccomp_data is nr, arch,
    instruction_pointer, args[6], each argument 64 bits (little-endian on x86_64)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack("HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    assert len(insns) <= 4096
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            assert k % 4 == 0 and k + 4 <= len(data)
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x15:  # JEQ
            pc += jt if accumulator == k else jf
        elif code == 0x35:  # JGE
            pc += jt if accumulator >= k else jf
        elif code == 0x45:  # JSET
            pc += jt if accumulator & k else jf
        elif code == 0x06:  # RET
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def call(name: str, *args: int, allow: frozenset[str] = frozenset()) -> int:
    return run(build_filter("x86_64", allow), NR[name], args)


@pytest.mark.parametrize("name", ["io_uring_setup", "io_uring_enter", "io_uring_register", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "ptrace", "mount", "memfd_secret"])
def test_refused_calls_get_eperm(name: str) -> None:
    assert call(name) == EPERM


def test_ordinary_calls_are_allowed() -> None:
    assert call("read", 0) == ALLOW
    assert call("bind", 3) == ALLOW


def test_a_vsock_socket_is_refused_and_other_families_are_not() -> None:
    assert call("socket", 40, 1, 0) == EPERM
    assert call("socketpair", 40, 1, 0) == EPERM
    for family in (1, 2, 10, 16, 17):  # unix, inet, inet6, netlink, packet (packet needs a capability)
        assert call("socket", family, 1, 0) == ALLOW
        assert call("socketpair", family, 1, 0) == ALLOW


def test_only_the_high_half_differs_is_still_vsock() -> None:
    # The kernel reads the family as an int: 0x1_0000_0028 is AF_VSOCK to it.
    assert call("socket", (1 << 32) | 40, 1, 0) == EPERM


@pytest.mark.parametrize("persona", [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF])
def test_personality_takes_the_values_docker_allows(persona: int) -> None:
    assert call("personality", persona) == ALLOW


@pytest.mark.parametrize("persona", [0x0040000, 0x0400000, 0x0020000 | 0x0040000, 0x1, 0xFFFFFFFE, 0x08000000])
def test_personality_refuses_other_flags(persona: int) -> None:
    # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ... and other execution domains.
    assert call("personality", persona) == EPERM


def test_clone_with_namespace_flags_is_refused_and_plain_clone_is_not() -> None:
    assert call("clone", 0x10000000 | 17) == EPERM  # CLONE_NEWUSER | SIGCHLD
    assert call("clone", 0x003D0F00) == ALLOW  # what glibc's pthread_create passes
    assert call("clone3") == ENOSYS


def test_foreign_architectures_and_x32_are_killed() -> None:
    program = build_filter("x86_64")
    assert run(program, 0, arch=0x40000003) == KILL  # i386
    assert run(program, 0x40000000 | 41) == KILL  # x32 socket


@pytest.mark.parametrize("name", ["io_uring_setup", "io_uring_enter", "io_uring_register", "pidfd_getfd", "process_vm_readv"])
def test_an_allowed_name_removes_its_rule_and_only_its_rule(name: str) -> None:
    assert call(name, allow=frozenset({name})) == ALLOW
    assert call("ptrace", allow=frozenset({name})) == EPERM


def test_allowing_socket_lets_vsock_through_and_keeps_socketpair_checked() -> None:
    assert call("socket", 40, 1, 0, allow=frozenset({"socket"})) == ALLOW
    assert call("socketpair", 40, 1, 0, allow=frozenset({"socket"})) == EPERM


def test_allowing_personality_lets_any_persona_through() -> None:
    assert call("personality", 0x0040000, allow=frozenset({"personality"})) == ALLOW
    assert call("socket", 40, allow=frozenset({"personality"})) == EPERM


def test_allowing_clone_keeps_clone3_refused() -> None:
    assert call("clone", 0x10000000, allow=frozenset({"clone"})) == ALLOW
    assert call("clone3", allow=frozenset({"clone"})) == ENOSYS


def test_every_new_rule_is_a_name_the_spec_accepts() -> None:
    assert {"io_uring_setup", "io_uring_enter", "io_uring_register", "process_vm_readv", "pidfd_getfd", "personality", "socket", "socketpair", "clone", "clone3"} <= known_calls()


def test_the_bind_filter_hands_bind_to_sandboxd_and_allows_the_rest() -> None:
    program = bind_notify_filter()
    assert run(program, NR["bind"], (3, 0, 16)) == SECCOMP_RET_USER_NOTIF
    assert run(program, NR["socket"], (40,)) == ALLOW  # the default filter beside it decides
    assert run(program, NR["bind"], arch=0x40000003) == ALLOW  # the default filter kills foreign arches


AT_FDCWD = (1 << 64) - 100  # -100 as the kernel hands it to the filter
NR.update({name: nr for name, (nr, _arg) in seccomp._MODE_ARGUMENT.items()}, openat2=seccomp.OPENAT2)


@pytest.mark.parametrize(("name", "args"), [
    ("chmod", (0, 0o4755)), ("fchmod", (3, 0o2755)), ("fchmodat", (AT_FDCWD, 0, 0o6755)), ("fchmodat2", (AT_FDCWD, 0, 0o4700, 0)),
    ("creat", (0, 0o4755)), ("mkdir", (0, 0o2775)), ("mkdirat", (AT_FDCWD, 0, 0o2775)), ("mknod", (0, 0o104755, 0)),
    ("mknodat", (AT_FDCWD, 0, 0o104755, 0)), ("open", (0, 0o100, 0o4755)), ("openat", (AT_FDCWD, 0, 0o101, 0o6755)),
    ("openat", (AT_FDCWD, 0, 0o20200002, 0o4755)),
])  # fmt: skip
def test_a_setuid_or_setgid_mode_is_refused(name: str, args: tuple[int, ...]) -> None:
    assert call(name, *args) == EPERM
    assert call(name, *args, allow=frozenset({name})) == ALLOW


@pytest.mark.parametrize(("name", "args"), [
    ("chmod", (0, 0o1777)), ("fchmod", (3, 0o755)), ("fchmodat", (AT_FDCWD, 0, 0o644)), ("mkdir", (0, 0o1777)),
    ("creat", (0, 0o600)), ("open", (0, 0o2, 0o4755)), ("openat", (AT_FDCWD, 0, 0o0, 0o6755)), ("openat", (AT_FDCWD, 0, 0o101, 0o644)),
])  # fmt: skip
def test_other_modes_and_opens_without_o_creat_are_allowed(name: str, args: tuple[int, ...]) -> None:
    assert call(name, *args) == ALLOW


def test_openat2_is_not_there_so_libc_uses_openat() -> None:
    assert call("openat2", AT_FDCWD, 0, 0, 24) == ENOSYS
