"""`sandboxd exec SERVICE -- CMD…`: run a command inside a running sandbox, from the CLI itself,
confined exactly as the service is, and handing the sandbox nothing of the host's.

Why not the CLI's own descriptors: any process in the sandbox with the command's uid can open
/proc/PID/fd/N of the command (or take it with pidfd_getfd). Were those the CLI's stdin and
stdout, the sandbox would hold the admin's host terminal, and could write to it and read the next
line typed at the host's shell long after exec returned. So the command gets a pseudo-terminal
allocated from the sandbox's own devpts (`-t`) or pipes (`-T`), and the CLI, which stays outside
the sandbox's pid namespace, copies bytes between them and its own terminal (relay.py).

Why a cgroup of its own per exec: when the CLI ends, even by SIGKILL, nothing of the command may
go on running in the sandbox, not even a background child that ignores SIGHUP or a daemon that
left its session. The stack creates `<service's cgroup>/sbd-exec-N` for the CLI's control
connection; the command is born in it (clone3 CLONE_INTO_CGROUP) and nothing in a sandbox can
leave it. When the command exits, the CLI kills what is left in it (cgroup.kill); when the
connection closes, however the CLI ended, the stack sends SIGHUP to what is left, kills it after
HANGUP_GRACE and removes the cgroup. (A stack that dies takes its sandboxes with it, exec'd
commands included: they are in the sandbox's pid namespace.)

Why not a pid namespace nested in the sandbox's, with an init of its own that dies with the CLI
(which the kernel would clean up with no one's help): a command in it could not signal the
service's processes (a child namespace cannot name its parent's), and /proc, the sandbox's,
would number its own processes differently from getpid(): `kill 2` typed after `ps` showed the
service as 2 would hit the exec'd shell itself. The command here is in the sandbox's own pid
namespace, as `docker exec` runs one, and `ps`, `kill` and /proc mean what they say.

    CLI (host pid ns; stays outside)                        command (sandbox's pid ns)
    ────────────────────────────────                        ──────────────────────────
    control connection: exec_info + session ─▶ the stack makes sbd-exec-N
    pidfd_open(init), check its cgroup; open the v1 tasks files, sbd-exec-N's cgroup.kill
    setns(pidfd, PID|MNT); a pty from its /dev/pts/ptmx (or pipes)
    clone3 into sbd-exec-N ────────────────────────────────▶ fds 0-2 := pty slave or pipes, nothing else;
    setns back into its own mnt and pid ns                  setsid; join the v1 cgroups; setns(pidfd,
                                                            [USER|]UTS|IPC|NET); become userns root;
                                                            TIOCSCTTY; chdir; confine (seccomp, caps, ids)
           ◀── EOF on the channel (close-on-exec) ────────── execve(CMD)
               or SetupFailed(step, detail, path, exit: 125|126|127); _exit(exit)
    copy bytes; SIGWINCH -> TIOCSWINSZ; signals -> the command
           ◀── waitid(pidfd): its exit code (128+N if killed by N); cgroup.kill for what it left
    exit: the connection closes ─▶ the stack: SIGHUP, HANGUP_GRACE, SIGKILL, rmdir sbd-exec-N

Until it has replaced fds 0-2 and closed the rest (its first step), the command's process holds
the CLI's descriptors; it is root with every capability then, which no process of the service
has, so the kernel refuses the service /proc/PID/fd and ptrace of it until it is confined, by
when it holds nothing of the host's. The CLI does its work in the sandbox's mount namespace only
for the pty, with every module imported before: Python code found in a sandbox's tree is never
run by anything of sandboxd's.

Exit codes follow `docker exec`: the command's own, 125 when sandboxd could not set it up, 126
when the command could not be executed, 127 when it was not found.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sys
import termios
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

from sandboxd.errors import LaunchError, SandboxdError
from sandboxd.kernel import abi, linux
from sandboxd.kernel.seam import LINUX
from sandboxd.host.cgroups import cgroup2_of
from sandboxd.sandbox.confine import Step, become_userns_root, confine, failure
from sandboxd.sandbox.protocol import encode
from sandboxd.sandbox.relay import FORWARDED_SIGNALS, Relay
from sandboxd.wire import ExecInfo

EXIT_SETUP_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


@dataclass(frozen=True)
class ExecOptions:
    """What the caller asked for on the command line."""

    argv: tuple[str, ...]
    tty: bool | None = None  # -t / -T; None: a terminal when stdin and stdout are terminals
    user: str = ""  # -u USER[:GROUP], resolved by the stack (exec_info) as the spec's user: is
    workdir: str = ""  # -w DIR
    env: tuple[str, ...] = ()  # -e KEY=VALUE, or -e KEY for the caller's own value


@dataclass(frozen=True)
class ExecPlan:
    """Everything the command's processes need, decided before any of them exists."""

    service: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    workdir: str
    uid: int
    gid: int
    capabilities: tuple[int, ...]
    seccomp_filter: str
    tty: bool
    init_pid: int
    cgroup: str  # the service's cgroup2 directory: its init must be in it
    exec_cgroup: str  # the command's own cgroup2 directory, below the service's (sbd-exec-N)
    cgroup_tasks: tuple[str, ...]  # the v1 tasks files the command joins too (hybrid host), writing "0"


