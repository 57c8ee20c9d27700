"""The calls a process makes to become a sandbox, as one interface: `Kernel`.

A sandbox's set-up (namespaces, the mount walk, descriptors, ids, capabilities, seccomp, exec)
is a program of these calls (sandbox/program.py), as youki's container init makes every call
through its `Syscall` trait: the compiled interpreter (sandbox/setup/sbd-setup.c) makes them in a
sandbox, its Python twin (sandbox/reference.py) makes them through a `Kernel` in the unit tests,
and the processes that enter a running sandbox (join.py, execute.py) make theirs through one.
`LINUX` is the real one: the ctypes calls of `linux` and the standard library's.
`kernel.fake.RecordingKernel` answers the same calls from a small model of a file tree and
records them in order, so the mount walk and the order of the set-up are unit-tested without
root (tests/unit/test_child.py).

What runs outside a sandbox's set-up (the fork server's detached mounts and clones, the
supervisor, the host's cgroups and networks) calls `linux` directly: it is not unit-tested
through a fake, and its calls are not the ones whose order makes a sandbox.

Every call raises OSError(errno, text, path) on failure, the path being the one it was given.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import stat
from collections.abc import Sequence
from typing import Literal, NoReturn, Protocol

from sandboxd.kernel import linux

EntryKind = Literal["dir", "symlink", "other"]

# What the fork server sets up for itself (handlers, SIG_IGN) and a sandbox must not inherit.
RESET_SIGNALS = (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Confining(Protocol):
    """The calls that the last steps of a set-up make (sandbox/confine.py): ids, capabilities,
    seccomp, descriptors. A `Kernel` makes them; the set-up program's compiler records them as
    ops (sandbox/ops.py, OpRecorder)."""

    def prctl(self, option: int, arg2: int = 0) -> None: ...
    def setgroups(self, groups: list[int]) -> None: ...
    def setresgid(self, rgid: int, egid: int, sgid: int) -> None: ...
    def setresuid(self, ruid: int, euid: int, suid: int) -> None: ...
    def setgid(self, gid: int) -> None: ...
    def setuid(self, uid: int) -> None: ...
    def drop_bounding_set(self, keep: set[int]) -> None: ...
    def keep_only_capabilities(self, keep: set[int]) -> None: ...
    def install_seccomp(self, program: bytes) -> None: ...
    def open(self, path: str, flags: int) -> int: ...
    def dup_above(self, fd: int, lowest: int) -> int:
        """A close-on-exec copy of `fd` numbered `lowest` or above (F_DUPFD_CLOEXEC)."""

    def dup2(self, fd: int, target: int) -> None: ...


class Kernel(Confining, Protocol):
    """Every call of a sandbox's set-up (and `Confining`'s)."""

    # ── namespaces, the session, the host name ──
    def unshare(self, flags: int) -> None: ...
    def setns(self, fd: int, nstype: int) -> None: ...
    def setsid(self) -> None: ...
    def sethostname(self, name: str) -> None: ...
    def loopback_up(self) -> None: ...

    # ── signals, ids, capabilities, seccomp ──
    def reset_signals(self) -> None:
        """No wakeup fd, RESET_SIGNALS back to SIG_DFL, an empty signal mask."""

    def install_seccomp_listener(self, program: bytes) -> int: ...

    # ── descriptors and files written ──
    def close(self, fd: int) -> None: ...
    def closerange(self, low: int, high: int) -> None: ...
    def write_file(self, path: str, text: str) -> None: ...
    def write(self, fd: int, data: bytes) -> int: ...

    # ── mounts ──
    def mount(self, source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None: ...
    def umount2(self, target: str, flags: int = 0) -> None: ...
    def mount_setattr(self, path: str, attr_set: int, attr_clr: int = 0, recursive: bool = True) -> None: ...
    def move_mount(self, fd: int, target: str) -> None: ...
    def clone_tree(self, path: str) -> int:
        """A detached copy of the mount tree at `path`, its last name not followed."""

    def pivot_root(self, new_root: str, put_old: str) -> None: ...

    # ── the file tree ──
    def chdir(self, path: str) -> None: ...
    def lexists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def islink(self, path: str) -> bool: ...
    def realpath(self, path: str) -> str: ...
    def device_of(self, path: str) -> int:
        """st_dev of `path` (a mount point differs from its parent directory in it)."""

    def fd_is_dir(self, fd: int) -> bool: ...
    def list_dir(self, path: str) -> list[tuple[str, EntryKind]]:
        """The entries of a directory, each with whether it is a symlink, a directory or else."""

    def readlink(self, path: str) -> str: ...
    def mkdir(self, path: str, mode: int = 0o777) -> None: ...
    def makedirs(self, path: str, mode: int = 0o777) -> None:
        """mkdir -p: `path` and its missing parents; no error if it exists."""

    def create_file(self, path: str) -> None:
        """An empty regular file at `path` (mode 0644) if nothing is there."""

    def symlink(self, target: str, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...

    # ── the end of a set-up ──
    def send(self, channel: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None: ...
    def init_exec(self, argv: list[str], env: dict[str, str]) -> NoReturn:
        """Fork `argv` in a session of its own and execute it (PATH from `env`); stay as its
        init: every signal forwarded to its process group, every child reaped, exit as it did
        (128+n when signal n killed it). sbd-setup.c's init_exec says why and how."""

    def exit(self, code: int) -> NoReturn: ...


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _list_dir(path: str) -> list[tuple[str, EntryKind]]:
    entries: list[tuple[str, EntryKind]] = []
    for entry in os.scandir(path):
        entries.append((entry.name, "symlink" if entry.is_symlink() else "dir" if entry.is_dir() else "other"))
    return entries


