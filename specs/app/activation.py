"""sd_listen_fds(3) in a few lines: the sockets sandboxd passed in, by name, checked as libsystemd does."""

import os
import socket

SD_LISTEN_FDS_START = 3


def listen_sockets() -> dict[str, socket.socket]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        raise SystemExit(f"LISTEN_PID={os.environ.get('LISTEN_PID')} is not my pid {os.getpid()}: no sockets for me")
    count = int(os.environ["LISTEN_FDS"])
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # our own children must not take them for theirs
    return {names[i]: socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)}
