"""plan: what each sandbox gets, computed without root, from facts alone: planning opens no file."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxd.errors import SpecErrors
from sandboxd.kernel.abi import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUTS
from sandboxd.plan.launch import HOST_IDS, MASK_WITH_MOUNTPOINTS, STORE_IDS, SYSFS_OF_NETNS, HostFacts, LaunchPlan, MountOp, PathFacts, UserNamespace, is_under
from sandboxd.plan.stack import paths_asked, plan_stack
from sandboxd.sandbox.protocol import from_wire, to_wire
from sandboxd.spec.load import load_stack

FACTS = HostFacts(architecture="x86_64")
HOST_PATHS = {"/", "/srv", "/srv/data", "/etc", "/usr", "/usr/bin/x", "/usr/bin/y", "/usr/bin/serve", "/bin/-weird", "/bin/x", "/srv/data/db.sock"}


def with_paths(stack: Stack, facts: HostFacts, exists: Callable[[str], bool]) -> HostFacts:
    """`facts` with the answers of a fake file system (`exists`; everything but a socket is a
    directory) at every path planning asks about: what host/prepare.py does with the real one."""
    return dataclasses.replace(facts, paths=PathFacts({p: not p.endswith(".sock") for p in paths_asked(stack, facts) if exists(p)}))


# A client service that uses the socket of a service db (the tests add the socket units).
CLIENT_USES_DB = """
        kind: service
        name: client
        command: [x]
        uses: [db]
        ---
        kind: service
        name: db
        command: [y]
