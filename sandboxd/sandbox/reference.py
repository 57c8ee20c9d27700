"""The set-up program run in Python, one `Kernel` call per op: the compiled interpreter's twin.

Sandboxes never run this: the child executes setup/sbd-setup.c. It is what the unit tests run a
compiled program with, against the recording fake (tests/unit/test_child.py), so that the calls
a program makes and the file tree it leaves are checked without root; it evaluates guards,
tolerated errnos and registers as the C does (ops.py), and reports a failure as the C does: the
same SetupFailed (confine.failure), exit 127 (126 for anything but an OSError, which the C
cannot meet).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Sequence
from typing import NoReturn

from sandboxd.kernel import abi
from sandboxd.kernel.seam import Kernel
from sandboxd.plan.launch import is_under
from sandboxd.sandbox.child import EXIT_SETUP_FAILED, EXIT_UNEXPECTED
from sandboxd.sandbox.confine import Step, failure, report
from sandboxd.sandbox.ops import R_CHANNEL, Arg, Guard, Op
from sandboxd.sandbox.program import READONLY
from sandboxd.sandbox.protocol import Executing, encode


def run_program(kernel: Kernel, ops: Sequence[Op], channel: socket.socket, registers: dict[int, int]) -> NoReturn:
    """Run `ops` to init_exec; on the first failure, report it on `channel` and exit.
    `registers`: those set before the program starts (R_SYSFS); R_CHANNEL is `channel`'s."""
    step = Step()
    state = _State(kernel, channel, {**registers, R_CHANNEL: channel.fileno()})
    try:
        for op in ops:
            step.name = op.step
            state.run(op)
        raise RuntimeError("the program ended without init_exec")
    except OSError as e:
        report(kernel, channel, failure(step, e, EXIT_SETUP_FAILED))
        kernel.exit(EXIT_SETUP_FAILED)
    except Exception as e:  # noqa: BLE001 - (a BaseException is the fake's end of the process)
        report(kernel, channel, failure(step, e, EXIT_UNEXPECTED))
        kernel.exit(EXIT_UNEXPECTED)


