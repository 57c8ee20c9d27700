"""The state file of a run: what a later run removes of a dead one."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from sandboxd.host.state import StateRecord, remove_recorded


def test_a_dead_runs_socket_files_are_removed_and_what_is_no_socket_is_left(tmp_path: Path) -> None:
    runtime, files = tmp_path / "run/stack", tmp_path / "files"
    runtime.mkdir(parents=True)
    files.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(files / "a.sock"))
    sock.close()
    (files / "b.sock").write_text("someone's")  # recorded before a bind that never came, then made by another
    record = StateRecord(runtime, pid=2**22 + 1)
    record.files = [str(files / "a.sock"), str(files / "b.sock"), str(files / "never.sock")]
    record.save()
    assert json.loads((runtime / "state.json").read_text())["files"] == record.files
    remove_recorded(runtime)
    assert sorted(os.listdir(files)) == ["b.sock"] and not runtime.exists()
