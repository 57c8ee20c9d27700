"""specs/examples/real: Debian's redis, nginx and PostgreSQL, each in its own sandbox behind a
`proxy:` socket, and a client that uses all three, started at the same moment.

The example is copied to tmp_path so that its socket paths lie in the test's socket folder and its
volumes get names of their own (volumes are host-wide by name); the volumes are removed at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sandboxd.testing import Stack
from sandboxd.store.volumes import volumes_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "specs" / "examples" / "real"
SOCKETS = "/run/sbd-real"
VOLUMES = ("real-www", "real-pgdata")
CLIENT_LINE = re.compile(r"^(redis|nginx|postgres) ok value=(\S+) (\d+\.\d+)s$")


def _copy_example(destination: Path, socket_dir: Path, suffix: str) -> dict[str, str]:
    """The example in `destination`, its sockets in `socket_dir`; returns the volumes' new names."""
    shutil.copytree(EXAMPLE, destination)
    volumes = {name: f"{name}-{suffix}" for name in VOLUMES}
    for spec in destination.glob("*.yaml"):
        text = spec.read_text().replace(SOCKETS, str(socket_dir))
        for old, new in volumes.items():
            text = re.sub(rf"\b{re.escape(old)}\b", new, text)
        spec.write_text(text)
    return volumes


def _remove_volumes(names: list[str]) -> None:
    for name in names:
        subprocess.run([sys.executable, "-m", "sandboxd", "volume", "rm", name], check=False, capture_output=True)


def _wait_until_finished(stack: Stack, service: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = next(s["state"] for s in stack.status()["services"] if s["name"] == service)
        if state in ("exited", "failed", "stopped"):
            return str(state)
        time.sleep(0.1)
    raise AssertionError(f"{service} still runs after {timeout:g} s:\n{stack.logs(service)}")


def _redis(path: Path, *args: str) -> bytes | None:
    """One command in RESP, the protocol redis speaks; the reply (a status, or a bulk string)."""
    request = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(str(path))
        c.sendall(request)
        reply = c.makefile("rb")
        first = reply.readline()
        assert first and first[:1] in b"+$", f"redis answered {first!r}"
        if first.startswith(b"+"):
            return first[1:].rstrip(b"\r\n")
        size = int(first[1:])
        return None if size < 0 else reply.read(size + 2)[:-2]


def _http(path: Path, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request over a unix socket; (status, body)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(str(path))
        c.sendall(head.encode() + body)
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    header, _, content = answer.partition(b"\r\n\r\n")
    return int(header.split(b" ", 2)[1]), content


def _psql(folder: Path, sql: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    argv = ["psql", "-h", str(folder), "-p", "5432", "-U", "postgres", "-d", "postgres", "-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, env=env)
        # PostgreSQL listens a moment before it accepts sessions (after a restart, say), and a
        # session in between is refused: ask again until it accepts (the bound only ends a hang).
        if "starting up" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert result.returncode == 0, f"psql failed ({result.returncode}): {result.stderr}"
    return result.stdout.strip()


def test_real_servers_answer_their_client_and_the_host_only_through_sandboxd_sockets(tmp_path: Path, socket_dir: Path) -> None:
    if shutil.which("psql") is None:
        pytest.fail("psql is missing: apt-get install postgresql-client-15 (and redis-server, nginx, postgresql-15, python3-redis, python3-psycopg2)")
    suffix = uuid.uuid4().hex[:8]
    volumes = _copy_example(tmp_path / "real", socket_dir, suffix)
    try:
        with Stack(tmp_path / "real") as stack:
            assert _wait_until_finished(stack, "client", timeout=120) == "exited", stack.logs("client")
            lines = stack.logs("client").splitlines()
            trips = {m[1]: (m[2], float(m[3])) for line in lines if (m := CLIENT_LINE.match(line))}
            assert set(trips) == {"redis", "nginx", "postgres"}, lines
            value = trips["redis"][0]
            assert value.startswith("sbd-real-")
            assert {found for found, _ in trips.values()} == {value}, lines
            assert any(line.startswith(f"all round trips ok value={value} ") for line in lines), lines
            # PostgreSQL's first start runs initdb; the other two were answered meanwhile.
            assert trips["redis"][1] < trips["postgres"][1] and trips["nginx"][1] < trips["postgres"][1], lines

            forwarded = {s["socket"]: s.get("proxy") for svc in stack.status()["services"] for s in svc["sockets"]}
            assert forwarded == {"redis": "tcp:127.0.0.1:6379", "nginx": "tcp:127.0.0.1:8080", "postgres": "tcp:127.0.0.1:5432"}

            # From the test process itself, through the same unix sockets.
            mine = f"from-test-{suffix}"
            assert _redis(socket_dir / "redis.sock", "GET", "sbd-real") == value.encode()
            assert _redis(socket_dir / "redis.sock", "SET", "from-test", mine) == b"OK"
            assert _redis(socket_dir / "redis.sock", "GET", "from-test") == mine.encode()

            assert _http(socket_dir / "nginx.sock", "GET", f"/client/{value}.txt") == (200, value.encode())
            assert _http(socket_dir / "nginx.sock", "PUT", f"/test/{mine}.txt", mine.encode())[0] in (201, 204)
            assert _http(socket_dir / "nginx.sock", "GET", f"/test/{mine}.txt") == (200, mine.encode())

            assert _psql(socket_dir / "pg", f"SELECT count(*) FROM round_trips WHERE value = '{value}'") == "1"
            assert _psql(socket_dir / "pg", f"INSERT INTO round_trips (value) VALUES ('{mine}') RETURNING value") == mine

            # A new sandbox for PostgreSQL on the same volume: no initdb, the rows are still there.
            stack.restart("postgres")
            assert _psql(socket_dir / "pg", "SELECT value FROM round_trips ORDER BY id") == f"{value}\n{mine}"
            assert "creating directory /var/lib/postgresql/data" in stack.logs("postgres")
            assert stack.logs("postgres").count("creating directory") == 1
    finally:
        _remove_volumes(list(volumes.values()))
    left = [name for name in volumes.values() if (volumes_dir() / name).exists()]
    assert not left, f"volumes not removed: {left}"
