"""The upgrade's state record (daemon/record.py): encoded and decoded unchanged; a format this
sandboxd does not read, a field missing, unknown or of the wrong type, or descriptors that do not
match the fields are refused, each with its reason."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sandboxd.daemon.record import (
    FORMAT,
    Descriptor,
    InstanceRecord,
    LaunchRecord,
    RecordRefused,
    ServiceRecord,
    SocketRecord,
    StackRecord,
    decode,
    encode,
    pack_spec,
    unpack_spec,
)
from sandboxd.spec.model import Limits


def _service(**changes: object) -> ServiceRecord:
    service = ServiceRecord(
        name="web", state="ready", reason="READY=1", was_ready=True,
        launch=LaunchRecord(7, 1234, 20, 12.5, 1, 2, None, None),
        restarts=2, starts=(1.0, 2.0), restart_at=None, output_r=21, output_w=22, partial="aGk=",
        notify_fd=23, status_text="up", main_pid=1235, listener=-1, handed_off=(),
        fdstore=(), sources=(("/srv", 24),), baseline=(("oom_kills", 0),), connections=0, active=0, proxies=(("cache", 31),),
    )  # fmt: skip
    return dataclasses.replace(service, **changes)  # type: ignore[arg-type]


def _record(**changes: object) -> StackRecord:
    fds = {3: "fork server link", 4: "control socket", 5: "socket web[0]", 20: "web: pidfd", 21: "web: output (r)",
           22: "web: output (w)", 23: "web: notify socket", 24: "web: bind source /srv", 25: "web@1: pidfd"}  # fmt: skip
    record = StackRecord(
        format=FORMAT, version="0.1.0", upgrades=1, token="t", instance="s", runtime_dir="/run/sandboxd/s",
        detached=True, pid=100, fork_server_pid=101, fork_server_fd=3, last_request_id=9, control_fd=4, lease_fd=-1,
        state_cgroups=("/sys/fs/cgroup/x",), state_files=(), state_dirs=(), state_subnets=(), state_userns=(),
        netns=(), sockets=(SocketRecord("web", 0, 5),), services=(_service(),),
        instances=(InstanceRecord(8, "web", "web@1", 25, "running"),), started_wall=1.5, exec_count=0,
        spec=pack_spec(("spec",)), descriptors=tuple(Descriptor(fd, what, "socket") for fd, what in fds.items()),
    )  # fmt: skip
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _wire(record: StackRecord) -> dict[str, object]:
    wire: dict[str, object] = json.loads(encode(record))
    return wire


def test_a_record_is_decoded_as_it_was_encoded() -> None:
    record = _record()
    assert decode(encode(record)) == record
    assert next(iter(_wire(record))) == "format"


@pytest.mark.parametrize("version", [0, FORMAT + 1, 99])
def test_a_format_this_sandboxd_does_not_read_is_refused_first(version: int) -> None:
    wire = _wire(_record())
    wire["format"] = version
    del wire["services"]  # the format is looked at before anything else
    with pytest.raises(RecordRefused, match=f"state record format {version}: this sandboxd reads format {FORMAT} only"):
        decode(json.dumps(wire).encode())


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"format": "1"}', b'{"format": true}', b"{}"])
def test_a_record_without_a_format_number_is_refused(data: bytes) -> None:
    with pytest.raises(RecordRefused):
        decode(data)


def test_a_missing_an_unknown_or_a_mistyped_field_is_refused() -> None:
    wire = _wire(_record())
    del wire["control_fd"]
    with pytest.raises(RecordRefused, match="lacks its field control_fd"):
        decode(json.dumps(wire).encode())
    wire = _wire(_record())
    wire["new_thing"] = 1
    with pytest.raises(RecordRefused, match="no field"):
        decode(json.dumps(wire).encode())
    wire = _wire(_record())
    wire["pid"] = True  # a bool is no pid
    with pytest.raises(RecordRefused, match="pid"):
        decode(json.dumps(wire).encode())


def test_descriptors_must_match_the_fields_that_use_them() -> None:
    record = _record()
    with pytest.raises(RecordRefused, match="unnamed: \\[25\\]"):
        decode(encode(dataclasses.replace(record, descriptors=record.descriptors[:-1])))
    twice = (*record.descriptors, record.descriptors[0])
    with pytest.raises(RecordRefused, match="twice"):
        decode(encode(dataclasses.replace(record, descriptors=twice)))


def test_states_this_sandboxd_does_not_know_are_refused() -> None:
    with pytest.raises(RecordRefused, match="state 'hibernating' is unknown"):
        decode(encode(_record(services=(_service(state="hibernating"),))))
    with pytest.raises(RecordRefused, match="web@1"):
        decode(encode(_record(instances=(InstanceRecord(8, "web", "web@1", 25, "asleep"),))))


def test_the_spec_travels_and_a_dataclass_whose_fields_changed_is_refused() -> None:
    limits = Limits(memory=1 << 20)
    assert unpack_spec(pack_spec((limits, {"a": (limits,)}))) == (limits, {"a": (limits,)})
    stale = Limits()
    object.__delattr__(stale, "pids")  # as an older sandboxd's Limits without that field
    with pytest.raises(RecordRefused, match="Limits in the state record: fields missing \\['pids'\\]"):
        unpack_spec(pack_spec(stale))
    with pytest.raises(RecordRefused, match="cannot be read"):
        unpack_spec("bm90IGEgcGlja2xl")
