"""proxy: programs that bind their own address get connections through sockets sandboxd bound."""

from __future__ import annotations

import re
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import HANG, wait_until


# An echo server that knows nothing of socket activation: it binds its own address, late with
# GATE (only once the test has made the file: after its clients connected, on any machine).
ECHO = r'''
import os, socket, sys, threading, time
while os.environ.get("GATE") and not os.path.exists(os.environ["GATE"]):
    time.sleep(0.01)
if os.environ.get("UDP_TOO"):  # a UDP server on the same address and port as the proxy's target
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", int(sys.argv[1])))
    print("udp bound", udp.getsockname(), flush=True)
family, address = (socket.AF_UNIX, sys.argv[1]) if sys.argv[1].startswith("/") else (socket.AF_INET, ("127.0.0.1", int(sys.argv[1])))
def bind():
    server = socket.socket(family)
    server.bind(address)
    server.listen(64)
    return server
if os.environ.get("BIND_IN_THREAD"):  # bind() from a thread that is not the process's first
    bound = []
    worker = threading.Thread(target=lambda: bound.append(bind()))
    worker.start()
    worker.join()
    server = bound[0]
else:
    server = bind()
print("listening", flush=True)
def serve(conn, peer):
    # With SHOWPEER the answer starts with the client's port as the program sees it: the client's
    # own with a handoff, the proxy's with forwarding.
    tag = f"{peer[1]}:" if os.environ.get("SHOWPEER") else os.environ.get("TAG", "")
    if os.environ.get("SHOWPIDS"):
        tag = ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())) + ":"
    with conn:
        while data := conn.recv(4096):
            conn.sendall(tag.encode() + data)
while True:
    conn, peer = server.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
'''


def echo_once(address: tuple[str, int] | str, payload: bytes, timeout: float = HANG, connected: Callable[[], object] = lambda: None) -> bytes:
    """Send and read the answer as request/response protocols do (`connected` is called once
    connect() returned). No half-close: the proxy, systemd-socket-proxyd, ends a connection at
    the first EOF of either side."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    expected = len(b"echo:" + payload)
    with socket.socket(family) as client:
        client.settimeout(timeout)
        client.connect(address)
        connected()
        client.sendall(payload)
        answer = b""
        while len(answer) < expected and (chunk := client.recv(4096)):
            answer += chunk
        return answer


def port_of(stack) -> int:
    """The port sandboxd bound on the host for the `proxy:` socket, as the start-up summary says it
    ("tcp:127.0.0.1:PORT (given to ..." or "(forwarded to ..."). Not the first "tcp:127.0.0.1:" the
    log shows: the program's own bind of the target (":7000 itself") may be said before the summary."""
    stack.wait_up()
    found = re.search(r"; tcp:127\.0\.0\.1:(\d+) \((?:given|forwarded)", stack.err)
    assert found is not None, stack.err
    return int(found[1])


def echo_stack(spec_dir: Path, target: str, listen: str, extra: str = "", gated: bool = False, handoff: bool = False, showpeer: bool = False, env: str = "") -> None:
    """An echo program behind a proxy socket; forwarding unless `handoff`. With `gated` it binds
    only once the file spec_dir/gate exists."""
    (spec_dir / "echo.py").write_text(ECHO)
    peer = ', SHOWPEER: "1"' if showpeer else ""
    peer += ', GATE: "/app/gate"' if gated else ""
    argument = target.rsplit(":", 1)[-1] if target.startswith("tcp:") else target.removeprefix("unix:")
    service = [
        "kind: service",
        f'command: [python3, /app/echo.py, "{argument}"]',
        "mounts: [{source: ., target: /app}]",
        f'environment: {{TAG: "echo:"{peer}{env}}}',
        *extra.splitlines(),
    ]
    sock = ["kind: socket", f"listen: {listen}", f"proxy: {target}", f"handoff: {str(handoff).lower()}"]
    (spec_dir / "echo.yaml").write_text("\n".join([*service, "---", *sock, ""]))


def test_clients_that_connect_before_the_program_listens_wait_and_get_through(run_stack, spec_dir: Path) -> None:
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", gated=True)
    stack = run_stack(spec_dir)
    port = port_of(stack)
    results: dict[int, bytes] = {}
    connected = threading.Semaphore(0)

    def client(n: int) -> None:
        results[n] = echo_once(("127.0.0.1", port), f"hello {n}".encode(), connected=connected.release)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert connected.acquire(timeout=HANG)  # connected, none refused
    # The program cannot have listened yet: it waits for the gate, opened only now.
    assert "listening" not in stack.out and "is forwarded to it" not in stack.err
    (spec_dir / "gate").touch()
    for thread in threads:
        thread.join(HANG)
    assert results == {n: f"echo:hello {n}".encode() for n in range(20)}  # held until it listened
    assert "listens; socket echo is forwarded to it" in stack.err
    stack.stop()


