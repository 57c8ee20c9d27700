"""The sd_notify protocol, as sandboxd receives it (see sd_notify(3) and shared/PROTOCOLS.md).

Each service with `ready: notify` (or a `watchdog`) gets a unix datagram socket of its own, bound
by sandboxd in its runtime directory and mounted into the sandbox at NOTIFY_SOCKET. One datagram is
one message: newline-separated KEY=VALUE lines, possibly with descriptors (SCM_RIGHTS). The socket
has SO_PASSCRED, so every message carries its sender's pid, translated by the kernel into
sandboxd's pid namespace; `notify_access: main` accepts only the service's main process, `all`
any process in its cgroup.

This module only reads and parses; what a message means for the service's life is the
supervisor's business.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAX_DATAGRAM = 4096
MAX_FDS = 768
_CREDS = struct.Struct("iII")


@dataclass
class Message:
    pid: int  # the sender's pid in sandboxd's namespace, 0 if the kernel gave none
    fields: dict[str, str]
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def parse(data: bytes) -> dict[str, str]:
    """KEY=VALUE lines; lines without '=' are ignored, as libsystemd's consumers do."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # a service that drops privileges must still be able to notify

    @classmethod
    def adopt(cls, path: Path, sock: socket.socket) -> NotifySocket:
        """A notify socket bound already (an upgrade carried it over: resume.py)."""
        notify = cls.__new__(cls)
        notify.path, notify.sock = path, sock
        return notify

    def receive(self) -> Message | None:
        """One message, or None when none is waiting."""
        fds = array.array("i")
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                MAX_DATAGRAM, socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDS.unpack(payload[: _CREDS.size])[0]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return Message(pid, parse(data), list(fds))

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def main_pid_of(init_pid: int) -> int:
    """The service's pid in sandboxd's namespace: the first child of the sandbox's init."""
    try:
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
    except OSError:
        return 0
    return int(children[0]) if children else 0


def host_pid(cgroup_pids: list[int], pid_in_sandbox: int) -> int:
    """Translate a pid as the sandbox sees it (MAINPID=) into sandboxd's namespace."""
    for pid in cgroup_pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == pid_in_sandbox:
                    return pid
        except (OSError, ValueError):
            continue
    return 0
