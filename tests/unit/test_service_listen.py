"""`listen:` on a service (the socket unit it implies), and proxy sockets that hold the address
the program binds (the handoff is then the only way to reach it)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from sandboxd.errors import SpecErrors
from sandboxd.plan.confinement import intercept_bind
from sandboxd.spec.model import Socket, hands_off, holds_proxy_address
from sandboxd.spec.values import parse_address
from .spec_snippets import Problems, StackOf

WEB = "kind: service\ncommand: [serve]\n"


def test_listen_on_a_service_implies_its_socket_unit_with_the_defaults(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(tmp_path, {"web.yaml": WEB + "listen: tcp:127.0.0.1:0\n"})
    (sock,) = stack.sockets
    assert sock == Socket(
        name="web",
        file=tmp_path.resolve() / "web.yaml",
        line=3,
        service="web",
        listen=(parse_address("tcp:127.0.0.1:0"),),
        fdname="web",
        backlog=socket.SOMAXCONN,
        mode=0o666,
        reuseport=False,
        netns="host",
        accept=False,
        max_connections=64,
        proxy=None,
        handoff=None,
        implied=True,
    )
    assert stack.service("web").listen == sock.listen
    assert stack.sockets_of("web") == (sock,)


def test_implied_socket_has_the_defaults_an_explicit_one_gets(tmp_path: Path, stack_of: StackOf) -> None:
    implied = stack_of(tmp_path / "a", {"web.yaml": WEB + "listen: [tcp:127.0.0.1:8080, 'unix:/run/web.sock']\n"}).sockets[0]
    explicit = stack_of(tmp_path / "b", {"web.yaml": WEB + "---\nkind: socket\nname: web\nlisten: [tcp:127.0.0.1:8080, 'unix:/run/web.sock']\n"}).sockets[0]
    assert dataclasses.replace(implied, file=explicit.file, line=explicit.line, implied=False) == explicit


def test_implied_socket_sits_beside_explicit_ones_in_name_order(tmp_path: Path, stack_of: StackOf) -> None:
    files = {"web.yaml": WEB + "listen: unix:/run/web.sock\n", "admin.yaml": "kind: socket\nservice: web\nlisten: unix:/run/admin.sock\n"}
    stack = stack_of(tmp_path, files)
    assert [s.name for s in stack.sockets_of("web")] == ["admin", "web"]
    assert [s.implied for s in stack.sockets] == [False, True]


def test_a_service_may_use_the_socket_another_implies(tmp_path: Path, stack_of: StackOf) -> None:
    files = {"web.yaml": WEB + "listen: unix:/run/web.sock\n", "client.yaml": "kind: service\ncommand: [get]\nuses: [web]\n"}
    assert stack_of(tmp_path, files).service("client").uses == ("web",)


def test_implied_socket_clashing_with_a_socket_unit_of_its_name_is_an_error_naming_both(tmp_path: Path, problems: Problems) -> None:
    files = {"web.yaml": WEB + "listen: tcp:127.0.0.1:8080\n", "zz.yaml": "kind: socket\nname: web\nlisten: tcp:127.0.0.1:9090\n"}
    assert problems(tmp_path, files) == [
        "zz.yaml:2: name: socket 'web' is also the socket that service 'web' has through its listen: (web.yaml:3); keep one: "
        "remove listen: from the service, or remove this socket unit (or rename it) and let the service's listen: give the address"
    ]


def test_two_services_of_one_name_with_listen_are_reported_once(tmp_path: Path, problems: Problems) -> None:
    text = "kind: service\nname: web\ncommand: [a]\nlisten: unix:/run/a.sock\n---\nkind: service\nname: web\ncommand: [b]\nlisten: unix:/run/b.sock\n"
    assert problems(tmp_path, {"web.yaml": text}) == ["web.yaml:7: name: duplicate service 'web' (also defined at web.yaml:2)"]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("[]", "web.yaml:3: listen: expected at least one address"),
        ("[unix:/run/a.sock, 'tcp:x']", "web.yaml:3: listen[1]: "),
        ("{port: 80}", "web.yaml:3: listen: expected an address or a list of addresses, got a mapping"),
    ],
)
def test_bad_listen_on_a_service_names_file_line_and_key(tmp_path: Path, problems: Problems, listen: str, expected: str) -> None:
    (found,) = problems(tmp_path, {"web.yaml": WEB + f"listen: {listen}\n"})
    assert found.startswith(expected)


def test_listen_of_a_service_clashing_with_another_socket_is_reported_at_its_line(tmp_path: Path, problems: Problems) -> None:
    files = {"a.yaml": "kind: socket\nservice: web\nlisten: tcp:127.0.0.1:8080\n", "web.yaml": WEB + "listen:\n  - unix:/run/web.sock\n  - tcp:0.0.0.0:8080\n"}
    assert problems(tmp_path, files) == ["web.yaml:5: listen[1]: tcp:0.0.0.0:8080 overlaps tcp:127.0.0.1:8080 of socket 'a' (a.yaml:3)"]


def test_listen_of_a_service_fed_by_an_accept_socket_is_refused(tmp_path: Path, problems: Problems) -> None:
    files = {"web.yaml": WEB + "listen: unix:/run/web.sock\n", "conn.yaml": "kind: socket\nservice: web\naccept: true\nlisten: unix:/run/c.sock\n"}
    assert problems(tmp_path, files) == [
        "conn.yaml:3: accept: service 'web' gets one sandbox per connection from this socket, so it cannot also be fed by socket(s) without accept: web"
    ]


def test_the_plan_passes_the_implied_socket_as_fd_3_named_after_the_service(tmp_path: Path, stack_of: StackOf) -> None:
    from sandboxd.host.prepare import survey
    from sandboxd.plan.launch import HostFacts
    from sandboxd.plan.stack import plan_stack

    stack = stack_of(tmp_path, {"web.yaml": "kind: service\ncommand: [/bin/true]\nlisten: [tcp:127.0.0.1:0, 'tcp:[::1]:0']\n"})
    plan = plan_stack(stack, survey(stack, HostFacts(architecture="x86_64")))["web"]
    assert plan.fd_names == ("web", "web")
    assert ("LISTEN_FDS", "2") in plan.env and ("LISTEN_FDNAMES", "web:web") in plan.env


REDIS = "kind: service\ncommand: [redis-server]\n{ready}---\nkind: socket\nname: redis\nnetns: {netns}\nlisten: {listen}\nproxy: {proxy}\n{extra}"
HEALTH = "ready: {exec: [redis-cli, ping]}\n"


def _redis(stack_of: StackOf, folder: Path, ready: str = HEALTH, netns: str = "service", listen: str = "tcp:0.0.0.0:6379", proxy: str = "tcp:0.0.0.0:6379", extra: str = "") -> tuple[Socket, bool]:
    stack = stack_of(folder, {"redis.yaml": REDIS.format(ready=ready, netns=netns, listen=listen, proxy=proxy, extra=extra)})
    sock = stack.socket("redis")
    return sock, hands_off(sock, stack.service("redis"))


@pytest.mark.parametrize(
    ("listen", "proxy"),
    [
        ("tcp:0.0.0.0:6379", "tcp:0.0.0.0:6379"),
        ("tcp:0.0.0.0:6379", "tcp:127.0.0.1:6379"),
        ("tcp:127.0.0.1:6379", "tcp:0.0.0.0:6379"),
        ("'tcp:[::]:6379'", "'tcp:[::1]:6379'"),
        ("unix:@redis", "unix:@redis"),
    ],
)
def test_proxy_socket_on_the_programs_own_address_hands_off_even_with_a_health_check(tmp_path: Path, stack_of: StackOf, listen: str, proxy: str) -> None:
    sock, handed = _redis(stack_of, tmp_path, listen=listen, proxy=proxy)
    assert holds_proxy_address(sock) and handed


@pytest.mark.parametrize(
    ("netns", "listen", "proxy"),
    [
        ("host", "tcp:0.0.0.0:6379", "tcp:0.0.0.0:6379"),  # bound in the host's namespace, not the program's
        ("service", "tcp:0.0.0.0:6380", "tcp:0.0.0.0:6379"),  # another port
        ("service", "'tcp:[::]:6379'", "tcp:127.0.0.1:6379"),  # another IP version
        ("service", "unix:/run/redis.sock", "unix:/run/redis.sock"),  # the host's file, not the sandbox's
    ],
)
def test_proxy_socket_elsewhere_forwards_when_the_service_has_a_health_check(tmp_path: Path, stack_of: StackOf, netns: str, listen: str, proxy: str) -> None:
    sock, handed = _redis(stack_of, tmp_path, netns=netns, listen=listen, proxy=proxy)
    assert not holds_proxy_address(sock) and not handed


def test_handoff_false_on_the_programs_own_address_is_refused_with_the_fix(tmp_path: Path, problems: Problems) -> None:
    text = REDIS.format(ready=HEALTH, netns="service", listen="tcp:0.0.0.0:6379", proxy="tcp:0.0.0.0:6379", extra="handoff: false\n")
    assert problems(tmp_path, {"redis.yaml": text}) == [
        "redis.yaml:10: handoff: this socket holds tcp:0.0.0.0:6379 inside the namespace of 'redis' (netns: service): with handoff: "
        "false the program's own bind() of it fails (EADDRINUSE) and nothing can be forwarded to it; remove handoff: false (the "
        "program is given this socket when it binds tcp:0.0.0.0:6379), or make the program listen on another port and proxy to that"
    ]


def test_two_listen_addresses_on_the_programs_own_address_are_refused(tmp_path: Path, problems: Problems) -> None:
    text = REDIS.format(ready="", netns="service", listen="[tcp:0.0.0.0:6379, unix:/run/r.sock]", proxy="tcp:0.0.0.0:6379", extra="")
    (found,) = problems(tmp_path, {"redis.yaml": text})
    assert found.startswith("redis.yaml:7: listen: this socket holds tcp:0.0.0.0:6379 inside the namespace of 'redis' (netns: service), so")
    assert "needs one listen address" in found


def test_without_a_handoff_table_the_programs_own_address_is_a_validation_error(tmp_path: Path, stack_of: StackOf) -> None:
    stack = stack_of(tmp_path, {"redis.yaml": REDIS.format(ready=HEALTH, netns="service", listen="tcp:0.0.0.0:6379", proxy="tcp:0.0.0.0:6379", extra="")})
    assert intercept_bind(stack, stack.service("redis"), "x86_64") is True
    with pytest.raises(SpecErrors) as raised:
        intercept_bind(stack, stack.service("redis"), "aarch64")
    assert "no seccomp table for aarch64" in str(raised.value.errors[0])


def test_listen_overrides_replace_then_add_addresses_and_follow_a_services_listen(tmp_path: Path, stack_of: StackOf) -> None:
    from sandboxd.spec.overrides import with_overrides

    files = {"web.yaml": WEB + "listen: tcp:127.0.0.1:8080\n", "admin.yaml": "kind: socket\nservice: web\nlisten: unix:/run/admin.sock\n"}
    stack = stack_of(tmp_path, files)
    changed = with_overrides(stack, ["web:A=1"], ["web=tcp:127.0.0.1:0", "web=unix:@web"])
    assert changed.socket("web").listen == (parse_address("tcp:127.0.0.1:0"), parse_address("unix:@web"))
    assert changed.service("web").listen == changed.socket("web").listen
    assert changed.socket("admin") == stack.socket("admin")
    assert dict(changed.service("web").environment) == {"A": "1"}
    assert with_overrides(stack, [], ["admin=tcp:127.0.0.1:0"]).service("web").listen == stack.service("web").listen


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("nosuch=tcp:127.0.0.1:0", "expected SOCKET=ADDRESS with a socket of the stack (web), got 'nosuch=tcp:127.0.0.1:0'"),
        ("web", "expected SOCKET=ADDRESS with a socket of the stack (web), got 'web'"),
        ("web=tcp:localhost:80", "'web=tcp:localhost:80': expected an IP address like 127.0.0.1 or [::1], got 'localhost' (host names are not resolved)"),
    ],
)
def test_a_bad_listen_override_is_a_spec_error_under_its_option(tmp_path: Path, stack_of: StackOf, override: str, expected: str) -> None:
    from sandboxd.spec.overrides import with_listen

    stack = stack_of(tmp_path, {"web.yaml": WEB + "listen: tcp:127.0.0.1:8080\n"})
    with pytest.raises(SpecErrors) as raised:
        with_listen(stack, [override])
    (error,) = raised.value.errors
    assert (error.key, error.message) == ("--listen", expected)


@pytest.mark.parametrize(("family", "address"), [(socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0)), (socket.AF_UNIX, "\0sandboxd-queue-test")])
def test_accept_queue_counts_connections_made_and_not_yet_accepted(family: int, address: object) -> None:
    from sandboxd.host.queues import accept_queue

    with socket.socket(family) as server:
        server.bind(address)
        server.listen(8)
        assert accept_queue(server) == 0
        clients = [socket.socket(family) for _ in range(3)]
        for client in clients:
            client.connect(server.getsockname())
        assert accept_queue(server) == 3
        server.accept()[0].close()
        assert accept_queue(server) == 2
        for client in clients:
            client.close()


def test_a_datagram_socket_has_no_accept_queue() -> None:
    from sandboxd.host.queues import accept_queue

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert accept_queue(udp) is None


def test_queues_answer_is_typed_on_the_wire() -> None:
    from sandboxd.wire import QueuesAnswer, conforms

    good = {"ok": True, "sockets": [{"socket": "web", "index": 0, "address": "tcp:127.0.0.1:80", "service": "web", "queued": 0}, {"socket": "dns", "index": 0, "address": "udp:127.0.0.1:53", "service": "dns"}]}
    assert conforms(good, QueuesAnswer) == ""
    assert conforms({"ok": True, "sockets": [{"socket": "web", "index": 0, "address": "x", "service": "web", "queued": "1"}]}, QueuesAnswer) != ""


@pytest.mark.parametrize(
    ("netns", "ready", "intercept", "said"),
    [
        ("service", HEALTH, True, "given to the program when it binds tcp:0.0.0.0:6379"),
        ("host", "", True, "given to the program if it binds tcp:0.0.0.0:6379, else forwarded to it"),
        ("host", "", False, "forwarded to tcp:0.0.0.0:6379"),  # no handoff table on this machine
        ("host", HEALTH, True, "forwarded to tcp:0.0.0.0:6379"),
    ],
)
def test_the_summary_says_the_one_thing_a_proxy_socket_does(tmp_path: Path, stack_of: StackOf, netns: str, ready: str, intercept: bool, said: str) -> None:
    from types import SimpleNamespace

    from sandboxd.daemon.proxy import proxy_plan

    stack = stack_of(tmp_path, {"redis.yaml": REDIS.format(ready=ready, netns=netns, listen="tcp:0.0.0.0:6379", proxy="tcp:0.0.0.0:6379", extra="")})
    rt = SimpleNamespace(spec=stack.service("redis"), plan=SimpleNamespace(intercept_bind=intercept))
    assert proxy_plan(stack.socket("redis"), rt) == said  # type: ignore[arg-type]
