"""A `Kernel` for tests: it records every call in order and answers from a small model of a
file tree, as youki's TestHelperSyscall does for its container init.

The model is what the sandbox child's walk asks about: which paths exist and what they are
(directories, files, symlinks with their targets), which are mount points (st_dev), where `/`
is after pivot_root and where the old root went, and what a detached tree holds once it is
attached. A tmpfs mounted on a path hides what was below it; a bind shows its source's
entries, an overlay its lower layer's, `move_mount` the tree's. Nothing is really mounted, written or executed:
`init_exec` and `exit` raise ProcessEnded, so a test sees the end of a set-up.

`fail(call, path)` makes the next such call fail as the real one would (OSError with the
call's name, the errno's text and the path), once.
"""

from __future__ import annotations

import errno
import os
import posixpath
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from sandboxd.kernel import abi
from sandboxd.kernel.seam import EntryKind, Kernel

Call = tuple[object, ...]
# Queries of the file tree are answered, not recorded: a test reads what was done.
_PATH_ARGUMENT = {"mount": 1, "umount2": 0, "clone_tree": 0, "mount_setattr": 0, "move_mount": 1, "pivot_root": 0, "chdir": 0, "mkdir": 0,
                  "makedirs": 0, "create_file": 0, "symlink": 1, "rmdir": 0, "write_file": 0, "open": 0}  # fmt: skip