@pytest.mark.parametrize(("handoff", "said"), [(False, "listens; socket echo is forwarded to it"), (True, "it gets socket echo instead")])
def test_program_is_reached_again_after_it_restarts(run_stack, spec_dir: Path, handoff: bool, said: str) -> None:
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", extra="restart: always\nrestart_delay: 50ms", handoff=handoff)
    stack = run_stack(spec_dir)
    port = port_of(stack)
    assert echo_once(("127.0.0.1", port), b"one") == b"echo:one"
    subprocess.run([sys.executable, "-m", "sandboxd", "kill", "-p", spec_dir.name, "-s", "KILL", "echo"], check=True, capture_output=True)
    stack.wait_for("restart #1", "err")
    assert echo_once(("127.0.0.1", port), b"two") == b"echo:two"
    assert stack.err.count(said) == 2
    stack.stop()


def test_unix_target_inside_the_sandbox_is_reached_with_the_program_as_nobody(run_stack, spec_dir: Path, socket_dir: Path) -> None:
    echo_stack(spec_dir, "unix:/run/echo/echo.sock", f"unix:{socket_dir}/echo.sock", extra="user: nobody\ntmpfs: /run/echo")
    # The program, as nobody, needs its socket folder writable: a tmpfs owned by it.
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert echo_once(str(socket_dir / "echo.sock"), b"over unix") == b"echo:over unix"
    stack.stop()


def test_on_demand_service_behind_a_proxy_starts_on_the_first_connection(run_stack, spec_dir: Path) -> None:
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", extra="start: on-demand")
    stack = run_stack(spec_dir)
    port = port_of(stack)
    assert "listening" not in stack.out
    assert echo_once(("127.0.0.1", port), b"wake") == b"echo:wake"
    assert "activated by" in stack.err
    stack.stop()


def test_proxy_connections_are_bounded_by_max_connections(run_stack, spec_dir: Path) -> None:
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0")
    path = spec_dir / "echo.yaml"
    path.write_text(path.read_text().replace("proxy:", "max_connections: 2\nproxy:"))
    stack = run_stack(spec_dir)
    port = port_of(stack)
    assert echo_once(("127.0.0.1", port), b"first") == b"echo:first"
    # Generous timeouts: each only ends a hang (the third connection is closed by the proxy, not
    # left waiting; were it left waiting, recv() would time out and the test fail).
    held = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(2)]
    try:
        for conn in held:
            conn.sendall(b"x")
            assert conn.recv(16) == b"echo:x"
        third = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        with third:
            third.sendall(b"y")
            third.settimeout(HANG)
            try:
                answer = third.recv(16)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # the proxy closes connections beyond the bound
    finally:
        for conn in held:
            conn.close()
    assert echo_once(("127.0.0.1", port), b"after") == b"echo:after"
    stack.stop()


def test_program_that_binds_the_proxy_address_gets_the_socket_itself(run_stack, spec_dir: Path) -> None:
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", gated=True, handoff=True, showpeer=True)
    stack = run_stack(spec_dir)
    port = port_of(stack)
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as client:
        assert "listening" not in stack.out  # before the program binds: it waits for the gate
        (spec_dir / "gate").touch()
        client.sendall(b"direct")
        answer = b""
        while not answer.endswith(b"direct"):
            answer += client.recv(64)
        own_port = client.getsockname()[1]
    assert answer == f"{own_port}:direct".encode()  # no proxy in between: the program sees the client itself
    assert "binds tcp:127.0.0.1:7000 itself; it gets socket echo instead (no proxy)" in stack.err
    assert "is forwarded to it" not in stack.err
    stack.stop()


def test_program_that_binds_the_proxy_address_from_a_thread_gets_the_socket_itself(run_stack, spec_dir: Path) -> None:
    """The bind() listener is told the calling thread's id: a thread that is not the process's
    first (a server whose worker binds) used to get ENOENT, from pidfd_open of that id."""
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", handoff=True, env=', BIND_IN_THREAD: "1"')
    stack = run_stack(spec_dir)
    port = port_of(stack)
    stack.wait_for("binds tcp:127.0.0.1:7000 itself; it gets socket echo instead (no proxy)", "err")
    assert echo_once(("127.0.0.1", port), b"threaded") == b"echo:threaded"
    stack.stop()


