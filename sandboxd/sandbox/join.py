"""What the fork server starts inside a running sandbox: a command (RunCommand: health checks,
`reload:` commands) or a proxy (StartProxy). `sandboxd exec` joins from the CLI (execute.py).

The child is born in the sandbox's cgroup (clone3 CLONE_INTO_CGROUP, forkserver.py), joins
further cgroups and the namespaces, reports Executing, and forks what runs (a joined pid
namespace takes effect for children only), waits for it and exits with its status. What runs
dies with that process (PR_SET_PDEATHSIG, set last before exec), so killing it ends both.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import NoReturn

from sandboxd.kernel import abi, linux
from sandboxd.kernel.seam import LINUX
from sandboxd.plan.environment import listen_environment
from sandboxd.sandbox.child import EXIT_SETUP_FAILED, EXIT_UNEXPECTED
from sandboxd.sandbox.confine import Step, become_userns_root, confine, failure, place_fds, report
from sandboxd.sandbox.protocol import Executing, RunCommand, StartProxy


def join_namespaces(target: int) -> bool:
    """Join the namespaces of process `target`: pid, uts, ipc, net, then mnt (which brings its
    root), and its user namespace last, if it has its own. Last, because joining it drops every
    capability in the host's user namespace, and the network namespace of a service on a network
    belongs to the host's. True if a user namespace was joined."""
    own_user = os.stat("/proc/self/ns/user").st_ino
    names = ["pid", "uts", "ipc", "net", "mnt"]
    in_userns = os.stat(f"/proc/{target}/ns/user").st_ino != own_user
    if in_userns:
        names.append("user")
    fds = [os.open(f"/proc/{target}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in names]
    for fd in fds:
        linux.setns(fd, 0)
        os.close(fd)
    return in_userns


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG, set after the last change of credentials (which clears it: becoming root
    of a user namespace, or the service's user). `parent` is what getppid() said right after the
    fork (0 when the parent is outside a pid namespace joined); if the parent died before this,
    the child was given to another and getppid() says so."""
    linux.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(EXIT_UNEXPECTED)


def _join_then_run(cgroup_tasks: tuple[str, ...], channel: socket.socket, join: Callable[[], bool], run: Callable[[bool, int], None]) -> NoReturn:
    """The shape of running something inside a running sandbox, in a child born in its cgroup:
    join `cgroup_tasks`, `join` namespaces (True if a user namespace was joined), report, fork
    `run` (which calls `_die_with_parent` last before exec), wait, exit with its status."""
    step = Step()
    try:
        step.name = "reset signals"
        LINUX.reset_signals()
        step.name = "start a session"
        os.setsid()  # out of the fork server's session, and its scheduling group (forkserver.py)
        step.name = "join cgroups"
        for procs in cgroup_tasks:
            LINUX.write_file(procs, "0")
        step.name = "join the sandbox's namespaces"
        in_userns = join()
        report(LINUX, channel, Executing(time.monotonic_ns()))
        pid = os.fork()
        if pid == 0:
            run(in_userns, os.getppid())
            os._exit(EXIT_UNEXPECTED)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except OSError as e:
        report(LINUX, channel, failure(step, e, EXIT_SETUP_FAILED, path_in_detail=False))
        os._exit(EXIT_SETUP_FAILED)
    except BaseException as e:  # noqa: BLE001
        report(LINUX, channel, failure(step, e, EXIT_UNEXPECTED))
        os._exit(EXIT_UNEXPECTED)


def run_in_sandbox(request: RunCommand, status_fd: int, output_fd: int) -> NoReturn:
    """Run a command in all the namespaces of a running sandbox's init, confined like the service."""

    def run(in_userns: bool, parent: int) -> None:
        if in_userns:
            become_userns_root(LINUX)
        os.chdir(request.workdir)
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        null = linux.open_null_in_root(root)  # the sandbox's: a host descriptor could be reopened
        for target_fd in (0, 1, 2):
            os.dup2(output_fd if target_fd and output_fd >= 0 else null, target_fd)
        os.closerange(3, 1 << 20)
        confine(LINUX, request.seccomp_filter, request.capabilities, True, Step(), request.uid, request.gid)
        _die_with_parent(parent)
        os.execvpe(request.argv[0], list(request.argv), dict(request.env))

    _join_then_run(request.cgroup_tasks, socket.socket(fileno=status_fd), lambda: join_namespaces(request.init_pid), run)


def run_proxy(request: StartProxy, status_fd: int, output_fd: int, fds: list[int]) -> NoReturn:
    """Start the proxy (see proxy.py) in a running sandbox's network namespace, with the bound
    sockets as fds 3.., and exit with its status.

    `fds` is the sandbox init's pidfd, then (for a unix target) an O_PATH descriptor of the
    program's socket file, then the bound sockets. The proxy joins the network namespace only: not
    the sandbox's pid namespace (a process there of the same uid could open /proc/PID/root of the
    proxy, which is the host's root), not its mount namespace (the proxy is the host's program). It
    ends with the sandbox through the cgroup, and with this process (PR_SET_PDEATHSIG).
    """
    channel = socket.socket(fileno=fcntl.fcntl(status_fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)))
    os.close(status_fd)
    pidfd, *rest = fds
    target = rest.pop(0) if request.unix_target else -1

    def join() -> bool:
        linux.setns(pidfd, abi.CLONE_NEWNET)
        return False

    def run(_in_userns: bool, parent: int) -> None:
        place_fds(LINUX, output_fd, rest + ([target] if target >= 0 else []))
        os.closerange(3 + len(rest) + (1 if target >= 0 else 0), 1 << 20)
        env = {**listen_environment(len(rest), pid=os.getpid()), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        argv = list(request.argv)
        if target >= 0:
            argv[-1] = f"/proc/self/fd/{3 + len(rest)}"  # the socket file, opened inside the sandbox's root
        confine(LINUX, "", (), True, Step(), request.uid, request.gid)
        _die_with_parent(parent)
        os.execve(argv[0], argv, env)

    _join_then_run(request.cgroup_tasks, channel, join, run)
