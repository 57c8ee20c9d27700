"""Escape attempts from a service with the default settings: each one must fail.

One stack runs a probe that tries everything and reports; each attempt is then a test of its
own, reading the probe's report (the probe's stack runs within the first test, so nothing outlives
a test). The probe runs on both kinds of host root: `probe` mounts its folder at a new top-level
directory (/t), which builds the root on a tmpfs; `inplace` mounts it below /tmp, which keeps the
host's root in place; `userns` and `userns_bound` do the same in a user namespace. One more
service, `image`, runs on a folder image (busybox) under sbd-setup as its init and checks what it can reach of its
init. The tests after those are about sandboxd's own mechanisms (pinned bind mounts, the allow
list of the seccomp filter, user namespaces).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CGROUPS, Stack, cgroup_dir, wait_until, write

from sandboxd.host.cgroups import CGROUP_ROOT, v1_mounts

PROBE = r'''
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}

def call(fn, *args):
    def run():
        if fn(*args) != 0:
            raise OSError(ctypes.get_errno(), "")
        return "returned 0"
    return run

class Safe(Exception):
    """Raised by an attempt that ran but reached nothing (an empty masked file, a memfd)."""

def attempt(name, fn):
    try:
        result = fn()
        out[name] = "ESCAPED: " + repr(result)[:80]
    except Safe as e:
        out[name] = "safe: " + str(e)
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
    except Exception as e:
        out[name] = type(e).__name__

def write(path, data="x"):
    def run():
        with open(path, "w") as f:
            f.write(data)
        return path
    return run

HOST_PID = int(sys.argv[1])
SPEC = sys.argv[2]
attempt("see_host_process", lambda: os.stat(f"/proc/{HOST_PID}") and HOST_PID)
attempt("signal_host_process", lambda: os.kill(HOST_PID, 0))
attempt("write_root", write("/escape"))
attempt("write_etc", write("/etc/escape"))
attempt("write_usr", write("/usr/escape"))
attempt("write_spec_folder", write(os.path.join(SPEC, "escape")))
attempt("mount_tmpfs", call(libc.mount, b"none", b"/mnt", b"tmpfs", 0, None))
attempt("umount_proc", call(libc.umount2, b"/proc", 2))
attempt("unshare_mount_ns", call(libc.unshare, 0x00020000))
attempt("unshare_user_ns", call(libc.unshare, 0x10000000))
def clone_userns():
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "")
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "cloned into a new user namespace"
attempt("clone_new_user_ns", clone_userns)
attempt("ptrace_the_init", call(libc.ptrace, 16, 1, None, None))
# The only namespaces it can name are its init's; being allowed to setns at all is the escape route.
attempt("setns_into_a_namespace", lambda: call(libc.setns, os.open("/proc/1/ns/mnt", os.O_RDONLY), 0)())
attempt("proc_1_root_escape", lambda: os.stat(f"/proc/1/root/proc/{HOST_PID}") and "host pid visible through /proc/1/root")
attempt("load_kernel_module", call(libc.syscall, 175, None, 0, b""))
attempt("reboot", call(libc.reboot, 0x4321FEDC))
attempt("sethostname_host", call(libc.sethostname, b"pwned", 5))
attempt("settime", lambda: call(libc.clock_settime, 0, ctypes.byref((ctypes.c_long * 2)(0, 0)))())
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("move_to_other_cgroup", write("@CGROUP2@/cgroup.procs", str(os.getpid())))
attempt("raise_own_limits", write("@PIDS@/pids.max", "max"))
attempt("read_kcore", lambda: len(open("/proc/kcore", "rb").read(16)) or (_ for _ in ()).throw(OSError(errno.ENODATA, "")))
attempt("write_sysrq_trigger", write("/proc/sysrq-trigger", "h"))
attempt("write_proc_sys", write("/proc/sys/kernel/domainname", "pwned"))
def ping():
    import shutil
    if not shutil.which("ping"):
        return "cannot check: ping is not installed (scripts/test installs iputils-ping)"
    code = os.waitstatus_to_exitcode(os.system("ping -c1 -W1 127.0.0.1 >/dev/null 2>&1"))
    if code == 1:  # iputils: sent, but no reply within -W (a busy machine, say): it had its socket
        return "ping sent a packet: it opened its raw socket"
    if code != 0:
        raise OSError(errno.EPERM, "ping could not open its raw socket")
    return "ping worked"
attempt("setuid_binary_gains_nothing", ping)
attempt("mknod_disk", lambda: os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0)) or "made a block device")
# The port space of AF_VSOCK is the VM's, not the network namespace's.
attempt("vsock_socket", lambda: socket.socket(40, socket.SOCK_STREAM))
def io_uring_setup():
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(425, 4, params)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "")
    return f"ring fd {fd}: its operations (IORING_OP_BIND ...) pass no seccomp filter"
attempt("io_uring_setup", io_uring_setup)
libc.personality.argtypes = [ctypes.c_ulong]
def personality(flag):
    def run():
        if libc.personality(flag) == -1:
            raise OSError(ctypes.get_errno(), "")
        libc.personality(0)
        return f"personality {flag:#x} set"
    return run
attempt("personality_addr_no_randomize", personality(0x0040000))
attempt("personality_read_implies_exec", personality(0x0400000))
query = libc.personality(0xFFFFFFFF)
out["personality_query"] = str(query) if query != -1 else errno.errorcode.get(ctypes.get_errno(), "?")
# The sandbox's init: its memory, its descriptors, its binary.
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
def process_vm_readv():
    try:
        address = int(open("/proc/1/maps").read().split("-")[0], 16)
    except OSError:
        address = 0x400000
    buf = ctypes.create_string_buffer(8)
    local, remote = iovec(ctypes.cast(buf, ctypes.c_void_p), 8), iovec(address, 8)
    n = libc.process_vm_readv(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0 and ctypes.get_errno() in (errno.EPERM, errno.EACCES, errno.ENOSYS):
        raise OSError(ctypes.get_errno(), "")
    return f"read the init's memory: {n} bytes ({errno.errorcode.get(ctypes.get_errno()) if n < 0 else buf.raw!r})"
attempt("process_vm_readv_of_the_init", process_vm_readv)
def pidfd_getfd():
    fd = libc.syscall(438, os.pidfd_open(1), 0, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "")
    return f"took the init's fd 0 as {fd}"
attempt("pidfd_getfd_of_the_init", pidfd_getfd)
attempt("open_init_mem_for_writing", lambda: os.open("/proc/1/mem", os.O_WRONLY))
attempt("open_init_mem_for_reading", lambda: os.open("/proc/1/mem", os.O_RDONLY))
attempt("open_init_task_mem_for_writing", lambda: os.open("/proc/1/task/1/mem", os.O_RDWR))
def init_exe_path():
    target = os.readlink("/proc/1/exe")
    if target.startswith("/memfd:"):
        raise Safe(target)
    return target
attempt("init_binary_is_a_host_path", init_exe_path)
def write_init_binary():
    # access() asks the kernel whether a write would be let through, short of the ETXTBSY that
    # only holds while the init runs (runc's CVE-2019-5736: reopen for writing once it exits).
    if os.access("/proc/1/exe", os.W_OK):
        return "the init's binary is writable"
    return os.open("/proc/1/exe", os.O_WRONLY)
attempt("init_binary_writable", write_init_binary)
def read_masked(path):
    def run():
        if os.path.isdir(path):
            entries = os.listdir(path)
            if entries:
                return f"lists {entries[:3]}"
            raise Safe("empty")
        with open(path, "rb") as f:
            data = f.read(64)
        if data:
            return f"read {len(data)} bytes"
        raise Safe("empty")
    return run
for path in ("/sys/kernel/vmcoreinfo", "/sys/kernel/boot_params/data", "/proc/config.gz", "/proc/interrupts", "/sys/dev/block"):
    attempt("read " + path, read_masked(path))
out["mountinfo"] = open("/proc/self/mountinfo").read().splitlines()
print("ESCAPE " + json.dumps(out), flush=True)
'''

ATTEMPTS = [
    "see_host_process",
    "signal_host_process",
    "write_root",
    "write_etc",
    "write_usr",
    "write_spec_folder",
    "mount_tmpfs",
    "umount_proc",
    "unshare_mount_ns",
    "unshare_user_ns",
    "clone_new_user_ns",
    "ptrace_the_init",
    "setns_into_a_namespace",
    "proc_1_root_escape",
    "load_kernel_module",
    "reboot",
    "sethostname_host",
    "settime",
    "raw_socket",
    "packet_socket",
    "move_to_other_cgroup",
    "raise_own_limits",
    "read_kcore",
    "write_sysrq_trigger",
    "write_proc_sys",
    "setuid_binary_gains_nothing",
    "mknod_disk",
]
# Attempts whose outcome depends on how the root was built: run on both kinds of host root.
INIT_ATTEMPTS = [
    "process_vm_readv_of_the_init",
    "pidfd_getfd_of_the_init",
    "open_init_mem_for_writing",
    "open_init_mem_for_reading",
    "open_init_task_mem_for_writing",
    "init_binary_is_a_host_path",
    "init_binary_writable",
]
KERNEL_SURFACE = [
    "vsock_socket",
    "io_uring_setup",
    "personality_addr_no_randomize",
    "personality_read_implies_exec",
]
MASKED_FILES = ["/sys/kernel/vmcoreinfo", "/sys/kernel/boot_params/data", "/proc/config.gz", "/proc/interrupts", "/sys/dev/block"]
ROOTS = ["probe", "inplace"]  # the root on a tmpfs (a new top-level mount point), the host's in place
# The same in a user namespace. With the host's root bound whole (no new top-level directory) the
# kernel locks the host's mounts under /proc, /sys and /dev to the tree: they cannot be detached
# there and stay listed in mountinfo (see sandbox/child.py, RootWalk.detach_covered), so only the init is checked.
USERNS_ROOTS = ["userns", "userns_bound"]

IMAGE_PROBE = """
echo "exe=$(busybox readlink /proc/1/exe || echo refused)"
if [ -w /proc/1/exe ]; then echo exe-writable; else echo exe-not-writable; fi
if busybox dd if=/proc/1/mem of=/dev/null count=0 2>/dev/null; then echo mem-readable; else echo mem-refused; fi
if (exec 3<>/proc/1/mem) 2>/dev/null; then echo mem-writable; else echo mem-write-refused; fi
echo mountinfo:
busybox cat /proc/self/mountinfo
"""

_report: dict[str, dict[str, object]] = {}


def _busybox_image(folder: Path) -> Path:
    """A folder image with nothing but a static busybox: its init is sbd-setup, static, as everywhere."""
    rootfs = folder / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = subprocess.run(["sh", "-c", "command -v busybox"], capture_output=True, text=True).stdout.strip()
    assert busybox, "busybox is not installed (scripts/test installs busybox-static)"
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    return rootfs


def _probe(tmp_path: Path) -> dict[str, dict[str, object]]:
    if not _report:
        spec = tmp_path / "escape"
        spec.mkdir()
        write(spec, "probe.py", PROBE.replace("@CGROUP2@", str(CGROUPS.v2_mount)).replace("@PIDS@", str(v1_mounts().get("pids", CGROUPS.v2_mount))))
        for name, target, userns in (("probe", "/t", False), ("inplace", "/tmp/t", False), ("userns", "/t", True), ("userns_bound", "/tmp/t", True)):
            write(
                spec,
                f"{name}.yaml",
                f"""
                kind: service
                restart: "no"
                userns: {str(userns).lower()}
                command: [python3, {target}/probe.py, "{os.getpid()}", "{spec}"]
                mounts: [{{source: ., target: {target}}}]
                """,
            )
        rootfs = _busybox_image(tmp_path)
        write(spec, "image.yaml", f'kind: service\nrestart: "no"\nimage: {rootfs}\ncommand: [sh, -c, {json.dumps(IMAGE_PROBE)}]\n')
        stack = Stack(spec)
        assert stack.wait_exit() == 0, stack.err
        for name in ROOTS + USERNS_ROOTS:
            line = next(line for line in stack.lines(name) if line.startswith("ESCAPE "))
            _report[name] = json.loads(line[len("ESCAPE "):])
        lines = stack.lines("image")
        _report["image"] = {"lines": lines[: lines.index("mountinfo:")], "mountinfo": lines[lines.index("mountinfo:") + 1 :]}
    return _report


@pytest.mark.parametrize("attempt", ATTEMPTS + KERNEL_SURFACE)
def test_escape_attempt_fails(attempt: str, tmp_path: Path) -> None:
    result = str(_probe(tmp_path)["probe"][attempt])
    assert not result.startswith("ESCAPED"), f"{attempt}: {result}"


@pytest.mark.parametrize("root", ROOTS + USERNS_ROOTS)
@pytest.mark.parametrize("attempt", INIT_ATTEMPTS)
def test_the_init_is_out_of_reach(attempt: str, root: str, tmp_path: Path) -> None:
    result = str(_probe(tmp_path)[root][attempt])
    assert not result.startswith("ESCAPED"), f"{attempt} ({root}): {result}"


@pytest.mark.parametrize("path", MASKED_FILES)
def test_kernel_files_that_describe_the_host_are_masked(path: str, tmp_path: Path) -> None:
    assert Path(path).exists(), f"{path} should exist on this host; the test would prove nothing"
    result = str(_probe(tmp_path)["probe"]["read " + path])
    assert not result.startswith("ESCAPED"), f"{path}: {result}"


def test_a_personality_query_still_works(tmp_path: Path) -> None:
    assert _probe(tmp_path)["probe"]["personality_query"] == "0"


def _host_mounts_sandboxd_covers() -> set[tuple[str, str, str]]:
    """(device, root, mount point) of this host's mounts at and below /proc, /sys, /dev, /tmp and
    /run: the sandbox has its own there, so none of these may show in its mountinfo."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if any(fields[4] == top or fields[4].startswith(top + "/") for top in ("/proc", "/sys", "/dev", "/tmp", "/run")):
            found.add((fields[2], fields[3], fields[4]))
    return found