class ProcessEnded(BaseException):
    """The process would be gone (`exit`: its code) or the command's init (`init_exec`: None)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class RecordingKernel:
    """`tree`: the host's paths (a trailing "/" for a directory; parents are directories);
    `links`: symlinks and their targets; `mount_points`: paths that are mounts of their own;
    `trees`: what each detached tree (by descriptor) holds, relative to its top ("etc/",
    "etc/passwd", "run -> /var/run"), and `file_trees` the descriptors of trees that are a
    single file."""

    def __init__(
        self,
        tree: Iterable[str] = (),
        links: Mapping[str, str] | None = None,
        mount_points: Iterable[str] = (),
        trees: Mapping[int, Iterable[str]] | None = None,
        file_trees: Iterable[int] = (),
    ) -> None:
        self.calls: list[Call] = []
        self.entries: dict[str, str] = {"/": "dir"}
        self.links: dict[str, str] = {}
        for path in tree:
            self._add(path.rstrip("/") or "/", "dir" if path.endswith("/") else "file")
        for path, target in (links or {}).items():
            self._add(path, "symlink")
            self.links[path] = target
        self._devices = 1
        self.devices: dict[str, int] = {"/": 1}
        self.read_only: set[str] = set()  # mounts (host paths) made read-only: writes below them are EROFS
        for path in mount_points:
            self._new_mount(path)
        self.trees = {fd: list(entries) for fd, entries in (trees or {}).items()}
        self.file_trees = set(file_trees)
        self.cwd = "/"
        self.new_root: str | None = None  # the host's path of `/` after pivot_root
        self.old_root: str | None = None  # where the host's root is then, as the sandbox names it
        self._failures: list[tuple[str, str | None, int]] = []
        self._next_fd = 1000

    # ── what a test asks ──

    def fail(self, call: str, path: str | None = None, error: int = errno.EACCES) -> None:
        """The next `call` (on `path`, or on any) fails with `error`."""
        self._failures.append((call, path, error))

    def named(self, *names: str) -> list[Call]:
        """The calls of these names, in order, each as (name, *arguments)."""
        return [call for call in self.calls if call[0] in names]

    def order(self) -> list[str]:
        return [str(call[0]) for call in self.calls]

    # ── the model ──

    def _add(self, path: str, kind: str) -> None:
        parent = posixpath.dirname(path)
        while parent not in self.entries:
            self.entries[parent] = "dir"
            parent = posixpath.dirname(parent)
        self.entries[path] = kind

    def _new_mount(self, host_path: str, read_only: bool = False) -> None:
        self._devices += 1
        self.devices[host_path] = self._devices
        (self.read_only.add if read_only else self.read_only.discard)(host_path)

    def _mount_of(self, host_path: str) -> str:
        while host_path not in self.devices:
            host_path = posixpath.dirname(host_path)
        return host_path

    def _writable(self, path: str) -> None:
        """EROFS if the folder `path` is made in is on a read-only mount."""
        if self._mount_of(posixpath.dirname(self._host(path))) in self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    def _host(self, path: str) -> str:
        """Where `path`, as the process names it now, is in the model (the host's view)."""
        if not path.startswith("/"):
            return posixpath.normpath(posixpath.join(self.cwd, path))
        path = posixpath.normpath(path)
        if self.new_root is None:
            return path
        if self.old_root is not None and _under(path, self.old_root):
            return posixpath.normpath("/" + path[len(self.old_root) :])
        return self.new_root if path == "/" else self.new_root + path

    def _resolve(self, path: str) -> str:
        """`path` with every symlink in it followed, as the process names it."""
        path = posixpath.normpath(posixpath.join(self._view(self.cwd), path))
        for _ in range(40):
            parts = [p for p in path.split("/") if p]
            current = "/"
            for index, part in enumerate(parts):
                candidate = posixpath.join(current, part)
                if self.entries.get(self._host(candidate)) == "symlink":
                    target = self.links[self._host(candidate)]
                    base = target if target.startswith("/") else posixpath.join(current, target)
                    path = posixpath.normpath(posixpath.join(base, *parts[index + 1 :]))
                    break
                current = candidate
            else:
                return current
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)

    def _view(self, host_path: str) -> str:
        if self.new_root is None:
            return host_path
        if _under(host_path, self.new_root):
            return "/" + host_path[len(self.new_root) :].lstrip("/")
        return posixpath.normpath(f"{self.old_root}/{host_path}") if self.old_root else host_path

    def _kind(self, path: str, follow: bool) -> str | None:
        resolved = self._resolve(path) if follow else posixpath.join(self._resolve(posixpath.dirname(path) or "."), posixpath.basename(path))
        return self.entries.get(self._host(resolved))

    def _do(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        index = _PATH_ARGUMENT.get(name)
        path = args[index] if index is not None else None
        for failure in self._failures:
            call, where, error = failure
            if call == name and (where is None or where == path):
                self._failures.remove(failure)
                raise OSError(error, f"{name}: {os.strerror(error)}", path)

    def _fd(self) -> int:
        self._next_fd += 1
        return self._next_fd

    # ── namespaces, ids, capabilities, seccomp: recorded ──

    def unshare(self, flags: int) -> None:
        self._do("unshare", flags)

    def setns(self, fd: int, nstype: int) -> None:
        self._do("setns", fd, nstype)

    def setsid(self) -> None:
        self._do("setsid")

    def sethostname(self, name: str) -> None:
        self._do("sethostname", name)

    def loopback_up(self) -> None:
        self._do("loopback_up")

    def reset_signals(self) -> None:
        self._do("reset_signals")

    def prctl(self, option: int, arg2: int = 0) -> None:
        self._do("prctl", option, arg2)

    def setgroups(self, groups: list[int]) -> None:
        self._do("setgroups", list(groups))

    def setresgid(self, rgid: int, egid: int, sgid: int) -> None:
        self._do("setresgid", rgid, egid, sgid)

    def setresuid(self, ruid: int, euid: int, suid: int) -> None:
        self._do("setresuid", ruid, euid, suid)

    def setgid(self, gid: int) -> None:
        self._do("setgid", gid)

    def setuid(self, uid: int) -> None:
        self._do("setuid", uid)

    def drop_bounding_set(self, keep: set[int]) -> None:
        self._do("drop_bounding_set", set(keep))

    def keep_only_capabilities(self, keep: set[int]) -> None:
        self._do("keep_only_capabilities", set(keep))

    def install_seccomp(self, program: bytes) -> None:
        self._do("install_seccomp", program)

    def install_seccomp_listener(self, program: bytes) -> int:
        self._do("install_seccomp_listener", program)
        return self._fd()

    # ── descriptors ──

    def open(self, path: str, flags: int) -> int:
        self._do("open", path, flags)
        return self._fd()

    def close(self, fd: int) -> None:
        self._do("close", fd)

    def dup_above(self, fd: int, lowest: int) -> int:
        self._do("dup_above", fd, lowest)
        return self._fd()

    def dup2(self, fd: int, target: int) -> None:
        self._do("dup2", fd, target)

    def closerange(self, low: int, high: int) -> None:
        self._do("closerange", low, high)

    def write_file(self, path: str, text: str) -> None:
        self._do("write_file", path, text)

    def write(self, fd: int, data: bytes) -> int:
        self._do("write", fd, data)
        return len(data)

    # ── mounts ──

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
        self._do("mount", source, target, fstype, flags, data)
        if flags & abi.MS_REMOUNT and flags & abi.MS_RDONLY:
            self.read_only.add(self._mount_of(self._host(self._resolve(target))))
        if flags & abi.MS_REMOUNT or (flags & (abi.MS_PRIVATE | abi.MS_SLAVE) and not flags & abi.MS_BIND):
            return  # the same mount, other flags or propagation
        where = self._host(self._resolve(target))
        if fstype == "tmpfs":
            for path in [p for p in self.entries if _under(p, where) and p != where]:
                del self.entries[path]
        elif fstype == "overlay" and data:
            self._copy(self._host(dict(option.split("=", 1) for option in data.split(","))["lowerdir"]), where)
        elif flags & abi.MS_BIND and source is not None:
            self._copy(self._host(self._resolve(source)), where)
        self._new_mount(where, bool(flags & abi.MS_RDONLY))

    def _copy(self, source: str, target: str) -> None:
        """What a bind (or an overlay's lower layer) shows at `target`: the entries below `source`."""
        if source == target:
            return
        for path, kind in list(self.entries.items()):
            if _under(path, source) and path != source:
                self._add(target + path[len(source) :], kind)
                if kind == "symlink":
                    self.links[target + path[len(source) :]] = self.links[path]

    def umount2(self, target: str, flags: int = 0) -> None:
        self._do("umount2", target, flags)
        if self.old_root is not None and posixpath.normpath(target) == self.old_root:
            self.old_root = None  # the host's root is out of reach now
            return
        where = self._host(target)
        for path in [p for p in self.devices if _under(p, where) and p != "/"]:
            del self.devices[path]

    def mount_setattr(self, path: str, attr_set: int, attr_clr: int = 0, recursive: bool = True) -> None:
        self._do("mount_setattr", path, attr_set, attr_clr, recursive)
        where = self._mount_of(self._host(self._resolve(path)))
        for mount in [m for m in self.devices if m == where or (recursive and _under(m, where))]:
            if attr_set & abi.MOUNT_ATTR_RDONLY:
                self.read_only.add(mount)
            elif attr_clr & abi.MOUNT_ATTR_RDONLY:
                self.read_only.discard(mount)

    def clone_tree(self, path: str) -> int:
        """A new descriptor whose tree holds what is below `path` now (or a single file)."""
        self._do("clone_tree", path)
        where = self._host(posixpath.join(self._resolve(posixpath.dirname(path)), posixpath.basename(path)))
        fd = self._fd()
        entries = []
        for entry, kind in sorted(self.entries.items()):
            if entry != where and _under(entry, where):
                name = entry[len(where) :].lstrip("/")
                entries.append(f"{name} -> {self.links[entry]}" if kind == "symlink" else name + "/" if kind == "dir" else name)
        self.trees[fd] = entries
        if self.entries.get(where) != "dir":
            self.file_trees.add(fd)
        return fd

    def move_mount(self, fd: int, target: str) -> None:
        self._do("move_mount", fd, target)
        where = self._host(self._resolve(target))
        for entry in self.trees.get(fd, []):
            name, arrow, link = entry.partition(" -> ")
            path = posixpath.join(where, name.rstrip("/"))
            self._add(path, "symlink" if arrow else "dir" if name.endswith("/") else "file")
            if arrow:
                self.links[path] = link
        self._new_mount(where)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._do("pivot_root", new_root, put_old)
        root, old = self._host(new_root), self._host(put_old)
        self.new_root, self.old_root = root, "/" + posixpath.relpath(old, root)

    # ── the file tree ──

    def chdir(self, path: str) -> None:
        self._do("chdir", path)
        self.cwd = self._host(self._resolve(path))

    def lexists(self, path: str) -> bool:
        return self._kind(path, follow=False) is not None

    def isdir(self, path: str) -> bool:
        return self._kind(path, follow=True) == "dir"

    def islink(self, path: str) -> bool:
        return self._kind(path, follow=False) == "symlink"

    def realpath(self, path: str) -> str:
        return self._resolve(path)

    def device_of(self, path: str) -> int:
        where = self._host(self._resolve(path))
        if where not in self.entries:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        while where not in self.devices:
            where = posixpath.dirname(where)
        return self.devices[where]

    def fd_is_dir(self, fd: int) -> bool:
        return fd not in self.file_trees

    def list_dir(self, path: str) -> list[tuple[str, EntryKind]]:
        where = self._host(self._resolve(path))
        found: list[tuple[str, EntryKind]] = []
        for entry, kind in sorted(self.entries.items()):
            if entry != where and posixpath.dirname(entry) == where:
                found.append((posixpath.basename(entry), "symlink" if kind == "symlink" else "dir" if kind == "dir" else "other"))
        return found

    def readlink(self, path: str) -> str:
        return self.links[self._host(path)]

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self._do("mkdir", path, mode)
        where = self._host(path)
        self._writable(path)
        if where in self.entries:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        if self.entries.get(posixpath.dirname(where)) != "dir":
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self.entries[where] = "dir"

    def makedirs(self, path: str, mode: int = 0o777) -> None:
        self._do("makedirs", path, mode)
        existing = self._host(path)
        while existing not in self.entries:
            existing = posixpath.dirname(existing)
        if existing != self._host(path) and self._mount_of(existing) in self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        self._add(self._host(path), self.entries.get(self._host(path), "dir"))

    def create_file(self, path: str) -> None:
        self._do("create_file", path)
        where = self._host(path)
        self._writable(path)
        if self.entries.get(posixpath.dirname(where)) != "dir":
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self.entries.setdefault(where, "file")

    def symlink(self, target: str, path: str) -> None:
        self._do("symlink", target, path)
        self._writable(path)
        self._add(self._host(path), "symlink")
        self.links[self._host(path)] = target

    def rmdir(self, path: str) -> None:
        self._do("rmdir", path)
        self.entries.pop(self._host(path), None)

    # ── the end of a set-up ──

    def send(self, channel: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
        """Recorded, and the message really sent (without the descriptors, which are the fake's)."""
        self._do("send", data, tuple(fds))
        channel.send(data)

    def init_exec(self, argv: list[str], env: dict[str, str]) -> NoReturn:
        self._do("init_exec", list(argv), dict(env))
        raise ProcessEnded(None)

    def exit(self, code: int) -> NoReturn:
        self._do("exit", code)
        raise ProcessEnded(code)


if TYPE_CHECKING:  # the fake answers every call of the interface
    _: Kernel = RecordingKernel()
