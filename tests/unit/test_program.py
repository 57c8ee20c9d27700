"""The set-up program: its ops, their encoding for the C interpreter, its guards, and what the
child needs before it can run one."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import struct
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from sandboxd.errors import HostError
from sandboxd.kernel import abi
from sandboxd.kernel.fake import ProcessEnded, RecordingKernel
from sandboxd.plan.launch import LaunchPlan, MountOp
from sandboxd.sandbox import handle
from sandboxd.sandbox.child import SETUP_BINARY
from sandboxd.sandbox.confine import Step, failure
from sandboxd.sandbox.ops import CALLS, GUARD_TESTS, Guard, Op, OpRecorder, encode, encode_op, program_head, register
from sandboxd.sandbox.program import Descriptors, HostView, Trees, compile_launch, with_environment
from sandboxd.sandbox.protocol import Connection, Executing, LaunchSandbox, SetupFailed, decode_status
from sandboxd.sandbox.protocol import encode as protocol_encode
from sandboxd.sandbox.reference import run_program

SOURCE = Path(__file__).parents[2] / "sandboxd" / "sandbox" / "setup" / "sbd-setup.c"


def launch(**fields: object) -> LaunchSandbox:
    mounts = (MountOp("rbind-root", "/", "/", options="in-place"), MountOp("proc", "/proc"))
    plan = dict(service="svc", argv=("/bin/serve",), env=(("A", "b=c"),), hostname="svc", workdir="/", clone_flags=abi.CLONE_NEWNS, mounts=mounts, fd_names=())
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
    for wrong in (Op("x", "chdir", (5,)), Op("x", "close", ("3",)), Op("x", "setgroups", ("1",)), Op("x", "write", (3, "0"))):
        with pytest.raises(TypeError, match="is no"):
            encode_op(wrong)
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


def test_the_compiled_program_ends_with_the_report_and_the_command_under_the_interpreter_as_its_init() -> None:
    ops = compile_launch(launch(), Descriptors(5, (6,)), Trees(), HostView())
    assert [op.call for op in ops[-2:]] == ["report_executing", "init_exec"]
    assert ops[-1].step == "execute /bin/serve"
    assert ops[-1].args == (("/bin/serve",), ("A=b=c",))
    assert ops[0].call == "reset_signals"
    assert all(op.call in CALLS for op in ops)


def test_a_connections_program_is_its_services_with_its_own_environment_in_the_exec() -> None:
    service = launch(mounts=(MountOp("tmpfs-root", "/"), MountOp("proc", "/proc"), MountOp("tmpfs", "/tmp", options="size=1m")))
    connection = dataclasses.replace(service, connection=Connection("svc@7", (("A", "b=c"), ("REMOTE_PORT", "4711"))))
    fds, view = Descriptors(5, (6,)), HostView((), (("usr", "dir", ""), ("bin", "symlink", "usr/bin"), ("vmlinuz", "other", "")))
    ops, own = compile_launch(service, fds, Trees(), view), compile_launch(connection, fds, Trees(), view)
    assert own[-1].args[1] == ("A=b=c", "REMOTE_PORT=4711")
    assert own == (*ops[:-1], with_environment(ops[-1], connection.launched().env))
    assert encode(own, 4) == program_head(len(ops), 4) + b"".join(encode_op(op) for op in ops[:-1]) + encode_op(own[-1], keep=False)


def test_a_guard_skips_its_op_and_a_tolerated_errno_is_no_failure() -> None:
    fake = RecordingKernel(["/proc/"], mount_points=["/proc"])
    fake.fail("umount2", "/proc", errno.EINVAL)
    ops = [
        Op("a", "mkdir", ("/proc", 0o755), (Guard("absent", "/proc"),)),
        Op("b", "umount2", ("/proc", 2), (Guard("own-mount", "/proc"),), (errno.EINVAL,)),
        Op("c", "mkdir", ("/new", 0o755), (Guard("absent", "/new"),), mark=0),
        Op("d", "rmdir", ("/new",), (Guard("marked", mark=0),)),
        Op("e", "rmdir", ("/never",), (Guard("marked", mark=1),)),
        Op("f", "init_exec", (("x",), ()), ()),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as unused, pytest.raises(ProcessEnded):
        run_program(fake, ops, unused, {})
    assert fake.calls == [("umount2", "/proc", 2), ("mkdir", "/new", 0o755), ("rmdir", "/new"), ("init_exec", ["x"], {})]


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


# ── the compiled interpreter itself, run without privileges on ops that need none ──

needs_binary = pytest.mark.skipif(
    not os.access(SETUP_BINARY, os.X_OK) and not os.environ.get("CI"), reason="sbd-setup is not built (scripts/test builds it)"
)


def interpreted(ops: list[Op], fds: tuple[int, ...] = ()) -> tuple[int, bytes]:
    """Run `ops` with the built interpreter; its exit code and what it said on the channel."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    os.write(write_end, encode(ops, 3))
    os.close(write_end)
    with ours, theirs:
        done = subprocess.run([str(SETUP_BINARY), str(read_end), str(theirs.fileno()), "-1"], pass_fds=(read_end, theirs.fileno(), *fds), timeout=30)
        os.close(read_end)
        theirs.close()
        said = ours.recv(1 << 16)
    return done.returncode, said


