"""A hostile service against what changed in session 6, run as root: covers (mounts anywhere),
upgrade in place, a replaced fork server.

Covers: a folder covered to hold a new mount point must stay what the host's folder was in the
sandbox: read-only, with the flags of the host's mounts below it, what is hidden in it hidden,
no file readable that is not readable uncovered, and nothing of it propagated to the host.

Upgrade and the fork server's replacement: a sandbox started afterwards (a per-connection
instance, an exec, a health check) holds the same descriptors, capabilities, seccomp, user and
oom_score_adj as one started before: nothing the supervisor holds leaks into it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until, write
from test_faults import children, detached, free_port, sbd, services, supervisor_pid

# What a sandbox says about itself: its descriptors (kinds, not inode numbers), credentials,
# capabilities, seccomp, oom_score_adj, mount points and which namespaces are the host's.
FINGERPRINT = r"""
import json, os, re, sys
def fds():
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = re.sub(r"\[\d+\]", "", os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass  # listdir's own descriptor, closed by now
    return found
status = [line for line in open("/proc/self/status") if line.split(":")[0] in
          ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters", "Umask", "SigBlk", "SigIgn")]
print_to = sys.argv[1] if len(sys.argv) > 1 else ""
info = {
    "fds": fds(),
    "status": status,
    "oom": open("/proc/self/oom_score_adj").read().strip(),
    "limits": open("/proc/self/limits").read(),
    "env": sorted(k for k in os.environ if k not in ("LISTEN_PID",)),
    "cwd": os.getcwd(),
    "mounts": sorted(line.split()[4] for line in open("/proc/self/mountinfo")),
    "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("user", "mnt", "net", "pid", "ipc", "uts", "cgroup")},
}
text = json.dumps(info, sort_keys=True) + "\n"
if print_to == "fd3":
    import socket
    socket.socket(fileno=3).sendall(text.encode())
elif print_to:
    with open(print_to, "a") as f:
        f.write(text)
else:
    sys.stdout.write(text)
"""


@pytest.mark.parametrize("root", ["in-place", "tmpfs-root"])
def test_covers_stay_read_only_keep_host_flags_and_hidden_paths_and_propagate_nothing(spec_dir: Path, tmp_path: Path, root: str) -> None:
    """In a mount namespace of the test's own, /opt is a tmpfs with a writable, a noexec and a
    read-only mount below it, and /etc/ssh holds a host key (hidden). The spec mounts below /opt,
    /etc, /etc/ssh and /var/lib (all covered). In the sandbox, as root with no capabilities and in
    a user namespace: nothing covered is writable, noexec stays noexec, the key and sandboxd's
    state stay hidden, /etc/shadow is as unreadable as uncovered, and the host's mount table
    gains nothing (the mounts are private)."""
    (tmp_path / "cfg").write_text("cfg\n")
    script = r"""
for p in /opt/rw/f /opt/new /etc/new /etc/ssh/new /var/lib/new /etc/passwd /opt/rw; do
  ( echo x > $p ) 2>/dev/null && echo "writable=$p"
done
mkdir /etc/made 2>/dev/null && echo writable=/etc/made
/opt/ne/run 2>/dev/null && echo "ran-noexec"
echo "key=$(cat /etc/ssh/ssh_host_ed25519_key 2>&1)"
echo "state=$(ls -A /var/lib/sandboxd 2>&1)"
cat /etc/shadow >/dev/null 2>&1 && echo shadow-readable || echo shadow-unreadable
grep -c shared: /proc/self/mountinfo | sed 's/^/shared=/'
mount -o remount,rw /etc 2>/dev/null && echo remounted
umount /etc 2>/dev/null && echo unmounted
cat /opt/app/cfg /etc/app/cfg /etc/ssh/app/cfg /var/lib/app/cfg | tr '\n' ' ' | sed 's/^/cfgs=/'; echo
"""
    (tmp_path / "probe.sh").write_text(script)
    mounts = [{"source": str(tmp_path / "cfg"), "target": t} for t in ("/opt/app/cfg", "/etc/app/cfg", "/etc/ssh/app/cfg", "/var/lib/app/cfg")]
    probe = "/probe.sh" if root == "tmpfs-root" else "/opt/app/probe.sh"  # a new top-level path makes the root a tmpfs
    mounts.append({"source": str(tmp_path / "probe.sh"), "target": probe})
    for userns in (False, True):
        write(spec_dir, "box.yaml", f"kind: service\nrestart: no\nuserns: {str(userns).lower()}\ncommand: [sh, {probe}]\nmounts: {json.dumps(mounts)}\n")
        write(spec_dir, "plain.yaml", f"kind: service\nrestart: no\nuserns: {str(userns).lower()}\ncommand: [sh, -c, 'cat /etc/shadow >/dev/null 2>&1 && echo shadow-readable || echo shadow-unreadable']\n")
        host = r"""
set -e
mount -t tmpfs -o mode=0755 none /opt
mkdir /opt/rw /opt/ne /opt/ro
mount -t tmpfs -o mode=0777 none /opt/rw
mount -t tmpfs -o noexec,mode=0755 none /opt/ne
printf '#!/bin/sh\necho ran\n' > /opt/ne/run; chmod 755 /opt/ne/run
mount -t tmpfs -o ro none /opt/ro
mount -t tmpfs -o mode=0755 none /etc/ssh
echo SECRET > /etc/ssh/ssh_host_ed25519_key; chmod 600 /etc/ssh/ssh_host_ed25519_key
before=$(cat /proc/self/mountinfo | wc -l)
"$1" -m sandboxd up "$2"
after=$(cat /proc/self/mountinfo | wc -l)
echo "host-mounts=$before $after"
"""
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", host, "sh", sys.executable, str(spec_dir)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
        out = done.stdout + done.stderr
        lines = {line.split("| ", 1)[-1].strip() for line in out.splitlines()}
        assert "cfgs=cfg cfg cfg cfg" in lines, out
        assert not any(line.startswith("writable=") for line in lines), out
        assert "ran-noexec" not in lines and "remounted" not in lines and "unmounted" not in lines, out
        assert "SECRET" not in out, out
        assert "state=" in lines or not os.path.isdir("/var/lib/sandboxd"), out
        assert "shared=0" in lines, out
        box = [line for line in out.splitlines() if line.startswith("box") and "shadow-" in line]
        plain = [line for line in out.splitlines() if line.startswith("plain") and "shadow-" in line]
        assert len(box) == len(plain) == 1, out
        assert [b.split("| ")[1] for b in box] == [p.split("| ")[1] for p in plain], out
        counts = next(line for line in lines if line.startswith("host-mounts=")).split("=")[1].split()
        assert counts[0] == counts[1], out


def fingerprint_spec(spec_dir: Path, tmp_path: Path) -> None:
    (spec_dir / "fp.py").write_text(FINGERPRINT)
    health = tmp_path / "health"
    health.mkdir()
    health.chmod(0o777)
    write(spec_dir, "fp.yaml", f"""
        kind: service
        name: conn
        command: [python3, /t/fp.py, fd3]
        mounts: [{{source: ., target: /t}}]
        ---
        kind: socket
        name: conn
        service: conn
        listen: tcp:127.0.0.1:{free_port()}
        accept: true
        ---
        kind: service
        name: long
        restart: always
        command: [sleep, '3600']
        ready: {{exec: [python3, /t/fp.py, /h/checks], interval: 3600s}}
        mounts: [{{source: ., target: /t}}, {{source: {health}, target: /h, readonly: false}}]
        """)


def fingerprints(stack: str, health: Path) -> dict[str, Any]:
    """The fingerprint of a new per-connection instance, of an exec into `long`, and of `long`'s
    latest health check (restarted to run one now)."""
    status = json.loads(sbd("ps", "--json", "-p", stack).stdout)
    conn = next(s for s in status["services"] if s["name"] == "conn")
    port = int(conn["sockets"][0]["address"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        instance = json.loads(c.makefile().readline())
    executed = json.loads(sbd("exec", "-T", "-p", stack, "long", "python3", "/t/fp.py").stdout)
    checks = (health / "checks").read_text().splitlines() if (health / "checks").exists() else []
    sbd("restart", "-p", stack, "long")
    wait_until(lambda: (health / "checks").exists() and len((health / "checks").read_text().splitlines()) > len(checks), "a new health check")
    check = json.loads((health / "checks").read_text().splitlines()[-1])
    return {"instance": instance, "exec": executed, "check": check}


def comparable(fp: dict[str, Any]) -> dict[str, Any]:
    """What must not change: all but the namespaces' inode numbers, which are per sandbox; for
    those, only whether each is the test's own (the host's)."""
    ours = {n: os.readlink(f"/proc/self/ns/{n}") for n in fp["ns"]}
    return {**fp, "ns": {n: fp["ns"][n] == ours[n] for n in fp["ns"]}}


def test_sandboxes_after_an_upgrade_and_a_new_fork_server_hold_what_they_held_before(spec_dir: Path, tmp_path: Path) -> None:
    fingerprint_spec(spec_dir, tmp_path)
    health = tmp_path / "health"
    with detached(spec_dir, "fps"):
        wait_until(lambda: (health / "checks").exists(), "the first health check")
        before = {k: comparable(v) for k, v in fingerprints("fps", health).items()}
        sbd("upgrade", "-p", "fps")
        upgraded = {k: comparable(v) for k, v in fingerprints("fps", health).items()}
        supervisor = supervisor_pid("fps")
        [fork_server] = children(supervisor)
        restarts = services("fps")["long"]["restarts"]
        os.kill(fork_server, signal.SIGKILL)
        seen: list[object] = []
        try:
            wait_until(lambda: seen.append(s := services("fps")["long"]) or (s["restarts"] > restarts and s["state"] == "ready"), "long ready again, with a new fork server")
        except AssertionError:
            raise AssertionError(seen[-1], sbd("logs", "-p", "fps", "sandboxd").stdout) from None
        assert children(supervisor) != [fork_server]
        replaced = {k: comparable(v) for k, v in fingerprints("fps", health).items()}
    for kind in before:
        assert upgraded[kind] == before[kind], (kind, before[kind], upgraded[kind])
        assert replaced[kind] == before[kind], (kind, before[kind], replaced[kind])
