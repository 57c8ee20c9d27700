"""Faults injected into sandboxd's own parts and into the host, each case a test: the fork server,
a proxy, a health check and the supervisor killed (during a reload, during a stop); the log and
state directory full; descriptors used up; control clients that hang. Each asserts the end
state, what `ps` says, that `down` returns and (the autouse fixture) that nothing is left.

No wait here is timed: each ends on its event (a state in `ps`, a line in a log, an answer);
the bound of every wait (HANG) only ends a hang."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import HANG, RUNTIME, cgroup_dir, wait_until, write

from sandboxd.host.listening import UNIX_LISTENING

PRINTER = r"""
import socket, sys
# Prints each line it is sent, then answers "ok": a line and its answer are one event.
listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    with conn, conn.makefile("rwb") as f:
        for line in f:
            sys.stdout.write(line.decode()); sys.stdout.flush()
            f.write(b"ok\n"); f.flush()
"""


def sbd(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=HANG * 2, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def services(stack: str, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return {svc["name"]: svc for svc in json.loads(sbd("ps", "--json", "-p", stack, env=env).stdout)["services"]}


def supervisor_pid(stack: str, runtime: Path = RUNTIME) -> int:
    return int(json.loads((runtime / stack / "state.json").read_text())["pid"])


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def processes_in(cgroup: Path) -> list[int]:
    return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def log_of(stack: str, name: str, env: dict[str, str] | None = None) -> str:
    return sbd("logs", "-p", stack, name, env=env).stdout


def ask(address: tuple[str, int], line: bytes) -> bytes:
    with socket.create_connection(address, timeout=HANG) as conn:
        conn.sendall(line)
        return conn.makefile("rb").readline()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def detached(spec_dir: Path, stack: str, *up: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """`up -d` of the folder; `down` afterwards, whatever happened (that `down` returns is asserted)."""
    sbd("up", "-d", "-p", stack, *up, str(spec_dir), env=env)
    try:
        yield
    finally:
        down = sbd("down", "-p", stack, env=env, check=False)
        assert down.returncode == 0 or "was dead" in down.stdout or "no stack named" in down.stderr, down.stderr


def printer(spec_dir: Path, port: int, name: str = "printer", extra: str = "") -> None:
    (spec_dir / "printer.py").write_text(PRINTER)
    write(
        spec_dir,
        f"{name}.yaml",
        f"""
        kind: service
        command: [python3, /t/printer.py]
        mounts: [{{source: ., target: /t}}]
        {extra}
        ---
        kind: socket
        listen: tcp:127.0.0.1:{port}
        """,
    )


def stubborn(spec_dir: Path) -> None:
    """A service that ignores SIGTERM and may take an hour to stop: its stop is a state that lasts."""
    write(spec_dir, "stubborn.yaml", "kind: service\nstop_timeout: 3600s\ncommand: [sh, -c, 'trap \"\" TERM; while :; do sleep 1; done']\n")


def down_while_stopping(stack: str, victim: int) -> str:
    """`down` of the stack, `victim` killed with SIGKILL once its service is stopping; what
    `down` printed, once it returned (with 0)."""
    down = subprocess.Popen([sys.executable, "-m", "sandboxd", "down", "-p", stack], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: services(stack)["stubborn"]["state"] == "stopping", "the service is stopping")
        os.kill(victim, signal.SIGKILL)
        out, err = down.communicate(timeout=HANG)
    finally:
        if down.poll() is None:
            down.kill()
            down.wait()
    assert down.returncode == 0, err
    return out


# ── the fork server ──


def test_the_fork_servers_death_fails_every_service_with_the_reason_and_restarts_them_per_restart(spec_dir: Path) -> None:
    port = free_port()
    printer(spec_dir, port, extra="restart: on-failure")
    write(spec_dir, "once.yaml", "kind: service\nrestart: 'no'\ncommand: [sleep, '3600']\n")
    with detached(spec_dir, "forks"):
        assert ask(("127.0.0.1", port), b"before\n") == b"ok\n"
        supervisor = supervisor_pid("forks")
        [fork_server] = children(supervisor)
        old = services("forks")
        os.kill(fork_server, signal.SIGKILL)
        now = wait_until(lambda: (s := services("forks"))["printer"]["restarts"] == 1 and s["printer"]["state"] == "running" and s, "the printer restarted")
        assert now["printer"]["pid"] != old["printer"]["pid"]
        assert now["once"]["state"] == "failed"
        assert "died with sandboxd's fork server" in now["once"]["reason"] and "restart: no" in now["once"]["reason"]
        assert now["once"]["signal"] == "SIGKILL"
        row = next(line for line in sbd("ps", "-p", "forks").stdout.splitlines() if line.startswith("once "))
        assert "died with sandboxd's fork server" in row
        assert ask(("127.0.0.1", port), b"after\n") == b"ok\n"  # the same socket, the new sandbox
        assert children(supervisor) != [fork_server]
        said = log_of("forks", "sandboxd")
        assert said.count("sandboxd's fork server (pid") == 1 and "printer: failed -> starting: restart #1, with a new fork server" in said
        assert log_of("forks", "printer").count("before") == 1
    assert not (RUNTIME / "forks").exists()


def test_the_fork_servers_death_during_a_stop_ends_the_stop_and_down_returns(spec_dir: Path) -> None:
    stubborn(spec_dir)
    sbd("up", "-d", "-p", "stubborn", str(spec_dir))
    supervisor = supervisor_pid("stubborn")
    [fork_server] = children(supervisor)
    assert "is down" in down_while_stopping("stubborn", fork_server)


def test_a_second_sigterm_to_a_detached_supervisor_that_is_stopping_kills_every_service(spec_dir: Path) -> None:
    stubborn(spec_dir)
    sbd("up", "-d", "-p", "twice", str(spec_dir))
    supervisor = supervisor_pid("twice")
    service = services("twice")["stubborn"]["pid"]
    os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: services("twice")["stubborn"]["state"] == "stopping", "the service is stopping")
    os.kill(supervisor, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{supervisor}").exists() or "Z" in Path(f"/proc/{supervisor}/stat").read_text().rsplit(")", 1)[1].split()[0], "the supervisor's end")
    assert not Path(f"/proc/{service}").exists() and not (RUNTIME / "twice").exists()  # its own end removed them, not the `ls` below
    assert sbd("ls").stdout.count("twice") == 0


def test_down_of_a_supervisor_that_does_not_answer_escalates_to_sigkill_and_cleans_up(spec_dir: Path) -> None:
    write(spec_dir, "idle.yaml", "kind: service\nstop_timeout: 1s\ncommand: [sleep, '3600']\n")
    sbd("up", "-d", "-p", "wedged", str(spec_dir))
    supervisor = supervisor_pid("wedged")
    os.kill(supervisor, signal.SIGSTOP)  # it can neither answer nor handle a signal: only SIGKILL ends it
    try:
        down = sbd("down", "-p", "wedged")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGCONT)
    assert "does not answer" in down.stderr and "SIGTERM again" in down.stderr and "SIGKILL to its supervisor" in down.stderr
    assert "is down" in down.stdout


def test_sandboxes_do_not_inherit_the_supervisors_oom_score_adj(spec_dir: Path) -> None:
    write(spec_dir, "idle.yaml", "kind: service\ncommand: [sleep, '3600']\n")
    with detached(spec_dir, "oom"):
        supervisor = supervisor_pid("oom")
        shielded = Path(f"/proc/{supervisor}/oom_score_adj").read_text().strip()
        assert shielded == "-500" or "not shielded from the OOM killer" in log_of("oom", "sandboxd")
        [fork_server] = children(supervisor)
        assert Path(f"/proc/{fork_server}/oom_score_adj").read_text().strip() == "0"
        pid = services("oom")["idle"]["pid"]
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "0"


# ── helpers sandboxd starts: a proxy, a health check ──

ECHO = r"""
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 7000))
server.listen(16)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"echo:" + conn.recv(100))
"""


def test_a_killed_proxy_is_started_again_and_clients_get_through(spec_dir: Path) -> None:
    port = free_port()
    (spec_dir / "echo.py").write_text(ECHO)
    write(
        spec_dir,
        "echo.yaml",
        f"""
        kind: service
        command: [python3, /t/echo.py]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        listen: tcp:127.0.0.1:{port}
        proxy: tcp:127.0.0.1:7000
        handoff: false
        """,
    )
    with detached(spec_dir, "proxied"):
        assert ask(("127.0.0.1", port), b"one\n") == b"echo:one\n"
        cgroup = cgroup_dir("echo", stack="proxied")
        [proxy] = [pid for pid in processes_in(cgroup) if comm(pid).startswith("systemd-socket")]
        os.kill(proxy, signal.SIGKILL)
        assert ask(("127.0.0.1", port), b"two\n") == b"echo:two\n"  # waited in the queue for the new proxy
        said = log_of("proxied", "sandboxd")
        assert said.count("the proxy of socket echo ended") == 1 and said.count("socket echo is forwarded to it") == 2
        now = services("proxied")["echo"]
        assert now["state"] == "running" and now["restarts"] == 0


def test_a_health_check_whose_command_is_killed_counts_as_failed(spec_dir: Path) -> None:
    write(
        spec_dir,
        "checked.yaml",
        """
        kind: service
        restart: on-failure
        command: [sleep, '3600']
        ready:
          exec: [sh, -c, 'if [ -e /tmp/checked ]; then exec sleep 3600; fi; touch /tmp/checked']
          interval: 0.1s
          timeout: 3600s
          retries: 1
        """,
    )
    with detached(spec_dir, "checked", "--wait"):
        first = services("checked")["checked"]
        assert first["ready"]
        cgroup = cgroup_dir("checked", stack="checked")
        check = wait_until(lambda: [pid for pid in processes_in(cgroup) if comm(pid) == "sleep" and _is_check(pid, first["pid"])], "the second health check")
        os.kill(check[0], signal.SIGKILL)
        wait_until(lambda: services("checked")["checked"]["restarts"] == 1, "the restart after the failed check")
        said = log_of("checked", "sandboxd")
        assert "health check failed (killed by SIGKILL), 1 of 1" in said
        assert "unhealthy: health check failed 1 times in a row" in said


def _is_check(pid: int, service_init: int) -> bool:
    """Not the service's own sleep (a child of its init); False for a process that is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != service_init
    except OSError:
        return False


