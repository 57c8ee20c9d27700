"""`sandboxd exec SERVICE -- CMD…`: run a command inside a running sandbox, from the CLI itself.

The CLI (root) asks the stack for the service's init pid and its confinement (capabilities,
seccomp filter, user, environment), moves itself into the service's cgroups (v2, and v1 for its
limits), joins the init's user namespace (if it has one), pid, uts, ipc, network and mount
namespaces (the mount namespace last: it brings the sandbox's root), and forks the command there, with the CLI's own stdin, stdout and stderr, so a
terminal stays a terminal. The command is confined exactly as the service is.
"""

from __future__ import annotations

import os
from typing import Any

from .launcher import _confine, _Step, become_userns_root, join_namespaces


def exec_in(info: dict[str, Any], argv: list[str]) -> int:
    """Run `argv` in the sandbox described by `info` (from the control socket); its exit code."""
    pid = int(info["init_pid"])
    for procs in [os.path.join(info["cgroup"], "cgroup.procs"), *info["cgroup_procs"]]:
        with open(procs, "w") as f:
            f.write("0")
    in_userns = join_namespaces(pid)
    child = os.fork()
    if child == 0:
        try:
            if in_userns:
                become_userns_root()
            # A session of its own: no controlling terminal, so it cannot push keystrokes into the
            # caller's terminal (TIOCSTI) even where the kernel still allows that.
            os.setsid()
            os.chdir(info["workdir"])
            _confine(info["seccomp_filter"], tuple(info["capabilities"]), True, _Step(), info["uid"], info["gid"])
            os.execvpe(argv[0], argv, dict(info["env"]))
        except OSError as e:
            os.write(2, f"sandboxd exec: {argv[0]}: {e.strerror}\n".encode())
            os._exit(127)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
