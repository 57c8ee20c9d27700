"""Bind every listening socket before any service starts.

The sockets stay open in the supervisor for the whole life of the stack: a service that crashes
and is restarted gets the very same descriptors, and clients that connect meanwhile wait in the
kernel's queue. Options follow systemd's socket units: SO_REUSEADDR on inet sockets, SO_REUSEPORT
on request, the backlog given (the kernel caps it at net.core.somaxconn), unix socket files
created with the unit's mode after removing a stale socket file at the same path.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from sandboxd.errors import HostError
from sandboxd.spec.model import Address, Socket, socket_namespace
from sandboxd.host.state import StateRecord


@dataclass
class BoundSocket:
    unit: str
    index: int
    address: Address
    sock: socket.socket

    def real_address(self) -> str:
        """The address as bound, with port 0 resolved to the port the kernel chose."""
        a = self.address
        if a.is_inet:
            host, port = self.sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            return f"{a.family}:{shown}:{port}"
        return str(a)


def _make_parent(path: Path, record: StateRecord) -> None:
    missing = []
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        record.add("dirs", str(directory))


def _chmod_socket_file(path: Path, mode: int) -> None:
    """chmod the socket file just bound at `path`, never what a symlink there leads to: whoever
    may write its folder can swap the new file for a link to /etc/shadow before this runs.
    Anything but a socket there now is refused (EEXIST)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise FileExistsError(errno.EEXIST, "the socket file was replaced by something else", str(path))
        os.chmod(f"/proc/self/fd/{fd}", mode)  # the inode the descriptor holds (O_PATH: no other way)
    finally:
        os.close(fd)


def bind_address(unit: Socket, address: Address, record: StateRecord) -> socket.socket:
    family = socket.AF_UNIX
    if address.is_inet:
        assert address.host is not None
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, address.socktype)
    try:
        if address.is_inet:
            if address.socktype == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if unit.reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, address.port))
        elif address.is_abstract:
            assert address.path is not None
            sock.bind("\0" + address.path[1:])
        else:
            assert address.path is not None
            path = Path(address.path)
            _make_parent(path, record)
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except FileNotFoundError:
                pass
            sock.bind(str(path))  # recorded already (bind_sockets)
            _chmod_socket_file(path, unit.mode)
        if address.socktype != socket.SOCK_DGRAM:
            sock.listen(unit.backlog)
    except OSError as e:
        sock.close()
        hint = "choose another address, or stop what holds it"
        if isinstance(e, PermissionError):
            hint = "run sandboxd as root"
        raise HostError(f"socket {unit.name}: cannot bind {address}: {e.strerror}", hint) from None
    return sock


Enter = Callable[[str | None], AbstractContextManager[None]]


def bind_sockets(units: tuple[Socket, ...], record: StateRecord, inside: Enter = lambda _: nullcontext()) -> dict[tuple[str, int], BoundSocket]:
    """Bind all sockets of a stack; on any failure, close what was bound and raise.

    `inside(service)` enters that service's network namespace for the binding of a socket with
    `netns:` (a socket keeps the namespace it was created in, wherever it is used later).
    """
    bound: dict[tuple[str, int], BoundSocket] = {}
    files_before, dirs_before = len(record.files), len(record.dirs)
    # Every socket file is recorded before it is made, in one rewrite of the state file rather
    # than one per socket: a run killed in between leaves names a later run finds no socket at.
    record.add("files", *(str(Path(a.path)) for unit in units for a in unit.listen if a.path and not a.is_abstract))
    try:
        for unit in units:
            for index, address in enumerate(unit.listen):
                with inside(socket_namespace(unit)):
                    sock = bind_address(unit, address, record)
                bound[(unit.name, index)] = BoundSocket(unit.name, index, address, sock)
    except BaseException:
        # Only what this call made: a reload binds into a stack whose other sockets stay.
        for b in bound.values():
            b.sock.close()
        made = [str(Path(b.address.path)) for b in bound.values() if b.address.path and not b.address.is_abstract]
        _remove_paths(made, record.dirs[dirs_before:])
        del record.files[files_before:], record.dirs[dirs_before:]
        record.save()
        raise
    return bound


def close_sockets(bound: dict[tuple[str, int], BoundSocket], record: StateRecord) -> None:
    """Close every socket of the stack and remove the files and directories made for them."""
    for b in bound.values():
        b.sock.close()
    bound.clear()
    _remove_paths(record.files, record.dirs)


def close_socket(b: BoundSocket) -> None:
    """Close one socket and remove its file (a reload replaced it); its directories stay until down."""
    b.sock.close()
    if b.address.path and not b.address.is_abstract:
        try:
            os.unlink(b.address.path)
        except FileNotFoundError:
            pass


def _remove_paths(files: list[str], dirs: list[str]) -> None:
    for path in files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    for directory in reversed(dirs):
        try:
            os.rmdir(directory)
        except OSError:
            pass
