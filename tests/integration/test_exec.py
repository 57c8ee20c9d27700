"""`sandboxd exec`: a terminal of its own inside the sandbox (or pipes), nothing of the host's
handed in, nothing of the command left running when the CLI ends.

The admin's terminal is a pty the test holds (`AdminTerminal`): the CLI runs with its slave as
stdin, stdout, stderr and controlling terminal, as it would at a shell. Every wait is for an
event (a line of output, a file, a process count) with a deadline only as a bound.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CGROUPS, write
from sandboxd.host.cgroups import v1_mounts

DEADLINE = 30.0


def sbd(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=120, input=stdin)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _take_terminal() -> None:
    import fcntl

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class AdminTerminal:
    """A pty standing for the admin's host terminal."""

    def __init__(self, rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        termios.tcsetwinsize(self.master, (rows, cols))
        self.output = b""
        self.original = termios.tcgetattr(self.slave)
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, term: str = "sbd-test-term") -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", *args],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=_take_terminal,  # the session's controlling terminal, as a login shell's
            env={**os.environ, "TERM": term},
        )
        self.started.append(proc)
        return proc

    def read_until(self, text: bytes, timeout: float = DEADLINE) -> bytes:
        deadline = time.monotonic() + timeout
        while text not in self.output and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break
        assert text in self.output, f"no {text!r} on the admin's terminal; it shows {self.output!r}"
        return self.output

    def read_available(self) -> bytes:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        return self.output

    def messages(self) -> list[dict[str, object]]:
        """The JSON lines the command printed."""
        found = []
        for line in self.output.decode(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                found.append(json.loads(line))
        return found

    def close(self) -> None:
        for proc in self.started:  # a test that failed half-way leaves no CLI behind
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def admin() -> Iterator[AdminTerminal]:
    terminal = AdminTerminal(rows=31, cols=97)
    yield terminal
    terminal.close()


def _up(spec_dir: Path, name: str, service: str, userns: bool | None = None) -> None:
    """With `userns`, the service says so; without, it has the default (a user namespace)."""
    write(spec_dir, "svc.yaml", service + ("" if userns is None else f"userns: {str(userns).lower()}\n"))
    sbd("up", "-d", "--wait", "-p", name, str(spec_dir))


def _service_cgroup(stack: str) -> Path:
    pid = json.loads(sbd("ps", "--json", "-p", stack).stdout)["services"][0]["pid"]
    relative = next(l[3:] for l in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if l.startswith("0::"))
    return CGROUPS.v2_mount / relative.lstrip("/")


def _service_pids(stack: str) -> set[int]:
    """The processes in the service's cgroup (cgroup2) and every cgroup below it, read on the host."""
    found: set[int] = set()
    for directory, _subdirs, _files in os.walk(_service_cgroup(stack)):
        try:
            found |= {int(p) for p in Path(directory, "cgroup.procs").read_text().split()}
        except FileNotFoundError:
            pass
    return found


def _exec_cgroups(stack: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(_service_cgroup(stack)) if entry.is_dir())


def _wait_for(condition: object, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# ── the attack: a hostile service reaches into the exec'd command's descriptors ──

SCANNER = r'''
import ctypes, json, os, stat, sys, time
libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""

def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""

print("scanner ready", flush=True)
target = None
while target is None:  # the exec'd command: sh running the marked script
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, me) and comm(int(name)) == "sh" and b"exec-target" in cmdline(int(name)):
            target = int(name)
    time.sleep(0.01)

report = {"target": target, "devpts": os.stat("/dev/pts").st_dev, "processes": {}}
held = []
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) in (1, me):
        continue
    pid = int(name)
    entry = {"comm": comm(pid), "fds": {}, "listing": "ok", "getfd": {}}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        entry["listing"] = type(e).__name__
        fds = [str(n) for n in range(0, 8)]
    for fd in fds:
        item = {}
        try:
            item["link"] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError as e:
            item["link"] = type(e).__name__
        try:
            opened = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            item["open"] = type(e).__name__
        else:
            st = os.fstat(opened)
            item["open"] = "ok"
            item["dev"], item["ino"], item["kind"] = st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)
            held.append(opened)
        entry["fds"][fd] = item
    try:
        pidfd = os.pidfd_open(pid)
        for fd in fds:
            got = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
            if got < 0:
                entry["getfd"][fd] = os.strerror(ctypes.get_errno())
            else:
                st = os.fstat(got)
                entry["getfd"][fd] = {"dev": st.st_dev, "ino": st.st_ino}
                held.append(got)
    except OSError as e:
        entry["getfd"]["pidfd"] = type(e).__name__
    report["processes"][str(pid)] = entry
open("/tmp/scanned", "w").close()

# After exec has returned, and the admin has typed at the host's shell: write, then read.
while not os.path.exists("/tmp/typed"):
    time.sleep(0.01)
report["after"] = []
for fd in held:
    os.set_blocking(fd, False)  # one taken with pidfd_getfd shares the command's blocking file
    result = {}
    try:
        result["wrote"] = os.write(fd, b"PWNED-BY-THE-SANDBOX\r\n")
    except OSError as e:
        result["wrote"] = type(e).__name__
    try:
        result["read"] = os.read(fd, 200).decode(errors="replace")
    except OSError as e:
        result["read"] = type(e).__name__
    report["after"].append(result)
with open("/tmp/report.tmp", "w") as f:
    json.dump(report, f)
os.rename("/tmp/report.tmp", "/tmp/report.json")
print("report written", flush=True)
time.sleep(1000)
'''

TARGET = "echo exec-target started; while [ ! -e /tmp/scanned ]; do sleep 0.05; done; echo scanned"


@pytest.mark.parametrize(("tty", "userns"), [(True, False), (False, False), (True, True)], ids=["tty", "pipes", "tty-userns"])
def test_exec_gives_the_command_no_host_terminal(spec_dir: Path, admin: AdminTerminal, tty: bool, userns: bool) -> None:
    write(spec_dir, "scanner.py", SCANNER)
    stack = "attack"
    _up(spec_dir, stack, "kind: service\ncommand: [python3, /t/scanner.py]\nmounts: [{source: ., target: /t}]\n", userns)
    try:
        host = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (admin.slave, admin.master)}
        cli = admin.start("exec", "-p", stack, *([] if tty else ["-T"]), "svc", "--", "sh", "-c", TARGET)
        admin.read_until(b"scanned")
        assert _wait_exit(cli) == 0
        # The admin types at the host's shell once exec has returned; the sandbox then tries
        # every descriptor it took from the command: write to it, read from it.
        os.write(admin.master, b"secret typed at the host shell\n")
        sbd("exec", "-p", stack, "svc", "--", "touch", "/tmp/typed")
        _wait_for(lambda: sbd("exec", "-p", stack, "svc", "--", "test", "-e", "/tmp/report.json", check=False).returncode == 0, "the report")
        report = json.loads(sbd("exec", "-p", stack, "svc", "--", "cat", "/tmp/report.json").stdout)

        command = report["processes"][str(report["target"])]
        for pid, entry in report["processes"].items():
            for fd, item in entry["fds"].items():
                if item["open"] != "ok":
                    continue
                assert (item["dev"], item["ino"]) not in host, f"pid {pid} ({entry['comm']}) fd {fd} is the admin's terminal: {item}"
                if tty:
                    # a pty of the sandbox's own devpts, or the command's pipes: never a host file
                    assert item["dev"] == report["devpts"] or item["link"].startswith("pipe:"), f"pid {pid} fd {fd}: {item}"
                else:
                    assert item["link"].startswith(("pipe:", "/dev/pts/")) and item["kind"] in (stat.S_IFIFO, stat.S_IFCHR), item
                    assert item["kind"] != stat.S_IFCHR or item["dev"] == report["devpts"], f"pid {pid} fd {fd}: {item}"
            for fd, got in entry["getfd"].items():
                if isinstance(got, dict):
                    assert (got["dev"], got["ino"]) not in host, f"pidfd_getfd of pid {pid} fd {fd} gave the admin's terminal"
        assert all(command["fds"][fd]["open"] == "ok" for fd in "012"), command  # the attack was made
        for fd, item in command["fds"].items():
            if fd in "012":
                if tty:
                    assert item["link"].startswith("/dev/pts/") and item["dev"] == report["devpts"]
                else:
                    assert item["link"].startswith("pipe:")
        assert not any("secret" in str(result["read"]) for result in report["after"]), report["after"]
        assert b"PWNED" not in admin.read_available()
        os.set_blocking(admin.slave, False)
        assert os.read(admin.slave, 200) == b"secret typed at the host shell\n"  # still there for the host's shell
    finally:
        sbd("down", "-p", stack)


# ── a terminal of its own ──

PROBE = r'''
import json, os, signal, sys, time
def say(**fields):
    print(json.dumps(fields), flush=True)
st = os.fstat(0)
say(tty=os.ttyname(0), dev=st.st_dev, ino=st.st_ino, owner=st.st_uid, uid=os.getuid(), devpts=os.stat("/dev/pts").st_dev,
    term=os.environ.get("TERM"), size=list(os.get_terminal_size(0)), session_leader=os.getsid(0) == os.getpid(),
    foreground=os.tcgetpgrp(0) == os.getpgrp(), pid=os.getpid())
resized = []
signal.signal(signal.SIGWINCH, lambda *_: resized.append(1))
say(waiting="resize")
while not resized:
    signal.pause()
say(size=list(os.get_terminal_size(0)))
try:  # entered before it says it waits: a Ctrl-C right after the line is written is caught too
    say(waiting="interrupt")
    time.sleep(120)
except KeyboardInterrupt:
    say(interrupted=True)
    sys.exit(42)
'''


@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_exec_with_a_terminal_gets_a_pty_inside_the_sandbox_with_term_size_and_ctrl_c(spec_dir: Path, admin: AdminTerminal, userns: bool) -> None:
    write(spec_dir, "probe.py", PROBE)
    stack = "pty"
    _up(spec_dir, stack, "kind: service\ncommand: [sleep, '1000']\nmounts: [{source: ., target: /t}]\n", userns)
    try:
        cli = admin.start("exec", "-p", stack, "svc", "--", "python3", "/t/probe.py")  # -t by default: a terminal
        admin.read_until(b'"waiting": "resize"')
        facts = admin.messages()[0]
        assert str(facts["tty"]).startswith("/dev/pts/") and facts["dev"] == facts["devpts"]  # the sandbox's own devpts
        assert (facts["dev"], facts["ino"]) != (os.fstat(admin.slave).st_dev, os.fstat(admin.slave).st_ino)
        assert facts["term"] == "sbd-test-term"
        assert facts["size"] == [97, 31]
        assert facts["session_leader"] and facts["foreground"]  # its controlling terminal: job control works
        assert facts["owner"] == facts["uid"]
        lflag = termios.tcgetattr(admin.slave)[3]
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)  # the admin's terminal is raw meanwhile
        termios.tcsetwinsize(admin.master, (40, 120))  # the kernel sends SIGWINCH to the CLI
        admin.read_until(b'"waiting": "interrupt"')
        assert admin.messages()[-2]["size"] == [120, 40]
        os.write(admin.master, b"\x03")  # Ctrl-C at the admin's keyboard
        admin.read_until(b'"interrupted": true')
        assert _wait_exit(cli) == 42
        assert termios.tcgetattr(admin.slave) == admin.original  # restored
    finally:
        sbd("down", "-p", stack)


