"""Host shortages survived without root: a full disk under the logs and the state file, clients of
the control socket that hang, services that print without end."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from sandboxd.daemon import control, logs, output
from sandboxd.daemon.console import Console
from sandboxd.daemon.control import ControlServer
from sandboxd.daemon.logs import LogFiles
from sandboxd.daemon.output import Output
from sandboxd.host.state import StateRecord


class FullDisk:
    """os.write as on a file system that is full while `full` is set (or takes only `room` bytes)."""

    def __init__(self) -> None:
        self.full = False
        self.room: int | None = None
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.room is not None:
            self.full = True
            return self.real(fd, bytes(data)[: self.room])
        return self.real(fd, data)


def texts(directory: Path, name: str) -> list[str]:
    return [text for _stamp, text in logs.read(directory, name)]


def test_lines_that_find_no_room_are_dropped_and_counted_in_one_notice_once_writing_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FullDisk()
    monkeypatch.setattr(logs.os, "write", disk)
    files = LogFiles(tmp_path)
    files.write("web", "before")
    disk.full = True
    for index in range(5):
        files.write("web", f"lost {index}")
    files.write("db", "lost too")
    disk.full = False
    files.write("web", "after")
    files.write("web", "and on")
    assert texts(tmp_path, "web") == ["before", "sandboxd: 5 lines dropped here (No space left on device)", "after", "and on"]
    files.write("db", "back")
    assert texts(tmp_path, "db") == ["sandboxd: 1 line dropped here (No space left on device)", "back"]
    files.close()


def test_a_line_written_in_part_is_taken_back_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FullDisk()
    monkeypatch.setattr(logs.os, "write", disk)
    files = LogFiles(tmp_path)
    files.write("web", "first")
    disk.room = 7
    files.write("web", "this line does not fit")
    disk.full, disk.room = False, None
    files.write("web", "last")
    assert (tmp_path / "web.log").read_bytes().count(b"\n") == 3
    assert texts(tmp_path, "web") == ["first", "sandboxd: 1 line dropped here (No space left on device)", "last"]
    files.close()


def test_a_state_record_that_finds_no_room_leaves_the_last_one_whole_and_is_written_again_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = StateRecord(tmp_path, pid=42, stop_timeout=3.0)
    record.save()
    real_open = open

    def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write("{\"pid\": 42, \"cgr")  # a part, as a full disk leaves it
            f.flush()
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr("builtins.open", full_open)
    record.add("cgroups", "/sys/fs/cgroup/sandboxd/x")
    monkeypatch.undo()
    assert record.unsaved == "No space left on device"
    assert json.loads((tmp_path / "state.json").read_text())["cgroups"] == []
    assert not (tmp_path / "state.json.tmp").exists()
    record.save()
    assert record.unsaved == ""
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["cgroups"] == ["/sys/fs/cgroup/sandboxd/x"] and saved["stop_timeout"] == 3.0


def test_output_held_for_the_terminal_before_the_summary_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "MAX_HELD", 1000)
    out, err = io.StringIO(), io.StringIO()
    shown = Output(Console(["svc"], out=out, err=err))
    for index in range(500):
        shown._emit("svc", f"line {index:04d}".encode())
    assert shown.held_bytes <= 1000
    shown.release()
    lines = out.getvalue().splitlines()
    kept = 1000 // len(b"line 0000")  # the newest lines that fit
    assert lines == [f"svc | line {index:04d}" for index in range(500 - kept, 500)]
    assert f"{500 - kept} earlier lines of the services' output are not shown here" in err.getvalue()


class Verbs:
    instance = "test"

    def knows(self, name: str) -> bool:
        return True

    def status(self, names: list[str]) -> Any:
        return {"stack": "test", "services": []}


def test_hung_control_clients_hold_only_themselves_and_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "IDLE_FIRST", 0.05)
    monkeypatch.setattr(control, "WHOLE_REQUEST", 0.05)
    path = tmp_path / "control.sock"

    def client() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return sock

    async def ask(sock: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b'{"cmd": "status"}\n')
        return await loop.sock_recv(sock, 65536)

    async def scenario() -> None:
        server = ControlServer(Verbs(), path)  # type: ignore[arg-type]
        await server.start()
        silent, half = client(), client()
        half.sendall(b'{"cmd": "sta')
        other = client()
        other.setblocking(False)
        answer = await ask(other)
        assert json.loads(answer)["ok"] is True  # while the two others hang
        loop = asyncio.get_running_loop()
        for hung in (silent, half):
            hung.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(hung, 100), 10) == b""  # closed by the stack
        assert json.loads(await ask(other))["ok"] is True  # after its first request, idle is fine
        for sock in (silent, half, other):
            sock.close()
        await server.close()

    asyncio.run(scenario())
