"""Root inside is not root outside: every sandbox runs in a user namespace unless its spec says
`userns: false`, each running stack in a block of subordinate ids of its own.

The files and the socket these tests plant on the host are root's and private (mode 0600); each
test removes what it planted. Volumes get names of their own and are removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CGROUP_BASE, RUNTIME, write

from sandboxd.store.volumes import volumes_dir


def read_blocks():  # type: ignore[no-untyped-def]
    from sandboxd.host.subids import read_blocks as blocks

    return blocks()

PROBE = r'''
import errno, json, os, socket, sys
secret, sock_path = sys.argv[1], sys.argv[2]
out = {}

def attempt(name, fn):
    try:
        out[name] = "ESCAPED: " + repr(fn())[:80]
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))

def listing(path):
    found = os.listdir(path)
    if not found:
        raise OSError(errno.ENOENT, "empty")  # masked: an empty, read-only tmpfs
    return found

def connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return "connected"

attempt("read_etc_shadow", lambda: open("/etc/shadow").read(10))
attempt("read_etc_gshadow", lambda: open("/etc/gshadow").read(10))
attempt("read_a_private_file_of_root", lambda: open(secret).read())
attempt("list_root_home", lambda: listing("/root"))
attempt("list_home", lambda: listing("/home"))
attempt("see_sandboxd_state", lambda: listing("/var/lib/sandboxd"))
attempt("see_volumes_of_other_stacks", lambda: listing("/var/lib/sandboxd/volumes"))
attempt("connect_to_a_private_socket_of_root", lambda: connect(sock_path))
keys = [p for p in ("/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ecdsa_key") if os.path.exists(p)]
attempt("read_host_ssh_keys", lambda: [open(p).read(10) for p in keys if open(p).read(10)] or (_ for _ in ()).throw(OSError(errno.ENOENT, "")))
print("USERNS " + json.dumps(out), flush=True)
'''

ATTEMPTS = [
    "read_etc_shadow",
    "read_etc_gshadow",
    "read_a_private_file_of_root",
    "list_root_home",
    "list_home",
    "see_sandboxd_state",
    "see_volumes_of_other_stacks",
    "connect_to_a_private_socket_of_root",
    "read_host_ssh_keys",
]


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A private file and a listening private socket of root's under /var/tmp (on the host's root,
    which every sandbox on it sees read-only); /root and sandboxd's volumes folder made non-empty."""
    tag = f"sbd-userns-{os.getpid()}"
    secret = Path("/var/tmp") / f"{tag}.secret"
    sock_path = Path("/var/tmp") / f"{tag}.sock"
    volume = volumes_dir() / f"{tag}-volume"
    in_root = Path("/root") / f".{tag}"
    listener = socket.socket(socket.AF_UNIX)
    try:
        secret.write_text("root's secret\n")
        secret.chmod(0o600)
        listener.bind(str(sock_path))
        sock_path.chmod(0o600)
        listener.listen()
        in_root.write_text("x")
        volume.mkdir(parents=True)
        yield secret, sock_path
    finally:
        listener.close()
        for path in (secret, sock_path, in_root):
            path.unlink(missing_ok=True)
        shutil.rmtree(volume, ignore_errors=True)