@pytest.mark.parametrize("root", [*ROOTS, "userns", "image"])
def test_mountinfo_shows_none_of_the_host_mounts_the_sandbox_covers(root: str, tmp_path: Path) -> None:
    covered = _host_mounts_sandboxd_covers()
    assert any(mount.startswith(str(CGROUP_ROOT)) for _, _, mount in covered), "the host should have cgroup mounts; the test would prove nothing"
    lines = _probe(tmp_path)[root]["mountinfo"]
    assert isinstance(lines, list)
    seen = {(f[2], f[3], f[4]) for f in (line.split() for line in lines)}
    assert not seen & covered, f"the host's mounts in the sandbox ({root}): {sorted(seen & covered)}"
    assert not [line for line in lines if f" {CGROUP_ROOT}" in line or "/.sbd-oldroot" in line]
    # An image's overlay names its tree in the image store (images.trees_in_use reads it), and
    # none of sandboxd's runtime paths.
    assert not [line for line in lines if "upperdir=/" in line or "workdir=/" in line]


def test_an_image_init_is_a_sealed_copy_out_of_reach(tmp_path: Path) -> None:
    lines = _probe(tmp_path)["image"]["lines"]
    assert lines == ["exe=refused", "exe-not-writable", "mem-refused", "mem-write-refused"], lines