def python_failure(step: str, call: Callable[[], object]) -> bytes:
    """What the Python set-up reported when `call` failed in `step`."""
    with pytest.raises(OSError) as raised:
        call()
    return protocol_encode(failure(Step(step), raised.value, 127))


@needs_binary
def test_the_interpreter_writes_a_failure_byte_for_byte_as_the_python_codec() -> None:
    step = 'bind "/srv/é 𝄞" on /x\\y\t\x7f'
    code, said = interpreted([Op(step, "fail", (errno.ELOOP, "is a symlink\n", "/run/é"))])
    assert code == 127
    assert said == protocol_encode(SetupFailed(step, "is a symlink\n (/run/é)", "/run/é", 127))


@needs_binary
def test_the_interpreter_names_the_errno_and_path_as_the_python_calls_did(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    missing, below_file = str(tmp_path / "absent" / "x"), str(tmp_path / "file" / "x" / "y")
    assert interpreted([Op("change directory to x", "chdir", (missing,))])[1] == python_failure("change directory to x", lambda: os.chdir(missing))
    assert interpreted([Op("s", "makedirs", (below_file, 0o777))])[1] == python_failure("s", lambda: os.makedirs(below_file, exist_ok=True))
    assert interpreted([Op("s", "mkdir", (missing, 0o777))])[1] == python_failure("s", lambda: os.mkdir(missing))
    assert interpreted([Op("s", "symlink", ("target", missing))])[1] == python_failure("s", lambda: os.symlink("target", missing))


@needs_binary
def test_the_interpreter_follows_symlinks_inside_as_realpath_does_and_refuses_the_old_root(tmp_path: Path) -> None:
    (tmp_path / "old" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to("old/sub")
    (tmp_path / "loop").symlink_to("loop")
    target = str(tmp_path / "link" / "a")
    code, said = interpreted([Op("bind /src on /data", "bind_inside", (target, -1, 1, 1, str(tmp_path / "old")))])
    assert (code, said) == (127, protocol_encode(SetupFailed("bind /src on /data", f"leads out of the sandbox through a symlink ({target})", target, 127)))
    where = tmp_path / "link" / ".." / "link" / "b"
    real = os.path.realpath(where)
    code, said = interpreted([Op("s", "bind_inside", (str(where), -1, 1, 1, "/nowhere"))])
    message = decode_status(said)  # the mount point made where realpath leads, the move of no tree refused there
    assert isinstance(message, SetupFailed) and message.path == real and message.detail.startswith("move_mount: ")
    # A symlink loop, or more than 40 symlinks on the way, is ELOOP at the link where it stops: never
    # a path left partly resolved, which the kernel would follow afresh past the check (into `old`).
    loop = tmp_path / "loop"
    code, said = interpreted([Op("s", "bind_inside", (str(loop / "c"), -1, 1, 1, "/nowhere"))])
    assert said == python_failure("s", lambda: os.stat(loop))
    for n in range(1, 45):
        (tmp_path / f"l{n}").symlink_to(f"l{n + 1}")
    (tmp_path / "l45").symlink_to("old/sub")
    code, said = interpreted([Op("s", "bind_inside", (str(tmp_path / "l1" / "c"), -1, 1, 1, str(tmp_path / "old")))])
    assert (code, said) == (127, protocol_encode(SetupFailed("s", f"{os.strerror(errno.ELOOP)} ({tmp_path / 'l41'})", str(tmp_path / "l41"), 127)))
    assert not (tmp_path / "old" / "sub" / "c").exists()


@needs_binary
def test_the_interpreter_refuses_a_file_where_a_folder_is_and_the_other_way_round_by_name(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to("folder")
    for target, is_dir, detail in [
        (tmp_path / "link", 0, "is a directory, and what is mounted there is a file"),
        (tmp_path / "file", 1, "is not a directory, and what is mounted there is one"),
    ]:
        real = os.path.realpath(target)
        code, said = interpreted([Op("s", "bind_inside", (str(target), -1, 1, is_dir, "/nowhere"))])
        assert (code, said) == (127, protocol_encode(SetupFailed("s", f"{detail} ({real})", real, 127)))
    code, said = interpreted([Op("s", "bind_inside", (str(tmp_path / "file" / "x"), -1, 1, 1, "/nowhere"))])
    assert said == protocol_encode(SetupFailed("s", f"{os.strerror(errno.ENOTDIR)} ({tmp_path / 'file'})", str(tmp_path / "file"), 127))


@needs_binary
def test_the_interpreter_skips_a_guarded_op_reports_executing_and_executes(tmp_path: Path) -> None:
    made = tmp_path / "made"
    ops = [
        Op("a", "mkdir", (str(made), 0o755), (Guard("absent", str(made)),)),
        Op("b", "mkdir", (str(made), 0o755), (Guard("absent", str(made)),)),  # skipped: made by a
        Op("c", "report_executing"),
        Op("execute true", "init_exec", (("true",), ("PATH=/usr/bin:/bin",))),  # found in PATH of its own environment
    ]
    code, said = interpreted(ops)
    assert code == 0 and made.is_dir()
    assert isinstance(decode_status(said), Executing)


def started(argv: tuple[str, ...], env: tuple[str, ...] = ("PATH=/usr/bin:/bin",)) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The interpreter run on Executing and init_exec of `argv`, and our end of its channel, at
    the channel's EOF (the command executed) or its first message."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    os.write(write_end, encode([Op("c", "report_executing"), Op(f"execute {argv[0]}", "init_exec", (argv, env))], 3))
    os.close(write_end)
    with theirs:
        init = subprocess.Popen([str(SETUP_BINARY), str(read_end), str(theirs.fileno()), "-1"], pass_fds=(read_end, theirs.fileno()), stderr=subprocess.DEVNULL)
        os.close(read_end)
    ours.settimeout(30)
    assert isinstance(decode_status(ours.recv(4096)), Executing)
    return init, ours


@needs_binary
def test_the_init_exits_with_the_commands_code_or_128_plus_the_signal_that_killed_it() -> None:
    for argv, code in ((("sh", "-c", "exit 7"), 7), (("sh", "-c", "kill -SEGV $$"), 128 + 11), (("true",), 0)):
        init, channel = started(argv)
        with channel:
            assert channel.recv(4096) == b""  # the command executed: the init holds the channel no more
            assert init.wait(timeout=30) == code


@needs_binary
def test_the_init_forwards_every_signal_to_the_commands_group_and_stops_it_for_the_terminal_ones(tmp_path: Path) -> None:
    said = tmp_path / "said"
    names = ("HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "ALRM", "WINCH", "CONT")
    # The trap of a child of the command too: the whole group gets the signal (dumb-init's setsid mode).
    script = f"trap 'echo child >> {said}' USR2; (trap '' HUP INT QUIT USR1 TERM ALRM; trap 'echo grandchild >> {said}' USR2; echo set >> {said}; while :; do sleep 0.01; done) & "
    script += "".join(f"trap 'echo {name} >> {said}' {name}; " for name in names if name != "USR2")
    script += f"echo ready >> {said}; while [ ! -e {tmp_path}/end ]; do sleep 0.01; done; kill -KILL $!; exit 3"
    init, channel = started(("sh", "-c", script))
    with channel, _group_killed_after(init):
        assert channel.recv(4096) == b""
        wait_for(lambda: said.exists() and {"ready", "set"} <= set(said.read_text().split()))  # both set their traps
        for name in names:
            init.send_signal(getattr(signal, f"SIG{name}"))
            expected = ("child", "grandchild") if name == "USR2" else (name,)
            wait_for(lambda: all(line in said.read_text().split() for line in expected), lambda: f"{name}: {said.read_text().split()}")
        init.send_signal(signal.SIGTSTP)  # forwarded as SIGSTOP: no terminal is there to stop for
        wait_for(lambda: _state(init.pid) == "T")
        init.send_signal(signal.SIGCONT)
        wait_for(lambda: _state(init.pid) != "T")
        (tmp_path / "end").write_text("")
        assert init.wait(timeout=30) == 3


@contextmanager
def _group_killed_after(init: subprocess.Popen[bytes]) -> Iterator[None]:
    """Whatever the test's end, nothing of the command's process group outlives it (its child
    ignores SIGTERM; run outside a pid namespace, nothing else would end it)."""
    children = Path(f"/proc/{init.pid}/task/{init.pid}/children")
    wait_for(lambda: children.read_text() != "", lambda: "the init to fork its command")
    group = int(children.read_text().split()[0])
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        if init.poll() is None:
            init.kill()
            init.wait()


def _state(init_pid: int) -> str:
    """The state letter of the init's first child (the command)."""
    child = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()[0]
    return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for(condition: Callable[[], bool], what: Callable[[], str] = lambda: "") -> None:
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"not in 30 s: {what()}")


@needs_binary
def test_a_command_that_cannot_be_executed_is_a_failed_step_with_127_or_126(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a program\n")
    for command, detail, code in (("no-such-program", "No such file or directory", 127), (str(tmp_path / "plain"), "Permission denied", 126)):
        init, channel = started((command, "x"))
        with channel:
            assert decode_status(channel.recv(4096)) == SetupFailed(f"execute {command}", detail, "", code)
            assert channel.recv(4096) == b""
            assert init.wait(timeout=30) == code


@needs_binary
def test_the_init_holds_no_descriptor_once_the_command_runs(tmp_path: Path) -> None:
    init, channel = started(("sh", "-c", f"while [ ! -e {tmp_path}/end ]; do sleep 0.01; done"))
    with channel:
        assert channel.recv(4096) == b""
        assert os.listdir(f"/proc/{init.pid}/fd") == []
        (tmp_path / "end").write_text("")
        assert init.wait(timeout=30) == 0


def test_the_python_twin_of_init_exec_exits_as_its_command_did() -> None:
    """LINUX.init_exec (kernel/seam.py), the real call of the seam that the reference runs through:
    the command's code, 128+n when signal n killed it, a signal sent to the init reaching its trap."""
    run = "import sys; from sandboxd.kernel.seam import LINUX; LINUX.init_exec(sys.argv[1:], {'PATH': '/usr/bin:/bin'})"
    for script, code in (("exit 5", 5), ("kill -USR1 $$", 128 + signal.SIGUSR1), ("trap 'exit 6' HUP; kill -HUP $PPID; while :; do sleep 0.01; done", 6)):
        done = subprocess.run([sys.executable, "-c", run, "sh", "-c", script], timeout=30, stderr=subprocess.DEVNULL)
        assert done.returncode == code, script


def test_plans_alike_but_for_their_binds_sources_share_the_walk_and_each_gets_its_own_program() -> None:
    from sandboxd.sandbox import program

    def plan(source: str, hostname: str) -> LaunchSandbox:
        mounts = (MountOp("tmpfs-root", "/"), MountOp("proc", "/proc"), MountOp("mask", "/proc/kcore"), MountOp("bind", "/etc/hostname", source))
        return launch(mounts=mounts, hostname=hostname, clone_flags=abi.CLONE_NEWNS | abi.CLONE_NEWUTS)

    fds, trees = Descriptors(5, (6,)), Trees((9,), dev=10)
    view = HostView((False,), (("usr", "dir", ""), ("etc", "dir", "")))
    first, second = plan("/run/x/a/hostname", "a"), plan("/run/x/b/hostname", "b")
    program._WALKS.clear()
    parts = [program.compile_parts(request, fds, trees, view) for request in (first, second)]
    assert parts[0][1] is parts[1][1]  # the walk: compiled once, the very same ops
    kept = compile_launch(second, fds, trees, view)
    program._WALKS.clear()
    assert kept == compile_launch(second, fds, trees, view)  # what a fresh compile makes
    assert [op.step for op in kept if op.call == "bind_inside"] == ["bind /run/x/b/hostname on /etc/hostname"]
    assert ("sethostname", ("b",)) in [(op.call, op.args) for op in kept]
    other_trees = compile_launch(second, fds, Trees((11,), dev=12), view)
    assert [op.args[1] for op in other_trees if op.call == "bind_inside"] == [11]
