"""The sandbox a service gets, as it sees it: mounts and their flags, ids, capabilities, seccomp,
namespaces and cgroup. The expectations were recorded with the Python set-up walk (before the
compiled interpreter, sandboxd/sandbox/setup/sbd-setup.c) and must hold for whatever builds it.

With SANDBOXD_VIEW_DUMP=FILE, every view seen is appended to FILE as one JSON line, so that the
whole of two runs (two set-ups) can be compared line by line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import write

VIEW = r'''
import json, os, sys
table = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    dash = fields.index("-")
    flags = sorted(o for o in fields[5].split(",") if o in ("ro", "rw", "nosuid", "nodev", "noexec"))
    table.append((fields[0], fields[1], fields[4], ",".join(flags), fields[dash + 1]))
# At a point with mounts stacked on it, the one on top is no other's parent there.
mounts = {point: [flags, fstype] for mid, _, point, flags, fstype in table
          if not any(parent == mid and other == point for _, parent, other, _, _ in table)}
status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key.startswith("Cap") or key in ("NoNewPrivs", "Seccomp", "Seccomp_filters", "Uid", "Gid", "Groups"):
        status[key] = " ".join(value.split())
print("VIEW " + json.dumps({
    "service": sys.argv[1],
    "mounts": mounts,
    "all": sorted([point, flags, fstype] for _, _, point, flags, fstype in table),
    "status": status,
    "ns": {name: os.readlink(f"/proc/self/ns/{name}") for name in sorted(os.listdir("/proc/self/ns"))},
    "cgroup": open("/proc/self/cgroup").read().splitlines(),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "cwd": os.getcwd(),
    "uid": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
}), flush=True)
import time; time.sleep(600)
'''

SERVICES = {
    # The default posture: a user namespace, the host's root in place (binds below its /tmp).
    "inplace": ("/tmp/t", "mounts: [{source: ., target: /tmp/t}]"),
    # Without a user namespace, as a user of its own, a writable bind, a tmpfs of the spec's own.
    "plain": ("/tmp/t", "userns: false\nuser: 1000\nmounts: [{source: ., target: /tmp/t}, {source: ., target: /tmp/t-rw, readonly: false}]\ntmpfs: [/tmp/scratch]"),
    # A mount point with no place on the host's root: the root is a tmpfs of the sandbox's own.
    "tmpfsroot": ("/t", "mounts: [{source: ., target: /t}]"),
    # The bind() listener of the handoff, and a capability.
    "caps": ("/t", "capabilities: [NET_BIND_SERVICE]\nmounts: [{source: ., target: /t}]\n---\nkind: socket\nlisten: tcp:127.0.0.1:0\nservice: caps\nproxy: tcp:127.0.0.1:7001\nhandoff: true"),
}

FULL_CAPS = "000001ffffffffff"
# On an image (busybox, no Python): the same view, printed by the shell, read by `shell_view`.
SHELL_VIEW = "echo VIEW-BEGIN; cat /proc/self/mountinfo; grep -E '^(Cap|NoNewPrivs|Seccomp|Uid|Gid|Groups)' /proc/self/status; cat /proc/self/cgroup; echo VIEW-END; exec sleep 600"
HOST_NS = {name: os.readlink(f"/proc/self/ns/{name}") for name in os.listdir("/proc/self/ns")}


def shell_view(lines: list[str]) -> dict:
    """The view an image's shell printed, in the shape VIEW gives."""
    lines = lines[lines.index("VIEW-BEGIN") + 1 : lines.index("VIEW-END")]
    table, status, cgroup = [], {}, []
    for line in lines:
        fields = line.split()
        if " - " in line and len(fields) > 6:
            dash = fields.index("-")
            flags = sorted(o for o in fields[5].split(",") if o in ("ro", "rw", "nosuid", "nodev", "noexec"))
            table.append((fields[0], fields[1], fields[4], ",".join(flags), fields[dash + 1]))
        elif ":" in line and line.split(":", 1)[0] in ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters") or line.startswith("Cap"):
            key, _, value = line.partition(":")
            status[key] = " ".join(value.split())
        else:
            cgroup.append(line)
    mounts = {point: [flags, fstype] for mid, _, point, flags, fstype in table if not any(parent == mid and other == point for _, parent, other, _, _ in table)}
    return {"service": "image", "mounts": mounts, "all": sorted([point, flags, fstype] for _, _, point, flags, fstype in table), "status": status, "cgroup": cgroup}