"""


def plans(tmp_path: Path, text: str) -> dict[str, LaunchPlan]:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "stack.yaml").write_text(textwrap.dedent(text).lstrip())
    stack = load_stack(tmp_path)
    return plan_stack(stack, with_paths(stack, FACTS, lambda p: p in HOST_PATHS or is_under(p, str(tmp_path / "data"))))


def test_descriptors_follow_socket_unit_names_then_listen_order(tmp_path):
    p = plans(
        tmp_path,
        """
        kind: service
        name: api
        command: [serve]
        ---
        kind: socket
        name: zeta
        service: api
        listen: [tcp:127.0.0.1:1, tcp:127.0.0.1:2]
        ---
        kind: socket
        name: alpha
        service: api
        fdname: admin
        listen: unix:/run/x/admin.sock
        """,
    )["api"]
    assert p.fd_sockets == (("alpha", 0), ("zeta", 0), ("zeta", 1))
    assert p.fd_names == ("admin", "zeta", "zeta")
    env = dict(p.env)
    assert env["LISTEN_FDS"] == "3"
    assert env["LISTEN_PID"] == "2"  # the service is the first child of the sandbox's init
    assert env["LISTEN_FDNAMES"] == "admin:zeta:zeta"


def test_service_without_sockets_gets_no_listen_variables(tmp_path):
    env = dict(plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n")["a"].env)
    assert not any(key.startswith("LISTEN_") for key in env)
    assert env["PATH"].startswith("/usr/local/sbin:")


def test_spec_environment_overrides_default_path(tmp_path):
    env = dict(plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nenvironment: {PATH: /bin, A: b}\n")["a"].env)
    assert env == {"PATH": "/bin", "A": "b"}


def test_the_plan_runs_the_command_itself_even_one_that_starts_with_a_dash(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: -weird --flags\n")["a"]
    assert p.argv == ("-weird", "--flags")  # no init of another program's in front: sbd-setup is the init


def test_a_spec_mount_of_etc_or_etc_hostname_takes_the_place_of_sandboxds_hostname_file(tmp_path):
    for target in ("/etc", "/etc/hostname"):
        spec = f"kind: service\nname: a\ncommand: [x]\nmounts: [{{source: /etc/hostname, target: {target}}}]\n"
        if target == "/etc":
            spec = "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /etc}]\n"
        binds = [(m.target, m.source) for m in plans(tmp_path, spec)["a"].mounts if m.kind == "bind" and m.target.startswith("/etc")]
        assert len(binds) == 1 and binds[0][0] == target, binds  # the spec's, not sandboxd's file below or over it


def test_every_service_gets_mount_uts_ipc_and_net_namespaces(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n")["a"]
    assert p.clone_flags == CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET


def test_existing_targets_use_the_host_root_bound_read_only(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /srv/data}]\n")["a"]
    kinds = [(m.kind, m.target) for m in p.mounts if m.kind not in ("mask", "readonly")]
    assert kinds == [("rbind-root", "/"), ("proc", "/proc"), ("sysfs", "/sys"), ("dev", "/dev"), ("tmpfs", "/dev/shm"), ("tmpfs", "/tmp"), ("tmpfs", "/run"), ("bind", "/etc/hostname"), ("bind", "/srv/data")]
    masked = [m.target for m in p.mounts if m.kind == "mask"]
    assert "/proc/kcore" in masked and "/sys/firmware" in masked
    assert [m.target for m in p.mounts if m.kind == "readonly"] == ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/pressure"]
    assert p.mounts[-1].readonly is True
    assert p.mounts[-1].source == str(tmp_path / "data")


def _tmpfs(p: LaunchPlan) -> dict[str, str]:
    return {m.target: m.options for m in p.mounts if m.kind == "tmpfs"}


def test_every_tmpfs_of_a_sandbox_is_capped_by_default(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nuser: 1000\ntmpfs: [/srv/data]\n")["a"]
    capped = "size=67108864,nr_inodes=16384"
    assert _tmpfs(p) == {
        "/dev/shm": f"mode=1777,{capped}",
        "/tmp": f"mode=1777,{capped}",
        "/run": f"mode=0755,{capped}",
        "/srv/data": f"mode=0755,{capped},uid=1000,gid=1000",
    }


def test_tmpfs_sizes_come_from_the_entry_then_tmpfs_size_and_shm_size(tmp_path):
    p = plans(
        tmp_path,
        """
        kind: service
        name: a
        command: [x]
        tmpfs_size: 8M
        shm_size: 1G
        tmpfs: [/srv/data, {path: /srv, size: 2G}]
        """,
    )["a"]
    options = _tmpfs(p)
    assert options["/dev/shm"] == "mode=1777,size=1073741824,nr_inodes=262144"
    assert options["/tmp"] == options["/run"].replace("0755", "1777") == "mode=1777,size=8388608,nr_inodes=2048"
    assert options["/srv/data"] == "mode=0755,size=8388608,nr_inodes=2048,uid=0,gid=0"
    assert options["/srv"] == "mode=0755,size=2147483648,nr_inodes=524288,uid=0,gid=0"


def test_shm_size_defaults_to_tmpfs_size_and_a_tiny_tmpfs_keeps_some_inodes(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\ntmpfs_size: 4k\n")["a"]
    assert _tmpfs(p)["/dev/shm"] == "mode=1777,size=4096,nr_inodes=1024"


def test_tmpfs_entry_at_tmp_or_run_takes_the_place_of_the_sandboxs_own(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nuser: 1000\ntmpfs: [{path: /tmp, size: 1G}, /run]\n")["a"]
    targets = [m.target for m in p.mounts if m.kind == "tmpfs"]
    assert targets.count("/tmp") == 1 and targets.count("/run") == 1
    assert targets.index("/tmp") < targets.index("/run") < len(targets)  # in the base's place, before pivot_root
    options = _tmpfs(p)
    assert options["/tmp"] == "mode=1777,size=1073741824,nr_inodes=262144,uid=1000,gid=1000"  # still open to all
    assert options["/run"] == "mode=0755,size=67108864,nr_inodes=16384,uid=1000,gid=1000"  # the service's own


def test_new_top_level_target_builds_the_root_on_a_tmpfs(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /app/data, readonly: false}]\n")["a"]
    assert (p.mounts[0].kind, p.mounts[1].kind, p.mounts[1].target, p.mounts[1].options) == ("tmpfs-root", "mountpoint", "/app/data", "dir")  # made with its parents before the root is sealed
    assert p.mounts[-1].readonly is False


def test_target_below_an_existing_read_only_directory_is_planned_on_the_host_root_in_place(tmp_path):
    # Its mount point is made by the set-up in a cover of /etc (program.py), never on the host.
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /etc/app/config.yaml}, {source: data, target: /srv/app/data}]\n")["a"]
    assert (p.mounts[0].kind, p.mounts[0].options) == ("rbind-root", "in-place")
    assert not any(m.kind == "mountpoint" for m in p.mounts)
    assert [m.target for m in p.mounts if m.kind == "bind"][-2:] == ["/etc/app/config.yaml", "/srv/app/data"]


def test_a_target_whose_kind_does_not_fit_what_is_on_the_host_root_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "data").mkdir()
    text = "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /etc/passwd}, {source: file, target: /etc}, {source: data, target: /etc/passwd/x}]\n"
    (tmp_path / "stack.yaml").write_text(text.replace("/etc/passwd", "/etc/hosts.sock"))
    stack = load_stack(tmp_path)
    with pytest.raises(SpecErrors) as e:
        plan_stack(stack, with_paths(stack, FACTS, lambda p: p in (*HOST_PATHS, "/etc/hosts.sock") or p == str(tmp_path / "data")))
    assert [(err.file.name, err.line, err.key) for err in e.value.errors] == [("stack.yaml", 4, f"mounts[{i}].target") for i in range(3)]
    assert [err.message for err in e.value.errors] == [
        "/etc/hosts.sock is a file, and what is mounted there is a directory; mount a directory at a path that is one, or at a new path",
        "/etc is a directory, and what is mounted there is a file; mount a file at a path that is one, or at a new path",
        "/etc/hosts.sock is a file on the host's root, so /etc/hosts.sock/x cannot be made below it",
    ]


def test_mounting_over_proc_is_refused(tmp_path):
    with pytest.raises(SpecErrors) as e:
        plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /proc/x}]\n")
    assert e.value.errors[0].message == "cannot mount over /proc/x: sandboxd manages it"


def test_used_unix_socket_is_bound_read_only_at_the_same_path_with_the_hosts_ids(tmp_path):
    p = plans(
        tmp_path,
        CLIENT_USES_DB
        + """
        ---
        kind: socket
        name: db
        listen: unix:/run/db/db.sock
        """,
    )
    bind = p["client"].mounts[-1]
    # connect() needs no writable mount; read-only, the service cannot chmod the host's socket file.
    assert (bind.kind, bind.source, bind.target, bind.readonly, bind.options) == ("bind", "/run/db/db.sock", "/run/db/db.sock", True, HOST_IDS)
    assert not any(m.kind == "bind" and m.target != "/etc/hostname" for m in p["db"].mounts)


def test_socket_files_a_service_does_not_use_are_hidden_from_it(tmp_path):
    p = plans(
        tmp_path,
        CLIENT_USES_DB
        + """
        ---
        kind: service
        name: other
        command: [x]
        ---
        kind: socket
        name: db
        listen: [unix:/srv/data/db.sock, unix:/tmp/db.sock]
        ---
        kind: socket
        name: other
        listen: ["unix:@abstract", tcp:127.0.0.1:5]
        """,
    )
    masks = {name: [m.target for m in plan.mounts if m.kind == "mask" and m.target.endswith(".sock")] for name, plan in p.items()}
    # Under /tmp and /run the sandbox has its own tmpfs; an abstract name or an address has no file.
    assert masks == {"client": [], "db": ["/srv/data/db.sock"], "other": ["/srv/data/db.sock"]}


def test_plan_survives_the_wire_format(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /app}]\n")["a"]
    assert from_wire(LaunchPlan, to_wire(p)) == p


def test_missing_program_is_a_validation_error(tmp_path):
    with pytest.raises(SpecErrors) as e:
        plans(tmp_path, "kind: service\nname: a\ncommand: [pyhton3, app.py]\n")
    (err,) = e.value.errors
    assert (err.key, err.message) == (
        "command",
        "program 'pyhton3' not found in PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)",
    )


def test_program_inside_a_bind_mount_is_found_through_its_source(tmp_path):
    (tmp_path / "data" / "run.sh").parent.mkdir(exist_ok=True)
    (tmp_path / "data" / "run.sh").write_text("#!/bin/sh\n")
    HOST_PATHS.add(str(tmp_path / "data" / "run.sh"))
    try:
        p = plans(tmp_path, "kind: service\nname: a\ncommand: [/app/run.sh]\nmounts: [{source: data, target: /app}]\n")
    finally:
        HOST_PATHS.discard(str(tmp_path / "data" / "run.sh"))
    assert p["a"].argv[0] == "/app/run.sh"


def test_default_seccomp_filter_is_planned_and_can_be_relaxed(tmp_path):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the seccomp table covers x86_64 only")  # the CI machine is x86_64
    strict = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n")["a"].seccomp_filter
    loose = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nseccomp: [ptrace, mount]\n")["a"].seccomp_filter
    off = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nseccomp: unconfined\n")["a"].seccomp_filter
    assert off == ""
    assert len(bytes.fromhex(strict)) == len(bytes.fromhex(loose)) + 16  # two comparisons fewer, 8 bytes each
    assert len(bytes.fromhex(strict)) % 8 == 0


def test_seccomp_names_a_call_the_filter_does_not_refuse(tmp_path):
    with pytest.raises(SpecErrors) as e:
        plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nseccomp: [mout]\n")
    assert e.value.errors[0].message == "'mout' is not refused by the default filter; did you mean 'mount'?"


# ── user namespaces (the default) ──

IDS = UserNamespace(uid=165536, gid=165536, count=65536, store_uid=100000, store_gid=100000)
USERNS_FACTS = HostFacts(architecture="x86_64", userns=IDS, hidden=("/root", "/home", "/var/lib/sandboxd", "/etc/ssh/ssh_host_ed25519_key"))


def userns_plans(tmp_path: Path, text: str) -> dict[str, LaunchPlan]:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "stack.yaml").write_text(textwrap.dedent(text).lstrip())
    exists = lambda p: p in HOST_PATHS or p in ("/root", "/home", "/home/alice", "/home/alice/x", "/root/bin/tool") or p.startswith(str(tmp_path))  # noqa: E731
    stack = load_stack(tmp_path)
    return plan_stack(stack, with_paths(stack, USERNS_FACTS, exists))


def test_every_service_gets_the_stacks_user_namespace_unless_it_says_no(tmp_path):
    p = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n---\nkind: service\nname: b\ncommand: [x]\nuserns: false\n")
    assert p["a"].userns == IDS
    assert p["b"].userns is None
    assert from_wire(LaunchPlan, to_wire(p["a"])) == p["a"]


def test_a_user_namespace_keeps_the_host_root_in_place(tmp_path):
    p = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n")["a"]
    assert p.mounts[0] == MountOp("rbind-root", "/", "/", readonly=True, options="in-place")


def test_volumes_and_binds_are_seen_through_the_stored_ids_and_sandboxd_files_as_they_are(tmp_path):
    p = userns_plans(
        tmp_path,
        """
        kind: service
        name: a
        command: [x]
        ready: notify
        mounts: [{source: data, target: /srv/data}, {volume: v, target: /vol, readonly: false}]
        ---
        kind: volume
        name: v
        """,
    )["a"]
    binds = {m.target: m.options for m in p.mounts if m.kind == "bind"}
    assert binds == {"/vol": STORE_IDS, "/srv/data": STORE_IDS, "/run/.sbd-notify": "", "/etc/hostname": ""}
    plain = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nuserns: false\nmounts: [{source: data, target: /srv/data}]\n")["a"]
    assert [m.options for m in plain.mounts if m.kind == "bind"] == ["", ""]


def test_an_images_tree_keeps_its_owners_in_a_user_namespace(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()  # for the spec, which checks that an image folder exists; planning asks only its facts
    (tmp_path / "stack.yaml").write_text(f"kind: service\nname: a\ncommand: [/bin/x]\nimage: {rootfs}\n")
    from sandboxd.store.images import Image

    facts = HostFacts(architecture="x86_64", userns=IDS, images={str(rootfs): Image(str(rootfs), rootfs)}, paths=PathFacts({f"{rootfs}/bin/x": False}))
    p = plan_stack(load_stack(tmp_path), facts)["a"]
    assert p.mounts[0] == MountOp("image-root", "/", str(rootfs), readonly=True, options=HOST_IDS)
    assert not any(m.kind == "mask" and m.target in ("/root", "/home") for m in p.mounts)  # the image's own tree


def test_home_folders_state_and_ssh_keys_are_hidden_from_the_host_root(tmp_path):
    p = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nuserns: false\n")["a"]
    masks = [m for m in p.mounts if m.kind == "mask" and not m.target.startswith(("/proc", "/sys"))]
    assert masks == [MountOp("mask", path) for path in ("/root", "/home", "/var/lib/sandboxd", "/etc/ssh/ssh_host_ed25519_key")]
    assert p.mounts.index(masks[0]) > p.mounts.index(MountOp("dev", "/dev"))  # files are masked with its own /dev/null


def test_a_mount_into_a_hidden_folder_gets_its_mount_point_and_one_onto_it_unhides_it(tmp_path):
    p = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nmounts: [{source: data, target: /home/alice/x}, {source: data, target: /root}]\n")["a"]
    masks = {m.target: m.options for m in p.mounts if m.kind == "mask" and not m.target.startswith(("/proc", "/sys"))}
    assert masks == {"/home": MASK_WITH_MOUNTPOINTS, "/var/lib/sandboxd": "", "/etc/ssh/ssh_host_ed25519_key": ""}


def test_a_program_in_a_hidden_folder_is_not_found(tmp_path):
    with pytest.raises(SpecErrors) as caught:
        userns_plans(tmp_path, "kind: service\nname: a\ncommand: [/root/bin/tool]\n")
    assert "program '/root/bin/tool' not found in the sandbox" in str(caught.value)
    ok = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [/root/bin/tool]\nmounts: [{source: data, target: /root/bin}]\n")
    assert ok["a"].argv[-1] == "/root/bin/tool"


def test_a_user_namespace_on_a_network_attaches_a_sysfs_made_in_its_namespace(tmp_path):
    text = "kind: service\nname: a\ncommand: [x]\nnetwork: [net]\n---\nkind: network\nname: net\n"
    joined = userns_plans(tmp_path, text)["a"]
    assert joined.net == "join" and MountOp("sysfs", "/sys", options=SYSFS_OF_NETNS) in joined.mounts
    private = userns_plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n")["a"]
    assert MountOp("sysfs", "/sys") in private.mounts  # its own namespace: it mounts its own


def test_volumes_are_idmapped_with_only_the_stored_and_running_blocks_swapped():
    from sandboxd.plan.launch import MAX_ID, swapped_id_map

    lines = [tuple(map(int, line.split())) for line in swapped_id_map(100000, 296608, 65536).splitlines()]
    assert lines == [(0, 0, 100000), (100000, 296608, 65536), (165536, 165536, 131072), (296608, 100000, 65536), (362144, 362144, MAX_ID - 362144)]
    inside = sorted((a, a + n) for a, _, n in lines)
    outside = sorted((b, b + n) for _, b, n in lines)
    for ranges in (inside, outside):  # every id once, on both sides: a bijection of 0 .. MAX_ID - 1
        assert ranges[0][0] == 0 and ranges[-1][1] == MAX_ID
        assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    assert swapped_id_map(100000, 165536, 65536).splitlines()[2] == "165536 100000 65536"  # adjacent blocks


def test_masks_come_after_dev_and_hide_what_describes_the_host_kernel(tmp_path):
    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\n")["a"]
    kinds = [m.kind for m in p.mounts]
    assert kinds.index("dev") < kinds.index("mask")  # files are masked with the sandbox's own /dev/null
    masked = {m.target for m in p.mounts if m.kind == "mask"}
    assert {"/sys/kernel/vmcoreinfo", "/sys/kernel/boot_params", "/proc/config.gz", "/proc/interrupts", "/sys/dev/block"} <= masked


def test_a_mount_inside_a_writable_mount_is_refused_and_one_inside_a_read_only_one_is_not(tmp_path):
    text = """
        kind: service
        name: a
        command: [x]
        mounts: [{volume: v, target: /srv, readonly: false}, {source: data, target: /srv/data}]
        tmpfs: [/srv/cache]
        ---
        kind: volume
        name: v
        """
    with pytest.raises(SpecErrors) as caught:
        plans(tmp_path, text)
    found = sorted((e.line, e.key) for e in caught.value.errors if "inside the writable mount mounts[0]" in e.message)
    assert found == [(4, "mounts[1].target"), (5, "tmpfs[0]")]
    plans(tmp_path, text.replace("readonly: false", "readonly: true"))  # /srv/cache is made in a cover


# ── planning is pure: everything it needs is in HostFacts, gathered before by host/prepare.py ──


def _no_io(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("planning touched the file system or NSS")


def test_planning_opens_no_file_and_asks_no_nss(tmp_path, monkeypatch):
    from sandboxd.plan.launch import Accounts
    from sandboxd.store.images import Image, ImageConfig

    (tmp_path / "data").mkdir()
    (tmp_path / "stack.yaml").write_text(
        "kind: service\nname: web\nimage: busybox\nuser: app\nmounts: [{volume: v, target: /srv}]\n---\nkind: volume\nname: v\n---\n"
        "kind: service\nname: api\ncommand: [serve]\nuser: alice\ngroup: staff\nmounts: [{source: data, target: /app/data}]\n"
    )
    stack = load_stack(tmp_path)
    rootfs = Path("/nonexistent/images/busybox/trees/1")  # no such image on disk: its facts say all
    facts = HostFacts(
        images={"busybox": Image("busybox", rootfs, ImageConfig(entrypoint=("/bin/httpd",), cmd=("-f",)))},
        accounts={"busybox": Accounts({"app": (500, 600)}), "host": Accounts({"alice": (1000, 1000)}, {"staff": 50})},
        paths=PathFacts({f"{rootfs}/bin/httpd": False, "/usr/bin/serve": False, str(tmp_path / "data"): True}),
        architecture="x86_64",
    )
    with monkeypatch.context() as m:
        import builtins
        import grp
        import os
        import pwd

        for module, name in ((builtins, "open"), (os, "open"), (os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (pwd, "getpwnam"), (grp, "getgrnam")):
            m.setattr(module, name, _no_io)
        p = plan_stack(stack, facts)
    assert (p["web"].argv, p["web"].uid, p["web"].gid) == (("/bin/httpd", "-f"), 500, 600)
    assert p["web"].mounts[0] == MountOp("image-root", "/", str(rootfs), readonly=True, options=HOST_IDS)
    assert (p["api"].uid, p["api"].gid) == (1000, 50)
    assert p["api"].mounts[:2] == (MountOp("tmpfs-root", "/", "/", readonly=True), MountOp("mountpoint", "/app/data", options="dir"))


def test_facts_without_the_answers_plan_as_a_host_without_the_files_and_users(tmp_path):
    (tmp_path / "stack.yaml").write_text("kind: service\nname: api\ncommand: [serve]\nuser: alice\n")
    with pytest.raises(SpecErrors) as caught:
        plan_stack(load_stack(tmp_path), FACTS)
    assert sorted(e.key for e in caught.value.errors) == ["user"]  # the program's absence waits for the user's
    assert "no user 'alice' in the host's /etc/passwd" in str(caught.value)


def test_paths_asked_are_mount_target_prefixes_sources_and_the_programs_candidates(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "stack.yaml").write_text("kind: service\nname: a\ncommand: [serve]\nenvironment: {PATH: /bin:/opt/bin}\nmounts: [{source: data, target: /opt/app/data}]\n")
    assert paths_asked(load_stack(tmp_path), FACTS) == {"/opt", "/opt/app", "/opt/app/data", str(tmp_path / "data"), "/bin/serve", "/opt/bin/serve"}


def test_survey_looks_at_the_host_for_every_answer_planning_needs(tmp_path):
    from sandboxd.host.prepare import survey
    from sandboxd.store.images import Image

    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "bin").mkdir()
    (rootfs / "bin" / "x").write_text("")
    (rootfs / "etc" / "passwd").write_text("app:x:500:600::/:/bin/sh\n")
    (tmp_path / "stack.yaml").write_text("kind: service\nname: a\nimage: img\ncommand: [x]\nuser: app\n")
    stack = load_stack(tmp_path)
    facts = survey(stack, HostFacts(architecture="x86_64", images={"img": Image("img", rootfs)}))
    assert facts.accounts["img"].users == {"app": (500, 600)}
    assert facts.paths.exists(f"{rootfs}/bin/x") and not facts.paths.exists(f"{rootfs}/usr/bin/x")
    assert set(facts.paths.found) <= paths_asked(stack, facts)
    plan = plan_stack(stack, facts)["a"]
    assert (plan.uid, plan.gid) == (500, 600)


# ── the one builder of LISTEN_* and NOTIFY_* variables ──


def test_a_service_gets_its_descriptors_notify_socket_and_watchdog_from_one_builder(tmp_path):
    from sandboxd.plan.environment import NOTIFY_PATH_IN_SANDBOX, SERVICE_PID_IN_SANDBOX

    p = plans(tmp_path, "kind: service\nname: a\ncommand: [x]\nready: notify\nwatchdog: 2s\n---\nkind: socket\nname: a\nlisten: tcp:127.0.0.1:1\n")["a"]
    env = dict(p.env)
    assert env["NOTIFY_SOCKET"] == NOTIFY_PATH_IN_SANDBOX
    assert (env["WATCHDOG_USEC"], env["WATCHDOG_PID"]) == ("2000000", str(SERVICE_PID_IN_SANDBOX))
    assert (env["LISTEN_FDS"], env["LISTEN_PID"], env["LISTEN_FDNAMES"]) == ("1", str(SERVICE_PID_IN_SANDBOX), "a")


def test_other_descriptors_replace_a_plans_listen_variables_and_keep_the_rest():
    from sandboxd.plan.environment import listen_environment, with_descriptors

    env = (("PATH", "/bin"), ("LISTEN_FDS", "2"), ("LISTEN_PID", "2"), ("LISTEN_FDNAMES", "a:b"), ("NOTIFY_SOCKET", "/run/.sbd-notify"))
    assert with_descriptors(env, ("connection",)) == (
        ("PATH", "/bin"),
        ("NOTIFY_SOCKET", "/run/.sbd-notify"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_PID", "2"),
        ("LISTEN_FDNAMES", "connection"),
    )
    assert listen_environment(3, pid=77) == {"LISTEN_FDS": "3", "LISTEN_PID": "77"}  # the proxy's: no names