def wants_tty(flag: bool | None, stdin_is_tty: bool, stdout_is_tty: bool) -> bool:
    """-t and -T decide; without either, a terminal when both stdin and stdout are terminals.

    Not stdin alone: `sandboxd exec svc -- cat f > out` typed at a terminal must give `out` the
    command's bytes, not a terminal's (CR LF line ends, stderr mixed in), as lxc exec decides."""
    return flag if flag is not None else stdin_is_tty and stdout_is_tty


def plan_exec(service: str, info: ExecInfo, options: ExecOptions, caller_env: Mapping[str, str], tty: bool) -> ExecPlan:
    """The command's plan from the stack's answer (`exec_info`) and the caller's options (pure).

    The environment is the service's (without its descriptors' and notify variables), then the
    caller's TERM when the command gets a terminal (so that programs know what the caller's
    terminal understands), then every -e in order."""
    env = dict((str(k), str(v)) for k, v in info["env"])
    if tty and "TERM" in caller_env:
        env["TERM"] = caller_env["TERM"]
    for item in options.env:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
        elif key in caller_env:
            env[key] = caller_env[key]
    return ExecPlan(
        service=service,
        argv=options.argv,
        env=tuple(env.items()),
        workdir=options.workdir or str(info["workdir"]),
        uid=int(info["uid"]),
        gid=int(info["gid"]),
        capabilities=tuple(int(c) for c in info["capabilities"]),
        seccomp_filter=str(info["seccomp_filter"]),
        tty=tty,
        init_pid=int(info["init_pid"]),
        cgroup=str(info["cgroup"]),
        exec_cgroup=str(info["exec_cgroup"]),
        cgroup_tasks=tuple(str(p) for p in info["cgroup_tasks"]),
    )


def host_id(id_map: str, inside: int) -> int | None:
    """The host's id for id `inside` of a user namespace, from its uid_map or gid_map text
    ("inside outside count" lines); None if it is not mapped."""
    for line in id_map.splitlines():
        fields = line.split()
        if len(fields) == 3:
            first, outside, count = (int(f) for f in fields)
            if first <= inside < first + count:
                return outside + inside - first
    return None


def exit_code(wait_status: int) -> int:
    """A wait status as a shell shows it: the exit code, or 128+N when killed by signal N."""
    return os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else 128 + os.WTERMSIG(wait_status)


# ───────────────────────────── the CLI ─────────────────────────────