# ── the supervisor killed ──


def test_a_supervisor_killed_during_a_reload_is_cleaned_up_by_the_next_ls_and_up_works_again(spec_dir: Path) -> None:
    stubborn(spec_dir)
    sbd("up", "-d", "-p", "reloaded", str(spec_dir))
    supervisor = supervisor_pid("reloaded")
    (spec_dir / "stubborn.yaml").write_text((spec_dir / "stubborn.yaml").read_text().replace("sleep 1", "sleep 2"))
    reload = subprocess.Popen([sys.executable, "-m", "sandboxd", "reload", "-p", "reloaded"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: services("reloaded")["stubborn"]["state"] == "stopping", "the reload stopping the changed service")
        os.kill(supervisor, signal.SIGKILL)
        reload.communicate(timeout=HANG)
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.wait()
    assert reload.returncode != 0
    wait_until(lambda: "reloaded" not in sbd("ls").stdout, "ls to clean the dead stack")
    assert not (RUNTIME / "reloaded").exists()
    (spec_dir / "stubborn.yaml").write_text((spec_dir / "stubborn.yaml").read_text().replace("3600s", "1s"))
    with detached(spec_dir, "reloaded"):
        assert services("reloaded")["stubborn"]["state"] == "running"


def test_a_supervisor_killed_during_a_stop_leaves_nothing_once_down_returns(spec_dir: Path) -> None:
    stubborn(spec_dir)
    sbd("up", "-d", "-p", "killed", str(spec_dir))
    supervisor = supervisor_pid("killed")
    down_while_stopping("killed", supervisor)
    again = sbd("down", "-p", "killed", check=False)
    assert "was dead; removed what it left behind" in again.stdout or "no stack named" in again.stderr


# ── the host runs short ──


@contextlib.contextmanager
def small_tmpfs(size: str = "4m") -> Iterator[Path]:
    """A small tmpfs of the test's own, mounted and unmounted here. Under /run, as the runtime
    directory is: a sandbox's root user (a user namespace) could not reach one below the test's
    tmp_path (pytest's is mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="faults-", dir="/run"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "faults-tmpfs", str(path)], check=True)
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)
    finally:
        path.rmdir()


def test_a_full_runtime_directory_drops_log_lines_counted_and_the_services_keep_running(spec_dir: Path) -> None:
    port = free_port()
    printer(spec_dir, port)
    with small_tmpfs() as runtime:
        env = {"SANDBOXD_RUNTIME_DIR": str(runtime)}
        with detached(spec_dir, "full", env=env):
            assert ask(("127.0.0.1", port), b"written\n") == b"ok\n"
            filler = runtime / "filler"
            with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
            # Longer than a page: none fits in what is left of the log file's last page.
            for index in range(3):
                assert ask(("127.0.0.1", port), f"dropped {index} {'x' * 5000}\n".encode()) == b"ok\n"
            now = services("full", env=env)["printer"]
            assert now["state"] == "running" and now["restarts"] == 0
            json.loads((runtime / "full" / "state.json").read_text())  # whole
            filler.unlink()
            assert ask(("127.0.0.1", port), b"room again\n") == b"ok\n"
            printed = wait_until(lambda: "room again" in (text := log_of("full", "printer", env=env)) and text, "the line after the room came back")
            assert "written" in printed and "dropped 0" not in printed
            assert printed.count("sandboxd: 3 lines dropped here (No space left on device)") == 1
        assert not (runtime / "full").exists()


def _quiet(stack: str, service: str, pid: int) -> bool:
    """No instance of `service` runs and the supervisor `pid` holds no control connection (one
    still closing after its answer was read frees a descriptor below the lowest free one later)."""
    if services(stack)[service]["instances"] != 0:
        return False
    control = str(RUNTIME / stack / "control.sock")
    accepted = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == control and not int(fields[3], 16) & UNIX_LISTENING:  # not the listener
            accepted.add(f"socket:[{fields[6]}]")
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return not held & accepted


def _lowest_free_fd(pid: int) -> int:
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(taken) + 1) if fd not in taken)


def test_descriptors_used_up_in_the_supervisor_pause_accepting_and_everything_recovers(spec_dir: Path) -> None:
    port = free_port()
    write(
        spec_dir,
        "hello.yaml",
        f"""
        kind: service
        command: [sh, -c, 'echo ok >&3']
        ---
        kind: socket
        listen: tcp:127.0.0.1:{port}
        accept: true
        """,
    )
    with detached(spec_dir, "nofile"):
        assert ask(("127.0.0.1", port), b"") == b"ok\n"
        supervisor = supervisor_pid("nofile")
        before = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
        # Every descriptor that the first connection's instance and the test's own queries used
        # is closed first: one freed later would let an accept through, and the launch after it fail.
        wait_until(lambda: _quiet("nofile", "hello", supervisor), "the first instance to end and the control connections to close")
        # New descriptors take the lowest free number: below it, all are taken.
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (_lowest_free_fd(supervisor), before[1]))
        try:
            waiting = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(3)]
            wait_until(lambda: "cannot accept a connection for hello" in log_of("nofile", "sandboxd"), "the accept to fail")
            ps = subprocess.Popen([sys.executable, "-m", "sandboxd", "ps", "--json", "-p", "nofile"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: "control socket: cannot accept a connection" in log_of("nofile", "sandboxd"), "the control socket's accept to fail")
        finally:
            resource.prlimit(supervisor, resource.RLIMIT_NOFILE, before)
        out, err = ps.communicate(timeout=HANG)
        # Answered once the control socket accepted again: the status, or (if a descriptor was
        # free for the connection but not for what the status reads) a clear refusal.
        assert ps.returncode == 0 or "Too many open files" in err, err
        assert services("nofile")["hello"]["state"] == "waiting"
        for conn in waiting:
            with conn:
                assert conn.makefile("rb").readline() == b"ok\n"  # each waited in the queue
        said = log_of("nofile", "sandboxd")
        assert said.count("cannot accept a connection for hello") == 1 and said.count("control socket: cannot accept") == 1
        assert "accepting connections for hello again" in said
        assert ask(("127.0.0.1", port), b"") == b"ok\n"


def test_control_clients_that_hang_do_not_hold_other_verbs(spec_dir: Path) -> None:
    write(spec_dir, "idle.yaml", "kind: service\ncommand: [sleep, '3600']\n")
    with detached(spec_dir, "hung"):
        path = RUNTIME / "hung" / "control.sock"
        silent, half = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        silent.connect(str(path))
        half.connect(str(path))
        half.sendall(b'{"cmd": "stat')  # and never reads nor ends its request
        try:
            sbd("stop", "-p", "hung", "idle")
            assert services("hung")["idle"]["state"] == "stopped"
            sbd("start", "-p", "hung", "idle")
            wait_until(lambda: services("hung")["idle"]["state"] == "running", "the start")
            assert sbd("ps", "-p", "hung").stdout.count("idle ") == 1
        finally:
            silent.close()
            half.close()



def test_a_dead_runs_v1_cgroup_that_still_holds_a_process_is_emptied_and_removed(tmp_path: Path) -> None:
    # What `down` finds after a supervisor's SIGKILL: its sandboxes, killed with it, may not have
    # left the v1 directories yet (they had, mostly, on an idle machine; not on a loaded one).
    from sandboxd.host.state import remove_recorded

    parent = Path("/sys/fs/cgroup/pids/sandboxd")
    made_parent = not parent.exists()
    v1 = parent / "sbd-stale-test"
    v1.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        (v1 / "tasks").write_text(str(sleeper.pid))
        run = tmp_path / "run"
        run.mkdir()
        (run / "state.json").write_text(json.dumps({"pid": 0, "cgroups": [str(v1)], "files": [], "dirs": []}))
        remove_recorded(run)
        assert sleeper.wait(timeout=HANG) == -signal.SIGKILL
        assert not v1.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        with contextlib.suppress(FileNotFoundError):
            v1.rmdir()
        if made_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()