def test_program_binding_another_family_than_the_socket_is_forwarded_to(run_stack, spec_dir: Path, socket_dir: Path) -> None:
    """A unix socket on the host cannot stand in for the program's tcp socket: forwarding then."""
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", f"unix:{socket_dir}/echo.sock", handoff=True)
    stack = run_stack(spec_dir)
    stack.wait_up()
    assert echo_once(str(socket_dir / "echo.sock"), b"across") == b"echo:across"
    assert "listens; socket echo is forwarded to it" in stack.err
    assert "instead (no proxy)" not in stack.err
    stack.stop()


def test_other_binds_of_the_program_proceed_unchanged(run_stack, spec_dir: Path) -> None:
    """A bind of an address that is no proxy target is the program's own, as without sandboxd."""
    echo_stack(spec_dir, "tcp:127.0.0.1:7001", "tcp:127.0.0.1:0", handoff=True)
    path = spec_dir / "echo.yaml"
    # The program binds 7000 (its own socket, inside its sandbox); the proxy waits for 7001.
    path.write_text(path.read_text().replace('"7001"', '"7000"'))
    stack = run_stack(spec_dir)
    stack.wait_for("listening", "out")
    assert "instead (no proxy)" not in stack.err
    stack.stop()


def test_udp_server_on_the_proxy_address_keeps_its_own_socket(run_stack, spec_dir: Path) -> None:
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", handoff=True, env=', UDP_TOO: "1"')
    stack = run_stack(spec_dir)
    port = port_of(stack)
    assert echo_once(("127.0.0.1", port), b"tcp") == b"echo:tcp"
    stack.wait_for("echo | udp bound", "out")  # printed before the answer; forwarded by sandboxd on its own time
    assert any(line.startswith("udp bound ('127.0.0.1', 7000)") for line in stack.lines("echo"))
    assert stack.err.count("it gets socket echo instead") == 1
    stack.stop()


def test_forwarding_proxy_is_not_visible_inside_the_sandbox(run_stack, spec_dir: Path) -> None:
    """The proxy runs in the sandbox's network namespace only: in its pid namespace a process of
    the same user could reach the host's root through /proc/PID/root of the proxy."""
    echo_stack(spec_dir, "tcp:127.0.0.1:7000", "tcp:127.0.0.1:0", extra="user: nobody", env=', SHOWPIDS: "1"')
    stack = run_stack(spec_dir)
    port = port_of(stack)
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as client:
        client.sendall(b"x")
        answer = b""
        while not answer.endswith(b"x"):
            answer += client.recv(64)
    assert answer == b"1,2:x"  # the init and the program, nothing else
    stack.stop()


def test_unix_target_that_the_sandbox_turns_into_a_symlink_does_not_reach_the_host(run_stack, spec_dir: Path, socket_dir: Path) -> None:
    """The program swaps its socket file for a symlink to a host socket; the proxy resolves the
    path inside the sandbox's root, so it finds nothing there and connects nowhere."""
    host_path = socket_dir / "host.sock"
    host = socket.socket(socket.AF_UNIX)
    host.bind(str(host_path))
    host.listen(8)
    host.setblocking(False)  # looked at once the proxy has tried: a connection would be queued here
    swap = (
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('/run/echo/echo.sock'); s.listen(8)\n"
        f"os.unlink('/run/echo/echo.sock'); os.symlink({str(host_path)!r}, '/run/echo/echo.sock')\n"
        "print('swapped', flush=True); time.sleep(60)\n"
    )
    (spec_dir / "swap.py").write_text(swap)
    (spec_dir / "echo.yaml").write_text(
        "kind: service\ncommand: [python3, /app/swap.py]\nmounts: [{source: ., target: /app}]\ntmpfs: /run/echo\n"
        f"---\nkind: socket\nlisten: unix:{socket_dir}/front.sock\nproxy: unix:/run/echo/echo.sock\nhandoff: false\n"
    )
    stack = run_stack(spec_dir)
    ended = "the proxy of socket echo ended"
    try:
        stack.wait_for("swapped", "out")
        stack.wait_for("is forwarded to it", "err")
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(HANG)
            tries = stack.err.count(ended)
            client.connect(str(socket_dir / "front.sock"))
            # A start of the proxy that ends after the client connected: it had the client's
            # connection to pass on, so anything it reached would now wait in the host's queue.
            wait_until(lambda: stack.err.count(ended) > tries or select.select([host], [], [], 0)[0], "the proxy to try and end")
            try:
                conn, _ = host.accept()
                conn.close()
                reached = True
            except BlockingIOError:
                reached = False
        assert not reached
    finally:
        stack.stop()
        host.close()
        host_path.unlink()
