"""Benchmark parts for images and the proxy, run by scripts/bench.py (section 8 and 9 there).

8. Proxy overhead. One nginx (Debian's) runs in a sandbox with `network: host` and listens on two
   addresses it binds itself, 127.0.0.1:P and 127.0.0.1:H. Two socket units of the same service:
   one on 127.0.0.1:F with `proxy: tcp:127.0.0.1:P` and `handoff: false` (forwarding through
   systemd-socket-proxyd), one on 127.0.0.1:S with `proxy: tcp:127.0.0.1:H` (the handoff: nginx's
   bind of H is answered with sandboxd's socket S, so nginx accepts on S itself). So the same
   server, in the same run, is reached directly (P), through sandboxd's socket by handoff (S), and
   through the forwarding proxy (F). nginx answers every GET with a 3-byte body (`return 200
   "ok\n"`), one worker, no access log. Load: ApacheBench (`ab`, Debian's apache2-utils, a C
   client, so the client's own cost is small), four shapes: one client with keep-alive (latency
   per request), 8 clients with keep-alive (throughput), and both again with a new connection per
   request. Each shape runs direct, handoff, forwarded, direct, ... (ROUNDS times each, after one
   unrecorded warm-up), each run a fixed number of requests; the medians of requests/s and of
   ab's mean time per request are reported; overhead = 1 - (requests/s) / (direct requests/s).
9. Images. Build: `sandboxd image build --force images/busybox` timed as a whole process
   (fetching the package with apt-get download included), into a store of its own. Mount: a
   1-service stack `sh -c 'exec sleep 1000'` is brought up and stopped repeatedly, on the host's
   root, on the busybox image read-only and with a writable layer (readonly_root: false); the
   median of sandboxd's own "median launch" (request to exec, which includes the overlay mount)
   is reported per kind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SANDBOXD = Path(sys.executable).parent / "sandboxd"
SUMMARY = re.compile(r"services? launched in ([0-9.]+) ms(?:, median launch ([0-9.]+) ms)?")
AB_RATE = re.compile(r"Requests per second:\s+([0-9.]+)")
AB_TIME = re.compile(r"Time per request:\s+([0-9.]+) \[ms\] \(mean\)")
AB_FAILED = re.compile(r"Failed requests:\s+([0-9]+)")
AB_NON2XX = re.compile(r"Non-2xx responses:\s+([0-9]+)")

NGINX_CONF = """
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{handoff};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1", **(env or {})}, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _wait_text(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if match := re.search(pattern, text):
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"sandboxd exited ({proc.returncode}):\n{text[-2000:]}")
        time.sleep(0.01)
    raise TimeoutError(f"no {pattern!r} within {timeout:g} s:\n{log.read_text(errors='replace')[-2000:]}")


