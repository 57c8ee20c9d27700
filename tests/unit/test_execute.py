"""`sandboxd exec`: the pure parts (options, the plan, id maps, exit codes)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from sandboxd.cli.main import build_parser
from sandboxd.sandbox.execute import ExecOptions, exit_code, host_id, plan_exec, wants_tty
from sandboxd.host.identity import lookup_identity

INFO: dict[str, Any] = {
    "init_pid": 4242,
    "cgroup": "/sys/fs/cgroup/unified/sandboxd/st/svc",
    "exec_cgroup": "/sys/fs/cgroup/unified/sandboxd/st/svc/sbd-exec-1",
    "cgroup_tasks": ["/sys/fs/cgroup/pids/sandboxd/st/svc/tasks"],
    "capabilities": [10],
    "seccomp_filter": "abcd",
    "uid": 1000,
    "gid": 1001,
    "env": [["PATH", "/usr/bin:/bin"], ["GREETING", "hi"]],
    "workdir": "/srv",
}


def test_a_terminal_by_default_only_when_stdin_and_stdout_are_terminals() -> None:
    assert wants_tty(None, True, True)
    assert not wants_tty(None, True, False)  # `exec svc -- cat f > out` keeps out's bytes exact
    assert not wants_tty(None, False, True)
    assert wants_tty(True, False, False)
    assert not wants_tty(False, True, True)


def test_plan_keeps_the_service_confinement_and_takes_the_options() -> None:
    plan = plan_exec("svc", INFO, ExecOptions(("sh",)), {}, tty=False)
    assert (plan.uid, plan.gid, plan.capabilities, plan.seccomp_filter, plan.workdir) == (1000, 1001, (10,), "abcd", "/srv")
    assert plan.exec_cgroup == "/sys/fs/cgroup/unified/sandboxd/st/svc/sbd-exec-1"
    assert plan.cgroup_tasks == ("/sys/fs/cgroup/pids/sandboxd/st/svc/tasks",)
    assert plan_exec("svc", INFO, ExecOptions(("sh",), workdir="/tmp"), {}, tty=False).workdir == "/tmp"


def test_plan_environment_is_the_services_then_term_with_a_terminal_then_each_e() -> None:
    caller = {"TERM": "xterm-kitty", "HOME": "/root", "EDITOR": "vi"}
    options = ExecOptions(("sh",), env=("GREETING=hello", "A=1", "A=2", "EDITOR", "MISSING"))
    with_tty = dict(plan_exec("svc", INFO, options, caller, tty=True).env)
    assert with_tty == {"PATH": "/usr/bin:/bin", "GREETING": "hello", "TERM": "xterm-kitty", "A": "2", "EDITOR": "vi"}
    without = dict(plan_exec("svc", INFO, ExecOptions(("sh",)), caller, tty=False).env)
    assert without == {"PATH": "/usr/bin:/bin", "GREETING": "hi"}  # nothing of the caller's unless asked
    assert dict(plan_exec("svc", INFO, ExecOptions(("sh",), env=("TERM=dumb",)), caller, tty=True).env)["TERM"] == "dumb"


def test_host_id_follows_the_user_namespace_map() -> None:
    id_map = "         0     100000      65536\n     65536       5000          1\n"
    assert host_id(id_map, 0) == 100000
    assert host_id(id_map, 1000) == 101000
    assert host_id(id_map, 65536) == 5000
    assert host_id(id_map, 70000) is None


def test_exit_code_is_the_commands_or_128_plus_the_signal() -> None:
    assert exit_code(7 << 8) == 7
    assert exit_code(signal.SIGTERM) == 128 + signal.SIGTERM
    assert os.waitstatus_to_exitcode(0) == exit_code(0) == 0


def test_exec_options_are_parsed_before_the_service() -> None:
    args = build_parser().parse_args(["exec", "-t", "-u", "nobody:nogroup", "-w", "/tmp", "-e", "A=1", "-e", "B", "web", "--", "sh", "-t"])
    assert (args.tty, args.user, args.workdir, args.env, args.service, args.command) == (True, "nobody:nogroup", "/tmp", ["A=1", "B"], "web", ["sh", "-t"])
    assert build_parser().parse_args(["exec", "-T", "web", "id"]).tty is False
    assert build_parser().parse_args(["exec", "web", "id"]).tty is None


@pytest.mark.parametrize(
    "argv",
    [["-w", "tmp"], ["-u", ""], ["-u", "nobody:"], ["-u", ":grp"], ["-e", "=x"], ["-t", "-T"]],
)
def test_bad_exec_options_are_refused_with_exit_code_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["exec", *argv, "web", "--", "id"])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_lookup_identity_takes_numbers_and_host_names() -> None:
    assert lookup_identity("1234", "", "", "host") == (1234, 1234, [])
    assert lookup_identity("1234", "55", "", "host") == (1234, 55, [])
    assert lookup_identity("root", "", "", "host") == (0, 0, [])
    uid, gid, problems = lookup_identity("no-such-user-here", "no-such-group", "", "host")
    assert [key for key, _ in problems] == ["user", "group"]
    assert "no user 'no-such-user-here' in the host's /etc/passwd" in problems[0][1]


def test_lookup_identity_reads_an_images_own_files(tmp_path: Any) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:500:600::/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:700:\n")
    assert lookup_identity("app", "", str(tmp_path), "image 'x'") == (500, 600, [])
    assert lookup_identity("app", "staff", str(tmp_path), "image 'x'") == (500, 700, [])
    assert lookup_identity("nobody", "", str(tmp_path), "image 'x'")[2][0][1].startswith("no user 'nobody' in the image 'x''s")


def test_relay_copies_pipes_both_ways_and_returns_the_exit_code(tmp_path: Any) -> None:
    """The CLI's half without a sandbox: a child of ours stands for the command."""
    import socket
    import subprocess

    from sandboxd.sandbox.relay import Relay

    theirs = [os.pipe() for _ in range(3)]  # the command's stdin, stdout, stderr
    proc = subprocess.Popen(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=theirs[0][0], stdout=theirs[1][1], stderr=theirs[2][1])
    for fd in (theirs[0][0], theirs[1][1], theirs[2][1]):
        os.close(fd)
    caller_in_r, caller_in_w = os.pipe()
    caller_out_r, caller_out_w = os.pipe()
    caller_err_r, caller_err_w = os.pipe()
    os.write(caller_in_w, b"hello\n")
    os.close(caller_in_w)
    (tmp_path / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    events = os.open(tmp_path / "cgroup.events", os.O_RDONLY)
    kill = os.open(os.devnull, os.O_WRONLY)
    ours, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other.close()  # the command "executed": its end of the channel is closed
    relay = Relay(os.pidfd_open(proc.pid), ours, tty=False, our_ends=[theirs[0][1], theirs[1][0], theirs[2][0]],
                  cgroup_kill=kill, cgroup_events=events, stdin=caller_in_r, stdout=caller_out_w, stderr=caller_err_w)
    assert relay.run() == (3, None)
    for fd in (caller_in_r, caller_out_w, caller_err_w):
        os.close(fd)
    assert os.read(caller_out_r, 100) == b"hello\n"
    assert os.read(caller_err_r, 100) == b"err\n"
