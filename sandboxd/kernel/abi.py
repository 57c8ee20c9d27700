"""The kernel's numbers that sandboxd uses: flags, syscall numbers, ioctl requests, capabilities.

Plain constants, no calls: the spec and the plan (which must stay pure) import what they need
from here, never from `linux`, the module that makes the calls. Values are those of the kernel's
UAPI headers (<linux/sched.h>, <linux/mount.h>, <linux/prctl.h>, <linux/capability.h> ...).
"""

from __future__ import annotations

import os

# ── namespaces and clone3 (<linux/sched.h>) ──
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PIDFD = 0x1000
CLONE_INTO_CGROUP = 0x200000000

# ── mount(2) and umount2(2) (<linux/mount.h>) ──
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

# ── the new mount API: mount_setattr, open_tree, move_mount, fsopen/fsconfig/fsmount ──
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 0x1

# ── openat2 (<linux/openat2.h>) ──
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# MFD_EXEC (Linux 6.3): executable even where vm.memfd_noexec makes memfds non-executable by default.
MFD_EXEC = 0x0010

# ── syscall numbers ──
# The same on every architecture: they are newer than the unified syscall table.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_CLONE3 = 435
# Those that differ, by uname's machine (linux.machine()) (mount_setattr is newer than the unified table too).
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"pivot_root": 155, "mount_setattr": 442, "seccomp": 317, "openat2": 437, "pidfd_getfd": 438},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442, "seccomp": 277, "openat2": 437, "pidfd_getfd": 438},
    "riscv64": {"pivot_root": 41, "mount_setattr": 442, "seccomp": 277, "openat2": 437, "pidfd_getfd": 438},
    "ppc64le": {"pivot_root": 203, "mount_setattr": 442, "seccomp": 358, "openat2": 437, "pidfd_getfd": 438},
    "s390x": {"pivot_root": 217, "mount_setattr": 442},
}

# ── network interfaces (<linux/sockios.h>, <net/if.h>) ──
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# ── prctl(2) (<linux/prctl.h>) ──
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2

# ── capabilities (<linux/capability.h>) ──
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAPABILITIES = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11,
    "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
    "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}  # fmt: skip

# ── seccomp (<linux/seccomp.h>) ──
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64), _IOW('!', 3, struct seccomp_notif_addfd)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103

# ── pseudo-terminals and devices ──
TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int)
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
TIOCGPTPEER = 0x5441  # _IO('T', 0x41)
PTMX_DEVICE = os.makedev(5, 2)
NULL_DEVICE = os.makedev(1, 3)
