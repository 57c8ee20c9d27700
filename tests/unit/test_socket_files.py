"""A unix socket's file, made by sandboxd as root in a folder another user may write: what the
chmod to the unit's mode changes is that socket file, never what it was swapped for."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from sandboxd.errors import HostError
from sandboxd.host.sockets import bind_address
from sandboxd.host.state import StateRecord
from sandboxd.spec.model import Socket
from sandboxd.spec.values import parse_address


def unit(path: Path) -> Socket:
    address = parse_address(f"unix:{path}")
    return Socket("web", Path("web.yaml"), 1, "web", (address,), "web", 16, 0o666, False, "host", False, 64, None, None)


def test_a_socket_file_swapped_for_a_symlink_before_its_chmod_leaves_the_symlinks_target_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder's owner swaps the new socket file for a symlink to a file of root's between
    bind() and the chmod (inotify tells it when): a chmod that follows the link makes that file
    0666 (/etc/shadow, say). The swap is made by the bind itself here, so the race always wins."""
    secret = tmp_path / "shadow"
    secret.write_text("root:x:\n")
    secret.chmod(0o600)
    path = tmp_path / "shared" / "web.sock"
    path.parent.mkdir()

    class Swapped(socket.socket):
        def bind(self, address: object) -> None:
            super().bind(address)  # type: ignore[arg-type]
            os.unlink(path)
            os.symlink(secret, path)

    monkeypatch.setattr(socket, "socket", Swapped)
    record = StateRecord(tmp_path)
    with pytest.raises(HostError):
        bind_address(unit(path), unit(path).listen[0], record)
    assert secret.stat().st_mode & 0o777 == 0o600


def test_a_socket_file_gets_the_units_mode(tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    sock = bind_address(dataclasses.replace(unit(path), mode=0o640), unit(path).listen[0], StateRecord(tmp_path))
    try:
        assert path.lstat().st_mode & 0o777 == 0o640
    finally:
        sock.close()
