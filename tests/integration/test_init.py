"""The sandbox's init is the set-up interpreter itself (sbd-setup.c, init_exec): pid 1 of the
sandbox, the command pid 2 in a session of its own. The init of a pid namespace gets no signal
whose disposition is SIG_DFL, even from sandboxd's namespace: these tests send each signal the
way sandboxd does (`sandboxd kill`, `stop`, the reload signal) and see the service's own trap
run; they check the exit codes, the reaping of orphans, the init's own state, and a command
that cannot be executed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import HANG, wait_until, write

# The signals a service may trap that sandboxd forwards (SIGTERM: the stop below; SIGCONT: after SIGTSTP).
TRAPPED = ("HUP", "INT", "QUIT", "USR1", "USR2", "ALRM", "WINCH", "PIPE", "TERM", "CONT")


def sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=HANG)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _service(stack: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(sbd("ps", "--json", "-p", stack, name).stdout)["services"][0]
    return found


def _logs(stack: str, name: str) -> list[str]:
    return [line.removeprefix(f"{name} | ") for line in sbd("logs", "-p", stack, name).stdout.splitlines()]


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _status(pid: int, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(f"{key}:"))


def test_every_signal_sandboxd_sends_reaches_the_services_trap_through_its_init(spec_dir: Path) -> None:
    traps = "".join(f"trap 'echo got {name}' {name}; " for name in TRAPPED if name != "TERM")
    script = f"{traps}trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    write(spec_dir, "trap.yaml", f"kind: service\nuser: nobody\ncommand: [sh, -c, \"{script}\"]\n")
    sbd("up", "-d", "-p", "traps", str(spec_dir))
    try:
        wait_until(lambda: "ready" in _logs("traps", "trap"), "the service to set its traps")
        init = _service("traps", "trap")["pid"]
        (command,) = _children(init)
        assert _status(command, "NSpid").split()[-1] == "2" and _status(init, "NSpid").split()[-1] == "1"
        for name in TRAPPED[:-2]:
            sbd("kill", "-s", f"SIG{name}", "-p", "traps", "trap")
            wait_until(lambda: f"got {name}" in _logs("traps", "trap"), f"the trap of SIG{name}")
        # A stop of the terminal's kind stops the command (SIGSTOP: no terminal is there), SIGCONT goes on.
        sbd("kill", "-s", "SIGTSTP", "-p", "traps", "trap")
        wait_until(lambda: _state(command) == "T", "the command to stop")
        sbd("kill", "-s", "SIGCONT", "-p", "traps", "trap")
        wait_until(lambda: "got CONT" in _logs("traps", "trap"), "the trap of SIGCONT")
        assert _state(command) != "T"
        sbd("stop", "-p", "traps", "trap")  # SIGTERM to the init: the trap ends the service
        assert "got TERM" in _logs("traps", "trap")
        assert _service("traps", "trap")["state"] == "stopped"
    finally:
        sbd("down", "-p", "traps", check=False)


def test_the_init_reaps_orphans_and_holds_nothing(spec_dir: Path) -> None:
    # The grandchild's parent exits at once: the orphan is the init's child, and its zombie the init's to reap.
    script = "sh -c 'sleep 1000 & exit 0'; echo orphaned; while :; do sleep 1; done"
    write(spec_dir, "reaper.yaml", f"kind: service\ncommand: [sh, -c, \"{script}\"]\n")
    sbd("up", "-d", "-p", "reaper", str(spec_dir))
    try:
        wait_until(lambda: "orphaned" in _logs("reaper", "reaper"), "the service to orphan a child")
        init = _service("reaper", "reaper")["pid"]
        command, orphan = wait_until(lambda: len(found := _children(init)) == 2 and found, "the orphan to be the init's")
        assert _status(command, "NSpid").split()[-1] == "2"
        # Nothing ignored is inherited from the launchers, glibc's own signals (32, 33) included.
        assert int(_status(command, "SigIgn"), 16) & (0b11 << 31) == 0, _status(command, "SigIgn")
        os.kill(orphan, signal.SIGKILL)
        wait_until(lambda: _children(init) == [command], "the orphan's zombie to be reaped")
        assert not Path(f"/proc/{orphan}").exists()
        assert os.listdir(f"/proc/{init}/fd") == []  # no descriptor: neither the channel nor the service's
        assert os.readlink(f"/proc/{init}/exe").startswith("/memfd:")  # the sealed copy of sbd-setup
    finally:
        sbd("down", "-p", "reaper", check=False)


def test_the_exit_code_or_128_plus_the_signal_is_the_services(spec_dir: Path) -> None:
    write(spec_dir, "three.yaml", "kind: service\nrestart: 'no'\ncommand: [sh, -c, 'exit 3']\n")
    write(spec_dir, "usr2.yaml", "kind: service\nrestart: 'no'\ncommand: [sh, -c, 'kill -USR2 $$$$']\n")
    write(spec_dir, "killed.yaml", "kind: service\nrestart: 'no'\ncommand: [sh, -c, 'echo up; exec sleep 1000']\n")
    try:
        sbd("up", "-d", "-p", "codes", str(spec_dir), check=False)  # (1: three and usr2 failed)
        three = wait_until(lambda: (s := _service("codes", "three"))["state"] == "failed" and s, "three to fail")
        assert three["exit_code"] == 3 and three["reason"] == "exited with code 3", three
        usr2 = wait_until(lambda: (s := _service("codes", "usr2"))["state"] == "failed" and s, "usr2 to fail")
        assert usr2["signal"] == "SIGUSR2" and usr2["reason"] == "killed by SIGUSR2", usr2  # 128+12 from the init
        wait_until(lambda: "up" in _logs("codes", "killed"), "killed to run")
        sbd("kill", "-s", "SIGUSR1", "-p", "codes", "killed")  # no trap: the command dies of it, the init tells
        killed = wait_until(lambda: (s := _service("codes", "killed"))["state"] == "failed" and s, "killed to fail")
        assert killed["signal"] == "SIGUSR1", killed
    finally:
        sbd("down", "-p", "codes", check=False)


def test_a_command_that_cannot_be_executed_is_a_failed_start_naming_it_and_why(spec_dir: Path) -> None:
    write(spec_dir, "noexec.sh", "echo never\n")  # no x bit: EACCES
    write(spec_dir, "nointerp.sh", "#!/nonexistent/interpreter\necho never\n")
    os.chmod(spec_dir / "nointerp.sh", 0o755)  # its interpreter is missing: ENOENT
    write(spec_dir, "ok.yaml", "kind: service\ncommand: sleep 1000\n")
    for name in ("noexec", "nointerp"):
        write(spec_dir, f"{name}.yaml", f"kind: service\nrestart: 'no'\ncommand: [/t/{name}.sh]\nmounts: [{{source: ., target: /t}}]\n")
    try:
        up = sbd("up", "-d", "-p", "noexec", str(spec_dir), check=False)
        assert up.returncode == 1, up.stderr
        for name, why in (("noexec", "Permission denied"), ("nointerp", "No such file or directory")):
            status = wait_until(lambda: (s := _service("noexec", name))["state"] == "failed" and s, f"{name} to fail")
            assert status["reason"] == f"could not start: execute /t/{name}.sh: {why}", status
        assert _service("noexec", "ok")["state"] == "running"
    finally:
        sbd("down", "-p", "noexec", check=False)


def test_a_service_on_a_folder_image_has_the_same_init_without_anything_of_the_images(spec_dir: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = Path("/bin/busybox")
    (rootfs / "bin" / "busybox").write_bytes(busybox.read_bytes())
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    (rootfs / "bin" / "sh").symlink_to("busybox")
    script = "trap 'echo got HUP' HUP; trap 'echo got TERM; exit 0' TERM; echo ready $$$$; while :; do busybox sleep 0.05; done"
    write(spec_dir, "img.yaml", f"kind: service\nimage: {rootfs}\nenvironment: {{PATH: /bin}}\ncommand: [sh, -c, \"{script}\"]\n")
    sbd("up", "-d", "-p", "image", str(spec_dir))
    try:
        wait_until(lambda: "ready 2" in _logs("image", "img"), "the service, pid 2, to set its traps")
        sbd("kill", "-s", "SIGHUP", "-p", "image", "img")
        wait_until(lambda: "got HUP" in _logs("image", "img"), "the trap of SIGHUP")
        sbd("stop", "-p", "image", "img")
        assert "got TERM" in _logs("image", "img")
        assert _service("image", "img")["state"] == "stopped"
    finally:
        sbd("down", "-p", "image", check=False)


# Tries, from its first instruction, what a command could take of its init while the init still
# runs its set-up: the init's memory, its descriptors by path and by pidfd_getfd (the status
# channel among them), and says what it got. Static, so that it starts within the window.
RACE_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    int pidfd = syscall(SYS_pidfd_open, 1, 0), got = 0;
    for (int t = 0; t < 3000; t++) {
        int mem = open("/proc/1/mem", O_RDONLY);
        if (mem >= 0) { printf("took /proc/1/mem\n"); got++; close(mem); }
        for (int fd = 0; fd < 8; fd++) {
            char path[32], link[256];
            snprintf(path, sizeof path, "/proc/1/fd/%d", fd);
            if (readlink(path, link, sizeof link) > 0) { printf("read /proc/1/fd/%d\n", fd); got++; }
            int copy = pidfd < 0 ? -1 : syscall(SYS_pidfd_getfd, pidfd, fd, 0);
            if (copy >= 0) { printf("took fd %d of pid 1\n", fd); got++; close(copy); }
        }
        if (got) break;
    }
    printf("race done: %d\n", got);
    fflush(stdout);
    return 0;
}
"""


def test_a_command_with_the_inits_own_ids_cannot_take_its_memory_or_descriptors_while_it_sets_up(spec_dir: Path, tmp_path: Path) -> None:
    # No user namespace and root: the command's ids are the init's, so only the init's not being
    # dumpable from before the fork keeps it out (it won 1 race in 3 when that came after the exec).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "race.c").write_text(RACE_C)
    subprocess.run(["gcc", "-O2", "-static", "-o", str(bin_dir / "race"), str(tmp_path / "race.c")], check=True, timeout=HANG)
    racers = [f"race{n}" for n in range(8)]
    for name in racers:
        write(spec_dir, f"{name}.yaml", f"kind: service\nrestart: 'no'\nuserns: false\nuser: root\nseccomp: unconfined\ncommand: [/a/race]\nmounts: [{{source: {bin_dir}, target: /a}}]\n")
    try:
        sbd("up", "-d", "-p", "race", str(spec_dir), check=False)
        for name in racers:
            lines = wait_until(lambda: (found := _logs("race", name)) and found[-1].startswith("race done") and found, f"{name} to finish")
            assert lines == ["race done: 0"], (name, lines)
    finally:
        sbd("down", "-p", "race", check=False)