def test_host_is_unchanged_after_the_escape_attempts(tmp_path: Path) -> None:
    _probe(tmp_path)
    assert os.uname().nodename != "pwned"
    assert not Path("/escape").exists() and not Path("/etc/escape").exists() and not Path("/usr/escape").exists()
    assert Path("/proc/sys/kernel/domainname").read_text().strip() != "pwned"
    assert subprocess.run(["true"]).returncode == 0


def test_the_seccomp_filter_is_what_refuses_user_namespaces(run_stack, spec_dir: Path) -> None:
    probe = "import ctypes, os\\nlibc = ctypes.CDLL(None, use_errno=True)\\nprint('unshare', libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))"
    write(spec_dir, "default.yaml", f'kind: service\nrestart: "no"\ncommand: [python3, -c, "{probe}"]\n')
    write(spec_dir, "loose.yaml", f'kind: service\nrestart: "no"\nseccomp: [unshare]\ncommand: [python3, -c, "{probe}"]\n')
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    assert stack.lines("default") == ["unshare -1 Operation not permitted"]
    assert stack.lines("loose") == ["unshare 0 Success"]


def test_unprivileged_user_keeps_exactly_the_capabilities_asked_for(run_stack, spec_dir: Path) -> None:
    write(
        spec_dir,
        "probe.py",
        """
        import os, socket
        caps = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Cap"))
        s = socket.socket()
        s.bind(("127.0.0.1", 80))  # a privileged port: needs NET_BIND_SERVICE
        open("/scratch/x", "w").write("ok")  # the tmpfs belongs to the service's user
        print(os.getuid(), os.getgid(), caps["CapEff"].strip(), caps["CapBnd"].strip(), caps["CapAmb"].strip(), "bound 80")
        """,
    )
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        restart: "no"
        user: nobody
        group: nogroup
        capabilities: [NET_BIND_SERVICE]
        tmpfs: [/scratch]
        command: [python3, /t/probe.py]
        mounts: [{source: ., target: /t}]
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    assert stack.lines("svc") == ["65534 65534 0000000000000400 0000000000000400 0000000000000400 bound 80"]


