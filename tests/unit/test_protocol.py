"""The fork server's protocol: every message survives the wire; anything else is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sandboxd.plan.launch import HOST_IDS, LaunchPlan, MountOp, UserNamespace
from sandboxd.sandbox.protocol import (
    Connection,
    Executing,
    Exited,
    ForkFailed,
    LaunchSandbox,
    ProtocolError,
    RunCommand,
    SetupFailed,
    StartProxy,
    decode_reply,
    decode_request,
    decode_status,
    encode,
    from_wire,
    to_wire,
)

PLAN = LaunchPlan(
    service="web",
    argv=("/bin/serve", "-p", "80"),
    env=(("PATH", "/bin"), ("LISTEN_FDS", "1")),
    hostname="web",
    workdir="/srv",
    clone_flags=0x4C020000,
    mounts=(MountOp("image-root", "/", "/var/lib/sandboxd/images/trees/abc", options=HOST_IDS), MountOp("proc", "/proc"), MountOp("bind", "/data", "/srv/data", readonly=False)),
    fd_names=("http",),
    fd_sockets=(("http", 0),),
    proxied=(("admin", 1),),
    intercept_bind=True,
    net="join",
    capabilities=(10, 12),
    seccomp_filter="abcd",
    uid=33,
    gid=33,
    userns=UserNamespace(200000, 200000, 65536, 100000, 100000),
)
REQUESTS = [
    LaunchSandbox(1, PLAN, "/sys/fs/cgroup/unified/sandboxd/st/web", ("/sys/fs/cgroup/pids/sandboxd/st/web/cgroup.procs",), "/run/sandboxd/st/root", True, 1),
    LaunchSandbox(2, dataclasses.replace(PLAN, userns=None, net="private"), "/sys/fs/cgroup/sandboxd/st/web", (), "/run/x", False, 0),
    RunCommand(3, 4242, "/sys/fs/cgroup/x", (), ("/bin/check", "--quick"), (("PATH", "/bin"),), "/", (10,), "", 33, 33, False),
    StartProxy(4, "/sys/fs/cgroup/x", ("/sys/fs/cgroup/pids/x/cgroup.procs",), ("/usr/lib/systemd/systemd-socket-proxyd", "127.0.0.1:80"), 65534, 65534, True),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_survives_the_wire(message: LaunchSandbox | RunCommand | StartProxy) -> None:
    assert decode_request(encode(message)) == message


@pytest.mark.parametrize("message", [Exited(7, 256), ForkFailed(8, "fork: Resource temporarily unavailable (/sys/fs/cgroup/x)")], ids=lambda m: type(m).__name__)
def test_every_reply_survives_the_wire(message: Exited | ForkFailed) -> None:
    assert decode_reply(encode(message)) == message


@pytest.mark.parametrize("message", [Executing(123456789), SetupFailed("mount proc on /proc", "Permission denied (/proc)", "/proc", 127)], ids=lambda m: type(m).__name__)
def test_every_status_survives_the_wire(message: Executing | SetupFailed) -> None:
    assert decode_status(encode(message)) == message


def test_a_decoded_plan_has_the_types_of_its_hints() -> None:
    plan = from_wire(LaunchPlan, json.loads(json.dumps(to_wire(PLAN))))
    assert plan == PLAN
    assert isinstance(plan.mounts, tuple) and isinstance(plan.mounts[0], MountOp)
    assert isinstance(plan.fd_sockets[0], tuple) and isinstance(plan.userns, UserNamespace)


def test_a_plan_on_the_wire_is_its_fields_as_sandboxd_config_prints_them() -> None:
    assert json.loads(json.dumps(to_wire(PLAN))) == json.loads(json.dumps(dataclasses.asdict(PLAN)))


def test_a_message_names_its_type_beside_its_fields() -> None:
    assert json.loads(encode(Exited(7, 0))) == {"type": "exited", "arg": {"id": 7, "status": 0}}


def test_a_failed_fork_counts_as_a_child_that_exited_127() -> None:
    assert ForkFailed(1, "x").wait_status == 127 << 8 and Exited(1, 9).wait_status == 9


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        (b"not json", "not JSON"),
        (b'{"type": "exited", "arg": {"id": 1, "status": 0}}', "unexpected message type 'exited'"),
        (b'{"type": "launch"}', "a message is"),
        (b'{"type": "reboot", "arg": {}}', "unexpected message type 'reboot'"),
        (b'{"type": "run", "arg": {"id": 1}}', "RunCommand lacks its field init_pid"),
    ],
)
def test_a_request_that_is_not_the_protocols_is_refused(wire: bytes, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        decode_request(wire)


def field_changed(message: object, path: list[str | int], value: object) -> bytes:
    wire = json.loads(encode(message))  # type: ignore[arg-type]
    where = wire["arg"]
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    return json.dumps(wire).encode()


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        (["id"], True, r"LaunchSandbox.id: expected int, got True"),  # a bool is no number here
        (["netns"], 1, r"LaunchSandbox.netns: expected bool"),
        (["plan", "net"], "bridge", r"LaunchSandbox.plan: LaunchPlan.net: expected one of"),
        (["plan", "mounts", 0, "kind"], "nfs", r"MountOp.kind: expected one of"),
        (["plan", "fd_sockets", 0], ["http"], r"LaunchPlan.fd_sockets: expected an array of 2"),
        (["plan", "argv"], "/bin/sh", r"LaunchPlan.argv: expected an array"),
        (["plan", "userns", "extra"], 1, r"UserNamespace has no field \['extra'\]"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_it(path: list[str | int], value: object, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        decode_request(field_changed(REQUESTS[0], path, value))


def test_a_field_with_a_default_may_be_left_out() -> None:
    assert decode_status(b'{"type": "setup-failed", "arg": {"step": "fork", "detail": "gone"}}') == SetupFailed("fork", "gone", "", 127)


def test_only_what_the_protocol_knows_has_a_wire_form() -> None:
    with pytest.raises(TypeError):
        to_wire({"a": 1})


def test_a_launch_is_encoded_the_same_with_what_was_kept_of_earlier_ones() -> None:
    message = REQUESTS[0]
    first = encode(message)
    assert encode(message) == first  # the plan's text kept
    assert json.loads(first) == {"type": "launch", "arg": json.loads(json.dumps(to_wire(message)))}
    # A connection's plan (accept mode): its service's, another name and environment.
    connection = dataclasses.replace(PLAN, service="web@7", env=(*PLAN.env, ("REMOTE_PORT", "4711")), fd_names=("connection",), fd_sockets=())
    request = dataclasses.replace(message, id=9, plan=connection)
    assert json.loads(encode(request))["arg"] == json.loads(json.dumps(to_wire(request)))
    assert decode_request(encode(request)) == request


def test_a_launch_is_encoded_without_evaluating_type_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's first launch request made the encoder evaluate every message class's
    hints (typing.get_type_hints: some 0.6 ms); a value's own type says how it goes on the wire."""
    import typing

    from sandboxd.sandbox.codec import field_names

    field_names.cache_clear()

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the encoder evaluated type hints")

    monkeypatch.setattr(typing, "get_type_hints", refuse)
    request = dataclasses.replace(REQUESTS[0], plan=dataclasses.replace(PLAN, service="hints"))
    data = encode(request)
    monkeypatch.undo()
    assert decode_request(data) == request
    assert json.loads(data)["arg"]["plan"] == json.loads(json.dumps(dataclasses.asdict(request.plan)))


