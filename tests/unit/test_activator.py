"""sbd-activate (sandboxd/export/activator.c), the socket activator `export kubernetes` puts in pods:
built as the activator image builds it (gcc -static), it binds the sockets in order on fds 3, 4 ...,
sets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES as sd_listen_fds(3) checks them, and execs the
program; with --accept it forks the program per connection. Loopback and a temporary folder only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import sandboxd.export

SOURCE = Path(sandboxd.export.__file__).parent / "activator.c"
PROBE = """
import json, os, socket, stat, sys
names = os.environ["LISTEN_FDNAMES"].split(":")
found = []
for fd in range(3, 3 + int(os.environ["LISTEN_FDS"])):
    s = socket.socket(fileno=fd)
    found.append([s.family.name, s.type.name, str(s.getsockname()), s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)])
    s.detach()
print(json.dumps({"pid_ok": os.environ["LISTEN_PID"] == str(os.getpid()), "names": names, "found": found,
                  "mode": oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode))}))
"""


@pytest.fixture(scope="module")
def activator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("CI"):
            pytest.fail("gcc is missing (scripts/build-setup.sh installs it)")
        pytest.skip("no gcc")
    binary = tmp_path_factory.mktemp("activator") / "sbd-activate"
    subprocess.run([gcc, "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)], check=True, timeout=120)
    return binary


def test_the_sockets_arrive_in_order_with_their_names(activator: Path, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    argv = [str(activator), "--listen", "tcp:127.0.0.1:0", "--name", "http", "--backlog", "8", "--reuseport",
            "--listen", f"unix:{path}", "--name", "admin", "--mode", "0600", "--", sys.executable, "-c", PROBE, str(path)]  # fmt: skip
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert out["pid_ok"] is True
    assert out["names"] == ["http", "admin"]
    assert [f[:2] for f in out["found"]] == [["AF_INET", "SOCK_STREAM"], ["AF_UNIX", "SOCK_STREAM"]]
    assert out["found"][0][2].startswith("('127.0.0.1', ") and out["found"][1][2] == str(path)
    assert [f[3] for f in out["found"]] == [1, 1]  # listening
    assert out["mode"] == "0o600"


def test_a_datagram_socket_is_bound_and_not_listening(activator: Path, tmp_path: Path) -> None:
    argv = [str(activator), "--listen", "udp:127.0.0.1:0", "--name", "dns", "--", sys.executable, "-c", PROBE, str(tmp_path)]
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert [f[:2] for f in out["found"]] == [["AF_INET", "SOCK_DGRAM"]]


def test_accept_mode_runs_the_program_per_connection_on_fd_3(activator: Path, tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    program = ["/bin/sh", "-c", 'echo "fds=$LISTEN_FDS names=$LISTEN_FDNAMES" >&3']
    server = subprocess.Popen([str(activator), "--accept", "4", "--listen", f"unix:{path}", "--", *program])
    try:
        for _ in range(3):
            while not path.exists():
                assert server.poll() is None
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                assert client.makefile().readline() == "fds=1 names=connection\n"
    finally:
        server.kill()
        server.wait(timeout=30)


def test_install_copies_the_activator(activator: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy" / "sbd-activate"
    target.parent.mkdir()
    subprocess.run([str(activator), "--install", str(target)], check=True, timeout=60)
    assert target.read_bytes() == activator.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o555


def test_a_bad_address_is_named(activator: Path) -> None:
    result = subprocess.run([str(activator), "--listen", "tcp:nohost:80", "--", "/bin/true"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 111
    assert "sbd-activate: bad address tcp:nohost:80" in result.stderr