def views(run_stack, spec_dir: Path) -> dict[str, dict]:
    write(spec_dir, "view.py", VIEW)
    rootfs = spec_dir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
    for tool in ("sh", "cat", "grep", "sleep"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    (spec_dir / "image.yaml").write_text(f"kind: service\nname: image\nimage: ./rootfs\ncommand: [/bin/sh, -c, {json.dumps(SHELL_VIEW)}]\n")
    for name, (where, extra) in SERVICES.items():
        write(spec_dir, f"{name}.yaml", f"kind: service\nname: {name}\ncommand: [python3, {where}/view.py, {name}]\n{extra}\n")
    stack = run_stack(spec_dir)
    for name in SERVICES:
        stack.wait_for(f'"service": "{name}"', "out")
    stack.wait_for("VIEW-END", "out")
    seen = {}
    for name in SERVICES:
        line = next(line for line in stack.lines(name) if line.startswith("VIEW "))
        seen[name] = json.loads(line[len("VIEW "):])
    seen["image"] = shell_view(stack.lines("image"))
    assert stack.stop() == 0
    dump = os.environ.get("SANDBOXD_VIEW_DUMP")
    if dump:
        with open(dump, "a") as f:
            for name in seen:
                f.write(json.dumps(seen[name], sort_keys=True) + "\n")
    return seen


@pytest.fixture
def seen(run_stack, spec_dir: Path) -> dict[str, dict]:
    return views(run_stack, spec_dir)


def test_the_sandbox_mounts_its_own_file_systems_with_the_flags_it_always_had(seen) -> None:
    common = {
        "/": ["nodev,nosuid,ro", None],
        "/proc": ["nodev,noexec,nosuid,rw", "proc"],
        "/sys": ["nodev,noexec,nosuid,ro", "sysfs"],
        "/dev": ["noexec,nosuid,rw", "tmpfs"],
        "/dev/pts": ["noexec,nosuid,rw", "devpts"],
        "/dev/shm": ["nodev,nosuid,rw", "tmpfs"],
        "/tmp": ["nodev,nosuid,rw", "tmpfs"],
        "/run": ["nodev,nosuid,rw", "tmpfs"],
    }
    for name, view in seen.items():
        for point, (flags, fstype) in common.items():
            assert point in view["mounts"], (name, point)
            assert view["mounts"][point][0] == flags, (name, point, view["mounts"][point])
            if fstype:
                assert view["mounts"][point][1] == fstype, (name, point)
        assert not any(point.startswith("/run/.sbd-oldroot") for point, _, _ in view["all"])
        if name in SERVICES:
            where = SERVICES[name][0]
            assert view["mounts"][where][0] == "nodev,nosuid,ro", (name, view["mounts"][where])
    assert seen["plain"]["mounts"]["/tmp/t-rw"][0] == "nodev,nosuid,rw"
    assert seen["plain"]["mounts"]["/tmp/scratch"] == ["nodev,nosuid,rw", "tmpfs"]
    assert seen["tmpfsroot"]["mounts"]["/"] == ["nodev,nosuid,ro", "tmpfs"]
    assert seen["inplace"]["mounts"]["/"][1] != "tmpfs"
    assert seen["image"]["mounts"]["/"][1] == "overlay"  # readonly_root: read-only, nosuid, nodev


def test_the_sandbox_has_the_ids_capabilities_and_seccomp_it_always_had(seen) -> None:
    for name in ("inplace", "tmpfsroot", "image"):
        status = seen[name]["status"]
        assert (status["Uid"], status["Gid"]) == ("0 0 0 0", "0 0 0 0")
        assert seen[name].get("uid", [0, 0, 0, 0]) == [0, 0, 0, 0]
        assert status["CapBnd"] == status["CapPrm"] == status["CapEff"] == status["CapInh"] == status["CapAmb"] == "0000000000000000"
    plain = seen["plain"]["status"]
    assert (plain["Uid"], plain["Gid"], plain.get("Groups", "")) == ("1000 1000 1000 1000", "1000 1000 1000 1000", "1000")
    assert plain["CapBnd"] == plain["CapEff"] == "0000000000000000"
    caps = seen["caps"]["status"]
    assert caps["CapBnd"] == caps["CapPrm"] == caps["CapEff"] == caps["CapInh"] == caps["CapAmb"] == f"{1 << 10:016x}"
    for name, view in seen.items():
        assert view["status"]["NoNewPrivs"] == "1", name
        assert view["status"]["Seccomp"] == "2", name
    assert int(seen["caps"]["status"]["Seccomp_filters"]) == int(seen["inplace"]["status"]["Seccomp_filters"]) + 1  # the bind() listener's
    assert FULL_CAPS  # (root of the host keeps every capability; no sandbox does)


def test_the_sandbox_has_namespaces_of_its_own_and_its_cgroup(seen) -> None:
    assert any(line.startswith("0::") and line.endswith("/image") for line in seen["image"]["cgroup"])
    for name, view in seen.items():
        if name == "image":
            continue
        own = {kind for kind, ns in view["ns"].items() if ns != HOST_NS.get(kind)}
        expected = {"mnt", "pid", "pid_for_children", "uts", "ipc", "net"} | ({"user"} if name != "plain" else set())
        assert expected <= own, (name, own)
        assert "time" not in own and "time_for_children" not in own
        assert view["ns"]["cgroup"] == HOST_NS["cgroup"]
        assert any(line.startswith("0::") and line.endswith(f"/{name}") for line in view["cgroup"]), view["cgroup"]
        assert view["fds"][:4] == [0, 1, 2, 3] if name == "caps" else view["fds"][:3] == [0, 1, 2]
        assert view["cwd"] == "/"
