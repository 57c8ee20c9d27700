"""`listen:` on a service, a proxy with a health check on the address the program binds, and the
test API's wait_for_accept and listen overrides, with real stacks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from conftest import HANG, wait_until, write

from sandboxd.cli.client import request

# Answers every connection with its name and the LISTEN_* variables it was started with.
NAMED = """
import os, socket
s = socket.socket(fileno=3)
print("up", os.environ["LISTEN_FDS"], os.environ["LISTEN_FDNAMES"], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(f"{os.environ['NAME']} {os.environ['LISTEN_FDNAMES']}\\n".encode())
    c.close()
"""


def _answer(address: tuple[str, int] | str) -> str:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as client:
        client.settimeout(HANG)
        client.connect(address)
        return client.makefile().readline().strip()


def test_a_one_file_service_with_listen_is_reached_on_the_socket_it_implies(sandboxd_stack, spec_dir: Path) -> None:
    write(spec_dir, "named.py", NAMED)
    write(spec_dir, "web.yaml", "kind: service\ncommand: [python3, /t/named.py]\nenvironment: {NAME: web}\nmounts: [{source: ., target: /t}]\nlisten: tcp:127.0.0.1:0\n")
    stack = sandboxd_stack(spec_dir)
    assert stack.wait_for_log("web", "^up") == "up 1 web"
    assert _answer(stack.address("web")) == "web web"
    ps = json.loads(subprocess.run([sys.executable, "-m", "sandboxd", "ps", "--json", "-p", stack.name], capture_output=True, text=True, check=True).stdout)
    (sock,) = ps["services"][0]["sockets"]
    host, port = stack.address("web")
    assert sock == {"socket": "web", "address": f"tcp:{host}:{port}", "fdname": "web", "netns": "host"}
    config = json.loads(subprocess.run([sys.executable, "-m", "sandboxd", "config", str(spec_dir)], capture_output=True, text=True, check=True).stdout)
    assert [(s["name"], s["service"], s["implied"]) for s in config["stack"]["sockets"]] == [("web", "web", True)]


def test_a_socket_unit_named_as_a_service_with_listen_is_refused_with_exit_2(spec_dir: Path) -> None:
    write(spec_dir, "web.yaml", "kind: service\ncommand: [sleep, '60']\nlisten: tcp:127.0.0.1:0\n")
    write(spec_dir, "web-socket.yaml", "kind: socket\nname: web\nlisten: tcp:127.0.0.1:0\n")
    result = subprocess.run([sys.executable, "-m", "sandboxd", "up", "-d", str(spec_dir)], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{spec_dir}/web-socket.yaml:2: name: socket 'web' is also the socket that service 'web' has through its listen: (web.yaml:3)" in result.stderr


# A redis-like server: it binds its own address (all addresses, port 6379) and knows nothing of
# socket activation; it answers PING with PONG.
REDISH = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 6379))
server.listen(16)
print("redish listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        if conn.recv(64).startswith(b"PING"):
            conn.sendall(b"+PONG\\r\\n")
"""
PING = """
import socket, sys
with socket.create_connection((sys.argv[1], 6379), timeout=5) as c:
    c.sendall(b"PING\\r\\n")
    assert c.recv(16) == b"+PONG\\r\\n"
print("pong", flush=True)
"""


def test_proxy_with_a_health_check_on_the_address_the_program_binds_hands_the_socket_over(run_stack, spec_dir: Path) -> None:
    """The trap of a redis with a health check: sandboxd's socket holds 0.0.0.0:6379 in its
    namespace, so the program's own bind() only works if it is given that socket; it is, even with
    the readiness check, and the log says that alone."""
    write(spec_dir, "redish.py", REDISH)
    write(spec_dir, "ping.py", PING)
    write(
        spec_dir,
        "stack.yaml",
        f"""
        kind: network
        name: back
        ---
        kind: service
        name: redis
        network: [back]
        command: [python3, /t/redish.py]
        mounts: [{{source: ., target: /t}}]
        ready: {{exec: [python3, /t/ping.py, 127.0.0.1], interval: 100ms}}
        ---
        kind: socket
        name: redis
        netns: service
        listen: tcp:0.0.0.0:6379
        proxy: tcp:0.0.0.0:6379
        ---
        kind: service
        name: client
        network: [back]
        uses: [redis]
        after: [{{service: redis, condition: ready}}]
        restart: "no"
        mounts: [{{source: ., target: /t}}]
        command: [python3, /t/ping.py, redis]
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("client | pong", "out")
    stack.wait_for("redis: running -> ready", "err")
    err = stack.err
    assert "(given to the program when it binds tcp:0.0.0.0:6379)" in err
    assert err.count("redis: binds tcp:0.0.0.0:6379 itself; it gets socket redis instead (no proxy)") == 1
    assert "forwarded" not in err
    assert "Address already in use" not in stack.out and "restart #" not in err
    stack.stop()


def test_handoff_false_on_the_address_the_program_binds_is_refused_with_the_fix(spec_dir: Path) -> None:
    write(spec_dir, "redis.yaml", "kind: service\ncommand: [sleep, '60']\n---\nkind: socket\nnetns: service\nlisten: tcp:0.0.0.0:6379\nproxy: tcp:0.0.0.0:6379\nhandoff: false\n")
    result = subprocess.run([sys.executable, "-m", "sandboxd", "up", "-d", str(spec_dir)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "redis.yaml:8: handoff: this socket holds tcp:0.0.0.0:6379 inside the namespace of 'redis'" in result.stderr
    assert "remove handoff: false" in result.stderr


# Accepts only once the test opens the gate (a file in a folder bound in): until then every
# connection waits in the queue, however long it takes.
GATED = """
import os, socket, time
s = socket.socket(fileno=3)
print("holding the socket", flush=True)
while not os.path.exists("/gate/open"):
    time.sleep(0.01)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    print(f"accepted {n}", flush=True)
    c.close()
"""


def test_wait_for_accept_returns_only_once_the_service_took_the_probe(sandboxd_stack, spec_dir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    write(spec_dir, "slow.py", GATED)
    write(spec_dir, "slow.yaml", f"kind: service\ncommand: [python3, /t/slow.py]\nmounts: [{{source: ., target: /t}}, {{source: {gate}, target: /gate}}]\nlisten: tcp:127.0.0.1:0\n")
    stack = sandboxd_stack(spec_dir)
    stack.wait_for_log("slow", "holding the socket")
    opened_before_return: list[bool] = []
    waiter = threading.Thread(target=lambda: (stack.wait_for_accept("slow", timeout=HANG), opened_before_return.append((gate / "open").exists())))
    waiter.start()
    # The probe is in the queue, not accepted: the wait has not returned, whatever the time.
    wait_until(lambda: request(stack.name, {"cmd": "queues", "sockets": ["slow"]})["sockets"][0].get("queued") == 1, "the probe in the accept queue")
    assert waiter.is_alive() and not opened_before_return
    (gate / "open").touch()
    waiter.join(HANG)
    assert opened_before_return == [True]
    assert stack.wait_for_log("slow", "^accepted") == "accepted 1"
    stack.wait_for_accept("slow")  # accepting now: a second probe is taken too
    assert stack.wait_for_log("slow", "accepted 2") == "accepted 2"


def test_wait_for_accept_on_a_unix_socket_and_an_on_demand_service(sandboxd_stack, spec_dir: Path, socket_dir: Path) -> None:
    write(spec_dir, "named.py", NAMED)
    write(spec_dir, "lazy.yaml", f"kind: service\nstart: on-demand\ncommand: [python3, /t/named.py]\nenvironment: {{NAME: lazy}}\nmounts: [{{source: ., target: /t}}]\nlisten: unix:{socket_dir}/lazy.sock\n")
    stack = sandboxd_stack(spec_dir)
    assert stack.logs("lazy") == ""  # not started: it waits for its first connection
    stack.wait_for_accept("lazy")  # the probe starts it, and it accepts
    assert stack.wait_for_log("lazy", "^up") == "up 1 lazy"
    assert _answer(str(socket_dir / "lazy.sock")) == "lazy lazy"


# A project's own test module, run by several pytest processes at once (as pytest-xdist's
# workers are): each brings up the same folder, whose spec names a fixed port, on port 0.
WORKER_TESTS = """
import json, os, socket

SPEC = {spec!r}

def test_own_port(sandboxd_stack):
    stack = sandboxd_stack(SPEC, environment={{"web": {{"NAME": os.environ["WORKER"]}}}}, listen={{"web": "tcp:127.0.0.1:0"}})
    stack.wait_for_accept("web")
    host, port = stack.address("web")
    with socket.create_connection((host, port), timeout=30) as c:
        answer = c.makefile().readline().strip()
    with open(os.environ["RESULT"], "w") as f:
        json.dump({{"port": port, "answer": answer, "addresses": stack.addresses()}}, f)

def test_that_fails(sandboxd_stack):
    stack = sandboxd_stack(SPEC, listen={{"web": "tcp:127.0.0.1:0"}})
    stack.wait_for_log("web", "^up")
    assert False, "failing on purpose"
"""


def test_listen_overrides_give_parallel_test_processes_their_own_ports_and_failures_their_logs(spec_dir: Path, tmp_path: Path) -> None:
    write(spec_dir, "named.py", NAMED)
    write(spec_dir, "web.yaml", "kind: service\ncommand: [python3, /t/named.py]\nenvironment: {NAME: spec}\nmounts: [{source: ., target: /t}]\nlisten: tcp:127.0.0.1:7431\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_web.py").write_text(textwrap.dedent(WORKER_TESTS.format(spec=str(spec_dir))))
    workers = []
    for n in range(3):
        env = {**os.environ, "WORKER": f"gw{n}", "RESULT": str(tmp_path / f"gw{n}.json")}
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project / "test_web.py")]
        workers.append(subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [worker.communicate(timeout=HANG * 3)[0] for worker in workers]
    results = [json.loads((tmp_path / f"gw{n}.json").read_text()) for n in range(3)]
    assert [r["answer"] for r in results] == [f"gw{n} web" for n in range(3)]
    ports = {r["port"] for r in results}
    assert len(ports) == 3 and 7431 not in ports
    assert all(r["addresses"] == {"web": [["127.0.0.1", r["port"]]]} for r in results)
    for output in outputs:
        assert "1 failed, 1 passed" in output, output
        assert "sandboxd stack stack-" in output and "--- last lines of web ---\nup 1 web" in output, output
