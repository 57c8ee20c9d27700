"""The set-up program's ops, their encoding for the compiled interpreter, and `OpRecorder`.

A sandbox's set-up is an ordered list of `Op`s (program.py compiles one per launch). Each op is
one call of the `Kernel` seam (kernel/seam.py) or one of a few higher-level calls, with the step
name a failure reports, and:

    guards    tests evaluated by the interpreter just before the op; the op is skipped unless
              all hold: "dir" (a directory, symlinks followed), "not-dir", "exists" (lstat),
              "absent", "link" (a symlink), "own-mount" (st_dev differs from its parent
              directory's; a failing stat fails the op), "marked" (the op with that mark ran)
    tolerate  errnos that leave the op done (umount2 of a mount a user namespace locked)
    into      the register the call's result goes to (an fd: dup_above, open, the listener)
    mark      set when the op ran, for a later "marked" guard

An fd argument is a descriptor number, or a register: register r is written -(r + 1). Register
R_CHANNEL is the status channel and R_SYSFS the sysfs made in the service's network namespace,
both given to the interpreter on its command line (forkserver.py).

The encoding (little-endian, every string NUL-free and written with a NUL after it):

    program   "SBD1" u32:count i32:channel_lowest op*   (the channel is moved to an fd >= that first)
    op        u32:length u16:call i16:into i16:mark u8:guards u8:tolerated u8:args
              str:step (u8:test i16:mark str:path)* i32:errno* arg*
    arg       'i' i64 | 'f' i32 | 's' str | 'n' (None) | 'b' u32:length bytes
              | 'S' u32:count str* | 'I' u32:count i64*
    str       u32:length bytes NUL

The calls are numbered in the order of CALLS; sandboxd/sandbox/setup/sbd-setup.c lists them in
the same order (tests/unit/test_program.py compares the two).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

from sandboxd.sandbox.confine import Step

Arg = int | str | bytes | None | tuple[str, ...] | tuple[int, ...]
GuardTest = Literal["dir", "not-dir", "exists", "absent", "link", "own-mount", "marked"]
GUARD_TESTS: tuple[GuardTest, ...] = ("dir", "not-dir", "exists", "absent", "link", "own-mount", "marked")

# Each call's arguments: f an fd (or register), i an int, s a str, z a str or None, b bytes,
# S a tuple of str, I a tuple of int. Higher-level calls are described in sbd-setup.c.
CALLS: dict[str, str] = {
    "reset_signals": "",  # every disposition SIG_DFL, an empty mask
    "write": "fb",
    "close": "f",
    "setns": "fi",
    "unshare": "i",
    "setsid": "",
    "sethostname": "s",
    "loopback_up": "",
    "prctl": "ii",
    "setgroups": "I",
    "setresgid": "iii",
    "setresuid": "iii",
    "setgid": "i",
    "setuid": "i",
    "drop_bounding_set": "I",
    "keep_only_capabilities": "I",
    "install_seccomp": "b",
    "install_seccomp_listener": "b",
    "open": "si",
    "dup_above": "fi",
    "dup2": "fi",
    "close_others": "if",  # closerange around the kept fd, from `low` up
    "mount": "zsziz",
    "umount2": "si",
    "mount_setattr": "siii",
    "move_mount": "fs",
    "pivot_root": "ss",
    "chdir": "s",
    "mkdir": "si",
    "makedirs": "si",
    "create_file": "s",
    "symlink": "ss",
    "rmdir": "s",
    "fail": "iss",  # fail with errno, text and path (guarded)
    "bind_inside": "sfiis",  # target, tree, readonly, is_dir, refuse_under
    "tmpfs_inside": "szs",  # target, options, refuse_under
    "seal_covers": "",  # the tmpfs covers bind_inside and tmpfs_inside made, read-only
    "report_executing": "",
    "report_executing_with": "f",  # with the listener, by SCM_RIGHTS
    "init_exec": "SS",  # argv, environment: the command forked as pid 2, this process its init
}
CALL_NUMBERS = {name: number for number, name in enumerate(CALLS)}

R_CHANNEL, R_SYSFS = 0, 1
FIRST_FREE_REGISTER = 2
MAX_REGISTERS = 64


def register(number: int) -> int:
    """The fd argument that names register `number`."""
    return -(number + 1)


class Guard(NamedTuple):  # (tuples: made and hashed at C speed, some fifty of them per launch)
    test: GuardTest
    path: str = ""
    mark: int = -1


class Op(NamedTuple):
    step: str
    call: str
    args: tuple[Arg, ...] = ()
    guards: tuple[Guard, ...] = ()
    tolerate: tuple[int, ...] = ()
    into: int = -1
    mark: int = -1


_U32, _I32, _I64 = struct.Struct("<I").pack, struct.Struct("<i").pack, struct.Struct("<q").pack
_OP_HEAD, _GUARD_HEAD = struct.Struct("<HhhBBB").pack, struct.Struct("<Bh").pack


def _str(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError(f"embedded null byte in {value!r}")
    return _U32(len(data)) + data + b"\0"


def _int_arg(tag: bytes, pack: Callable[[int], bytes]) -> Callable[[Arg], bytes]:
    def encode(value: Arg) -> bytes:
        if not isinstance(value, int):
            raise TypeError(f"argument {value!r} is no {tag.decode()!r}")
        return tag + pack(value)

    return encode


def _str_arg(value: Arg) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"argument {value!r} is no 's'")
    return b"s" + _str(value)


def _optional_str_arg(value: Arg) -> bytes:
    return b"n" if value is None else _str_arg(value)


def _bytes_arg(value: Arg) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"argument {value!r} is no 'b'")
    return b"b" + _U32(len(value)) + value


def _strs_arg(value: Arg) -> bytes:
    if not isinstance(value, tuple):
        raise TypeError(f"argument {value!r} is no 'S'")
    return b"S" + _U32(len(value)) + b"".join([_str(str(item)) for item in value])


def _ints_arg(value: Arg) -> bytes:
    if not isinstance(value, tuple):
        raise TypeError(f"argument {value!r} is no 'I'")
    return b"I" + _U32(len(value)) + b"".join([_I64(int(item)) for item in value])


# Each argument kind's encoder (a call per argument, no match: a program has some 500 arguments).
_ARGS: dict[str, Callable[[Arg], bytes]] = {
    "f": _int_arg(b"f", _I32),
    "i": _int_arg(b"i", _I64),
    "s": _str_arg,
    "z": _optional_str_arg,
    "b": _bytes_arg,
    "S": _strs_arg,
    "I": _ints_arg,
}
_CALL_ARGS = {name: tuple(_ARGS[kind] for kind in kinds) for name, kinds in CALLS.items()}
_GUARD_NUMBERS = {test: number for number, test in enumerate(GUARD_TESTS)}


_ENCODED: dict[Op, bytes] = {}  # most ops recur from launch to launch (the same steps, paths and fds)
_ENCODED_MAX = 4096  # (bounded: the fork server's heap is what every fork copies)


def encode_op(op: Op, keep: bool = True) -> bytes:
    """The op's encoding; kept for the next launch unless `keep` is false (an op of one launch's own)."""
    if not keep:
        return _encode_op(op)
    encoded = _ENCODED.get(op)
    if encoded is None:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        encoded = _ENCODED[op] = _encode_op(op)
    return encoded


def _encode_op(op: Op) -> bytes:
    encoders = _CALL_ARGS[op.call]
    if len(encoders) != len(op.args):
        raise TypeError(f"{op.call} takes {len(encoders)} arguments, not {len(op.args)}")
    parts = [_OP_HEAD(CALL_NUMBERS[op.call], op.into, op.mark, len(op.guards), len(op.tolerate), len(op.args)), _str(op.step)]
    for guard in op.guards:
        parts += (_GUARD_HEAD(_GUARD_NUMBERS[guard.test], guard.mark), _str(guard.path))
    parts += [_I32(e) for e in op.tolerate]
    parts += [encoder(value) for encoder, value in zip(encoders, op.args)]
    body = b"".join(parts)
    return _U32(4 + len(body)) + body


def encode(ops: Sequence[Op], channel_lowest: int) -> bytes:
    """The program as the interpreter reads it: it moves the status channel to an fd numbered
    `channel_lowest` or above (clear of the service's fds 3..) before the first op. Raises
    ValueError for a string with a NUL in it."""
    return program_head(len(ops), channel_lowest) + b"".join(encode_op(op) for op in ops)


def program_head(count: int, channel_lowest: int) -> bytes:
    """What comes before a program's `count` ops (`encode`): a program may be put together from
    ops encoded earlier."""
    return b"SBD1" + struct.pack("<Ii", count, channel_lowest)


class Recorded(NamedTuple):
    """Ops an OpRecorder recorded (`OpRecorder.since`), and its registers, marks and step name after them."""

    ops: tuple[Op, ...]
    next_register: int
    next_mark: int
    name: str


class OpRecorder(Step):
    """Records ops instead of making calls, with the `Kernel` methods' names and signatures, so
    that code written against the seam (confine.py's `confine`, `place_fds`) also compiles into
    the program. It is the Step of that code too: its `name` names the ops recorded from now on; `when` and `tolerating` add guards
    and tolerated errnos to the ops recorded inside them. A call that returns an fd returns the
    register its result goes to."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self._guards: tuple[Guard, ...] = ()
        self._tolerate: tuple[int, ...] = ()
        self._next_register = FIRST_FREE_REGISTER
        self._next_mark = 0

    def context(self) -> tuple[int, int, tuple[Guard, ...], tuple[int, ...]]:
        """What, besides the calls, decides the ops recorded next: the next register and mark, and
        the guards and tolerated errnos in force (a part of a program kept for a later one is
        the same only from the same context: `Recorded`)."""
        return (self._next_register, self._next_mark, self._guards, self._tolerate)

    def since(self, start: int) -> Recorded:
        """The ops recorded from index `start` on, with where the recorder stands after them."""
        return Recorded(tuple(self.ops[start:]), self._next_register, self._next_mark, self.name)

    def replay(self, recorded: Recorded) -> None:
        """Record again what `since` returned, as if its calls were made once more."""
        self.ops += recorded.ops
        self._next_register, self._next_mark, self.name = recorded.next_register, recorded.next_mark, recorded.name

    def record(self, call: str, *args: Arg, into: int = -1, mark: int = -1) -> None:
        self.ops.append(Op(self.name, call, args, self._guards, self._tolerate, into, mark))

    def result(self, call: str, *args: Arg) -> int:
        """Record `call` with its result into a new register; returns that register's fd argument."""
        number = self._next_register
        if number >= MAX_REGISTERS:
            raise ValueError(f"more than {MAX_REGISTERS} registers")
        self._next_register += 1
        self.record(call, *args, into=number)
        return register(number)

    def new_mark(self) -> int:
        self._next_mark += 1
        return self._next_mark - 1

    @contextmanager
    def when(self, *guards: Guard) -> Iterator[None]:
        outer = self._guards
        self._guards = (*outer, *guards)
        try:
            yield
        finally:
            self._guards = outer

    @contextmanager
    def tolerating(self, *errnos: int) -> Iterator[None]:
        outer = self._tolerate
        self._tolerate = (*outer, *errnos)
        try:
            yield
        finally:
            self._tolerate = outer

    # ── the seam's calls that confine.py makes ──

    def prctl(self, option: int, arg2: int = 0) -> None:
        self.record("prctl", option, arg2)

    def setgroups(self, groups: list[int]) -> None:
        self.record("setgroups", tuple(groups))

    def setresgid(self, rgid: int, egid: int, sgid: int) -> None:
        self.record("setresgid", rgid, egid, sgid)

    def setresuid(self, ruid: int, euid: int, suid: int) -> None:
        self.record("setresuid", ruid, euid, suid)

    def setgid(self, gid: int) -> None:
        self.record("setgid", gid)

    def setuid(self, uid: int) -> None:
        self.record("setuid", uid)

    def drop_bounding_set(self, keep: set[int]) -> None:
        self.record("drop_bounding_set", tuple(sorted(keep)))

    def keep_only_capabilities(self, keep: set[int]) -> None:
        self.record("keep_only_capabilities", tuple(sorted(keep)))

    def install_seccomp(self, program: bytes) -> None:
        self.record("install_seccomp", program)

    def install_seccomp_listener(self, program: bytes) -> int:
        return self.result("install_seccomp_listener", program)

    def open(self, path: str, flags: int) -> int:
        return self.result("open", path, flags)

    def dup_above(self, fd: int, lowest: int) -> int:
        return self.result("dup_above", fd, lowest)

    def dup2(self, fd: int, target: int) -> None:
        self.record("dup2", fd, target)

    def close(self, fd: int) -> None:
        self.record("close", fd)

    # ── the mount walk's calls (program.py) ──

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
        self.record("mount", source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int = 0) -> None:
        self.record("umount2", target, flags)

    def mount_setattr(self, path: str, attr_set: int, attr_clr: int = 0, recursive: bool = True) -> None:
        self.record("mount_setattr", path, attr_set, attr_clr, int(recursive))

    def move_mount(self, fd: int, target: str) -> None:
        self.record("move_mount", fd, target)

    def chdir(self, path: str) -> None:
        self.record("chdir", path)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self.record("mkdir", path, mode)

    def makedirs(self, path: str, mode: int = 0o777) -> None:
        self.record("makedirs", path, mode)

    def create_file(self, path: str) -> None:
        self.record("create_file", path)

    def fail(self, error: int, text: str, path: str) -> None:
        self.record("fail", error, text, path)
