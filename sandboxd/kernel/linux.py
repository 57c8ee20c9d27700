"""The kernel's calls that Python's standard library lacks, through ctypes.

Nothing else in sandboxd imports ctypes. Every wrapper raises `OSError(errno, strerror, path)`
naming the path or the call, so a failure in a sandbox's set-up says exactly what failed. The
numbers these calls take are in `abi`; the sandbox child reaches them through `seam.Kernel`.

Python 3.12 has `os.unshare` and `os.setns`; we support 3.11, so both go through libc here.
`pivot_root`, `mount_setattr`, `open_tree`, `move_mount`, the fsopen family and `openat2` have no
glibc wrapper on every distribution we support and go through `syscall(2)` with the architecture's number.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import signal
import socket
import stat
import struct
from dataclasses import dataclass

from sandboxd.kernel import abi

# By soname, as the dynamic loader finds it: ctypes.util.find_library would run `ldconfig -p`
# (a subprocess, and shutil, tempfile and subprocess imported) at every start of the CLI. A libc
# of another soname (musl's) is the one the interpreter itself is linked with: dlopen(NULL) finds it.
def _load_libc(kind: type[ctypes.CDLL]) -> ctypes.CDLL:
    try:
        return kind("libc.so.6", use_errno=True)
    except OSError:
        return kind(None, use_errno=True)


_libc = _load_libc(ctypes.CDLL)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


# The same libc, called with the GIL held (as os.fork holds it), for clone3 below.
_libc_gil = _load_libc(ctypes.PyDLL)
_libc_gil.syscall.restype = ctypes.c_long


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("pidfd", ctypes.c_uint64),
        ("child_tid", ctypes.c_uint64),
        ("parent_tid", ctypes.c_uint64),
        ("exit_signal", ctypes.c_uint64),
        ("stack", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64),
        ("tls", ctypes.c_uint64),
        ("set_tid", ctypes.c_uint64),
        ("set_tid_size", ctypes.c_uint64),
        ("cgroup", ctypes.c_uint64),
    ]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, call: str, path: str | None = None) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}", path)


@functools.cache
def machine() -> str:
    """The machine as uname says it ("x86_64"), asked once: the one place sandboxd learns it."""
    return os.uname().machine  # what platform.machine() returns, without importing platform


def _syscall_number(name: str) -> int:
    arch = machine()
    try:
        return abi.SYSCALLS[arch][name]
    except KeyError:
        raise OSError(0, f"{name}: no syscall number known for {arch}") from None


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _syscall_number("pivot_root")
    _check(_libc.syscall(nr, _b(new_root), _b(put_old)), "pivot_root", new_root)


def mount_setattr(
    path: str | int, attr_set: int, attr_clr: int = 0, recursive: bool = True, propagation: int = 0, name: str = "", userns_fd: int = -1
) -> None:
    """Change mount attributes of `path` (and, with `recursive`, every mount below it) in one call.
    `path` may be a descriptor of a mount (a detached one from `clone_mount_tree`); `propagation`
    is MS_PRIVATE, MS_SLAVE ... or 0 to leave it; `name` is what an error names (else `path`).
    With `userns_fd` (and MOUNT_ATTR_IDMAP in `attr_set`) the mount becomes idmapped: a file owned
    by id N on disk is seen as owned by what N maps to in that user namespace."""
    attr = _MountAttr(attr_set, attr_clr, propagation, max(userns_fd, 0))
    nr = _syscall_number("mount_setattr")
    flags = abi.AT_RECURSIVE if recursive else 0
    dirfd, where = (path, "") if isinstance(path, int) else (abi.AT_FDCWD, path)
    if isinstance(path, int):
        flags |= abi.AT_EMPTY_PATH
    result = _libc.syscall(
        nr, ctypes.c_int(dirfd), _b(where), ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))
    )
    _check(result, "mount_setattr", name or str(path))


def clone_mount_tree(fd: int, name: str = "") -> int:
    """A detached copy of the mount tree at descriptor `fd` (a bind mount not yet attached
    anywhere, with every mount below it): open_tree(OPEN_TREE_CLONE | AT_RECURSIVE). It is
    freed when its last descriptor closes, unless `move_mount` attached it first."""
    flags = abi.OPEN_TREE_CLONE | abi.OPEN_TREE_CLOEXEC | abi.AT_EMPTY_PATH | abi.AT_RECURSIVE
    result = _libc.syscall(abi.SYS_OPEN_TREE, ctypes.c_int(fd), b"", ctypes.c_uint(flags))
    _check(result, "open_tree", name or None)
    return int(result)


def clone_path_tree(path: str) -> int:
    """A detached copy of the mount tree at `path` (its last name not followed, as a bind of a
    symlink's own entry would not): open_tree(OPEN_TREE_CLONE | AT_RECURSIVE | AT_SYMLINK_NOFOLLOW)."""
    flags = abi.OPEN_TREE_CLONE | abi.OPEN_TREE_CLOEXEC | abi.AT_RECURSIVE | abi.AT_SYMLINK_NOFOLLOW
    result = _libc.syscall(abi.SYS_OPEN_TREE, ctypes.c_int(abi.AT_FDCWD), _b(path), ctypes.c_uint(flags))
    _check(result, "open_tree", path)
    return int(result)


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` on `target` (a path in the caller's mount namespace)."""
    result = _libc.syscall(abi.SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(abi.AT_FDCWD), _b(target), ctypes.c_uint(abi.MOVE_MOUNT_F_EMPTY_PATH))
    _check(result, "move_mount", target)


def detached_mount(fstype: str, attrs: int, options: tuple[tuple[str, str], ...] = ()) -> int:
    """A new, detached instance of file system `fstype` with mount attributes `attrs` and string
    `options` (fsopen, fsconfig, fsmount); its descriptor serves as a directory for the *at calls.
    Its namespaces are the caller's at this moment: a sysfs made while in a network namespace
    shows that namespace's links wherever it is attached later, a tmpfs made in the host's user
    namespace may hold device nodes that work in any."""
    fs = _libc.syscall(abi.SYS_FSOPEN, _b(fstype), ctypes.c_uint(abi.FSOPEN_CLOEXEC))
    _check(fs, "fsopen", fstype)
    try:
        for key, value in options:
            _check(_libc.syscall(abi.SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(abi.FSCONFIG_SET_STRING), _b(key), _b(value), ctypes.c_int(0)), f"fsconfig {key}={value}", fstype)
        _check(_libc.syscall(abi.SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(abi.FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0)), "fsconfig", fstype)
        mnt = _libc.syscall(abi.SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(abi.FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
        _check(mnt, "fsmount", fstype)
    finally:
        os.close(fs)
    return int(mnt)


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0), "prctl")


def fork_into_cgroup(cgroup_fd: int, flags: int = 0) -> int:
    return fork_into_cgroup_with_pidfd(cgroup_fd, flags, want_pidfd=False)[0]


def fork_into_cgroup_with_pidfd(cgroup_fd: int, flags: int = 0, want_pidfd: bool = True) -> tuple[int, int]:
    """fork(), with the child born in the cgroup2 directory `cgroup_fd` (clone3 CLONE_INTO_CGROUP).

    Moving a process into a cgroup by writing cgroup.procs takes a global lock whose first writer
    waits for an RCU grace period: 9 ms median, up to 30 ms, on this kind of machine. A child born
    in its cgroup takes no such lock, and no process of the service ever runs outside it.
    `flags` may add namespace flags (CLONE_NEWPID). Python's own fork bookkeeping runs around the
    call, as os.fork does it. Raises OSError (ENOSYS before Linux 5.7: see `clone_into_cgroup_works`).
    """
    return _clone3(flags | abi.CLONE_INTO_CGROUP, cgroup_fd, want_pidfd)


@functools.cache
def clone_into_cgroup_works() -> bool:
    """Whether this kernel forks a child straight into a cgroup (clone3 with CLONE_INTO_CGROUP,
    Linux 5.7): probed once per process, the first time it is asked, and remembered.

    The probe asks for a child born in the cgroup of a descriptor that is no cgroup's (an O_PATH
    descriptor of "/"). A kernel that knows the flag refuses that (EBADF) when it looks at the
    descriptor, before the child is running; one that does not refuses the flag (EINVAL), the
    size of the arguments (E2BIG) or clone3 itself (ENOSYS). Any other answer says the call
    exists, and leaves a real failure to the real fork to report.
    """
    fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        args = _CloneArgs(flags=abi.CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=fd)
        pid = _libc_gil.syscall(abi.SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        err = ctypes.get_errno()
    finally:
        os.close(fd)
    if pid == 0:
        os._exit(0)  # not reached: "/" is no cgroup
    if pid > 0:
        os.waitpid(pid, 0)
        return True
    return err not in (errno.ENOSYS, errno.E2BIG, errno.EINVAL)


def _clone3(flags: int, cgroup_fd: int, want_pidfd: bool) -> tuple[int, int]:
    pidfd = ctypes.c_int(-1)
    args = _CloneArgs(flags=flags, exit_signal=signal.SIGCHLD, cgroup=max(cgroup_fd, 0))
    if want_pidfd:
        args.flags |= abi.CLONE_PIDFD
        args.pidfd = ctypes.addressof(pidfd)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(abi.SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone3: {os.strerror(err)}")
    return int(pid), pidfd.value


def loopback_up() -> None:
    """Bring up `lo` in the calling thread's network namespace (two ioctls; no netlink needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, abi.SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, abi.SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | abi.IFF_UP))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def last_cap() -> int:
    """The highest capability this kernel knows: the last one PR_CAPBSET_READ accepts (at most 63).
    Not read from /proc/sys/kernel/cap_last_cap: inside a sandbox's mount namespace, where exec,
    health checks and reload commands drop their bounding set, a service may have bound a file of
    its own over it (as sbd-setup.c asks the kernel too)."""
    cap = 0
    while cap < 63 and _libc.prctl(abi.PR_CAPBSET_READ, cap + 1, 0, 0, 0) >= 0:
        cap += 1
    return cap


def drop_bounding_set(keep: set[int]) -> None:
    """Drop every capability not in `keep` from the bounding set (needs CAP_SETPCAP: before setuid)."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            _check(_libc.prctl(abi.PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")


def raise_effective_capabilities() -> None:
    """Make the effective set the permitted one again (after seteuid to a non-zero uid cleared it,
    while the real uid 0 kept the permitted set)."""
    header = _CapHeader(abi.LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), ctypes.byref(data)), "capget")
    for word in (0, 1):
        data[word].effective = data[word].permitted
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def keep_only_capabilities(keep: set[int]) -> None:
    """Make `keep` exactly the permitted, effective, inheritable and ambient sets, so that they
    survive exec whether the process is root or not. Call after `drop_bounding_set`."""
    mask = sum(1 << cap for cap in keep)
    data = (_CapData * 2)()
    for word in (0, 1):
        bits = (mask >> (32 * word)) & 0xFFFFFFFF
        data[word].effective = data[word].permitted = data[word].inheritable = bits
    header = _CapHeader(abi.LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    for cap in sorted(keep):
        _check(_libc.prctl(abi.PR_CAP_AMBIENT, abi.PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"prctl(PR_CAP_AMBIENT_RAISE, {cap})")




class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(program: bytes) -> None:
    """Load a classic BPF seccomp filter (8-byte `struct sock_filter` instructions) for this process."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_libc.prctl(abi.PR_SET_SECCOMP, abi.SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


# ── seccomp user notification: sandboxd answers a sandbox's bind() (see proxy.py, handoff) ──

_NOTIF = struct.Struct("QII" + "iIQ" + "6Q")  # id, pid, flags; seccomp_data: nr, arch, ip, args[6]


def install_seccomp_listener(program: bytes) -> int:
    """Load a filter whose SECCOMP_RET_USER_NOTIF calls wait for the holder of the returned fd."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    fd = _libc.syscall(_syscall_number("seccomp"), abi.SECCOMP_SET_MODE_FILTER, abi.SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog))
    _check(fd, "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)")
    return int(fd)


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # in the pid namespace of the receiver
    nr: int
    args: tuple[int, ...]


def notif_receive(listener: int) -> Notification:
    buffer = bytearray(_NOTIF.size)  # the kernel wants it zeroed
    fcntl.ioctl(listener, abi.SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
    fields = _NOTIF.unpack(buffer)
    return Notification(fields[0], fields[1], fields[3], tuple(fields[6:12]))


def notif_still_valid(listener: int, notification_id: int) -> bool:
    try:
        fcntl.ioctl(listener, abi.SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("Q", notification_id))
    except OSError:
        return False
    return True


def notif_install_fd(listener: int, notification_id: int, source_fd: int, target_fd: int, cloexec: bool) -> None:
    """Put a copy of our `source_fd` at `target_fd` in the waiting process, as dup3 would."""
    flags = os.O_CLOEXEC if cloexec else 0
    fcntl.ioctl(listener, abi.SECCOMP_IOCTL_NOTIF_ADDFD, struct.pack("QIIII", notification_id, abi.SECCOMP_ADDFD_FLAG_SETFD, source_fd, target_fd, flags))


def notif_answer(listener: int, notification_id: int, value: int = 0, error: int = 0, proceed: bool = False) -> None:
    """Finish the waiting call: it returns `value` (or fails with `error`), or runs as it was."""
    flags = abi.SECCOMP_USER_NOTIF_FLAG_CONTINUE if proceed else 0
    fcntl.ioctl(listener, abi.SECCOMP_IOCTL_NOTIF_SEND, struct.pack("QqiI", notification_id, value, -error if error else 0, flags))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, path: str, flags: int, resolve: int, name: str) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(_syscall_number("openat2"), ctypes.c_int(dir_fd), _b(path), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    _check(fd, "openat2", name)
    return int(fd)


def open_in_root(root_fd: int, path: str, flags: int, resolve: int = 0) -> int:
    """Open `path` as if `root_fd` were `/`: absolute symlinks and `..` stay inside (openat2 with
    RESOLVE_IN_ROOT), and no /proc magic link is followed. For paths inside a sandbox's tree.
    `resolve` adds RESOLVE_ flags (RESOLVE_NO_SYMLINKS)."""
    return _openat2(root_fd, path.lstrip("/") or ".", flags, abi.RESOLVE_IN_ROOT | abi.RESOLVE_NO_MAGICLINKS | resolve, path)


def open_beneath(dir_fd: int, path: str, flags: int, symlinks: bool = True, name: str = "") -> int:
    """Open the relative `path` below `dir_fd`, refusing (EXDEV) any step that leaves it: a `..`
    above it, an absolute symlink, a relative one that leads out (openat2 with RESOLVE_BENEATH);
    no /proc magic link is followed, and without `symlinks` no symlink at all (ELOOP)."""
    resolve = abi.RESOLVE_BENEATH | abi.RESOLVE_NO_MAGICLINKS | (0 if symlinks else abi.RESOLVE_NO_SYMLINKS)
    return _openat2(dir_fd, path, flags, resolve, name or path)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy of descriptor `target_fd` of the process behind `pidfd` (close-on-exec)."""
    fd = _libc.syscall(_syscall_number("pidfd_getfd"), ctypes.c_int(pidfd), ctypes.c_int(target_fd), ctypes.c_uint(0))
    _check(fd, "pidfd_getfd")
    return int(fd)


# ── pseudo-terminals inside a sandbox (sandboxd exec -t) ──

def open_pty_in_root(root_fd: int) -> tuple[int, int]:
    """A new pseudo-terminal from the devpts instance at `dev/pts` below `root_fd` (a sandbox's
    own): (master, slave), both close-on-exec, neither our controlling terminal.

    The master is `dev/pts/ptmx` itself, reached without following any symlink (a sandbox may
    have replaced its `/dev/ptmx` link), and must be the ptmx device; the slave is opened from
    the master (TIOCGPTPEER), never by a path the sandbox could swap.
    """
    path = "dev/pts/ptmx"
    master = open_in_root(root_fd, path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK, abi.RESOLVE_NO_SYMLINKS)
    try:
        info = os.fstat(master)
        if not stat.S_ISCHR(info.st_mode) or info.st_rdev != abi.PTMX_DEVICE:
            raise OSError(errno.ENOTTY, "not the ptmx device of a devpts file system", "/" + path)
        fcntl.ioctl(master, abi.TIOCGPTN, struct.pack("I", 0))  # only a pty master answers this
        fcntl.ioctl(master, abi.TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, abi.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        os.close(master)
        raise OSError(e.errno, f"allocate a pty: {e.strerror}", e.filename or "/" + path) from None
    os.set_blocking(master, True)
    return master, int(slave)


def open_null_in_root(root_fd: int) -> int:
    """`dev/null` below `root_fd`, for reading and writing, close-on-exec; refused unless it is the
    null device (a sandbox may have put a fifo or a link there)."""
    fd = open_in_root(root_fd, "dev/null", os.O_RDWR | os.O_NONBLOCK, abi.RESOLVE_NO_SYMLINKS)
    info = os.fstat(fd)
    if not stat.S_ISCHR(info.st_mode) or info.st_rdev != abi.NULL_DEVICE:
        os.close(fd)
        raise OSError(errno.ENODEV, "is not the null device", "/dev/null")
    return fd