# A shell that records SIGHUP, with a background child that ignores SIGHUP. The hang-up reaches
# every process left, in no set order: when the foreground sleep dies of it first, dash says
# "Hangup" on stderr, and with the CLI gone that write would kill it with SIGPIPE before its trap
# ran; so its stderr is /dev/null. It runs the trap between commands, and its commands are short,
# so it takes the SIGHUP well within the stack's HANGUP_GRACE (a `wait` it entered just after the
# signal came could sleep through it).
LINGER = "exec 2>/dev/null; trap 'echo hup > /tmp/hup; exit 0' HUP; (trap '' HUP; exec sleep 1000) & echo started; while :; do sleep 0.1; done"


@pytest.mark.parametrize(("tty", "userns"), [(True, False), (False, False), (True, True)], ids=["tty", "pipes", "tty-userns"])
def test_killing_exec_leaves_nothing_of_the_command_running(spec_dir: Path, admin: AdminTerminal, tty: bool, userns: bool) -> None:
    stack = "linger"
    _up(spec_dir, stack, "kind: service\ncommand: [sleep, '1000']\n", userns)
    try:
        before = _service_pids(stack)
        cli = admin.start("exec", "-p", stack, *([] if tty else ["-T"]), "svc", "--", "sh", "-c", LINGER)
        admin.read_until(b"started")
        _wait_for(lambda: len(_service_pids(stack) - before) >= 2, "the command and its background child")
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        _wait_for(lambda: _service_pids(stack) == before and not _exec_cgroups(stack), "the command's processes to be gone")
        assert _service_pids(stack) == before  # the background child that ignores SIGHUP too
        assert sbd("exec", "-p", stack, "svc", "--", "cat", "/tmp/hup").stdout == "hup\n"  # it got SIGHUP first
    finally:
        sbd("down", "-p", stack)


