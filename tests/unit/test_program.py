"""The set-up program: its ops, their encoding for the C interpreter, its guards, and what the
child needs before it can run one."""

from __future__ import annotations

import errno
import re
import socket
import struct
from pathlib import Path

import pytest

from sandboxd.errors import HostError
from sandboxd.kernel import abi
from sandboxd.kernel.fake import ProcessEnded, RecordingKernel
from sandboxd.plan.launch import LaunchPlan, MountOp
from sandboxd.sandbox import handle
from sandboxd.sandbox.ops import CALLS, GUARD_TESTS, Guard, Op, OpRecorder, encode, encode_op, register
from sandboxd.sandbox.program import Descriptors, HostView, Trees, compile_launch
from sandboxd.sandbox.protocol import LaunchSandbox, SetupFailed, decode_status
from sandboxd.sandbox.reference import run_program

SOURCE = Path(__file__).parents[2] / "sandboxd" / "sandbox" / "setup" / "sbd-setup.c"


def launch(**fields: object) -> LaunchSandbox:
    mounts = (MountOp("rbind-root", "/", "/", options="in-place"), MountOp("proc", "/proc"))
    plan = dict(service="svc", argv=("/init", "--", "/bin/serve"), env=(("A", "b=c"),), hostname="svc", workdir="/", clone_flags=abi.CLONE_NEWNS, mounts=mounts, fd_names=())
    plan.update(fields)
    return LaunchSandbox(1, LaunchPlan(**plan), "/sys/fs/cgroup/x", (), "/run/x/root", False, 0)  # type: ignore[arg-type]


def test_the_interpreter_numbers_the_calls_and_guards_as_the_compiler_does() -> None:
    text = SOURCE.read_text()
    calls = re.search(r"enum call \{(.*?)\};", text, re.S)
    tests = re.search(r"enum test \{(.*?)\};", text, re.S)
    assert calls and tests
    assert [name.strip() for name in calls[1].split(",")] == [f"C_{name.upper()}" for name in CALLS] + ["C_COUNT"]
    assert [name.strip() for name in tests[1].split(",")] == [f"G_{name.upper().replace('-', '_')}" for name in GUARD_TESTS] + ["G_COUNT"]


def test_an_op_is_one_length_prefixed_record() -> None:
    op = Op("mount proc on /proc", "umount2", ("/proc", abi.MNT_DETACH), (Guard("own-mount", "/proc"),), (errno.EINVAL,))
    data = encode_op(op)
    (length, call, into, mark, guards, tolerated, args) = struct.unpack_from("<IHhhBBB", data)
    assert (length, call, into, mark, guards, tolerated, args) == (len(data), list(CALLS).index("umount2"), -1, -1, 1, 1, 2)
    assert data[13:17] == struct.pack("<I", len(op.step)) and data[17 : 17 + len(op.step) + 1] == op.step.encode() + b"\0"
    assert data.endswith(b"s" + struct.pack("<I", 5) + b"/proc\0" + b"i" + struct.pack("<q", abi.MNT_DETACH))
    program = encode([op, op], 4)
    assert program[:12] == b"SBD1" + struct.pack("<Ii", 2, 4) and program[12:] == data + data


def test_an_op_with_the_wrong_arguments_or_a_nul_byte_is_refused() -> None:
    with pytest.raises(TypeError):
        encode_op(Op("x", "mount", ("/proc",)))
    with pytest.raises(ValueError, match="null byte"):
        encode_op(Op("x", "chdir", ("/a\0b",)))


def test_the_recorder_gives_results_registers_and_ops_their_guards() -> None:
    k = OpRecorder()
    k.name = "set up descriptors"
    first = k.dup_above(5, 100)
    with k.when(Guard("absent", "/x")), k.tolerating(errno.EPERM):
        k.mkdir("/x")
    k.close(first)
    assert first == register(2) == -3
    assert k.ops[1] == Op("set up descriptors", "mkdir", ("/x", 0o777), (Guard("absent", "/x"),), (errno.EPERM,))
    assert k.ops[2].guards == () and k.ops[2].args == (first,)


def test_the_compiled_program_ends_with_the_report_and_the_exec_of_the_sealed_init() -> None:
    ops = compile_launch(launch(), Descriptors(5, (6,), 80), Trees(), HostView())
    assert [op.call for op in ops[-2:]] == ["report_executing", "execve"]
    assert ops[-1].step == "execute /bin/serve"
    assert ops[-1].args[1:] == (("/init", "--", "/bin/serve"), ("A=b=c",))
    assert ops[0].call == "reset_signals"
    assert all(op.call in CALLS for op in ops)


def test_a_guard_skips_its_op_and_a_tolerated_errno_is_no_failure() -> None:
    fake = RecordingKernel(["/proc/"], mount_points=["/proc"])
    fake.fail("umount2", "/proc", errno.EINVAL)
    ops = [
        Op("a", "mkdir", ("/proc", 0o755), (Guard("absent", "/proc"),)),
        Op("b", "umount2", ("/proc", 2), (Guard("own-mount", "/proc"),), (errno.EINVAL,)),
        Op("c", "mkdir", ("/new", 0o755), (Guard("absent", "/new"),), mark=0),
        Op("d", "rmdir", ("/new",), (Guard("marked", mark=0),)),
        Op("e", "rmdir", ("/never",), (Guard("marked", mark=1),)),
        Op("f", "execve", (3, ("x",), ()), ()),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as unused, pytest.raises(ProcessEnded):
        run_program(fake, ops, unused, {})
    assert fake.calls == [("umount2", "/proc", 2), ("mkdir", "/new", 0o755), ("rmdir", "/new"), ("execve", 3, ["x"], {})]


def test_a_failing_op_reports_its_step_and_path_and_exits_127() -> None:
    fake = RecordingKernel(["/run/"])
    ops = [Op("mount image-root on /", "fail", (errno.ELOOP, "is a symlink in the image", "/run"), (Guard("dir", "/run"),))]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        with pytest.raises(ProcessEnded) as ended:
            run_program(fake, ops, theirs, {})
        assert ended.value.code == 127
        assert decode_status(ours.recv(4096)) == SetupFailed("mount image-root on /", "is a symlink in the image (/run)", "/run", 127)


def test_without_the_set_up_interpreter_sandboxd_says_to_run_scripts_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(handle, "SETUP_BINARY", tmp_path / "sbd-setup")
    with pytest.raises(HostError) as error:
        handle.ForkServer.start()
    assert "set-up interpreter" in str(error.value) and "scripts/install" in error.value.hint
