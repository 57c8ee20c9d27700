"""The one seam between sandboxd and the kernel's calls that Python's standard library lacks.

Nothing else in sandboxd imports ctypes. Every wrapper raises `OSError(errno, strerror, path)`
naming the path or the call, so a failure in a sandbox's set-up says exactly what failed.

Python 3.12 has `os.unshare` and `os.setns`; we support 3.11, so both go through libc here.
`pivot_root`, `mount_setattr`, `open_tree`, `move_mount`, the fsopen family and `openat2` have no
glibc wrapper on every distribution we support and go through `syscall(2)` with the architecture's number.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import signal
import socket
import stat
import struct
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 0x2

AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000

CLONE_INTO_CGROUP = 0x200000000

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# The same on every architecture: they are newer than the unified syscall table.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_CLONE3 = 435

_SYSCALLS: dict[str, dict[str, int]] = {
    # mount_setattr has the same number everywhere (it is newer than the unified table).
    "x86_64": {"pivot_root": 155, "mount_setattr": 442, "seccomp": 317, "openat2": 437, "pidfd_getfd": 438},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442, "seccomp": 277, "openat2": 437, "pidfd_getfd": 438},
    "riscv64": {"pivot_root": 41, "mount_setattr": 442, "seccomp": 277, "openat2": 437, "pidfd_getfd": 438},
    "ppc64le": {"pivot_root": 203, "mount_setattr": 442, "seccomp": 358, "openat2": 437, "pidfd_getfd": 438},
    "s390x": {"pivot_root": 217, "mount_setattr": 442},
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


# The same libc, called with the GIL held (as os.fork holds it), for clone3 below.
_libc_gil = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
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


def _syscall_number(name: str) -> int:
    machine = platform.machine()
    try:
        return _SYSCALLS[machine][name]
    except KeyError:
        raise OSError(0, f"{name}: no syscall number known for {machine}") from None


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


AT_FDCWD = -100


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
    flags = AT_RECURSIVE if recursive else 0
    dirfd, where = (path, "") if isinstance(path, int) else (AT_FDCWD, path)
    if isinstance(path, int):
        flags |= AT_EMPTY_PATH
    result = _libc.syscall(
        nr, ctypes.c_int(dirfd), _b(where), ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))
    )
    _check(result, "mount_setattr", name or str(path))


OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 0x1


def clone_mount_tree(fd: int, name: str = "") -> int:
    """A detached copy of the mount tree at descriptor `fd` (a bind mount not yet attached
    anywhere, with every mount below it): open_tree(OPEN_TREE_CLONE | AT_RECURSIVE). It is
    freed when its last descriptor closes, unless `move_mount` attached it first."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE
    result = _libc.syscall(SYS_OPEN_TREE, ctypes.c_int(fd), b"", ctypes.c_uint(flags))
    _check(result, "open_tree", name or None)
    return int(result)


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` on `target` (a path in the caller's mount namespace)."""
    result = _libc.syscall(SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD), _b(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    _check(result, "move_mount", target)


def detached_mount(fstype: str, attrs: int, options: tuple[tuple[str, str], ...] = ()) -> int:
    """A new, detached instance of file system `fstype` with mount attributes `attrs` and string
    `options` (fsopen, fsconfig, fsmount); its descriptor serves as a directory for the *at calls.
    Its namespaces are the caller's at this moment: a sysfs made while in a network namespace
    shows that namespace's links wherever it is attached later, a tmpfs made in the host's user
    namespace may hold device nodes that work in any."""
    fs = _libc.syscall(SYS_FSOPEN, _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))
    _check(fs, "fsopen", fstype)
    try:
        for key, value in options:
            _check(_libc.syscall(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_SET_STRING), _b(key), _b(value), ctypes.c_int(0)), f"fsconfig {key}={value}", fstype)
        _check(_libc.syscall(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0)), "fsconfig", fstype)
        mnt = _libc.syscall(SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
        _check(mnt, "fsmount", fstype)
    finally:
        os.close(fs)
    return int(mnt)


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0), "prctl")


CLONE_PIDFD = 0x1000


def fork_into_cgroup(cgroup_fd: int, flags: int = 0) -> int:
    return fork_into_cgroup_with_pidfd(cgroup_fd, flags, want_pidfd=False)[0]


def fork_into_cgroup_with_pidfd(cgroup_fd: int, flags: int = 0, want_pidfd: bool = True) -> tuple[int, int]:
    """fork(), with the child born in the cgroup2 directory `cgroup_fd` (clone3 CLONE_INTO_CGROUP).

    Moving a process into a cgroup by writing cgroup.procs takes a global lock whose first writer
    waits for an RCU grace period: 9 ms median, up to 30 ms, on this kind of machine. A child born
    in its cgroup takes no such lock, and no process of the service ever runs outside it.
    `flags` may add namespace flags (CLONE_NEWPID). Python's own fork bookkeeping runs around the
    call, as os.fork does it. Raises OSError (ENOSYS before Linux 5.7).
    """
    return _clone3(flags | CLONE_INTO_CGROUP, cgroup_fd, want_pidfd)


def _clone3(flags: int, cgroup_fd: int, want_pidfd: bool) -> tuple[int, int]:
    pidfd = ctypes.c_int(-1)
    args = _CloneArgs(flags=flags, exit_signal=signal.SIGCHLD, cgroup=max(cgroup_fd, 0))
    if want_pidfd:
        args.flags |= CLONE_PIDFD
        args.pidfd = ctypes.addressof(pidfd)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
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
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_bounding_set(keep: set[int]) -> None:
    """Drop every capability not in `keep` from the bounding set (needs CAP_SETPCAP: before setuid)."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")


def raise_effective_capabilities() -> None:
    """Make the effective set the permitted one again (after seteuid to a non-zero uid cleared it,
    while the real uid 0 kept the permitted set)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
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
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    for cap in sorted(keep):
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"prctl(PR_CAP_AMBIENT_RAISE, {cap})")


CAPABILITIES = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11,
    "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
    "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}  # fmt: skip


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(program: bytes) -> None:
    """Load a classic BPF seccomp filter (8-byte `struct sock_filter` instructions) for this process."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


# ── seccomp user notification: sandboxd answers a sandbox's bind() (see proxy.py, handoff) ──

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64), _IOW('!', 3, struct seccomp_notif_addfd)
_NOTIF_RECV, _NOTIF_SEND, _NOTIF_ID_VALID, _NOTIF_ADDFD = 0xC0502100, 0xC0182101, 0x40082102, 0x40182103
_NOTIF = struct.Struct("QII" + "iIQ" + "6Q")  # id, pid, flags; seccomp_data: nr, arch, ip, args[6]


def install_seccomp_listener(program: bytes) -> int:
    """Load a filter whose SECCOMP_RET_USER_NOTIF calls wait for the holder of the returned fd."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    fd = _libc.syscall(_syscall_number("seccomp"), SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog))
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
    fcntl.ioctl(listener, _NOTIF_RECV, buffer, True)
    fields = _NOTIF.unpack(buffer)
    return Notification(fields[0], fields[1], fields[3], tuple(fields[6:12]))


def notif_still_valid(listener: int, notification_id: int) -> bool:
    try:
        fcntl.ioctl(listener, _NOTIF_ID_VALID, struct.pack("Q", notification_id))
    except OSError:
        return False
    return True


def notif_install_fd(listener: int, notification_id: int, source_fd: int, target_fd: int, cloexec: bool) -> None:
    """Put a copy of our `source_fd` at `target_fd` in the waiting process, as dup3 would."""
    flags = os.O_CLOEXEC if cloexec else 0
    fcntl.ioctl(listener, _NOTIF_ADDFD, struct.pack("QIIII", notification_id, SECCOMP_ADDFD_FLAG_SETFD, source_fd, target_fd, flags))


def notif_answer(listener: int, notification_id: int, value: int = 0, error: int = 0, proceed: bool = False) -> None:
    """Finish the waiting call: it returns `value` (or fails with `error`), or runs as it was."""
    flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE if proceed else 0
    fcntl.ioctl(listener, _NOTIF_SEND, struct.pack("QqiI", notification_id, value, -error if error else 0, flags))


RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


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
    return _openat2(root_fd, path.lstrip("/") or ".", flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | resolve, path)


def open_beneath(dir_fd: int, path: str, flags: int, symlinks: bool = True, name: str = "") -> int:
    """Open the relative `path` below `dir_fd`, refusing (EXDEV) any step that leaves it: a `..`
    above it, an absolute symlink, a relative one that leads out (openat2 with RESOLVE_BENEATH);
    no /proc magic link is followed, and without `symlinks` no symlink at all (ELOOP)."""
    resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | (0 if symlinks else RESOLVE_NO_SYMLINKS)
    return _openat2(dir_fd, path, flags, resolve, name or path)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy of descriptor `target_fd` of the process behind `pidfd` (close-on-exec)."""
    fd = _libc.syscall(_syscall_number("pidfd_getfd"), ctypes.c_int(pidfd), ctypes.c_int(target_fd), ctypes.c_uint(0))
    _check(fd, "pidfd_getfd")
    return int(fd)


# ── pseudo-terminals inside a sandbox (sandboxd exec -t) ──

TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int)
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
TIOCGPTPEER = 0x5441  # _IO('T', 0x41)
PTMX_DEVICE = os.makedev(5, 2)
NULL_DEVICE = os.makedev(1, 3)


def open_pty_in_root(root_fd: int) -> tuple[int, int]:
    """A new pseudo-terminal from the devpts instance at `dev/pts` below `root_fd` (a sandbox's
    own): (master, slave), both close-on-exec, neither our controlling terminal.

    The master is `dev/pts/ptmx` itself, reached without following any symlink (a sandbox may
    have replaced its `/dev/ptmx` link), and must be the ptmx device; the slave is opened from
    the master (TIOCGPTPEER), never by a path the sandbox could swap.
    """
    path = "dev/pts/ptmx"
    master = open_in_root(root_fd, path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK, RESOLVE_NO_SYMLINKS)
    try:
        info = os.fstat(master)
        if not stat.S_ISCHR(info.st_mode) or info.st_rdev != PTMX_DEVICE:
            raise OSError(errno.ENOTTY, "not the ptmx device of a devpts file system", "/" + path)
        fcntl.ioctl(master, TIOCGPTN, struct.pack("I", 0))  # only a pty master answers this
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        os.close(master)
        raise OSError(e.errno, f"allocate a pty: {e.strerror}", e.filename or "/" + path) from None
    os.set_blocking(master, True)
    return master, int(slave)


def open_null_in_root(root_fd: int) -> int:
    """`dev/null` below `root_fd`, for reading and writing, close-on-exec; refused unless it is the
    null device (a sandbox may have put a fifo or a link there)."""
    fd = open_in_root(root_fd, "dev/null", os.O_RDWR | os.O_NONBLOCK, RESOLVE_NO_SYMLINKS)
    info = os.fstat(fd)
    if not stat.S_ISCHR(info.st_mode) or info.st_rdev != NULL_DEVICE:
        os.close(fd)
        raise OSError(errno.ENODEV, "is not the null device", "/dev/null")
    return fd