def test_closing_the_terminal_hangs_up_the_command_and_ends_it(spec_dir: Path, admin: AdminTerminal) -> None:
    stack = "hangup"
    _up(spec_dir, stack, "kind: service\ncommand: [sleep, '1000']\n")
    try:
        before = _service_pids(stack)
        cli = admin.start("exec", "-p", stack, "svc", "--", "sh", "-c", LINGER)
        admin.read_until(b"started")
        os.close(admin.slave)
        os.close(admin.master)  # the admin's terminal goes away (the window is closed)
        _wait_exit(cli)
        _wait_for(lambda: _service_pids(stack) == before, "the command's processes to be gone")
        assert sbd("exec", "-p", stack, "svc", "--", "cat", "/tmp/hup").stdout == "hup\n"  # it got SIGHUP
    finally:
        sbd("down", "-p", stack)


def test_down_ends_a_running_exec(spec_dir: Path) -> None:
    stack = "downexec"
    _up(spec_dir, stack, "kind: service\ncommand: [sleep, '1000']\n")
    cli = subprocess.Popen([sys.executable, "-m", "sandboxd", "exec", "-p", stack, "svc", "--", "sh", "-c", "echo started; exec sleep 1000"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert cli.stdout is not None and cli.stdout.readline() == b"started\n"
        sbd("down", "-p", stack)
        assert cli.wait(DEADLINE) == 128 + signal.SIGKILL  # the command died with its sandbox
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate()
        sbd("down", "-p", stack, check=False)


# ── without a terminal: pipes ──


def test_exec_without_a_terminal_copies_pipes_and_passes_the_exit_code(spec_dir: Path) -> None:
    stack = "pipes"
    _up(spec_dir, stack, "kind: service\ncommand: [sleep, '1000']\n")
    try:
        assert sbd("exec", "-p", stack, "svc", "--", "kill", "-0", "2").returncode == 0  # it may signal the service (pid 2)
        script = "cat; echo to-stderr >&2; for f in 0 1 2; do readlink /proc/$$/fd/$f; done; exit 3"
        proc = subprocess.Popen([sys.executable, "-m", "sandboxd", "exec", "-p", stack, "svc", "--", "sh", "-c", script],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ours = [f"pipe:[{os.fstat(f.fileno()).st_ino}]" for f in (proc.stdin, proc.stdout, proc.stderr) if f is not None]
        out, err = proc.communicate(b"piped in\n", timeout=120)
        lines = out.decode().splitlines()
        assert proc.returncode == 3
        assert lines[0] == "piped in" and all(line.startswith("pipe:[") for line in lines[1:4]), lines
        assert not set(lines[1:4]) & set(ours)  # pipes of its own, copied by the CLI: not the caller's
        assert err == b"to-stderr\n"
        big = "".join(f"{i:07d}\n" for i in range(250_000))  # 2 MB each way, more than any pipe holds
        echoed = sbd("exec", "-p", stack, "svc", "--", "cat", stdin=big)
        assert echoed.stdout == big
        assert sbd("exec", "-p", stack, "svc", "--", "sh", "-c", "kill -TERM $$", check=False).returncode == 128 + signal.SIGTERM
        missing = sbd("exec", "-p", stack, "svc", "--", "no-such-program", check=False)
        assert missing.returncode == 127 and "no-such-program" in missing.stderr
    finally:
        sbd("down", "-p", stack)


@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_exec_takes_user_workdir_and_environment(spec_dir: Path, userns: bool) -> None:
    stack = "options"
    _up(spec_dir, stack, "kind: service\ncommand: [sleep, '1000']\nenvironment: {GREETING: hi, FOO: service}\n", userns)
    try:
        out = sbd("exec", "-p", stack, "-u", "nobody", "-w", "/tmp", "-e", "FOO=bar", "-e", "NEW=1", "svc", "--",
                  "sh", "-c", "id -u; id -g; pwd; echo $FOO $NEW $GREETING").stdout.split("\n")
        assert out[:4] == ["65534", "65534", "/tmp", "bar 1 hi"]
        assert sbd("exec", "-p", stack, "-u", "1234:5678", "svc", "--", "sh", "-c", "id -u; id -g").stdout.split() == ["1234", "5678"]
        assert sbd("exec", "-p", stack, "svc", "--", "id", "-u").stdout.strip() == "0"  # the service's user by default
        unknown = sbd("exec", "-p", stack, "-u", "no-such-user", "svc", "--", "true", check=False)
        assert unknown.returncode != 0 and "no user 'no-such-user'" in unknown.stderr
        nowhere = sbd("exec", "-p", stack, "-w", "/no/such/dir", "svc", "--", "true", check=False)
        assert nowhere.returncode == 125 and "/no/such/dir" in nowhere.stderr
    finally:
        sbd("down", "-p", stack)


# ── health checks run through the fork server: no host descriptor either ──


def test_health_check_gets_the_sandboxs_own_dev_null(spec_dir: Path) -> None:
    stack = "health"
    probe = (
        "import os; ids = lambda st: f'{st.st_dev}:{st.st_ino}'; "
        "open('/tmp/fds', 'w').write(' '.join([ids(os.fstat(fd)) for fd in (0, 1, 2)] + [ids(os.stat('/dev/null'))]))"
    )
    _up(spec_dir, stack, f"kind: service\ncommand: [sleep, '1000']\nready: {{exec: [python3, -c, {json.dumps(probe)}], interval: 10s}}\n")
    try:
        ids = sbd("exec", "-p", stack, "svc", "--", "cat", "/tmp/fds").stdout.split()
        assert len(ids) == 4 and len(set(ids)) == 1, ids  # stdin, stdout, stderr: the sandbox's own /dev/null
    finally:
        sbd("down", "-p", stack)


# What a process says of its controlling terminal: the tty_nr of /proc/self/stat (0: none) and
# what opening /dev/tty (the sandbox's own node, 5:0, which is the caller's terminal) gives.
CTTY_PROBE = (
    "import os\n"
    "tty_nr = open('/proc/self/stat').read().rsplit(')', 1)[1].split()[4]\n"
    "try:\n"
    "    os.close(os.open('/dev/tty', os.O_RDWR | os.O_NOCTTY)); opened = 'opened'\n"
    "except OSError as e:\n"
    "    opened = os.strerror(e.errno)\n"
    "open('/tmp/ctty.tmp', 'w').write(f'{tty_nr} {opened}'); os.rename('/tmp/ctty.tmp', '/tmp/ctty')\n"
)


def test_a_health_check_of_a_stack_up_on_a_terminal_has_no_controlling_terminal(spec_dir: Path, admin: AdminTerminal) -> None:
    """`up` in the foreground on the admin's terminal: a health check (forked by the fork server)
    has no controlling terminal, so its /dev/tty is no way to the admin's (TIOCSTI would type at
    the admin's shell). It used to be in `up`'s session, the terminal's."""
    write(spec_dir, "probe.py", CTTY_PROBE)
    write(spec_dir, "svc.yaml", "kind: service\ncommand: [sleep, '1000']\nmounts: [{source: ., target: /t}]\nready: {exec: [python3, /t/probe.py], interval: 10s}\n")
    up = admin.start("up", "-p", "ctty", str(spec_dir))
    try:
        # The transition, once the health check passed (the summary may say "not ready yet" first).
        admin.read_until(b"-> ready")
        said = sbd("exec", "-T", "-p", "ctty", "svc", "--", "cat", "/tmp/ctty").stdout.split(" ", 1)
        assert said == ["0", "No such device or address"], said
    finally:
        up.send_signal(signal.SIGINT)
        assert _wait_exit(up) == 0


# ── no descriptor of sandboxd's, and the service's own cgroups, in whatever runs in a sandbox ──

# What a process sees of itself: its descriptors (but the one listing them) and its cgroups.
FD_PROBE = (
    "import json, os\n"
    "fds = {n: os.readlink(f'/proc/self/fd/{n}') for n in os.listdir('/proc/self/fd') if os.path.exists(f'/proc/self/fd/{n}')}\n"
    "cgroups = {l.split(':')[1]: l.split(':')[2] for l in open('/proc/self/cgroup').read().splitlines()}\n"
    "print(json.dumps({'fds': fds, 'cgroup': cgroups}))\n"
)


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "host-ids"])
def test_no_descriptor_of_sandboxd_reaches_the_service_its_health_check_or_an_exec(spec_dir: Path, userns: bool) -> None:
    """The v1 tasks files the fork server opens for the child, the sealed init, the status channel
    and the fork server's socket are closed before any exec: the service, a health check and an
    exec'd command hold fds 0-2 alone, and each is in the service's v1 memory and pids cgroups."""
    stack = "fdprobe"
    write(spec_dir, "probe.py", FD_PROBE)
    service = (
        'kind: service\ncommand: [sh, -c, "python3 /t/probe.py > /tmp/svc; exec sleep 1000"]\n'
        "mounts: [{source: ., target: /t}]\n"
        'ready: {exec: [sh, -c, "python3 /t/probe.py > /tmp/hc"], interval: 10s}\n'
    )
    _up(spec_dir, stack, service, userns)
    try:
        reports = {
            "service": sbd("exec", "-T", "-p", stack, "svc", "--", "cat", "/tmp/svc").stdout,
            "health check": sbd("exec", "-T", "-p", stack, "svc", "--", "cat", "/tmp/hc").stdout,
            "exec": sbd("exec", "-T", "-p", stack, "svc", "--", "python3", "/t/probe.py").stdout,
        }
        for who, text in reports.items():
            report = json.loads(text)
            listing = {n for n, target in report["fds"].items() if target.startswith("/proc/") and target.endswith("/fd")}
            assert sorted(set(report["fds"]) - listing) == ["0", "1", "2"], (who, report["fds"])
            for controller in ("memory", "pids"):  # v1 hierarchies, on a hybrid host
                if controller in report["cgroup"]:
                    assert report["cgroup"][controller].endswith(f"/sandboxd/{stack}/svc"), (who, report["cgroup"])
    finally:
        sbd("down", "-p", stack)


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "host-ids"])
def test_a_service_with_the_hosts_sys_cannot_move_itself_to_another_cgroup(spec_dir: Path, userns: bool) -> None:
    """network: host keeps the host's /sys, the cgroup hierarchies with it, and with userns: false
    the service's root passes their owner checks: the read-only mounts must refuse every write."""
    files = [str(p / name) for p in [CGROUPS.v2_mount, *v1_mounts().values()] for name in ("tasks", "cgroup.procs") if (p / name).exists()]
    assert files
    code = (
        "import errno, json\nr = {}\n"
        f"for p in {files!r}:\n"
        "    try:\n        open(p, 'w').write('0'); r[p] = 'MOVED'\n"
        "    except OSError as e:\n        r[p] = errno.errorcode[e.errno]\n"
        "open('/tmp/moved', 'w').write(json.dumps(r))\n"
    )
    write(spec_dir, "try.py", code)
    _up(spec_dir, "mover", 'kind: service\nnetwork: host\nmounts: [{source: ., target: /t}]\ncommand: [sh, -c, "python3 /t/try.py; exec sleep 1000"]\n', userns)
    try:
        result = json.loads(sbd("exec", "-T", "-p", "mover", "svc", "--", "sh", "-c", "while [ ! -s /tmp/moved ]; do sleep 0.05; done; cat /tmp/moved").stdout)
        assert set(result) == set(files) and all(v in ("EROFS", "EACCES", "EPERM") for v in result.values()), result
        cgroup = sbd("exec", "-T", "-p", "mover", "svc", "--", "cat", "/proc/1/cgroup").stdout
        assert all(line.endswith("/sandboxd/mover/svc") for line in cgroup.splitlines() if line.split(":")[1] in ("", "memory", "pids")), cgroup
    finally:
        sbd("down", "-p", "mover")