def test_equal_mount_ops_of_two_plans_are_encoded_alike() -> None:
    other = dataclasses.replace(PLAN, service="db", mounts=tuple(dataclasses.replace(op) for op in PLAN.mounts))
    wire = json.loads(encode(dataclasses.replace(REQUESTS[0], plan=other)))["arg"]["plan"]
    assert wire["mounts"] == json.loads(json.dumps(to_wire(PLAN)))["mounts"] and wire["service"] == "db"


def test_descriptors_to_hold_survive_the_wire() -> None:
    from sandboxd.sandbox.protocol import HoldDescriptors

    assert decode_request(encode(HoldDescriptors(1))) == HoldDescriptors(1)


def test_the_ids_to_prepare_storage_for_survive_the_wire_and_only_a_plan_with_an_idmapped_bind_needs_it() -> None:
    from sandboxd.plan.launch import STORE_IDS, MountOp, UserNamespace
    from sandboxd.sandbox.protocol import PrepareStorage

    ids = UserNamespace(uid=165536, gid=165536, count=65536, store_uid=100000, store_gid=100000)
    assert decode_request(encode(PrepareStorage(ids))) == PrepareStorage(ids)
    bind = MountOp("bind", "/t", "/srv/t", options=STORE_IDS)
    assert dataclasses.replace(PLAN, userns=ids, mounts=(*PLAN.mounts, bind)).stores_through_ids
    assert not dataclasses.replace(PLAN, userns=None, mounts=(*PLAN.mounts, bind)).stores_through_ids
    assert not dataclasses.replace(PLAN, userns=ids, mounts=tuple(op for op in PLAN.mounts if op.options != STORE_IDS)).stores_through_ids


