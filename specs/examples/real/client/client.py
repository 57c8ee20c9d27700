"""Write a unique value through redis, nginx and PostgreSQL, read it back, and say how long each took.

It starts at the same moment as the servers and never waits for them: sandboxd bound their unix
sockets before any of them started, so a connection made early waits in the socket's queue and is
answered once its server listens. The three round trips run in threads of their own, so redis and
nginx answer within milliseconds while PostgreSQL still runs initdb on its first start.

Exits 0 only if all three values came back unchanged.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

STARTED = time.monotonic()  # before the imports below, so the times include them
SOCKETS = os.environ.get("SOCKET_DIR", "/run/sbd-real")
TIMEOUT = 60.0  # seconds; PostgreSQL's first start (initdb) takes a few

import psycopg2  # Debian's python3-psycopg2 and python3-redis
import redis


def redis_round_trip(value: str) -> str:
    client = redis.Redis(unix_socket_path=f"{SOCKETS}/redis.sock", socket_timeout=TIMEOUT)
    client.set("sbd-real", value)
    found: bytes = client.get("sbd-real")
    return found.decode()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def nginx_round_trip(value: str) -> str:
    conn = UnixHTTPConnection(f"{SOCKETS}/nginx.sock", TIMEOUT)
    path = f"/client/{value}.txt"
    conn.request("PUT", path, body=value.encode(), headers={"Content-Type": "text/plain"})
    put = conn.getresponse()
    put.read()
    if put.status not in (201, 204):
        raise RuntimeError(f"PUT {path}: {put.status} {put.reason}")
    conn.request("GET", path)
    got = conn.getresponse()
    body = got.read().decode()
    if got.status != 200:
        raise RuntimeError(f"GET {path}: {got.status} {got.reason}")
    return body


def postgres_round_trip(value: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            conn = psycopg2.connect(host=f"{SOCKETS}/pg", port=5432, user="postgres", dbname="postgres", connect_timeout=int(TIMEOUT))
            break
        except psycopg2.OperationalError as error:
            # PostgreSQL listens a few milliseconds before it accepts sessions, and refuses the
            # ones that arrive in between; only that is worth another try.
            if "starting up" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS round_trips (id serial PRIMARY KEY, value text NOT NULL, at timestamptz DEFAULT now())")
        cur.execute("INSERT INTO round_trips (value) VALUES (%s) RETURNING id", (value,))
        (row_id,) = cur.fetchone()
        cur.execute("SELECT value FROM round_trips WHERE id = %s", (row_id,))
        (found,) = cur.fetchone()
    conn.close()
    return str(found)


def main() -> int:
    value = f"sbd-real-{uuid.uuid4().hex[:12]}"
    trips: dict[str, Callable[[str], str]] = {"redis": redis_round_trip, "nginx": nginx_round_trip, "postgres": postgres_round_trip}
    passed: dict[str, bool] = {}
    lock = threading.Lock()

    def run(name: str, trip: Callable[[str], str]) -> None:
        try:
            got = trip(value)
            ok = got == value
            line = f"{name} {'ok' if ok else 'MISMATCH'} value={got} {time.monotonic() - STARTED:.3f}s"
        except Exception as error:  # noqa: BLE001  one line per server, whatever went wrong
            ok = False
            line = f"{name} FAILED {type(error).__name__}: {str(error).strip()} {time.monotonic() - STARTED:.3f}s"
        with lock:
            passed[name] = ok
            print(line, flush=True)

    threads = [threading.Thread(target=run, args=item) for item in trips.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = all(passed.get(name, False) for name in trips)
    print(f"{'all round trips ok' if everything else 'some round trips failed'} value={value} {time.monotonic() - STARTED:.3f}s", flush=True)
    return 0 if everything else 1


if __name__ == "__main__":
    sys.exit(main())
