"""Networks between sandboxes and sockets bound inside a sandbox's network namespace."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import write


def host_routes_into(net: ipaddress.IPv4Network) -> list[str]:
    """Routes of the host, other than the default, that lead into `net`."""
    found = []
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        dest, mask = (ipaddress.IPv4Address(int(x, 16).to_bytes(4, "little")) for x in (fields[1], fields[7]))
        route = ipaddress.ip_network(f"{dest}/{mask}", strict=False)
        if route.prefixlen and route.overlaps(net):
            found.append(line)
    return found


# It binds its own sockets (no socket activation), UDP first: once TCP answers, UDP is bound too.
ECHO_SERVER = r'''
import socket, sys, threading
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 7001))
def udp():
    while True:
        data, a = u.recvfrom(100)
        u.sendto(b"udp " + data, a)
threading.Thread(target=udp, daemon=True).start()
s = socket.create_server(("::", 7000), family=socket.AF_INET6, dualstack_ipv6=True)
print("serving", flush=True)
while True:
    c, a = s.accept()
    c.sendall(b"tcp hello from " + socket.gethostname().encode() + b"\n")
    c.close()
'''

# Started with the server, so it may connect before the server listens: refused until then,
# asked again until the server listens (a bound only ends a hang).
CLIENT = r'''
import json, socket, time
out = {}
deadline = time.monotonic() + 60
for family in (socket.AF_INET, socket.AF_INET6):
    addr = socket.getaddrinfo("server", 7000, family, socket.SOCK_STREAM)[0][4]
    while True:
        try:
            c = socket.create_connection(addr[:2], timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    out["tcp" + family.name] = c.makefile().readline().strip()
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.settimeout(30)
    u.sendto(b"ping", socket.getaddrinfo("server", 7001, family, socket.SOCK_DGRAM)[0][4])
    out["udp" + family.name] = u.recv(100).decode()
print("RESULT " + json.dumps(out), flush=True)
'''


def _client_server_stack(folder: Path) -> None:
    """A server and a client on one network `back`; the client reports what it got back."""
    write(folder, "server.py", ECHO_SERVER)
    write(folder, "client.py", CLIENT)
    write(
        folder,
        "stack.yaml",
        """
        kind: network
        name: back
        ---
        kind: service
        name: server
        network: [back]
        command: [python3, /t/server.py]
        mounts: [{source: ., target: /t}]
        ---
        kind: service
        name: client
        network: [back]
        restart: "no"
        command: [python3, /t/client.py]
        mounts: [{source: ., target: /t}]
        """,
    )


def test_services_on_one_network_talk_by_name_over_tcp_and_udp(run_stack, spec_dir: Path):
    _client_server_stack(spec_dir)
    stack = run_stack(spec_dir)
    stack.wait_for("client | RESULT", "out")
    result = json.loads(next(l for l in stack.lines("client") if l.startswith("RESULT "))[7:])
    assert result == {
        "tcpAF_INET": "tcp hello from server",
        "udpAF_INET": "udp ping",
        "tcpAF_INET6": "tcp hello from server",
        "udpAF_INET6": "udp ping",
    }
    assert stack.stop() == 0
    assert "on back 10." in stack.err and "fd5b:" in stack.err


def test_private_service_cannot_reach_a_server_on_the_hosts_loopback(run_stack, spec_dir: Path):
    host_server = socket.create_server(("127.0.0.1", 0))
    port = host_server.getsockname()[1]
    try:
        write(
            spec_dir,
            "probe.yaml",
            f"""
            kind: service
            restart: "no"
            command: [python3, -c, "import socket\\ntry:\\n socket.create_connection(('127.0.0.1', {port}), timeout=2); print('REACHED')\\nexcept OSError as e:\\n print('BLOCKED', e.errno)"]
            """,
        )
        stack = run_stack(spec_dir)
        assert stack.wait_exit() == 0
        assert stack.lines("probe") == ["BLOCKED 111"]  # refused by its own empty lo, never the host's
    finally:
        host_server.close()


SERVE_FD3 = r'''
import os, socket
s = socket.socket(fileno=3)
print("serving", flush=True)
while True:
    c, a = s.accept()
    c.sendall(b"answer from " + socket.gethostname().encode() + b" pid " + str(os.getpid()).encode() + b"\n")
    c.close()
'''


def _namespace_socket_stack(spec_dir: Path, client_command: str) -> None:
    write(spec_dir, "serve.py", SERVE_FD3)
    write(
        spec_dir,
        "stack.yaml",
        f"""
        kind: network
        name: net
        subnet: [10.213.77.0/24, "fd5b:d000:77::/64"]
        ---
        kind: service
        name: api
        network: [{{name: net, address: 10.213.77.10}}]
        command: [python3, /t/serve.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        name: api
        netns: service
        listen: tcp:0.0.0.0:7100
        ---
        kind: service
        name: peer
        network: [net]
        uses: [api]
        restart: "no"
        command: [python3, -c, "{client_command}"]
        """,
    )


def test_socket_bound_in_a_services_namespace_is_reachable_from_the_network_only(run_stack, spec_dir: Path):
    _namespace_socket_stack(
        spec_dir, "import socket\\nc = socket.create_connection(('api', 7100), timeout=30)\\nprint('GOT', c.makefile().readline().strip())"
    )
    stack = run_stack(spec_dir)
    stack.wait_for("peer | GOT", "out")
    assert stack.lines("peer") == ["GOT answer from api pid 2"]
    # From the host: nothing on loopback, and no route into the network (checked in the routing
    # table, without sending a packet towards the sandbox's address).
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", 7100), timeout=2).close()
    assert not host_routes_into(ipaddress.ip_network("10.213.77.0/24"))
    assert "tcp:0.0.0.0:7100 in api's namespace" in stack.err
    assert stack.stop() == 0


def test_restarted_service_keeps_its_address_and_in_namespace_socket(run_stack, spec_dir: Path):
    client = (
        "import socket, time\\n"
        "answers = []\\n"
        "for i in range(6):\\n"
        "    c = socket.create_connection(('10.213.77.10', 7100), timeout=30)\\n"
        "    answers.append(c.makefile().readline().strip())\\n"
        "print('ANSWERS', len(answers), len(set(answers)))"
    )
    _namespace_socket_stack(spec_dir, client)
    write(
        spec_dir,
        "serve.py",
        SERVE_FD3.replace("while True:", "for _ in range(2):") + "\nimport sys\nsys.exit(1)\n",
    )
    stack = run_stack(spec_dir)
    stack.wait_for("peer | ANSWERS", "out")
    # Six connections, the service crashed after every two: all answered, at the same address.
    assert stack.lines("peer") == ["ANSWERS 6 1"]
    assert stack.err.count("api: running -> backoff: exited with code 1") >= 2
    assert stack.stop() == 0


def test_socket_on_the_host_served_by_a_private_service_answers_from_the_host(run_stack, spec_dir: Path):
    write(spec_dir, "serve.py", SERVE_FD3)
    write(
        spec_dir,
        "api.yaml",
        "kind: service\ncommand: [python3, /t/serve.py]\nmounts: [{source: ., target: /t}]\n---\nkind: socket\nlisten: tcp:127.0.0.1:0\n",
    )
    stack = run_stack(spec_dir)
    port = int(stack.wait_for("tcp:127.0.0.1:", "err").split("tcp:127.0.0.1:")[1].split()[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        assert c.makefile().readline().strip() == "answer from api pid 2"
    assert stack.stop() == 0


def test_two_stacks_with_networks_run_side_by_side(run_stack, tmp_path: Path):
    folders = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        _client_server_stack(folder)
        folders.append(folder)
    stacks = [run_stack(folder) for folder in folders]
    subnets = []
    for stack in stacks:
        stack.wait_for("client | RESULT", "out")
        assert '"udpAF_INET6": "udp ping"' in next(l for l in stack.lines("client") if l.startswith("RESULT"))
        subnets.append(stack.err.split("server: pid")[1].split("on back ")[1].split()[0].rsplit(".", 1)[0])
    assert subnets[0] != subnets[1]  # each stack chose a subnet of its own
    for stack in stacks:
        assert stack.stop() == 0


def test_network_none_has_lo_down_and_host_shares_the_hosts_links(run_stack, spec_dir: Path):
    probe = "import socket\\nprint(sorted(n for _, n in socket.if_nameindex()), ['down', 'up'][int(open('/sys/class/net/lo/flags').read(), 16) & 1])"
    write(spec_dir, "none.yaml", f'kind: service\nnetwork: none\nrestart: "no"\ncommand: [python3, -c, "{probe}"]\n')
    write(spec_dir, "hosty.yaml", f'kind: service\nnetwork: host\nrestart: "no"\ncommand: [python3, -c, "{probe}"]\n')
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    assert stack.lines("none") == ["['lo'] down"]
    host_links = sorted(n for _, n in socket.if_nameindex())
    assert stack.lines("hosty")[0].startswith(str(host_links))
    assert "network: host (shares the host's network namespace)" in stack.err


def test_no_link_of_sandboxd_ever_appears_on_the_host(run_stack, spec_dir: Path):
    write(spec_dir, "server.py", ECHO_SERVER)
    write(spec_dir, "net.yaml", "kind: network\nname: back\n---\nkind: service\nname: server\nnetwork: [back]\ncommand: [python3, /t/server.py]\nmounts: [{source: ., target: /t}]\n")
    stack = run_stack(spec_dir)
    stack.wait_for("server | serving", "out")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout if Path("/sbin/ip").exists() or Path("/usr/sbin/ip").exists() else ""
    assert "sbd" not in links
    assert not [p for p in Path("/sys/class/net").iterdir() if p.name.startswith("sbd")]
    assert stack.stop() == 0