def test_a_plans_text_is_decoded_once_and_a_connection_brings_its_own_name_and_environment() -> None:
    connection = Connection("web@7", (("PATH", "/bin"), ("REMOTE_PORT", "4711")))
    first, second = (dataclasses.replace(REQUESTS[0], id=n, connection=connection if n == 11 else None) for n in (10, 11))
    decoded = [decode_request(encode(request)) for request in (first, second)]
    assert decoded == [first, second]
    assert isinstance(decoded[0], LaunchSandbox) and isinstance(decoded[1], LaunchSandbox)
    assert decoded[0].plan is decoded[1].plan  # the fork server keeps its program by it
    assert decoded[0].launched() is decoded[0].plan
    assert decoded[1].launched() == dataclasses.replace(PLAN, service="web@7", env=connection.env)


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (b'"net":"join"', b'"net":"bridge"', r"LaunchSandbox.plan: LaunchPlan.net: expected one of"),
        (b'"netns":true', b'"netns":1', r"LaunchSandbox.netns: expected bool"),
        (b'"sources":1', b'"sources":1,"extra":2', r"LaunchSandbox has no field \['extra'\]"),
        (b'"hostname":"web"', b'"hostname":"web",', r"not JSON"),
    ],
)
def test_a_launch_in_its_compact_form_is_checked_as_any_message(old: bytes, new: bytes, complaint: str) -> None:
    data = encode(dataclasses.replace(REQUESTS[0], plan=dataclasses.replace(PLAN, workdir="/compact")))
    assert data.startswith(b'{"type":"launch","arg":{') and old in data
    with pytest.raises(ProtocolError, match=complaint):
        decode_request(data.replace(old, new))


def test_equal_mount_ops_are_decoded_once_and_a_wrong_type_is_still_refused() -> None:
    plans = [decode_request(encode(dataclasses.replace(REQUESTS[0], plan=dataclasses.replace(PLAN, service=name)))) for name in ("a", "b")]
    assert isinstance(plans[0], LaunchSandbox) and isinstance(plans[1], LaunchSandbox)
    assert plans[0].plan.mounts == PLAN.mounts and all(x is y for x, y in zip(plans[0].plan.mounts, plans[1].plan.mounts))
    readonly = next(i for i, op in enumerate(PLAN.mounts) if op.readonly)
    with pytest.raises(ProtocolError, match=r"MountOp.readonly: expected bool, got 1"):
        decode_request(field_changed(REQUESTS[0], ["plan", "mounts", readonly, "readonly"], 1))
    with pytest.raises(ProtocolError, match=r"MountOp.target: expected str"):
        decode_request(field_changed(REQUESTS[0], ["plan", "mounts", readonly, "target"], ["/x"]))


def test_the_plans_to_expect_survive_the_wire_and_their_launches_get_the_very_plans_decoded_then() -> None:
    from sandboxd.sandbox import protocol
    from sandboxd.sandbox.protocol import ExpectLaunches

    other = dataclasses.replace(PLAN, service="db", hostname="db")
    protocol._PLANS.clear()
    expected = decode_request(encode(ExpectLaunches("/run/sandboxd/st/root", (PLAN, other))))
    assert expected == ExpectLaunches("/run/sandboxd/st/root", (PLAN, other))
    assert isinstance(expected, ExpectLaunches)
    launch = decode_request(encode(dataclasses.replace(REQUESTS[0], plan=other)))
    assert isinstance(launch, LaunchSandbox) and launch.plan is expected.plans[1]  # decoded once, with the expectation


def test_an_expectation_holds_the_first_plans_that_fit_in_one_message() -> None:
    from sandboxd.sandbox.protocol import BATCH_BYTES, EXPECT_MAX, ExpectLaunches

    plans = [dataclasses.replace(PLAN, service=f"s{k}") for k in range(EXPECT_MAX + 3)]
    assert ExpectLaunches.first("/r", plans).plans == tuple(plans[:EXPECT_MAX])
    big = [dataclasses.replace(PLAN, service=f"b{k}", env=(("BLOB", "x" * (BATCH_BYTES // 3)),)) for k in range(4)]
    message = ExpectLaunches.first("/r", big)
    assert message.plans == tuple(big[:2]) and len(encode(message)) < BATCH_BYTES
    assert ExpectLaunches.first("/r", []).plans == ()


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"expect","arg":{"root":"/r","sizes":[5]}}\nabc',  # shorter than its sizes say
        b'{"type":"expect","arg":{"root":"/r","sizes":[-1]}}\n',
        b'{"type":"expect","arg":{"sizes":[]}}\n',
        b'{"type":"expect","arg":{"root":"/r","sizes":[3]}}\n{}}',
        b'{"type":"expect","arg":{"root":"/r","sizes":[2]}}\n{}',  # not a plan
    ],
)
def test_a_malformed_expectation_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(data)
