"""What the fork server makes for a launch before it forks: detached mounts and the sealed copy of
the set-up interpreter, which is every sandbox's init.

A sandbox cannot make these itself. open_tree copies only mounts of the caller's own mount
namespace, which a sandbox has left; a tmpfs mounted in a user namespace holds no usable device
node; only root of the host's user namespace may idmap a mount of the host's file systems; and
the init it executes must be no file of the host's. So the fork server, in the host's
namespaces, makes each of these detached (attached to nothing), and the sandbox attaches them
with move_mount (child.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from sandboxd.kernel import abi, linux
from sandboxd.plan.launch import DEVICE_NODES, UserNamespace, swapped_id_map

_DEVICE_NUMBERS: dict[str, int] = {}


def detached_dev(owner: tuple[int, int] | None) -> int:
    """The sandbox's /dev, a small tmpfs with the device nodes a service needs (mknod, with the
    host's numbers), the mount points of its devpts and /dev/shm and the usual links, detached.
    Made here, in the host's user namespace, because a tmpfs mounted in a user namespace holds
    no usable device node (the kernel makes it nodev) and mknod there is refused; and so a
    sandbox attaches one mount where it made some fifteen files and mounts. `owner`: the host's
    ids of root inside the sandbox's user namespace, whose /dev it is, as it is root's in a
    sandbox without one."""
    if not _DEVICE_NUMBERS:
        for node in DEVICE_NODES:
            try:
                _DEVICE_NUMBERS[node] = os.stat(f"/dev/{node}").st_rdev
            except FileNotFoundError:
                continue
    dev = linux.detached_mount("tmpfs", abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NOEXEC, (("mode", "0755"), ("size", "64k")))
    umask = os.umask(0)  # the modes as written (this process is single-threaded), not a chmod each
    try:
        for node, number in _DEVICE_NUMBERS.items():
            os.mknod(node, stat.S_IFCHR | 0o666, number, dir_fd=dev)
        for directory in ("pts", "shm"):
            os.mkdir(directory, 0o755, dir_fd=dev)
        for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, name, dir_fd=dev)
        if owner is not None:
            os.chown(".", *owner, dir_fd=dev)
    except BaseException:
        os.close(dev)
        raise
    finally:
        os.umask(umask)
    return dev


def detached_bind(held_fd: int, source: str) -> int:
    """A detached copy of the mount tree that a held source descriptor names (pins.py), private
    (no mount or unmount propagates into or out of it), for the sandbox to attach."""
    tree = linux.clone_mount_tree(held_fd, source)
    try:
        linux.mount_setattr(tree, 0, propagation=abi.MS_PRIVATE, name=source)
    except OSError:
        os.close(tree)
        raise
    return tree


def idmap(tree: int, userns: int, source: str) -> None:
    """Idmap a detached copy through `userns`; say plainly when its file system cannot be."""
    try:
        linux.mount_setattr(tree, abi.MOUNT_ATTR_IDMAP, userns_fd=userns, name=source)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise OSError(e.errno, "its file system cannot be idmapped (a user namespace needs that for mounts; userns: false does not)", source) from None


def host_pid(pid: int, pidfd: int = -1) -> int:
    """The host's pid of a child (`pid` is its pid in this process's namespace): /proc here is the
    host's, and a pidfd's fdinfo tells the pid as the /proc it is read through numbers it."""
    own = pidfd < 0
    if own:
        pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
    finally:
        if own:
            os.close(pidfd)


_store_userns: dict[tuple[int, ...], int] = {}


def storage_userns(ids: UserNamespace, interpreter: int) -> int:
    """The user namespace that volumes and binds are idmapped through (plan.swapped_id_map): a
    file stored as store_uid + N is the sandbox's own N inside, everything else keeps its host
    owner. -1 when the stack runs as the stored block itself (a single block): no idmap needed.
    Made once per stack's ids by a process that unshares it and waits while its maps are written:
    the set-up interpreter (`interpreter`, the sealed copy: `sbd-setup userns`), started with
    vfork semantics, not a fork of this heap. Held by descriptor here for the life of the fork
    server; `up` has it made once the specs are planned (protocol.PrepareStorage), while the
    supervisor sets up, so that the first launch finds it made."""
    if (ids.store_uid, ids.store_gid) == (ids.uid, ids.gid):
        return -1
    key = (ids.store_uid, ids.store_gid, ids.uid, ids.gid, ids.count)
    if key in _store_userns:
        return _store_userns[key]
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = -1
    try:
        with inheritable([ready_w, done_r]):
            pid = os.posix_spawn(f"/proc/self/fd/{interpreter}", ["sbd-setup", "userns", str(ready_w), str(done_r)], {})
        os.close(ready_w)
        os.close(done_r)
        ready_w = done_r = -1
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "unshare(CLONE_NEWUSER) failed", "the storage user namespace")
        child = host_pid(pid)
        for kind, stored, running in (("uid_map", ids.store_uid, ids.uid), ("gid_map", ids.store_gid, ids.gid)):
            with open(f"/proc/{child}/{kind}", "w") as f:
                f.write(swapped_id_map(stored, running, ids.count))
        _store_userns[key] = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        for fd in (ready_r, ready_w, done_r, done_w):
            if fd >= 0:
                os.close(fd)
        if pid > 0:
            os.waitpid(pid, 0)
    return _store_userns[key]


_sealed_inits: dict[str, int] = {}  # the fork server's sealed copies, by path on the host


def sealed_copy(path: str) -> int:
    """The fork server's read-only, sealed, execute-only copy of the program at `path` (sbd-setup,
    which becomes each sandbox's init), made once and shared by every sandbox (no copy per launch).

    Why: an init executed from its file on the host leaves that file in reach through /proc/1/exe;
    uid 0 in the sandbox owns it, and with the root built on a tmpfs its mount is writable: only
    ETXTBSY, which ends with the init, stood between a write and the host's binary (runc's
    CVE-2019-5736). A memfd sealed against writes, growth and shrinking (and against unsealing)
    cannot be changed by anyone, root included, and is no path of the host's.

    Mode 0111: no one in a sandbox can read it either, and the kernel makes a process that execs a
    file it cannot read non-dumpable. So, without CAP_SYS_PTRACE (which docker withholds too), no
    process of the sandbox reaches its init's /proc/1/mem (read or write), environ, exe, fd/,
    root or map_files, nor its memory through process_vm_readv/writev, nor its descriptors
    through pidfd_getfd. The init makes itself non-dumpable as well (PR_SET_DUMPABLE 0, before it
    forks the command: sbd-setup.c's init_exec), which covers a service given CAP_DAC_OVERRIDE or
    CAP_DAC_READ_SEARCH, which reads the copy, and a host with fs.suid_dumpable=1. What this does
    not cover: the service's own processes reach one another as processes of one uid always do
    (ptrace itself is refused by seccomp).
    """
    fd = _sealed_inits.get(path)
    if fd is not None:
        return fd
    with open(path, "rb") as source:
        if source.read(4) != b"\x7fELF":
            raise OSError(errno.ENOEXEC, "not an ELF binary: sandboxd runs its init from a sealed copy, executed by descriptor", path)
        source.seek(0)
        try:
            fd = os.memfd_create("sbd-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | abi.MFD_EXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a kernel before MFD_EXEC, where memfds are executable
                raise OSError(e.errno, f"memfd_create: {e.strerror} (vm.memfd_noexec=2 forbids executable memfds)", path) from None
            fd = os.memfd_create("sbd-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            while chunk := source.read(1 << 20):
                os.write(fd, chunk)
            os.fchmod(fd, 0o111)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
    _sealed_inits[path] = fd
    return fd


@contextmanager
def inheritable(fds: list[int]) -> Iterator[None]:
    """`fds` without close-on-exec while the block runs (the clone of a child that executes the
    set-up interpreter, which must get them), close-on-exec again after it. The fork server is
    single-threaded: no other exec sees them so."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        yield
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)