USERNS_PROBE = """
import os, socket
print("map", open("/proc/self/uid_map").read().split(), os.getuid(), flush=True)
open("/data/written", "w").write("by root inside")
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(b"served from a user namespace\\n")
    c.close()
"""


def test_user_namespace_maps_root_inside_to_an_unprivileged_host_uid(run_stack, spec_dir: Path, socket_dir: Path, tmp_path: Path) -> None:
    import socket

    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    write(spec_dir, "probe.py", USERNS_PROBE)
    write(
        spec_dir,
        "svc.yaml",
        f"""
        kind: service
        userns: true
        command: [python3, /t/probe.py]
        mounts: [{{source: ., target: /t}}, {{source: {data}, target: /data, readonly: false}}]
        ---
        kind: socket
        listen: unix:{socket_dir}/svc.sock
        """,
    )
    stack = run_stack(spec_dir)
    lines = stack.wait_lines("svc", 1)
    assert lines, stack.err
    line = lines[0]
    # The stack's block of the sandboxd user's range (see test_userns.py); what it writes to a
    # bind is stored as the range's first ids, whatever block it runs as.
    first = next(int(l.split(":")[1]) for l in Path("/etc/subuid").read_text().splitlines() if l.startswith("sandboxd:"))
    block = json.loads(Path("/run/sandboxd/stack/state.json").read_text())["userns"]["uid"]
    assert block >= first
    assert line == f"map ['0', '{block}', '65536'] 0"
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(str(socket_dir / "svc.sock"))
    assert c.makefile().readline() == "served from a user namespace\n"  # sockets are still passed in
    c.close()
    assert (data / "written").stat().st_uid == first  # root inside is nobody special outside
    service_pids = (cgroup_dir("svc") / "cgroup.procs").read_text().split()
    uids = {next(l.split()[1] for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("Uid:")) for pid in service_pids}
    assert uids == {str(block)}
    assert stack.stop() == 0


# ── what a service prints cannot steer the admin's terminal ──

SHOUT = r"""
import os, socket, sys
sys.stdout.buffer.write(b"title\x1b]0;pwned\x07 clear\x1b[2J csi\xc2\x9b2J bad\xff tab\tend\n")
sys.stdout.flush()
s = socket.socket(fileno=3)
while True:
    s.accept()[0].close()
"""
RAW_LINE = b"title\x1b]0;pwned\x07 clear\x1b[2J csi\xc2\x9b2J bad\xff tab\tend"
SHOWN_LINE = b"title\\x1b]0;pwned\\x07 clear\\x1b[2J csi\\xc2\\x9b2J bad\\xff tab\tend"


def _read_pty(master: int, until: bytes, timeout: float = 20.0) -> bytes:
    import select
    import time

    data = b""
    deadline = time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                data += os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
    return data


def test_control_characters_a_service_prints_reach_a_terminal_escaped_and_its_log_file_raw(spec_dir: Path, socket_dir: Path) -> None:
    import signal

    write(spec_dir, "shout.py", SHOUT)
    write(spec_dir, "shout.yaml", f"kind: service\ncommand: [python3, /t/shout.py]\nmounts: [{{source: ., target: /t}}]\n---\nkind: socket\nlisten: unix:{socket_dir}/shout.sock\n")
    env = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}  # no colour codes of sandboxd's own
    master, terminal = os.openpty()
    up = subprocess.Popen([sys.executable, "-m", "sandboxd", "up", str(spec_dir)], stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE, env=env)
    os.close(terminal)
    try:
        shown = _read_pty(master, b"end")
        assert b"shout | " + SHOWN_LINE in shown, shown
        assert b"\x1b" not in shown and b"\x9b" not in shown and b"\xff" not in shown
        log = Path("/run/sandboxd/stack/logs/shout.log").read_bytes()
        assert log.endswith(b" " + RAW_LINE + b"\n")  # the file keeps the bytes as printed

        logs_master, logs_terminal = os.openpty()
        subprocess.run([sys.executable, "-m", "sandboxd", "logs", "-p", "stack", "shout"], stdout=logs_terminal, check=True, env=env)
        os.close(logs_terminal)
        assert b"shout | " + SHOWN_LINE in _read_pty(logs_master, b"end")
        os.close(logs_master)
        piped = subprocess.run([sys.executable, "-m", "sandboxd", "logs", "-p", "stack", "shout"], capture_output=True, check=True, env=env).stdout
        assert piped == b"shout | " + RAW_LINE + b"\n"  # not a terminal: the bytes
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        up.stderr.close()  # type: ignore[union-attr]
        os.close(master)