def probe(run_stack, spec_dir: Path, planted: tuple[Path, Path], extra: str = "") -> dict[str, str]:
    write(spec_dir, "probe.py", PROBE)
    write(
        spec_dir,
        "probe.yaml",
        f"""
        kind: service
        restart: "no"
        command: [python3, /t/probe.py, "{planted[0]}", "{planted[1]}"]
        mounts: [{{source: ., target: /t}}]
        {extra}
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    line = next(line for line in stack.lines("probe") if line.startswith("USERNS "))
    return dict(json.loads(line[len("USERNS "):]))


def test_a_default_service_reaches_none_of_roots_private_files_folders_or_sockets(run_stack, spec_dir: Path, planted: tuple[Path, Path]) -> None:
    report = probe(run_stack, spec_dir, planted)
    assert set(report) == set(ATTEMPTS)
    escaped = {name: result for name, result in report.items() if result.startswith("ESCAPED")}
    assert not escaped


def test_userns_false_gives_root_its_file_access_back(run_stack, spec_dir: Path, planted: tuple[Path, Path]) -> None:
    report = probe(run_stack, spec_dir, planted, extra="userns: false")
    assert report["read_a_private_file_of_root"] == "ESCAPED: \"root's secret\\n\""
    assert report["read_etc_shadow"].startswith("ESCAPED")
    assert report["connect_to_a_private_socket_of_root"] == "ESCAPED: 'connected'"
    assert report["list_root_home"] == "ENOENT"  # still hidden: that is the host root's view, not the ids


def running_block(name: str) -> dict[str, int]:
    """The block of ids a running stack holds, as its state file records it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            return dict(json.loads((RUNTIME / name / "state.json").read_text())["userns"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.02)
    raise AssertionError(f"no state file of stack {name}")


def service_pids(stack: str, service: str) -> list[int]:
    return [int(pid) for pid in (CGROUP_BASE / stack / service / "cgroup.procs").read_text().split()]


def host_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a process, as the host sees them."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    gid = next(int(line.split()[1]) for line in status if line.startswith("Gid:"))
    return uid, gid


def sleeper(spec_dir: Path, name: str = "svc", extra: str = "") -> Path:
    folder = spec_dir / name
    folder.mkdir()
    write(folder, f"{name}.yaml", f"kind: service\ncommand: [sh, -c, 'echo up; exec sleep 1000']\n{extra}")
    return folder


def test_root_inside_is_an_unprivileged_host_uid_from_the_sandboxd_users_range(run_stack, spec_dir: Path) -> None:
    stack = run_stack(sleeper(spec_dir), "-p", "uidcheck")
    stack.wait_lines("svc", 1)
    block = running_block("uidcheck")
    blocks = read_blocks()
    assert blocks is not None and (block["uid"], block["gid"]) in blocks.stacks
    assert (block["uid"], block["gid"]) != blocks.store or len(blocks.stacks) == 1  # no sandbox runs as the stored ids
    pids = service_pids("uidcheck", "svc")
    assert pids and {host_ids(pid) for pid in pids} == {(block["uid"], block["gid"])}
    assert Path(f"/proc/{pids[0]}/uid_map").read_text().split() == ["0", str(block["uid"]), "65536"]
    assert stack.stop() == 0


def test_two_running_stacks_get_disjoint_blocks_of_ids(run_stack, spec_dir: Path) -> None:
    one = run_stack(sleeper(spec_dir, "one"), "-p", "one")
    two = run_stack(sleeper(spec_dir, "two"), "-p", "two")
    one.wait_lines("one", 1)
    two.wait_lines("two", 1)
    a, b = running_block("one"), running_block("two")
    assert a["uid"] + a["count"] <= b["uid"] or b["uid"] + b["count"] <= a["uid"]
    assert a["gid"] + a["count"] <= b["gid"] or b["gid"] + b["count"] <= a["gid"]
    assert host_ids(service_pids("one", "one")[0]) != host_ids(service_pids("two", "two")[0])
    assert one.stop() == 0 and two.stop() == 0


def test_a_killed_supervisors_block_goes_to_the_next_stack_once_nothing_of_it_runs(run_stack, spec_dir: Path) -> None:
    crashed = run_stack(sleeper(spec_dir, "crashed"), "-p", "crashed")
    other = run_stack(sleeper(spec_dir, "other"), "-p", "other")
    crashed.wait_lines("crashed", 1)
    other.wait_lines("other", 1)
    block, others = running_block("crashed"), running_block("other")
    service = service_pids("crashed", "crashed")
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in service) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(Path(f"/proc/{pid}").exists() for pid in service)  # its services died with it
    subprocess.run([sys.executable, "-m", "sandboxd", "down", "-p", "crashed"], capture_output=True, check=False)
    after = run_stack(sleeper(spec_dir, "after"), "-p", "after")
    after.wait_lines("after", 1)
    assert running_block("after") == block != others
    assert after.stop() == 0 and other.stop() == 0


def test_an_images_files_keep_their_owners_inside(run_stack, spec_dir: Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None, "scripts/test installs busybox-static"
    rootfs = spec_dir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    (rootfs / "data").mkdir()
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "etc" / "secret").write_text("the image's own\n")
    (rootfs / "etc" / "secret").chmod(0o600)  # root's alone: readable by root inside only if it is the image's root
    (rootfs / "data" / "owned").write_text("x")
    os.chown(rootfs / "data" / "owned", 1234, 5678)
    write(
        spec_dir,
        "box.yaml",
        """
        kind: service
        image: ./rootfs
        restart: "no"
        command: [/bin/busybox, sh, -c, "busybox stat -c '%n %u:%g' /bin/busybox /etc/secret /data/owned; busybox cat /etc/secret; busybox cat /proc/self/uid_map"]
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    lines = stack.lines("box")
    assert lines[:4] == ["/bin/busybox 0:0", "/etc/secret 0:0", "/data/owned 1234:5678", "the image's own"]
    inside, outside, _count = lines[4].split()
    assert inside == "0" and outside != "0"  # and yet root inside is not root outside


def test_a_volume_is_stored_as_the_sandboxd_ids_and_reads_the_same_in_another_stack(run_stack, spec_dir: Path) -> None:
    blocks = read_blocks()
    assert blocks is not None
    name = f"sbduserns-{os.getpid()}"
    writer = spec_dir / "writer"
    reader = spec_dir / "reader"
    writer.mkdir()
    reader.mkdir()
    volume = f"mounts: [{{volume: {name}, target: /data}}]\n---\nkind: volume\nname: {name}\n"
    write(writer, "w.yaml", f"kind: service\nuser: nobody\ncommand: [sh, -c, 'echo hello > /data/note && echo written && exec sleep 1000']\n{volume}")
    write(reader, "r.yaml", f"kind: service\nrestart: 'no'\ncommand: [sh, -c, 'stat -c \"%u:%g\" /data/note; cat /data/note; cut -c12-22 /proc/self/uid_map']\n{volume}")
    try:
        first = run_stack(writer, "-p", "writer")
        first.wait_lines("w", 1)
        assert first.lines("w") == ["written"]
        note = volumes_dir() / name / "note"
        # nobody inside is stored as the sandboxd user's first ids + 65534, whatever block the writer ran as
        assert (note.stat().st_uid, note.stat().st_gid) == (blocks.store[0] + 65534, blocks.store[1] + 65534)
        second = run_stack(reader, "-p", "reader")  # runs while the writer holds its block: another one
        assert second.wait_exit() == 0, second.err
        owner, text, reader_uid = second.lines("r")
        assert (owner, text) == ("65534:65534", "hello")
        assert int(reader_uid) != running_block("writer")["uid"]
        assert first.stop() == 0
    finally:
        subprocess.run([sys.executable, "-m", "sandboxd", "volume", "rm", name], capture_output=True, check=False)


def test_a_writable_bind_takes_writes_only_where_the_stored_ids_may_write(run_stack, spec_dir: Path, tmp_path: Path) -> None:
    blocks = read_blocks()
    assert blocks is not None
    roots = tmp_path / "roots"  # the host root's: root inside is not its owner
    stored = tmp_path / "stored"  # the sandboxd user's stored root: root inside is its owner
    roots.mkdir()
    stored.mkdir()
    os.chown(stored, *blocks.store)
    write(
        spec_dir,
        "box.yaml",
        f"""
        kind: service
        restart: "no"
        command: [sh, -c, "{{ echo a > /roots/a; }} 2>/dev/null || echo refused; echo b > /stored/b && echo written"]
        mounts: [{{source: {roots}, target: /roots, readonly: false}}, {{source: {stored}, target: /stored, readonly: false}}]
        """,
    )
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0, stack.err
    assert stack.lines("box") == ["refused", "written"]
    assert not (roots / "a").exists()
    assert ((stored / "b").stat().st_uid, (stored / "b").stat().st_gid) == blocks.store


NETWORK_SERVER = r"""
import os, socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 80))  # below 1024, without capabilities: its own namespace allows it
s.listen()
print("links", sorted(os.listdir("/sys/class/net")), "map", open("/proc/self/uid_map").read().split()[:2], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from port 80 in a user namespace\n")
    c.close()
"""


def test_services_on_a_network_run_in_user_namespaces_with_their_own_sysfs(run_stack, spec_dir: Path) -> None:
    write(spec_dir, "server.py", NETWORK_SERVER)
    write(spec_dir, "net.yaml", "kind: network\nname: net\n")
    write(spec_dir, "server.yaml", "kind: service\nnetwork: [net]\ncommand: [python3, /t/server.py]\nmounts: [{source: ., target: /t}]\n")
    client = "import socket, time\\nfor _ in range(200):\\n    try:\\n        print(socket.create_connection(('server', 80), timeout=5).makefile().readline().strip()); break\\n    except OSError:\\n        time.sleep(0.05)"
    write(spec_dir, "client.yaml", f'kind: service\nrestart: "no"\nnetwork: [net]\ncommand: [python3, -c, "{client}"]\n')
    stack = run_stack(spec_dir, "-p", "netuserns")
    lines = stack.wait_lines("client", 1, timeout=30)
    assert lines == ["hello from port 80 in a user namespace"], stack.err
    block = running_block("netuserns")
    server = stack.wait_lines("server", 1)
    assert server == [f"links ['lo', 'sbd-net'] map ['0', '{block['uid']}']"]
    assert stack.stop() == 0


def test_health_checks_and_exec_run_as_root_of_the_services_user_namespace(spec_dir: Path) -> None:
    # Ready only once a check, run inside, is root there with ids that are not the host's.
    write(
        spec_dir,
        "svc.yaml",
        """
        kind: service
        network: [net]
        ready: {exec: [sh, -c, "test $(id -u) = 0 && test $(cut -c12-22 /proc/self/uid_map) != 0"], interval: 1s}
        command: [sh, -c, "exec sleep 1000"]
        ---
        kind: network
        name: net
        """,
    )
    env = {**os.environ, "NO_COLOR": "1"}
    up = subprocess.run([sys.executable, "-m", "sandboxd", "up", "-d", "--wait", "-p", "checked", str(spec_dir)], capture_output=True, text=True, env=env)
    assert up.returncode == 0, up.stderr
    try:
        block = running_block("checked")
        done = subprocess.run(
            [sys.executable, "-m", "sandboxd", "exec", "-p", "checked", "svc", "--", "sh", "-c", "id -u; cat /proc/self/uid_map"],
            capture_output=True, text=True, env=env, timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["0", "0", str(block["uid"]), "65536"]
    finally:
        subprocess.run([sys.executable, "-m", "sandboxd", "down", "-p", "checked"], capture_output=True, env=env, check=False)