class _State:
    def __init__(self, kernel: Kernel, channel: socket.socket, registers: dict[int, int]) -> None:
        self.kernel = kernel
        self.channel = channel
        self.registers = registers
        self.marks: set[int] = set()
        self.covers: list[str] = []  # folders covered to hold mount points, sealed by seal_covers

    def fd(self, value: Arg) -> int:
        assert isinstance(value, int)
        return value if value >= 0 else self.registers[-value - 1]

    def holds(self, guard: Guard) -> bool:
        kernel, path = self.kernel, guard.path
        match guard.test:
            case "dir":
                return kernel.isdir(path)
            case "not-dir":
                return not kernel.isdir(path)
            case "exists":
                return kernel.lexists(path)
            case "absent":
                return not kernel.lexists(path)
            case "link":
                return kernel.islink(path)
            case "own-mount":
                return kernel.device_of(path) != kernel.device_of(os.path.dirname(path))
            case "marked":
                return guard.mark in self.marks

    def run(self, op: Op) -> None:
        if not all(self.holds(guard) for guard in op.guards):
            return
        try:
            result = self.call(op.call, op.args)
        except OSError as e:
            if e.errno not in op.tolerate:
                raise
            return
        if op.into >= 0:
            assert isinstance(result, int)
            self.registers[op.into] = result
        if op.mark >= 0:
            self.marks.add(op.mark)

    def call(self, call: str, args: tuple[Arg, ...]) -> object:  # noqa: C901 - one dispatch per op
        k, a = self.kernel, args
        match call:
            case "reset_signals":
                k.reset_signals()
            case "write":
                k.write(self.fd(a[0]), _bytes(a[1]))
            case "close":
                k.close(self.fd(a[0]))
            case "setns":
                k.setns(self.fd(a[0]), _int(a[1]))
            case "unshare":
                k.unshare(_int(a[0]))
            case "setsid":
                k.setsid()
            case "sethostname":
                k.sethostname(_str(a[0]))
            case "loopback_up":
                k.loopback_up()
            case "prctl":
                k.prctl(_int(a[0]), _int(a[1]))
            case "setgroups":
                k.setgroups([_int(g) for g in _tuple(a[0])])
            case "setresgid":
                k.setresgid(_int(a[0]), _int(a[1]), _int(a[2]))
            case "setresuid":
                k.setresuid(_int(a[0]), _int(a[1]), _int(a[2]))
            case "setgid":
                k.setgid(_int(a[0]))
            case "setuid":
                k.setuid(_int(a[0]))
            case "drop_bounding_set":
                k.drop_bounding_set({_int(c) for c in _tuple(a[0])})
            case "keep_only_capabilities":
                k.keep_only_capabilities({_int(c) for c in _tuple(a[0])})
            case "install_seccomp":
                k.install_seccomp(_bytes(a[0]))
            case "install_seccomp_listener":
                return k.install_seccomp_listener(_bytes(a[0]))
            case "open":
                return k.open(_str(a[0]), _int(a[1]))
            case "dup_above":
                return k.dup_above(self.fd(a[0]), _int(a[1]))
            case "dup2":
                k.dup2(self.fd(a[0]), _int(a[1]))
            case "close_others":
                keep = self.fd(a[1])
                k.closerange(_int(a[0]), keep)
                k.closerange(keep + 1, 1 << 20)
            case "report_executing":
                report(k, self.channel, Executing(time.monotonic_ns()))
            case "report_executing_with":
                k.send(self.channel, encode(Executing(time.monotonic_ns())), [self.fd(a[0])])
            case "init_exec":
                k.init_exec([str(arg) for arg in _tuple(a[0])], dict(str(kv).split("=", 1) for kv in _tuple(a[1])))
            case _:
                self.file_call(call, args)
        return None

    def file_call(self, call: str, a: tuple[Arg, ...]) -> None:
        k = self.kernel
        match call:
            case "mount":
                k.mount(_opt(a[0]), _str(a[1]), _opt(a[2]), _int(a[3]), _opt(a[4]))
            case "umount2":
                k.umount2(_str(a[0]), _int(a[1]))
            case "mount_setattr":
                k.mount_setattr(_str(a[0]), _int(a[1]), _int(a[2]), bool(a[3]))
            case "move_mount":
                k.move_mount(self.fd(a[0]), _str(a[1]))
            case "pivot_root":
                k.pivot_root(_str(a[0]), _str(a[1]))
            case "chdir":
                k.chdir(_str(a[0]))
            case "mkdir":
                k.mkdir(_str(a[0]), _int(a[1]))
            case "makedirs":
                k.makedirs(_str(a[0]), _int(a[1]))
            case "create_file":
                k.create_file(_str(a[0]))
            case "symlink":
                k.symlink(_str(a[0]), _str(a[1]))
            case "rmdir":
                k.rmdir(_str(a[0]))
            case "fail":
                raise OSError(_int(a[0]), _str(a[1]), _str(a[2]))
            case "bind_inside" | "tmpfs_inside":
                self.mount_inside(call, a)
            case "seal_covers":
                for folder in self.covers:
                    k.mount_setattr(folder, READONLY | abi.MOUNT_ATTR_RDONLY, recursive=False)
                self.covers.clear()
            case _:
                raise ValueError(f"no such call in a set-up program: {call}")

    def mount_inside(self, call: str, a: tuple[Arg, ...]) -> None:
        """After pivot_root: a bind's detached tree or a tmpfs at the realpath of the target (a
        symlink on the way is followed inside the sandbox); one that leads under `refuse_under`
        (the host's root, still at OLD_ROOT) is refused. (The C resolves the target by descriptors
        and mounts on the descriptor; the fake has paths only.)"""
        k, target = self.kernel, _str(a[0])
        real = k.realpath(target)
        refuse_under = _str(a[-1])
        if refuse_under and is_under(real, refuse_under):
            raise OSError(errno.EPERM, "leads out of the sandbox through a symlink", target)
        if call == "tmpfs_inside":
            self.ensure_mountpoint(real, True)
            k.mount("tmpfs", real, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, _opt(a[1]))
            return
        tree = self.fd(a[1])
        self.ensure_mountpoint(real, bool(a[3]))
        k.move_mount(tree, real)
        if a[2]:
            k.mount_setattr(real, READONLY)
        else:
            # nosuid and nodev on the whole tree, writable only its own mount: a read-only mount
            # of the host's below the source stays read-only (sbd-setup.c does the same).
            k.mount_setattr(real, abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV)
            k.mount_setattr(real, 0, abi.MOUNT_ATTR_RDONLY, recursive=False)
        k.close(tree)

    def ensure_mountpoint(self, target: str, is_dir: bool) -> None:
        """What is missing of `target`, made; a read-only folder on the way covered first."""
        if self.kernel.lexists(target):
            return
        try:
            self.make_mountpoint(target, is_dir)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            folder = os.path.dirname(target)
            while not self.kernel.lexists(folder):
                folder = os.path.dirname(folder)
            if folder == "/":
                raise OSError(errno.EROFS, "is a new top-level path on the sandbox's read-only root, reached through a symlink", target) from None
            self.cover(folder)
            self.make_mountpoint(target, is_dir)

    def make_mountpoint(self, target: str, is_dir: bool) -> None:
        self.kernel.makedirs(os.path.dirname(target))
        if is_dir:
            self.kernel.mkdir(target)
        else:
            self.kernel.create_file(target)

    def cover(self, folder: str) -> None:
        """A tmpfs over the read-only `folder` with each of its entries made again on it and a
        copy of its tree bound there (a symlink made as it was), sealed by seal_covers."""
        k = self.kernel
        entries = [(name, kind, k.readlink(f"{folder}/{name}") if kind == "symlink" else "") for name, kind in k.list_dir(folder)]
        trees = {name: k.clone_tree(f"{folder}/{name}") for name, kind, _ in entries if kind != "symlink"}
        k.mount("tmpfs", folder, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "size=1m")
        for name, kind, link in entries:
            path = f"{folder}/{name}"
            if kind == "symlink":
                k.symlink(link, path)
                continue
            if kind == "dir":
                k.mkdir(path, 0o755)
            else:
                k.create_file(path)
            k.move_mount(trees[name], path)
            k.close(trees[name])
        self.covers.append(folder)


def _int(value: Arg) -> int:
    assert isinstance(value, int)
    return value


def _str(value: Arg) -> str:
    assert isinstance(value, str)
    return value


def _opt(value: Arg) -> str | None:
    assert value is None or isinstance(value, str)
    return value


def _bytes(value: Arg) -> bytes:
    assert isinstance(value, bytes)
    return value


def _tuple(value: Arg) -> tuple[str | int, ...]:
    assert isinstance(value, tuple)
    return value
