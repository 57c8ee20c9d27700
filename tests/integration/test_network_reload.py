"""A reload of a stack whose services are on networks: the changed service restarts in its network
at its address, the others run on untouched, services come and go, and what cannot be applied is
refused with its reason. Nothing of the old sandboxes is left: the supervisor's network namespaces
and the bridge's ports are counted after each reload."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from conftest import wait_until, write
from test_control import sbd

# Serves the socket sandboxd bound in its namespace (fd 3); on SIGTERM it ends after the
# connection it is serving or waiting for, so that no client is cut off mid-answer.
SERVER = r'''
import os, signal, socket
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
s = socket.socket(fileno=3)
print("serving", os.environ["GREETING"], flush=True)
while not stop:
    c, _ = s.accept()
    c.sendall((os.environ["GREETING"] + "\n").encode())
    c.close()
'''

# Reads the server's address once from its /etc/hosts, then asks it again and again at that
# address, printing each answer that differs from the last one (and any error).
CLIENT = r'''
import socket, sys, time
ip = next(f[0] for f in (l.split() for l in open("/etc/hosts")) if f[1:] == ["server"] and "." in f[0])
print("ADDRESS", ip, flush=True)
last = None
while True:
    try:
        with socket.create_connection((ip, 7100), timeout=30) as c:
            answer = c.makefile().readline().strip()
    except OSError as e:
        answer = "ERR " + repr(e)
    if answer != last:
        print("GOT", answer, flush=True)
        last = answer
    time.sleep(0.02)
'''

NETWORK = "kind: network\nname: {name}\nsubnet: {subnet}\n---\n"
SOCKET = "kind: socket\nname: server\nnetns: service\nlisten: tcp:0.0.0.0:7100\n---\n"


def _service(name: str, network: str, program: str = "", extra: str = "") -> str:
    command = f"[python3, /t/{program}]" if program else "[sleep, '1000']"
    return f"kind: service\nname: {name}\nnetwork: {network}\ncommand: {command}\nmounts: [{{source: ., target: /t}}]\n{extra}---\n"


def _write_stack(folder: Path, *units: str) -> None:
    write(folder, "server.py", SERVER)
    write(folder, "client.py", CLIENT)
    (folder / "stack.yaml").write_text("".join(units))


def _status(stack: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(sbd("ps", "--json", "-p", stack).stdout)
    return status


def _running(stack: str) -> dict[str, tuple[int, int]]:
    """(pid, restarts) of every service, once none is starting."""

    def settled() -> dict[str, tuple[int, int]] | None:
        services = _status(stack)["services"]
        ok = all(s["state"] == "running" and s["pid"] > 0 for s in services)
        return {s["name"]: (s["pid"], s["restarts"]) for s in services} if ok else None

    return wait_until(settled, f"every service of {stack} to run")


def _lines(stack: str, service: str) -> list[str]:
    return [line.split("| ", 1)[1] for line in sbd("logs", "-p", stack, service).stdout.splitlines() if "| " in line]


def _lines_until(stack: str, service: str, last: str) -> list[str]:
    return wait_until(lambda: (lines := _lines(stack, service)) and lines[-1] == last and lines, f"{service} to print {last!r}")


def _ip_link(pid: int, fd: str, *what: str) -> list[str]:
    """The names of the links in the namespace the process holds by `fd` (`what`: `type bridge` …)."""
    out = subprocess.run(["nsenter", f"--net=/proc/{pid}/fd/{fd}", "ip", "-o", "link", "show", *what], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(": ")[1].split("@")[0] for line in out.splitlines())


def _namespaces(stack: str) -> tuple[dict[str, list[str]], int]:
    """The network namespaces the stack's supervisor holds (the host's aside): each bridge with
    its ports (sbd0, sbd1 …), and how many other (services') namespaces it holds."""
    pid = _status(stack)["pid"]
    seen = {os.readlink("/proc/self/ns/net")}
    bridges: dict[str, list[str]] = {}
    services = 0
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("net:") or target in seen:
            continue
        seen.add(target)
        bridge = _ip_link(pid, fd, "type", "bridge")
        if bridge:
            bridges[bridge[0]] = [name for name in _ip_link(pid, fd) if re.fullmatch(r"sbd\d+", name)]
        else:
            services += 1
    return bridges, services


def test_a_changed_service_on_a_network_restarts_at_its_address_and_its_client_runs_on(spec_dir: Path) -> None:
    back = NETWORK.format(name="back", subnet="10.213.81.0/24")
    client = _service("client", "[back]", "client.py")
    _write_stack(spec_dir, back, client, _service("server", "[back]", "server.py", "environment: {GREETING: old}\n"), SOCKET)
    sbd("up", "-d", "-p", "netre", str(spec_dir))
    try:
        assert _lines_until("netre", "client", "GOT old") == ["ADDRESS 10.213.81.3", "GOT old"]
        before = _running("netre")
        hosts = sbd("exec", "-T", "-p", "netre", "client", "--", "cat", "/etc/hosts").stdout
        _write_stack(spec_dir, back, client, _service("server", "[back]", "server.py", "environment: {GREETING: new}\n"), SOCKET)
        result = sbd("up", "-d", "-p", "netre", str(spec_dir))  # against the running stack: a reload
        assert result.stdout.strip() == "stack 'netre' reloaded: changed: server"
        # The client, never restarted, reaches the new server at the address it read at its start:
        # no error, no connection refused or cut off while the server restarted.
        assert _lines_until("netre", "client", "GOT new") == ["ADDRESS 10.213.81.3", "GOT old", "GOT new"]
        after = _running("netre")
        assert after["client"] == before["client"]
        assert after["server"][0] != before["server"][0]
        assert _lines("netre", "server") == ["serving old", "serving new"]
        assert sbd("exec", "-T", "-p", "netre", "client", "--", "cat", "/etc/hosts").stdout == hosts
        assert _namespaces("netre") == ({"sbd-back": ["sbd0", "sbd1"]}, 2)
    finally:
        sbd("down", "-p", "netre")


def test_services_added_to_and_removed_from_a_network_leave_the_others_running(spec_dir: Path) -> None:
    back = NETWORK.format(name="back", subnet="10.213.82.0/24")
    client, server = _service("client", "[back]", "client.py"), _service("server", "[back]", "server.py", "environment: {GREETING: hi}\n")
    _write_stack(spec_dir, back, client, server, SOCKET, _service("old1", "[back]"), _service("old2", "[back]"))
    sbd("up", "-d", "-p", "netadd", str(spec_dir))
    try:
        _lines_until("netadd", "client", "GOT hi")
        before = _running("netadd")
        assert _namespaces("netadd") == ({"sbd-back": ["sbd0", "sbd1", "sbd2", "sbd3"]}, 4)
        # "aaa" comes first by name: at a fresh start it would take .2, the client's; a reload
        # gives it a free address and every running service keeps its own.
        _write_stack(spec_dir, back, _service("aaa", "[back]", "client.py"), client, server, SOCKET)
        result = sbd("up", "-d", "-p", "netadd", str(spec_dir))
        assert result.stdout.strip() == "stack 'netadd' reloaded: added: aaa; removed: old1, old2"
        assert _lines_until("netadd", "aaa", "GOT hi") == ["ADDRESS 10.213.82.5", "GOT hi"]
        after = _running("netadd")
        assert sorted(after) == ["aaa", "client", "server"]
        assert (after["client"], after["server"]) == (before["client"], before["server"])
        assert _lines("netadd", "client") == ["ADDRESS 10.213.82.5", "GOT hi"]
        # The running client's /etc/hosts names the new service (rewritten in place), not the removed ones.
        hosts = sbd("exec", "-T", "-p", "netadd", "client", "--", "cat", "/etc/hosts").stdout
        assert "\taaa\n" in hosts and "old1" not in hosts and "\tserver\n" in hosts
        # The removed services' links and namespaces are gone, the new one's are there.
        assert _namespaces("netadd") == ({"sbd-back": ["sbd0", "sbd1", "sbd3"]}, 3)  # aaa took the lowest free port
    finally:
        sbd("down", "-p", "netadd")


def test_a_service_moved_to_a_new_network_and_the_old_network_removed(spec_dir: Path) -> None:
    back, front = NETWORK.format(name="back", subnet="10.213.83.0/24"), NETWORK.format(name="front", subnet="10.213.84.0/24")
    server = _service("server", "[back]", "server.py", "environment: {GREETING: hi}\n")
    _write_stack(spec_dir, back, _service("client", "[back]", "client.py"), server, SOCKET)
    sbd("up", "-d", "-p", "netmove", str(spec_dir))
    try:
        _lines_until("netmove", "client", "GOT hi")
        _write_stack(spec_dir, front, _service("client", "[front]", "client.py"), server.replace("[back]", "[front]"), SOCKET)
        result = sbd("up", "-d", "-p", "netmove", str(spec_dir))
        assert result.stdout.strip() == "stack 'netmove' reloaded: changed: client, server"
        wait_until(lambda: _lines("netmove", "client")[-2:] == ["ADDRESS 10.213.84.3", "GOT hi"], "the client on front to be answered")
        assert _namespaces("netmove") == ({"sbd-front": ["sbd0", "sbd1"]}, 2)
        # A new subnet: the services on the network restart with new addresses (as compose
        # recreates the containers of a changed network).
        _write_stack(spec_dir, front.replace("10.213.84.", "10.213.85."), _service("client", "[front]", "client.py"), server.replace("[back]", "[front]"), SOCKET)
        result = sbd("up", "-d", "-p", "netmove", str(spec_dir))
        assert result.stdout.strip() == "stack 'netmove' reloaded: changed: client, server"
        wait_until(lambda: _lines("netmove", "client")[-2:] == ["ADDRESS 10.213.85.3", "GOT hi"], "the client on the new subnet to be answered")
        assert "client: restarts: network 'front' has new subnets (10.213.85.0/24)" in sbd("logs", "-p", "netmove", "sandboxd").stdout
        assert _namespaces("netmove") == ({"sbd-front": ["sbd0", "sbd1"]}, 2)
    finally:
        sbd("down", "-p", "netmove")


def test_an_address_of_an_unchanged_service_given_to_a_new_one_is_refused_and_nothing_changes(spec_dir: Path) -> None:
    back = NETWORK.format(name="back", subnet="10.213.86.0/24")
    units = (back, _service("client", "[back]", "client.py"), _service("server", "[back]", "server.py", "environment: {GREETING: hi}\n"), SOCKET)
    _write_stack(spec_dir, *units)
    sbd("up", "-d", "-p", "netrefuse", str(spec_dir))
    try:
        _lines_until("netrefuse", "client", "GOT hi")
        before = _running("netrefuse")
        _write_stack(spec_dir, *units, _service("thief", "[{name: back, address: 10.213.86.3}]"))
        refused = sbd("up", "-d", "-p", "netrefuse", str(spec_dir), check=False)
        assert refused.returncode != 0
        assert (
            "cannot apply this change to the running stack: address 10.213.86.3 on network 'back' is held by service "
            "'server', which did not change, and the new spec gives it to service 'thief' (address:); give 'thief' another "
            "address; use sandboxd down and up"
        ) in refused.stderr
        # A spec that removes a network its services are still on is refused by validation.
        _write_stack(spec_dir, *units[1:])
        invalid = sbd("up", "-d", "-p", "netrefuse", str(spec_dir), check=False)
        assert invalid.returncode != 0 and "no network 'back'" in invalid.stderr
        assert _running("netrefuse") == before
        assert _lines("netrefuse", "client") == ["ADDRESS 10.213.86.3", "GOT hi"]
        assert _namespaces("netrefuse") == ({"sbd-back": ["sbd0", "sbd1"]}, 2)
    finally:
        sbd("down", "-p", "netrefuse")


def test_a_network_added_to_a_stack_that_had_none(spec_dir: Path) -> None:
    solo = "kind: service\nname: solo\ncommand: [sleep, '1000']\n---\n"
    _write_stack(spec_dir, solo)
    sbd("up", "-d", "-p", "netnew", str(spec_dir))
    try:
        before = _running("netnew")
        back = NETWORK.format(name="back", subnet="10.213.87.0/24")
        _write_stack(spec_dir, solo, back, _service("client", "[back]", "client.py"), _service("server", "[back]", "server.py", "environment: {GREETING: hi}\n"), SOCKET)
        result = sbd("up", "-d", "-p", "netnew", str(spec_dir))
        assert result.stdout.strip() == "stack 'netnew' reloaded: added: client, server; sockets_replaced: server"
        assert _lines_until("netnew", "client", "GOT hi") == ["ADDRESS 10.213.87.3", "GOT hi"]
        assert _running("netnew")["solo"] == before["solo"]
        assert _namespaces("netnew") == ({"sbd-back": ["sbd0", "sbd1"]}, 2)
    finally:
        sbd("down", "-p", "netnew")


def test_a_service_off_every_network_still_starts_after_a_reload_of_one_on_a_network(spec_dir: Path) -> None:
    # A reload rewrites the name files of the services on networks; the others' runtime files
    # (their /etc/hostname) must stay, or every later start of theirs fails.
    back = NETWORK.format(name="back", subnet="10.213.88.0/24")
    solo = "kind: service\nname: solo\nhostname: alone\ncommand: [sleep, '1000']\n---\n"
    _write_stack(spec_dir, solo, back, _service("server", "[back]", "server.py", "environment: {GREETING: old}\n"), SOCKET)
    sbd("up", "-d", "-p", "netsolo", str(spec_dir))
    try:
        before = _running("netsolo")
        _write_stack(spec_dir, solo, back, _service("server", "[back]", "server.py", "environment: {GREETING: new}\n"), SOCKET)
        assert sbd("up", "-d", "-p", "netsolo", str(spec_dir)).stdout.strip().startswith("stack 'netsolo' reloaded: changed: server")
        sbd("restart", "-p", "netsolo", "solo")
        after = _running("netsolo")
        assert after["solo"] != before["solo"] and after["solo"][1] == 0  # a new sandbox, not a crash loop
        assert sbd("exec", "-T", "-p", "netsolo", "solo", "--", "cat", "/etc/hostname").stdout == "alone\n"
    finally:
        sbd("down", "-p", "netsolo")