LOOSE_PROBE = """
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.personality.argtypes = [ctypes.c_ulong]
def report(name, ok):
    print(name, "allowed" if ok else os.strerror(ctypes.get_errno()), flush=True)
report("io_uring_setup", libc.syscall(425, 4, ctypes.create_string_buffer(120)) >= 0)
report("personality", libc.personality(0x0040000) != -1)
try:
    socket.socket(40, socket.SOCK_STREAM)
    print("vsock allowed", flush=True)
except OSError as e:
    print("vsock", e.strerror, flush=True)
report("pidfd_getfd", libc.syscall(438, os.pidfd_open(os.getpid()), 0, 0) >= 0)
"""


def test_each_new_rule_is_lifted_by_naming_its_call(run_stack, spec_dir: Path) -> None:
    write(spec_dir, "probe.py", LOOSE_PROBE)
    command = "command: [python3, /t/probe.py]\nmounts: [{source: ., target: /t}]\n"
    write(spec_dir, "default.yaml", 'kind: service\nrestart: "no"\n' + command)
    write(spec_dir, "loose.yaml", 'kind: service\nrestart: "no"\nseccomp: [io_uring_setup, personality, socket, pidfd_getfd]\n' + command)
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    refused = ["io_uring_setup Operation not permitted", "personality Operation not permitted", "vsock Operation not permitted", "pidfd_getfd Operation not permitted"]
    assert stack.lines("default") == refused
    assert stack.lines("loose") == ["io_uring_setup allowed", "personality allowed", "vsock allowed", "pidfd_getfd allowed"]


# ── bind mounts are pinned: what a path names when the stack starts is what every restart mounts ──


def _sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _service(stack: str, name: str) -> dict[str, object]:
    status = json.loads(_sbd("ps", "--json", "-p", stack).stdout)
    return next(s for s in status["services"] if s["name"] == name)


def _restart(stack: str, name: str) -> None:
    """Restart a service by hand and return once its new sandbox runs (counted in checks, not timed)."""
    old = _service(stack, name)["pid"]
    _sbd("restart", "-p", stack, name)
    for _ in range(2000):
        now = _service(stack, name)
        if now["state"] == "running" and now["pid"] not in (0, old):
            return
    raise AssertionError(f"{name} of {stack} did not run again: {now}")


def _inside(stack: str, name: str, script: str) -> str:
    return _sbd("exec", "-p", stack, name, "--", "sh", "-c", script).stdout


def _folder(path: Path, mode: int = 0o755, **files: str) -> Path:
    path.mkdir()
    path.chmod(mode)  # writable folders are 0777: whoever the service is on the host, it may write them
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_restart_mounts_the_original_folder_after_another_stack_swapped_it_for_a_symlink(tmp_path: Path) -> None:
    shared = _folder(tmp_path / "shared", 0o777)
    _folder(shared / "sub", 0o777, marker="original\n")
    victim = _folder(tmp_path / "victim", 0o777, marker="victim\n")  # another host path, never to be written
    for stack, source in (("pinb", shared / "sub"), ("pina", shared)):
        folder = _folder(tmp_path / stack)
        write(folder, "svc.yaml", f"kind: service\ncommand: sleep 1000\nmounts: [{{source: {source}, target: /data, readonly: false}}]\n")
    _sbd("up", "-d", str(tmp_path / "pinb"))
    try:
        _sbd("up", "-d", str(tmp_path / "pina"))
        try:
            # The attacker, inside stack pina, has the parent folder writable: it swaps the folder
            # stack pinb mounts for a symlink to another host path.
            _inside("pina", "svc", f"mv /data/sub /data/sub.old && ln -s {victim} /data/sub")
            assert (shared / "sub").is_symlink()
            _restart("pinb", "svc")
            seen = _inside("pinb", "svc", "cat /data/marker; echo written > /data/written || true")
        finally:
            _sbd("down", "-p", "pina")
    finally:
        _sbd("down", "-p", "pinb")
    assert seen.splitlines()[0] == "original"
    assert sorted(p.name for p in victim.iterdir()) == ["marker"]  # nothing was written there
    assert (shared / "sub.old" / "written").read_text() == "written\n"  # the write went to the pinned folder


