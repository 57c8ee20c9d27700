"""A service's view from inside its sandbox: namespaces, filesystem, network, environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import stored_ids, write

PROBE = r'''
import json, os, socket
def writable(path):
    try:
        with open(os.path.join(path, ".sbd-probe"), "w"):
            pass
        os.unlink(os.path.join(path, ".sbd-probe"))
        return True
    except OSError:
        return False
print("PROBE " + json.dumps({
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "hostname": socket.gethostname(),
    "links": sorted(name for _, name in socket.if_nameindex()),
    "lo_up": int(open("/sys/class/net/lo/flags").read(), 16) & 1 if os.path.exists("/sys/class/net/lo/flags") else None,
    "writable": {p: writable(p) for p in ["/", "/etc", "/usr", "/tmp", "/run", "/dev/shm", "/data", "/data-rw", SPEC]},
    "env": dict(kv.split("=", 1) for kv in open("/proc/self/environ").read().split("\0") if kv),
    "cgroup": open("/proc/self/cgroup").read(),
    "dev": sorted(os.listdir("/dev")),
    "host_marker": os.path.exists(MARKER),
}), flush=True)
import time; time.sleep(600)
'''


def probe(run_stack, spec_dir: Path, tmp_path: Path, extra: str = "") -> dict:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "data-rw").mkdir()
    os.chown(tmp_path / "data-rw", *stored_ids())  # root inside may write where its stored ids may
    marker = tmp_path / "host-only-marker"
    marker.write_text("x")
    write(spec_dir, "probe.py", f"SPEC = {str(spec_dir)!r}\nMARKER = {str(marker)!r}\n" + PROBE)
    write(
        spec_dir,
        "box.yaml",
        f"""
        kind: service
        command: [python3, /t/probe.py]
        hostname: boxy
        environment: {{COLOUR: blue}}
        mounts:
          - {{source: ., target: /t}}
          - {{source: {data}, target: /data}}
          - {{source: {tmp_path / 'data-rw'}, target: /data-rw, readonly: false}}
        {extra}
        """,
    )
    stack = run_stack(spec_dir)
    stack.wait_for("PROBE ", "out")
    line = next(line for line in stack.lines("box") if line.startswith("PROBE "))
    assert stack.stop() == 0
    return json.loads(line[len("PROBE "):])


def test_service_sees_only_its_own_processes(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    assert seen["pid"] == 2  # behind the init, which is pid 1
    assert seen["ppid"] == 1
    assert seen["pids"] == [1, 2]


def test_hostname_is_set_and_host_is_untouched(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    assert seen["hostname"] == "boxy"
    assert os.uname().nodename != "boxy"


def test_network_namespace_has_only_lo_and_it_is_up(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    assert seen["links"] == ["lo"]
    assert seen["lo_up"] == 1


def test_host_root_is_read_only_and_tmp_run_are_private(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    w = seen["writable"]
    assert w["/"] is False and w["/etc"] is False and w["/usr"] is False
    assert w[str(spec_dir)] is False
    assert w["/tmp"] is True and w["/run"] is True and w["/dev/shm"] is True
    assert str(tmp_path).startswith("/tmp/")
    assert seen["host_marker"] is False  # the host's /tmp is not the sandbox's


def test_bind_mounts_are_read_only_unless_asked(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    assert seen["writable"]["/data"] is False
    assert seen["writable"]["/data-rw"] is True


def test_dev_is_minimal(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx"} <= set(seen["dev"])
    assert not any(name.startswith(("sd", "vd", "nvme", "mem", "kmsg")) for name in seen["dev"])


def test_environment_is_the_spec_plus_path_and_nothing_of_sandboxd(run_stack, spec_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOXD_SECRET_OF_THE_HOST", "leak")
    seen = probe(run_stack, spec_dir, tmp_path)
    env = seen["env"]
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "COLOUR": "blue"}


def test_service_runs_in_its_own_cgroup(run_stack, spec_dir, tmp_path):
    seen = probe(run_stack, spec_dir, tmp_path)
    v2 = next(line for line in seen["cgroup"].splitlines() if line.startswith("0::"))
    assert "/sandboxd/stack/box" in v2


def test_writable_bind_on_an_existing_path_of_the_host_root_is_writable(run_stack, spec_dir, tmp_path):
    """The in-place root (no new top-level directory): the bind must not inherit its read-only flag."""
    data = tmp_path / "rw"
    data.mkdir()
    os.chown(data, *stored_ids())  # root inside may write where its stored ids may
    write(spec_dir, "box.yaml", f"""
        kind: service
        restart: no
        command: [sh, -c, "echo written > /srv/file && echo ok; touch /srv2 2>/dev/null || echo root-read-only"]
        mounts: [{{source: {data}, target: /srv, readonly: false}}]
        """)
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    assert stack.lines("box") == ["ok", "root-read-only"]
    assert (data / "file").read_text() == "written\n"


def test_mount_target_below_a_new_top_level_directory_is_made(run_stack, spec_dir, tmp_path):
    data = tmp_path / "deep"
    data.mkdir()
    (data / "hello").write_text("deep\n")
    write(spec_dir, "box.yaml", f"""
        kind: service
        restart: no
        command: [cat, /newtop/sub/dir/hello]
        mounts: [{{source: {data}, target: /newtop/sub/dir}}]
        """)
    stack = run_stack(spec_dir)
    assert stack.wait_exit() == 0
    assert stack.lines("box") == ["deep"]