def _create_file(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _send(channel: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    if fds:
        socket.send_fds(channel, [data], list(fds))
    else:
        channel.send(data)


STOPPING_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)  # forwarded as SIGSTOP, as dumb-init does


def _init_exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    every = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
    signal.pthread_sigmask(signal.SIG_SETMASK, every)
    executed_r, executed_w = os.pipe2(os.O_CLOEXEC)
    command = os.fork()
    if command == 0:
        try:
            os.setsid()
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execvpe(argv[0], argv, env)
        except OSError as e:  # (sbd-setup.c reports it on the status channel too)
            os._exit(127 if e.errno == errno.ENOENT else 126)
        finally:
            os._exit(126)
    os.close(executed_w)
    os.read(executed_r, 1)
    os.closerange(0, 1 << 20)
    while True:
        sig = signal.sigwaitinfo(every).si_signo
        if sig != signal.SIGCHLD:
            try:
                os.killpg(command, signal.SIGSTOP if sig in STOPPING_SIGNALS else sig)
            except ProcessLookupError:
                pass
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == command:
                os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


class LinuxKernel:
    """The real calls (the methods are the functions themselves: no layer between)."""

    unshare = staticmethod(linux.unshare)
    setns = staticmethod(linux.setns)

    @staticmethod
    def setsid() -> None:
        os.setsid()

    sethostname = staticmethod(socket.sethostname)
    loopback_up = staticmethod(linux.loopback_up)
    reset_signals = staticmethod(_reset_signals)
    prctl = staticmethod(linux.prctl)
    setgroups = staticmethod(os.setgroups)
    setresgid = staticmethod(os.setresgid)
    setresuid = staticmethod(os.setresuid)
    setgid = staticmethod(os.setgid)
    setuid = staticmethod(os.setuid)
    drop_bounding_set = staticmethod(linux.drop_bounding_set)
    keep_only_capabilities = staticmethod(linux.keep_only_capabilities)
    install_seccomp = staticmethod(linux.install_seccomp)
    install_seccomp_listener = staticmethod(linux.install_seccomp_listener)

    @staticmethod
    def open(path: str, flags: int) -> int:
        return os.open(path, flags)

    close = staticmethod(os.close)

    @staticmethod
    def dup_above(fd: int, lowest: int) -> int:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)

    @staticmethod
    def dup2(fd: int, target: int) -> None:
        os.dup2(fd, target)  # clears close-on-exec on `target`

    closerange = staticmethod(os.closerange)
    write_file = staticmethod(_write_file)
    write = staticmethod(os.write)
    mount = staticmethod(linux.mount)
    umount2 = staticmethod(linux.umount2)

    @staticmethod
    def mount_setattr(path: str, attr_set: int, attr_clr: int = 0, recursive: bool = True) -> None:
        linux.mount_setattr(path, attr_set, attr_clr, recursive)

    move_mount = staticmethod(linux.move_mount)
    clone_tree = staticmethod(linux.clone_path_tree)
    pivot_root = staticmethod(linux.pivot_root)
    chdir = staticmethod(os.chdir)
    lexists = staticmethod(os.path.lexists)
    isdir = staticmethod(os.path.isdir)
    islink = staticmethod(os.path.islink)

    @staticmethod
    def realpath(path: str) -> str:
        return os.path.realpath(path)

    @staticmethod
    def device_of(path: str) -> int:
        return os.stat(path).st_dev

    @staticmethod
    def fd_is_dir(fd: int) -> bool:
        return stat.S_ISDIR(os.fstat(fd).st_mode)

    list_dir = staticmethod(_list_dir)

    @staticmethod
    def readlink(path: str) -> str:
        return os.readlink(path)

    @staticmethod
    def mkdir(path: str, mode: int = 0o777) -> None:
        os.mkdir(path, mode)

    @staticmethod
    def makedirs(path: str, mode: int = 0o777) -> None:
        os.makedirs(path, mode, exist_ok=True)

    create_file = staticmethod(_create_file)

    @staticmethod
    def symlink(target: str, path: str) -> None:
        os.symlink(target, path)

    rmdir = staticmethod(os.rmdir)
    send = staticmethod(_send)
    init_exec = staticmethod(_init_exec)
    exit = staticmethod(os._exit)


LINUX: Kernel = LinuxKernel()