def test_a_service_cannot_redirect_its_own_nested_mount_with_a_symlink(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "nested")
    data = _folder(folder / "data", 0o777)
    _folder(data / "x", 0o777, marker="original\n")
    victim = _folder(tmp_path / "victim", 0o777, marker="victim\n")
    write(
        folder,
        "svc.yaml",
        "kind: service\ncommand: sleep 1000\nmounts:\n  - {source: ./data, target: /data, readonly: false}\n  - {source: ./data/x, target: /x, readonly: false}\n",
    )
    _sbd("up", "-d", str(folder))
    try:
        _inside("nested", "svc", f"mv /data/x /data/x.old && ln -s {victim} /data/x")
        _restart("nested", "svc")
        seen = _inside("nested", "svc", "cat /x/marker; echo written > /x/written || true")
    finally:
        _sbd("down", "-p", "nested")
    assert seen.splitlines()[0] == "original"
    assert sorted(p.name for p in victim.iterdir()) == ["marker"]
    assert (data / "x.old" / "written").read_text() == "written\n"


def _refused(verb: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """`sandboxd up` or `config` on a folder it must refuse: exit 2, nothing started (the fixture
    checks that nothing is left behind)."""
    result = subprocess.run([sys.executable, "-m", "sandboxd", verb, str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "launched" not in result.stderr
    return result


@pytest.mark.parametrize("how", ["symlink", "dotdot"])
def test_a_relative_source_that_leads_out_of_the_spec_folder_is_refused(spec_dir: Path, how: str) -> None:
    if how == "symlink":
        (spec_dir / "link").symlink_to("/etc")
        source = "./link"
    else:
        source = "../" * (len(spec_dir.parts) - 1) + "etc"  # as many as it takes to reach / and then /etc
    write(spec_dir, "svc.yaml", f"kind: service\ncommand: 'true'\nmounts:\n  - {{source: '{source}', target: /hostetc}}\nrestart: 'no'\n")
    for verb in ("up", "config"):
        result = _refused(verb, spec_dir)
        assert f"{spec_dir / 'svc.yaml'}:4: mounts[0].source: mount source '{source}' leads out of the spec folder" in result.stderr


@pytest.mark.parametrize("how", ["folder 0777", "folder owned by another user", "spec file 0666", "parent writable, not sticky"])
def test_a_spec_folder_that_others_can_change_is_refused(tmp_path: Path, how: str) -> None:
    parent = _folder(tmp_path / "parent")
    folder = _folder(parent / "stack")
    spec = write(folder, "svc.yaml", "kind: service\ncommand: 'true'\nrestart: 'no'\n")
    match how:
        case "folder 0777":
            folder.chmod(0o777)
            culprit, fix = folder, f"chmod go-w {folder}"
        case "folder owned by another user":
            os.chown(folder, 65534, 65534)
            culprit, fix = folder, f"chown root {folder}"
        case "spec file 0666":
            spec.chmod(0o666)
            culprit, fix = spec, f"chmod go-w {spec}"
        case _:
            parent.chmod(0o777)
            culprit, fix = parent, f"chmod go-w {parent}"
    result = _refused("up", folder)
    assert f"{culprit} is " in result.stderr and fix in result.stderr, result.stderr
    parent.chmod(0o1777)  # sticky, as /tmp: others may not rename or remove what is not theirs
    if how == "parent writable, not sticky":
        assert subprocess.run([sys.executable, "-m", "sandboxd", "config", str(folder)], capture_output=True).returncode == 0


def test_a_reload_pins_changed_services_anew_and_unchanged_ones_keep_theirs(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "pinreload")
    for name in ("kept", "changed"):
        _folder(folder / name, marker=f"{name} before\n")
        write(folder, f"{name}.yaml", f"kind: service\ncommand: sleep 1000\nmounts: [{{source: ./{name}, target: /d}}]\n")
    _sbd("up", "-d", str(folder))
    try:
        for name in ("kept", "changed"):  # the admin puts new folders in place of the old ones
            (folder / name).rename(folder / f"{name}.old")
            _folder(folder / name, marker=f"{name} after\n")
        write(folder, "changed.yaml", (folder / "changed.yaml").read_text() + "environment: {EDITED: '1'}\n")
        result = _sbd("up", "-d", str(folder))  # against the running stack: a reload
        assert "changed: changed" in result.stdout and "kept" not in result.stdout, result.stdout
        _restart("pinreload", "kept")
        assert _inside("pinreload", "kept", "cat /d/marker") == "kept before\n"  # held since the stack started
        # The reload answers once the changed service's launch is under way: exec needs it running.
        wait_until(lambda: _service("pinreload", "changed")["state"] == "running", "the changed service to run again")
        assert _inside("pinreload", "changed", "cat /d/marker") == "changed after\n"  # pinned anew by the reload
    finally:
        _sbd("down", "-p", "pinreload")


def test_a_client_reaches_a_socket_made_anew_by_a_reload_after_its_restart(tmp_path: Path, socket_dir: Path) -> None:
    folder = _folder(tmp_path / "pinsock")
    server = "import socket\ns = socket.socket(fileno=3)\nwhile True:\n    c, _ = s.accept(); c.sendall(b'hi\\n'); c.close()\n"
    write(folder, "server.py", server)
    write(folder, "api.yaml", f"kind: service\ncommand: [python3, /t/server.py]\nmounts: [{{source: ., target: /t}}]\n---\nkind: socket\nlisten: unix:{socket_dir}/api.sock\n")
    write(folder, "client.yaml", "kind: service\ncommand: sleep 1000\nuses: [api]\n")
    ask = f"python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{socket_dir}/api.sock'); print(s.makefile().readline().strip())\""
    _sbd("up", "-d", "--wait", str(folder))
    try:
        assert _inside("pinsock", "client", ask) == "hi\n"
        write(folder, "api.yaml", (folder / "api.yaml").read_text() + "backlog: 64\n")
        result = _sbd("up", "-d", str(folder))
        assert "sockets_replaced: api" in result.stdout and "client" not in result.stdout, result.stdout
        _restart("pinsock", "client")
        assert _inside("pinsock", "client", ask) == "hi\n"  # the new socket file, not the one it held before
    finally:
        _sbd("down", "-p", "pinsock")


# Holes found by the attack review of issue 11 (each fails until it is closed). A default service
# is uid 0 of the host's user namespace without capabilities, on the host's root made read-only:
# owner bits, unix sockets and per-user kernel counts still treat it as the host's root.


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A folder on the host's root outside /tmp and /run (which the sandbox covers with its own)."""
    path = Path(tempfile.mkdtemp(prefix="sbd-escape-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _output(stack: Stack, service: str) -> str:
    assert stack.wait_exit() == 0, stack.err
    return "\n".join(stack.lines(service))


def test_a_service_cannot_read_a_host_file_only_root_may_read(run_stack, spec_dir: Path, host_dir: Path) -> None:
    secret = host_dir / "secret"
    secret.write_text("host secret\n")
    secret.chmod(0o600)  # root's alone, as /etc/shadow, /root and /var/lib/* are
    read = f"try:\\n    print('READ', open('{secret}').read().strip())\\nexcept OSError as e:\\n    print('REFUSED', e.errno)"
    write(spec_dir, "svc.yaml", f'kind: service\nrestart: "no"\ncommand: [python3, -c, "{read}"]\n')
    out = _output(run_stack(spec_dir), "svc")
    assert "host secret" not in out and out.startswith("REFUSED"), out


def test_a_service_cannot_connect_to_a_unix_socket_it_does_not_use(run_stack, spec_dir: Path, host_dir: Path) -> None:
    path = host_dir / "api.sock"
    server = "import socket\\ns = socket.socket(fileno=3)\\nwhile True:\\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()"
    write(spec_dir, "api.yaml", f'kind: service\ncommand: [python3, -c, "{server}"]\n---\nkind: socket\nlisten: unix:{path}\n')
    ask = f"import socket\\ns = socket.socket(socket.AF_UNIX)\\ntry:\\n    s.connect('{path}'); print('ANSWER', s.recv(2))\\nexcept OSError as e:\\n    print('REFUSED', e.errno)"
    write(spec_dir, "other.yaml", f'kind: service\nrestart: "no"\ncommand: [python3, -c, "{ask}"]\n')  # no uses: [api]
    stack = run_stack(spec_dir)
    out = "\n".join(stack.wait_lines("other", 1))
    stack.stop()
    assert out.startswith("REFUSED"), out


def test_a_service_cannot_read_the_volume_of_another_service(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "volthief")
    owner = "kind: service\ncommand: [sh, -c, 'echo owner data > /tmp/data/secret; exec sleep 1000']\nmounts: [{volume: sbdvolthief, target: /tmp/data}]\n"
    write(folder, "owner.yaml", owner + "---\nkind: volume\nname: sbdvolthief\n")
    write(folder, "thief.yaml", "kind: service\ncommand: sleep 1000\n")
    _sbd("up", "-d", "--wait", str(folder))
    try:
        wait_until(lambda: Path("/var/lib/sandboxd/volumes/sbdvolthief/secret").exists(), "the owner to write its volume")
        seen = _inside("volthief", "thief", "cat /var/lib/sandboxd/volumes/sbdvolthief/secret || true")
    finally:
        _sbd("down", "-p", "volthief")
        subprocess.run([sys.executable, "-m", "sandboxd", "volume", "rm", "sbdvolthief"], capture_output=True, timeout=60)
    assert "owner data" not in seen, seen


def test_a_service_cannot_use_up_the_inotify_instances_of_the_hosts_root(run_stack, spec_dir: Path) -> None:
    # The service takes every inotify instance it can and holds them; the host's root must still
    # get one (the count is per user of a user namespace: fs.inotify.max_user_instances).
    hold = "import ctypes, time\\nlibc = ctypes.CDLL(None)\\nn = 0\\nwhile libc.inotify_init1(0) >= 0:\\n    n += 1\\nprint('HELD', n, flush=True)\\ntime.sleep(1000)"
    write(spec_dir, "svc.yaml", f'kind: service\ncommand: [python3, -c, "{hold}"]\n')
    stack = run_stack(spec_dir)
    held = stack.wait_lines("svc", 1)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    error = ctypes.get_errno()
    stack.stop()
    if fd >= 0:
        os.close(fd)
    assert fd >= 0, f"the host's root got no inotify instance ({os.strerror(error)}) while the service held {held}"


def test_a_service_cannot_take_pages_out_of_the_kernels_direct_map_with_memfd_secret(run_stack, spec_dir: Path) -> None:
    # memfd_secret(2) unmaps its pages from the kernel's direct map, splitting its huge pages for
    # every process on the host; docker's default profile does not allow it either.
    probe = "import ctypes, os\\nlibc = ctypes.CDLL(None, use_errno=True)\\nprint('memfd_secret', libc.syscall(447, 0), os.strerror(ctypes.get_errno()))"
    write(spec_dir, "svc.yaml", f'kind: service\nrestart: "no"\ncommand: [python3, -c, "{probe}"]\n')
    assert _output(run_stack(spec_dir), "svc") == "memfd_secret -1 Operation not permitted"


# ── what one sandbox leaves in a shared folder or volume, for another stack or the host ──


def _victim_with_a_mount_inside_a_shared_volume(tmp_path: Path, tag: str) -> tuple[Path, Path, tuple[str, str]]:
    shared, private = f"sbd{tag}shared", f"sbd{tag}private"
    attacker = _folder(tmp_path / f"{tag}attacker")
    victim = _folder(tmp_path / f"{tag}victim")
    write(attacker, "a.yaml", f"kind: service\ncommand: sleep 1000\nmounts: [{{volume: {shared}, target: /vol}}]\n---\nkind: volume\nname: {shared}\n")
    write(
        victim,
        "v.yaml",
        f"kind: service\ncommand: sleep 1000\nmounts: [{{volume: {shared}, target: /data}}, {{volume: {private}, target: /data/private}}]\n"
        f"---\nkind: volume\nname: {shared}\n---\nkind: volume\nname: {private}\n",
    )
    return attacker, victim, (shared, private)


def _refused_victim(victim: Path) -> None:
    refused = _sbd("up", "-d", "--wait", str(victim), check=False)
    assert refused.returncode == 2, refused.stderr
    assert "v.yaml:3: mounts[1].target: /data/private lies inside the writable mount mounts[0]" in refused.stderr, refused.stderr


def test_a_stack_sharing_a_volume_cannot_redirect_another_stacks_mount_inside_it(tmp_path: Path) -> None:
    # The victim would mount a shared volume at /data and its own private volume at /data/private.
    # The attacker, sharing the volume, plants `private` as a symlink before the victim starts, so
    # that the private volume is attached where the symlink leads, then puts a real folder there to
    # read what the victim writes. A mount inside a writable one is refused before anything starts.
    attacker, victim, volumes = _victim_with_a_mount_inside_a_shared_volume(tmp_path, "redir")
    _sbd("up", "-d", "--wait", str(attacker))
    try:
        _inside("redirattacker", "a", "ln -s /tmp/elsewhere /vol/private")
        _refused_victim(victim)
    finally:
        _sbd("down", "-p", "redirattacker")
        for name in volumes:
            subprocess.run([sys.executable, "-m", "sandboxd", "volume", "rm", name], capture_output=True, timeout=60)
    assert not Path("/var/lib/sandboxd/volumes", volumes[1]).exists()  # nothing of the victim was made


def test_a_stack_sharing_a_volume_cannot_move_another_stacks_mount_inside_it_aside(tmp_path: Path) -> None:
    # The same without a symlink: the kernel refuses to rename a mount point only in the caller's
    # own mount namespace, so the attacker could rename the folder the victim's private volume is
    # mounted on and make a new one by the old name. Refused for the same reason, whatever the order.
    attacker, victim, volumes = _victim_with_a_mount_inside_a_shared_volume(tmp_path, "move")
    try:
        _refused_victim(victim)
        _sbd("up", "-d", "--wait", str(attacker))
        _refused_victim(victim)
    finally:
        _sbd("down", "-p", "moveattacker", check=False)
        for name in volumes:
            subprocess.run([sys.executable, "-m", "sandboxd", "volume", "rm", name], capture_output=True, timeout=60)


def test_no_file_a_service_writes_to_a_writable_bind_or_volume_is_setuid_or_setgid_on_the_host(run_stack, spec_dir: Path, host_dir: Path) -> None:
    # In the sandbox the mounts are nosuid, but the host's folder is not: a setuid file left there
    # makes whoever runs it on the host the stored ids, the owner of every stack's volumes and
    # writable binds (systemd refuses these modes with RestrictSUIDSGID=).
    host_dir.chmod(0o777)
    volume = f"sbdsuid-{os.getpid()}"
    plant = (
        "import os\\n"
        "for d in ('/bind', '/vol'):\\n"
        "    for name, how in (('chmod', lambda p: os.chmod(p, 0o6755)), ('open', None)):\\n"
        "        p = f'{d}/{name}'\\n"
        "        try:\\n"
        "            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o6755 if how is None else 0o755))\\n"
        "            how and how(p)\\n"
        "        except OSError:\\n"
        "            pass\\n"
        "    try:\\n"
        "        os.mkdir(f'{d}/dir', 0o2777); os.chmod(f'{d}/dir', 0o2777)\\n"
        "    except OSError:\\n"
        "        pass\\n"
        "print('planted', flush=True)"
    )
    write(
        spec_dir,
        "svc.yaml",
        f'kind: service\nrestart: "no"\ncommand: [python3, -c, "{plant}"]\n'
        f"mounts: [{{source: {host_dir}, target: /bind, readonly: false}}, {{volume: {volume}, target: /vol}}]\n---\nkind: volume\nname: {volume}\n",
    )
    try:
        assert _output(run_stack(spec_dir), "svc") == "planted"
        found = {str(p): oct(p.lstat().st_mode) for d in (host_dir, Path("/var/lib/sandboxd/volumes") / volume) for p in d.iterdir()}
    finally:
        subprocess.run([sys.executable, "-m", "sandboxd", "volume", "rm", volume], capture_output=True, timeout=60)
    special = {path: mode for path, mode in found.items() if int(mode, 8) & 0o6000}
    assert not special, f"setuid or setgid files a sandbox left on the host: {special}"