def _ab(port: int, clients: int, requests: int, keepalive: bool) -> tuple[float, float, str]:
    argv = ["ab", "-q", "-c", str(clients), "-n", str(requests), *(["-k"] if keepalive else []), f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout
    rate, per = AB_RATE.search(out), AB_TIME.search(out)
    failed, non2xx = AB_FAILED.search(out), AB_NON2XX.search(out)
    trouble = ""
    if failed and int(failed[1]):
        trouble += f"{failed[1]} failed requests; "
    if non2xx and int(non2xx[1]):
        trouble += f"{non2xx[1]} non-2xx; "
    if not rate or not per:
        return 0.0, 0.0, f"ab printed no figures: {out[-300:]}"
    return float(rate[1]), float(per[1]), trouble


SHAPES = [("1 client, keep-alive", 1, True), ("8 clients, keep-alive", 8, True), ("1 client, new connection each", 1, False), ("8 clients, new connection each", 8, False)]


def proxy_section(root: Path, quick: bool, problem: object) -> list[str]:
    report = problem if callable(problem) else print
    if shutil.which("ab") is None or shutil.which("nginx") is None:
        return ["proxy overhead: skipped (needs ab from apache2-utils and nginx; scripts/bench installs them)"]
    rounds = 2 if quick else 5
    requests = {True: 5000 if quick else 20000, False: 1000 if quick else 4000}
    folder = root / "proxy-stack"
    folder.mkdir()
    direct, inner, forwarded, handed = _free_port(), _free_port(), _free_port(), _free_port()
    (folder / "nginx.conf").write_text(NGINX_CONF.format(port=direct, handoff=inner))
    (folder / "web.yaml").write_text(
        "kind: service\n"
        "network: host\n"
        "command: [nginx, -e, stderr, -c, /sbd-bench/nginx.conf]\n"
        "mounts: [{source: ., target: /sbd-bench}]\n"
        "user: www-data\n"
        "---\n"
        "kind: socket\n"
        "name: forwarded\n"
        "service: web\n"
        f"listen: tcp:127.0.0.1:{forwarded}\n"
        f"proxy: tcp:127.0.0.1:{direct}\n"
        "handoff: false\n"
        "max_connections: 256\n"
        "---\n"
        "kind: socket\n"
        "name: handoff\n"
        "service: web\n"
        f"listen: tcp:127.0.0.1:{handed}\n"
        f"proxy: tcp:127.0.0.1:{inner}\n"
    )
    log = root / "proxy-sandboxd.log"
    proc = _spawn([str(SANDBOXD), "up", str(folder), "-p", "sbdbench-proxy"], log)
    rows = []
    try:
        _wait_text(log, "is forwarded to it", proc)
        _wait_text(log, "instead \\(no proxy\\)", proc)
        ports = {"direct": direct, "handoff": handed, "forwarded": forwarded}
        for port in ports.values():  # warm-up, not counted
            _ab(port, 8, 2000, True)
        for name, clients, keepalive in SHAPES:
            found: dict[str, list[tuple[float, float]]] = {kind: [] for kind in ports}
            for _ in range(rounds):
                for kind, port in ports.items():
                    rate, per, trouble = _ab(port, clients, requests[keepalive], keepalive)
                    if trouble:
                        report(f"proxy bench, {name}, {kind}: {trouble}")
                    found[kind].append((rate, per))
            rows.append((name, found))
    finally:
        code = _stop(proc)
        if code != 0:
            report(f"proxy bench: sandboxd exited {code}: {log.read_text(errors='replace')[-500:]}")
    lines = [
        f"proxy overhead: nginx in a sandbox; direct on 127.0.0.1, through sandboxd's socket by handoff, and forwarded by the proxy "
        f"(systemd-socket-proxyd); ab, median of {rounds} runs each, {requests[True]} requests per keep-alive run, {requests[False]} otherwise",
        f"  {'load':<32}{'direct':>9}{'handoff':>9}{'overhead':>9}{'forwarded':>11}{'overhead':>9}   target   (requests/s)",
    ]
    latency = []
    for name, found in rows:
        rate = {kind: statistics.median(r for r, _ in runs) for kind, runs in found.items()}
        per = {kind: statistics.median(p for _, p in runs) for kind, runs in found.items()}

        def overhead(kind: str) -> str:
            return f"{(1 - rate[kind] / rate['direct']) * 100:.1f}%" if rate["direct"] else "—"

        lines.append(
            f"  {name:<32}{rate['direct']:>9.0f}{rate['handoff']:>9.0f}{overhead('handoff'):>9}{rate['forwarded']:>11.0f}{overhead('forwarded'):>9}   < 15 %"
        )
        latency.append(f"  {name:<32}{per['direct']:>9.3f}{per['handoff']:>9.3f}{'':>9}{per['forwarded']:>11.3f}")
    lines += ["  ab's mean time per request (ms), same runs:", *latency]
    lines.append("  (overhead = 1 - requests/s over direct requests/s; handoff: nginx accepts on sandboxd's socket itself)")
    return lines


def _launch_median(folder: Path, name: str, runs: int, root: Path, env: dict[str, str]) -> list[float]:
    found = []
    for index in range(runs + 1):
        log = root / f"{name}-{index}.log"
        proc = _spawn([str(SANDBOXD), "up", str(folder), "-p", name], log, env)
        try:
            match = _wait_text(log, SUMMARY.pattern, proc)
        finally:
            _stop(proc)
        if index and match[2]:
            found.append(float(match[2]))
    return found


def image_section(root: Path, quick: bool, problem: object) -> list[str]:
    report = problem if callable(problem) else print
    state = root / "state"
    env = {"SANDBOXD_STATE_DIR": str(state)}
    builds = []
    for _ in range(1 if quick else 3):
        started = time.monotonic()
        result = subprocess.run([str(SANDBOXD), "image", "build", "--force", str(REPO / "images" / "busybox")], capture_output=True, text=True, env={**os.environ, **env})
        builds.append(time.monotonic() - started)
        if result.returncode != 0:
            report(f"image build failed: {result.stderr[-500:]}")
            return ["images: the busybox build failed; see problems"]
    runs = 5 if quick else 15
    kinds = {
        "host root (read-only, in place)": "",
        "busybox image, read-only": "image: busybox\n",
        "busybox image, writable layer": "image: busybox\nreadonly_root: false\n",
    }
    lines = [
        f"images: build of images/busybox (apt-get download included), median of {len(builds)}: {statistics.median(builds):.2f} s",
        f"  launch (request to exec, mounts included), median of {runs} one-service stacks:",
    ]
    for index, (kind, keys) in enumerate(kinds.items()):
        folder = root / f"image-stack-{index}"
        folder.mkdir()
        (folder / "one.yaml").write_text(f"kind: service\n{keys}command: [sh, -c, 'exec sleep 1000']\n")
        found = _launch_median(folder, f"sbdbench-img{index}", runs, root, env)
        figure = f"{statistics.median(found):.1f} ms" if found else "—"
        lines.append(f"  {kind:<34}{figure:>10}")
    return lines