def exec_in(plan: ExecPlan) -> int:
    """Run the planned command and relay its terminal or pipes; its exit code. The caller holds
    the control connection that `exec_cgroup` belongs to until this returns."""
    _open_standard_descriptors()
    pidfd = _open_init(plan)
    step = Step()
    procs: list[int] = []
    ours_stdio: list[int] = []
    their_stdio: list[int] = []
    kill_fd = events_fd = exec_cgroup = -1
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # close-on-exec, as every socket
    try:
        step.name = "open the cgroups"
        exec_cgroup = os.open(plan.exec_cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        kill_fd = os.open("cgroup.kill", os.O_WRONLY | os.O_CLOEXEC, dir_fd=exec_cgroup)
        events_fd = os.open("cgroup.events", os.O_RDONLY | os.O_CLOEXEC, dir_fd=exec_cgroup)
        procs = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in plan.cgroup_tasks]
        step.name = "read the sandbox's user namespace"
        in_userns = os.stat(f"/proc/{plan.init_pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        id_maps = [_read(f"/proc/{plan.init_pid}/{kind}") for kind in ("uid_map", "gid_map")] if in_userns else []
        step.name = "join the sandbox's mount namespace"
        with _in_sandbox_mount_and_pid_namespace(pidfd):
            if plan.tty:
                step.name = "allocate a terminal in the sandbox"
                root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    master, slave = linux.open_pty_in_root(root)
                finally:
                    os.close(root)
                ours_stdio, their_stdio = [master], [slave, slave, slave]
                _give_terminal(slave, plan, id_maps)
            else:
                step.name = "make the command's pipes"
                stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
                ours_stdio, their_stdio = [stdin_w], [stdin_r]
                for _ in ("stdout", "stderr"):
                    read_end, write_end = os.pipe2(os.O_CLOEXEC)
                    ours_stdio.append(read_end)
                    their_stdio.append(write_end)
            step.name = "fork into the command's cgroup"
            command, command_pidfd = linux.fork_into_cgroup_with_pidfd(exec_cgroup)
            if command == 0:
                _command(plan, pidfd, procs, theirs, their_stdio, in_userns)
    except OSError as e:
        for fd in [*ours_stdio, kill_fd, events_fd]:
            if fd >= 0:
                os.close(fd)
        ours.close()
        raise _ExecSetupFailed(plan.service, f"exec: {step.name}", failure(step, e, EXIT_SETUP_FAILED).detail) from None
    finally:
        theirs.close()
        for fd in {*their_stdio, *procs, pidfd, exec_cgroup}:
            if fd >= 0:
                os.close(fd)
    relay = Relay(command_pidfd, ours, tty=plan.tty, our_ends=ours_stdio, cgroup_kill=kill_fd, cgroup_events=events_fd)
    code, failed = relay.run()
    if failed is not None:
        print(f"sandboxd: {plan.service}: exec: {failed.step}: {failed.detail}", file=sys.stderr)
        code = failed.exit
    return code


def _open_standard_descriptors() -> None:
    """Fds 0-2 open (on /dev/null if the caller closed one), so no descriptor of ours lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


def _open_init(plan: ExecPlan) -> int:
    """A pidfd of the service's init, checked to be in the service's cgroup: a pid reused by an
    unrelated process since the stack answered is refused, and the pidfd cannot be reused."""
    try:
        pidfd = os.pidfd_open(plan.init_pid)
        cgroup = cgroup2_of(plan.init_pid)
    except OSError:
        raise SandboxdError(f"{plan.service}: its sandbox ended before exec could join it") from None
    if not cgroup or not plan.cgroup.endswith(cgroup):
        os.close(pidfd)
        raise SandboxdError(f"{plan.service}: its sandbox ended before exec could join it")
    return pidfd


@contextmanager
def _in_sandbox_mount_and_pid_namespace(pidfd: int) -> Iterator[None]:
    """Within the block, the CLI is in the sandbox's mount namespace (its / is the sandbox's, for
    the pty) and forks into its pid namespace; afterwards it is back in its own, with its cwd."""
    saved = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in ("/proc/self/ns/mnt", "/proc/self/ns/pid", ".")]
    try:
        linux.setns(pidfd, abi.CLONE_NEWNS | abi.CLONE_NEWPID)
        try:
            yield
        finally:
            mnt, pid, cwd = saved
            linux.setns(mnt, abi.CLONE_NEWNS)
            linux.setns(pid, abi.CLONE_NEWPID)
            os.fchdir(cwd)
    finally:
        for fd in saved:
            os.close(fd)


def _give_terminal(slave: int, plan: ExecPlan, id_maps: list[str]) -> None:
    """The pty belongs to the command's user, as login and sshd give a terminal (mode 0600):
    programs that check their terminal's owner (or reopen it by name) work as that user."""
    uid, gid = plan.uid, plan.gid
    if id_maps:
        mapped_uid, mapped_gid = host_id(id_maps[0], uid), host_id(id_maps[1], gid)
        if mapped_uid is None or mapped_gid is None:
            return
        uid, gid = mapped_uid, mapped_gid
    os.fchown(slave, uid, gid)
    os.fchmod(slave, 0o600)


class _ExecSetupFailed(LaunchError):
    exit_code = EXIT_SETUP_FAILED


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# ───────────────────────────── inside the sandbox ─────────────────────────────


def _report(channel: socket.socket, step: Step, e: BaseException, code: int) -> NoReturn:
    try:
        channel.send(encode(failure(step, e, code)))
    finally:
        os._exit(code)


def _command(plan: ExecPlan, pidfd: int, procs: list[int], channel: socket.socket, stdio: list[int], in_userns: bool) -> NoReturn:
    """The CLI's child, born in the command's cgroup and the sandbox's pid and mount namespaces:
    gives up every host descriptor, joins the rest of the sandbox, takes the pty as its
    controlling terminal (job control, ^C), is confined as the service is, and executes."""
    step = Step()
    try:
        step.name = "set up descriptors"
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)  # the pty slave or the pipes, in place of the CLI's own
        keep = sorted({channel.fileno(), pidfd, *procs})
        start = 3
        for fd in keep:
            os.closerange(start, fd)
            start = fd + 1
        os.closerange(start, 1 << 20)
        step.name = "reset signals"
        LINUX.reset_signals()
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        step.name = "start a session"
        os.setsid()  # out of the caller's session and terminal
        step.name = "join cgroups"
        for fd in procs:
            os.write(fd, b"0")
            os.close(fd)
        step.name = "join the sandbox's namespaces"
        flags = abi.CLONE_NEWUTS | abi.CLONE_NEWIPC | abi.CLONE_NEWNET | (abi.CLONE_NEWUSER if in_userns else 0)
        linux.setns(pidfd, flags)
        os.close(pidfd)
        if in_userns:
            step.name = "become root of the user namespace"
            become_userns_root(LINUX)
        if plan.tty:
            step.name = "take the terminal"
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        step.name = f"change directory to {plan.workdir}"
        os.chdir(plan.workdir)
        confine(LINUX, plan.seccomp_filter, plan.capabilities, True, step, plan.uid, plan.gid)
        step.name = f"execute {plan.argv[0]}"
        os.execvpe(plan.argv[0], list(plan.argv), dict(plan.env))
    except BaseException as e:  # noqa: BLE001 - never unwind into the CLI's code
        if not step.name.startswith("execute "):
            _report(channel, step, e, EXIT_SETUP_FAILED)
        if isinstance(e, OSError):
            e.filename = None  # the last directory of PATH tried says nothing
        _report(channel, step, e, EXIT_NOT_FOUND if isinstance(e, OSError) and e.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE)
