"""The sandbox child's set-up against the recording kernel: which calls, in which order. The
set-up program (program.py) is compiled as the fork server compiles it and run by the Python
twin of the interpreter (reference.py), one Kernel call per op."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxd.kernel import abi
from sandboxd.kernel.fake import ProcessEnded, RecordingKernel
from sandboxd.plan.launch import HOST_IDS, MASK_WITH_MOUNTPOINTS, SYSFS_OF_NETNS, HostFacts, LaunchPlan, MountOp, PathFacts, UserNamespace
from sandboxd.plan.stack import plan_stack
from sandboxd.sandbox.ops import R_SYSFS, encode
from sandboxd.sandbox.program import OLD_ROOT, READONLY, Descriptors, HostView, Trees, compile_launch
from sandboxd.sandbox.protocol import Executing, LaunchSandbox, SetupFailed, decode_status
from sandboxd.sandbox.reference import run_program
from sandboxd.spec.load import load_stack

ROOT = "/run/sandboxd/st/root"  # where a root of its own is built
DEV_TREE, IMAGE_TREE, SYSFS_TREE = 90, 91, 92
OUTPUT, SOCKET = 5, 6
MOUNT_CALLS = ("mount", "umount2", "mount_setattr", "move_mount", "pivot_root")
FLAGS = abi.CLONE_NEWNS | abi.CLONE_NEWUTS | abi.CLONE_NEWIPC | abi.CLONE_NEWNET
IDS = UserNamespace(200000, 200000, 65536, 100000, 100000)
IMAGE = "/var/lib/sandboxd/images/trees/abc"

# A host as the walk sees it: /proc, /sys, /dev and /run are mounts of their own, /tmp is not.
HOST = ("/usr/bin/", "/etc/hosts", "/etc/resolv.conf", "/proc/sys/", "/proc/acpi/", "/proc/kcore", "/sys/firmware/",
        "/dev/null", "/tmp/", "/run/sandboxd/st/root/", "/root/", "/home/alice/", "/srv/data/", "/vmlinuz")  # fmt: skip
HOST_LINKS = {"/bin": "usr/bin"}
HOST_MOUNTS = ("/proc", "/sys", "/dev", "/run")
DEV = ["pts/", "shm/", "null"]  # what the fork server's detached /dev holds

BASE = (
    MountOp("proc", "/proc"),
    MountOp("sysfs", "/sys"),
    MountOp("dev", "/dev"),
    MountOp("tmpfs", "/dev/shm", options="mode=1777,size=65536"),
    MountOp("tmpfs", "/tmp", options="mode=1777,size=65536"),
    MountOp("tmpfs", "/run", options="mode=0755,size=65536"),
)
IN_PLACE = MountOp("rbind-root", "/", "/", options="in-place")
TMPFS_ROOT = MountOp("tmpfs-root", "/", "/")


def kernel(tree: Sequence[str] = HOST, links: dict[str, str] | None = None, trees: dict[int, list[str]] | None = None, file_trees: Sequence[int] = ()) -> RecordingKernel:
    return RecordingKernel(tree, HOST_LINKS if links is None else links, HOST_MOUNTS, {DEV_TREE: DEV, **(trees or {})}, file_trees)


def request(mounts: Sequence[MountOp], **fields: object) -> LaunchSandbox:
    plan = dict(service="svc", argv=("/bin/serve",), env=(("PATH", "/bin"),), hostname="svc", workdir="/", clone_flags=FLAGS, mounts=tuple(mounts), fd_names=())
    plan.update(fields)
    return LaunchSandbox(1, LaunchPlan(**plan), "/sys/fs/cgroup/unified/sandboxd/st/svc", (), ROOT, False, 0)  # type: ignore[arg-type]


HOSTNAME_TREE = 77  # the copy of the service's /etc/hostname file


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


@dataclass(frozen=True)
class Init:
    """What the program executed at its end (init_exec: the command, forked by its init)."""

    argv: list[str]
    env: dict[str, str]
    name: str  # the command, as the step of its exec names it


def host_view(fake: RecordingKernel, trees: Trees) -> HostView:
    """What the fork server answers, asked of the fake before the program runs."""
    root = tuple((name, kind, fake.readlink(f"/{name}") if kind == "symlink" else "") for name, kind in fake.list_dir("/"))
    return HostView(tuple(fake.fd_is_dir(tree) for tree in trees.binds), root)


def run(fake: RecordingKernel, launch: LaunchSandbox, channel: tuple[socket.socket, socket.socket], fds: Descriptors, trees: Trees) -> int | None:
    """Compile the launch's program, run it to its end; the exit code (None: it executed)."""
    ops = compile_launch(launch, fds, trees, host_view(fake, trees))
    assert encode(ops, 3 + len(fds.sockets)).startswith(b"SBD1")  # what the interpreter reads
    with pytest.raises(ProcessEnded) as ended:
        run_program(fake, ops, channel[1], {R_SYSFS: trees.sysfs})
    return ended.value.code


def walk(fake: RecordingKernel, launch: LaunchSandbox, channel: tuple[socket.socket, socket.socket], binds: tuple[int, ...] = (), netns: int = -1) -> Init:
    trees = Trees(binds, IMAGE_TREE, SYSFS_TREE, DEV_TREE)
    assert run(fake, launch, channel, Descriptors(OUTPUT, (SOCKET,), netns), trees) is None
    ops = compile_launch(launch, Descriptors(OUTPUT, (SOCKET,), netns), trees, host_view(fake, trees))
    (_, argv, env) = fake.named("init_exec")[-1]
    return Init(argv, env, ops[-1].step.removeprefix("execute "))  # type: ignore[arg-type]


def mounts_of(fake: RecordingKernel) -> list[tuple[object, ...]]:
    return fake.named(*MOUNT_CALLS)


def failed(fake: RecordingKernel, launch: LaunchSandbox, channel: tuple[socket.socket, socket.socket], binds: tuple[int, ...] = ()) -> tuple[int | None, SetupFailed]:
    code = run(fake, launch, channel, Descriptors(OUTPUT, (SOCKET,)), Trees(binds, IMAGE_TREE, SYSFS_TREE, DEV_TREE))
    message = decode_status(channel[0].recv(4096))
    assert isinstance(message, SetupFailed)
    return code, message


def test_host_root_in_place_is_sealed_in_one_call_and_each_covered_mount_is_detached_first(channel) -> None:
    fake = kernel()
    walk(fake, request([IN_PLACE, *BASE]), channel)
    tmpfs = abi.MS_NOSUID | abi.MS_NODEV
    assert mounts_of(fake) == [
        ("mount", None, "/", None, abi.MS_REC | abi.MS_PRIVATE, None),
        ("mount_setattr", "/", READONLY, 0, True),
        ("umount2", "/proc", abi.MNT_DETACH),
        ("mount", "proc", "/proc", "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, None),
        ("umount2", "/sys", abi.MNT_DETACH),
        ("mount", "sysfs", "/sys", "sysfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, None),
        ("umount2", "/dev", abi.MNT_DETACH),
        ("move_mount", DEV_TREE, "/dev"),
        ("mount", "devpts", "/dev/pts", "devpts", abi.MS_NOSUID | abi.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
        ("mount", "tmpfs", "/dev/shm", "tmpfs", tmpfs, "mode=1777,size=65536"),  # the sandbox's own /dev: nothing to detach
        ("mount", "tmpfs", "/tmp", "tmpfs", tmpfs, "mode=1777,size=65536"),  # no mount of the host's there
        ("umount2", "/run", abi.MNT_DETACH),
        ("mount", "tmpfs", "/run", "tmpfs", tmpfs, "mode=0755,size=65536"),
    ]
    assert ("close", DEV_TREE) in fake.calls
    assert "rmdir" not in fake.order() and "mkdir" not in fake.order()  # no root built, none pivoted into


def test_a_planned_service_on_the_host_root_walks_without_a_mount_point_of_its_own(tmp_path: Path, channel) -> None:
    (tmp_path / "stack.yaml").write_text("kind: service\nname: a\ncommand: [/bin/serve]\nuserns: false\n")
    paths = PathFacts({"/": True, "/bin/serve": False, "/etc": True, "/proc/kcore": False, "/proc/sys": True})
    plan = plan_stack(load_stack(tmp_path), HostFacts(architecture="x86_64", paths=paths))["a"]
    fake = kernel()
    fake.file_trees.add(HOSTNAME_TREE)
    walk(fake, LaunchSandbox(1, plan, "/sys/fs/cgroup/unified/x", (), ROOT, False, 0), channel, binds=(HOSTNAME_TREE,))
    assert ("move_mount", HOSTNAME_TREE, "/etc/hostname") in fake.calls  # its own /etc/hostname, sandboxd's file
    mounted = [call[2] for call in fake.named("mount")]
    # The plan's order: /proc, /sys and /dev first, then what is hidden in them, then the tmpfs.
    assert mounted.index("/proc") < mounted.index("/proc/kcore") < mounted.index("/tmp")
    assert ("mount", "/dev/null", "/proc/kcore", None, abi.MS_BIND, None) in fake.calls  # a file masked by /dev/null
    assert ("mount", "tmpfs", "/root", "tmpfs", abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=0") in fake.calls
    assert "pivot_root" not in fake.order()


def test_a_tmpfs_root_binds_the_host_entries_then_pivots_and_detaches_the_host(channel) -> None:
    fake = kernel()
    walk(fake, request([TMPFS_ROOT, MountOp("mountpoint", "/data", options="dir"), *BASE]), channel)
    calls = fake.calls
    private = calls.index(("mount", None, "/", None, abi.MS_REC | abi.MS_PRIVATE, None))
    assert calls[private + 1] == ("mount", "tmpfs", ROOT, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755,size=64k")
    assert ("symlink", "usr/bin", f"{ROOT}/bin") in calls
    assert ("mount", "/usr", f"{ROOT}/usr", None, abi.MS_BIND | abi.MS_REC, None) in calls
    assert ("create_file", f"{ROOT}/vmlinuz") in calls and ("mount", "/vmlinuz", f"{ROOT}/vmlinuz", None, abi.MS_BIND, None) in calls
    # sandboxd mounts its own at /proc, /dev, /tmp, /run and /sys: a directory, never the host's.
    assert ("mkdir", f"{ROOT}/proc", 0o777) in calls and not any(c[0] == "mount" and c[1] == "/proc" for c in calls)
    assert ("mkdir", f"{ROOT}/data", 0o777) in calls
    # The root is sealed once its mount points exist, before /proc goes on it.
    seal = calls.index(("mount_setattr", ROOT, READONLY, 0, True))
    assert seal < calls.index(("mount", "proc", f"{ROOT}/proc", "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, None))
    pivot = calls.index(("pivot_root", ".", OLD_ROOT.lstrip("/")))
    assert calls.index(("mkdir", f"{ROOT}{OLD_ROOT}", 0o777)) < calls.index(("chdir", ROOT)) < pivot
    detach = calls.index(("umount2", OLD_ROOT, abi.MNT_DETACH))
    assert pivot < detach and calls[detach + 1] == ("rmdir", OLD_ROOT)
    assert not any(c[0] == "umount2" and c[1] in ("/proc", f"{ROOT}/proc") for c in calls)  # nothing of the host's to detach


def test_an_image_root_is_an_overlay_on_its_detached_tree_and_sealed_with_readonly_root(channel) -> None:
    fake = kernel(trees={IMAGE_TREE: ["bin/", "etc/passwd", "proc/", "tmp/"]})
    image = MountOp("image-root", "/", IMAGE, readonly=True, options=HOST_IDS)
    walk(fake, request([image, *BASE]), channel)
    calls = mounts_of(fake)
    lower = f"{ROOT}/lower{IMAGE}"
    assert calls[1:4] == [
        ("mount", "tmpfs", ROOT, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "mode=0755"),
        ("move_mount", IMAGE_TREE, lower),
        ("mount", "overlay", ROOT, "overlay", abi.MS_NOSUID | abi.MS_NODEV, f"lowerdir=lower{IMAGE},upperdir=upper,workdir=work"),
    ]
    assert fake.calls.index(("chdir", ROOT)) < fake.calls.index(calls[3])  # the layers are named relative to the tmpfs
    made = [c[1] for c in fake.named("mkdir")]
    assert made[:2] == [f"{ROOT}/upper", f"{ROOT}/work"]
    assert {f"{ROOT}/dev", f"{ROOT}/run", f"{ROOT}/sys"} <= set(made) and f"{ROOT}/proc" not in made  # the image has /proc
    assert not fake.named("umount2")[:-1]  # nothing of the host's to detach, only the old root at the end
    assert calls[-2:] == [
        ("mount", None, "/", None, abi.MS_REMOUNT | abi.MS_BIND | abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV, None),
        ("umount2", OLD_ROOT, abi.MNT_DETACH),
    ]


def test_an_image_with_a_symlink_where_sandboxd_mounts_is_refused_naming_the_path(channel) -> None:
    fake = kernel(trees={IMAGE_TREE: ["bin/", "run -> /"]})
    code, message = failed(fake, request([MountOp("image-root", "/", IMAGE), *BASE]), channel)
    assert code == 127
    assert message == SetupFailed("mount image-root on /", "is a symlink in the image; sandboxd mounts a directory there (/run)", "/run", 127)


def test_in_a_user_namespace_the_program_creates_the_namespaces_first_and_confines_last(channel) -> None:
    fake = kernel()
    # (Root of its user namespace it became before the walk: sbd-setup.c's init_child.)
    walk(fake, request([IN_PLACE, *BASE], userns=IDS, uid=1000, gid=1000, capabilities=(10,), seccomp_filter="00"), channel)
    order = fake.order()
    assert order[0:3] == ["reset_signals", "unshare", "mount"]
    # Its own session once the set-up is done (until then in the fork server's scheduling group).
    assert order.index("setsid") > max(index for index, name in enumerate(order) if name in ("mount", "pivot_root", "chdir"))
    assert fake.calls[1] == ("unshare", FLAGS)
    # The confinement, last, in the order the kernel allows it.
    confinement = [c for c in fake.calls if c[0] in ("prctl", "install_seccomp", "drop_bounding_set", "setgroups", "setgid", "setuid", "keep_only_capabilities")]
    assert confinement == [
        ("prctl", abi.PR_SET_NO_NEW_PRIVS, 1),
        ("install_seccomp", b"\x00"),
        ("drop_bounding_set", {10}),
        ("prctl", abi.PR_SET_KEEPCAPS, 1),
        ("setgroups", [1000]),
        ("setgid", 1000),
        ("setuid", 1000),
        ("keep_only_capabilities", {10}),
        ("prctl", abi.PR_SET_NO_NEW_PRIVS, 1),
    ]
    assert order[-2] == "send" and order.index("keep_only_capabilities") < order.index("send")
    assert order[-1] == "init_exec"


def test_a_mount_the_user_namespace_locked_stays_and_only_there(channel) -> None:
    fake = kernel()
    fake.fail("umount2", "/proc", errno.EINVAL)
    walk(fake, request([IN_PLACE, *BASE], userns=IDS), channel)
    assert ("mount", "proc", "/proc", "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, None) in fake.calls
    assert isinstance(decode_status(channel[0].recv(4096)), Executing)
    fake = kernel()
    fake.fail("umount2", "/proc", errno.EINVAL)
    code, message = failed(fake, request([IN_PLACE, *BASE]), channel)
    assert (code, message.step, message.path) == (127, "mount proc on /proc", "/proc")


def test_the_child_joins_its_v1_cgroups_first_by_writing_0_to_the_tasks_files_it_was_given(channel) -> None:
    fake = kernel()
    launch = request([IN_PLACE, *BASE], userns=IDS)
    assert run(fake, launch, channel, Descriptors(OUTPUT, (SOCKET,), cgroup_tasks=(50, 51)), Trees((), IMAGE_TREE, SYSFS_TREE, DEV_TREE)) is None
    # "0" moves the writer alone (no global lock); by descriptor, since in its user namespace it may not open them.
    assert fake.calls[1:5] == [("write", 50, b"0"), ("close", 50), ("write", 51, b"0"), ("close", 51)]
    assert fake.order().index("close") < fake.order().index("unshare")
    assert "write_file" not in fake.order()


def test_a_joined_network_namespace_comes_before_the_new_namespaces(channel) -> None:
    fake = kernel()
    walk(fake, request([IN_PLACE, *BASE], clone_flags=FLAGS & ~abi.CLONE_NEWNET, net="join"), channel, netns=44)
    assert fake.calls[1:4] == [("setns", 44, abi.CLONE_NEWNET), ("close", 44), ("unshare", FLAGS & ~abi.CLONE_NEWNET)]
    assert "loopback_up" not in fake.order()  # lo of a namespace sandboxd made is up already


def test_hidden_paths_are_masked_by_kind_and_a_mask_with_mount_points_is_sealed_after_them(channel) -> None:
    fake = kernel(trees={60: []})
    masks = [
        MountOp("mask", "/proc/acpi"),
        MountOp("mask", "/proc/kcore"),
        MountOp("mask", "/proc/absent"),
        MountOp("mask", "/home", options=MASK_WITH_MOUNTPOINTS),
    ]
    bind = MountOp("bind", "/home/alice/work", "/srv/data", readonly=False)
    walk(fake, request([IN_PLACE, *BASE[:3], *masks, *BASE[3:], bind]), channel, binds=(60,))
    calls = fake.calls
    hidden = abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC
    assert ("mount", "tmpfs", "/proc/acpi", "tmpfs", hidden, "mode=0755,size=0") in calls
    assert ("mount", "/dev/null", "/proc/kcore", None, abi.MS_BIND, None) in calls
    assert not any(c[0] == "mount" and c[2] == "/proc/absent" for c in calls)
    home = ("mount", "tmpfs", "/home", "tmpfs", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, "mode=0755,size=64k")
    attach = ("move_mount", 60, "/home/alice/work")
    seal = ("mount_setattr", "/home", READONLY, 0, False)  # the mounts on it keep their flags
    assert calls.index(home) < calls.index(("makedirs", "/home/alice", 0o777)) < calls.index(attach) < calls.index(seal)


def test_binds_are_attached_after_pivot_root_where_their_symlinks_lead_inside(channel) -> None:
    links = {**HOST_LINKS, "/etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf"}  # as systemd-resolved has it
    fake = kernel(links=links, trees={60: [], 61: []}, file_trees=[61])
    binds = [MountOp("bind", "/data", "/srv/data", readonly=False), MountOp("bind", "/etc/resolv.conf", "/run/st/etc/resolv.conf")]
    walk(fake, request([TMPFS_ROOT, MountOp("mountpoint", "/data", options="dir"), *BASE, *binds]), channel, binds=(60, 61))
    calls = fake.calls
    pivot = calls.index(("pivot_root", ".", OLD_ROOT.lstrip("/")))
    assert pivot < calls.index(("move_mount", 60, "/data"))
    # nosuid and nodev on the whole tree; writable only the bind's own mount (a read-only mount of
    # the host's below its source stays read-only: test_escape_setup.py).
    attached = calls.index(("move_mount", 60, "/data"))
    assert calls[attached + 1 : attached + 3] == [
        ("mount_setattr", "/data", abi.MOUNT_ATTR_NOSUID | abi.MOUNT_ATTR_NODEV, 0, True),
        ("mount_setattr", "/data", 0, abi.MOUNT_ATTR_RDONLY, False),
    ]
    # The symlink is followed inside the sandbox: the file's mount point is made on its own /run.
    stub = "/run/systemd/resolve/stub-resolv.conf"
    assert pivot < calls.index(("makedirs", "/run/systemd/resolve", 0o777)) < calls.index(("create_file", stub)) < calls.index(("move_mount", 61, stub))
    assert ("mount_setattr", stub, READONLY, 0, True) in calls
    assert ("close", 60) in calls[pivot:] and ("close", 61) in calls[pivot:]


def test_a_bind_whose_symlink_leads_to_the_host_root_is_refused_by_its_own_step(channel) -> None:
    # An image can hold any symlink; the host's root is at OLD_ROOT while the binds are made.
    fake = kernel(trees={IMAGE_TREE: ["etc/", f"data -> {OLD_ROOT}/srv/data"], 60: []})
    bind = MountOp("bind", "/data", "/srv/data")
    code, message = failed(fake, request([MountOp("image-root", "/", IMAGE), *BASE, bind]), channel, binds=(60,))
    assert code == 127
    assert message == SetupFailed("bind /srv/data on /data", "leads out of the sandbox through a symlink (/data)", "/data", 127)
    assert not any(c[0] == "move_mount" and c[1] == 60 for c in fake.calls)


def test_readonly_paths_are_bound_onto_themselves_and_made_read_only_when_present(channel) -> None:
    fake = kernel()
    walk(fake, request([IN_PLACE, *BASE[:3], MountOp("readonly", "/proc/sys"), MountOp("readonly", "/proc/pressure"), *BASE[3:]]), channel)
    calls = fake.calls
    bound = ("mount", "/proc/sys", "/proc/sys", None, abi.MS_BIND | abi.MS_REC, None)
    assert calls.index(bound) + 1 == calls.index(("mount_setattr", "/proc/sys", READONLY, 0, True))
    assert not any("/proc/pressure" in c for c in calls)  # absent on this host


def test_a_sysfs_made_in_the_service_network_namespace_is_attached(channel) -> None:
    fake = kernel()
    mounts = [IN_PLACE, BASE[0], MountOp("sysfs", "/sys", options=SYSFS_OF_NETNS), *BASE[2:]]
    walk(fake, request(mounts, userns=IDS, net="join"), channel)
    calls = fake.calls
    assert calls.index(("umount2", "/sys", abi.MNT_DETACH)) + 1 == calls.index(("move_mount", SYSFS_TREE, "/sys"))


def test_the_failing_step_is_reported_with_its_path_and_the_child_exits_127(channel) -> None:
    fake = kernel()
    fake.fail("mount", "/proc", errno.EACCES)
    code, message = failed(fake, request([IN_PLACE, *BASE]), channel)
    assert code == 127
    assert message == SetupFailed("mount proc on /proc", "mount: Permission denied (/proc)", "/proc", 127)
    assert fake.order()[-2:] == ["send", "exit"]
    assert "execve" not in fake.order()


def test_a_failure_that_is_no_oserror_exits_126_saying_what_it_was(channel) -> None:
    fake = kernel()
    fake.sethostname = lambda name: (_ for _ in ()).throw(ValueError("embedded null byte"))  # type: ignore[method-assign]
    code, message = failed(fake, request([IN_PLACE, *BASE]), channel)
    assert (code, message.step, message.detail, message.exit) == (126, "set hostname", "ValueError('embedded null byte')", 126)


def test_the_child_reports_executing_with_only_its_descriptors_left_and_stays_as_the_commands_init(channel) -> None:
    fake = kernel()
    init = walk(fake, request([IN_PLACE, *BASE], intercept_bind=True), channel)
    # The fake numbers descriptors from 1001: the output's copy, the socket's, /dev/null.
    assert fake.named("dup_above") == [("dup_above", OUTPUT, 100), ("dup_above", SOCKET, 100)]
    assert init == Init(["/bin/serve"], {"PATH": "/bin"}, "/bin/serve")  # the command itself, no other init's
    assert fake.named("open") == [("open", "/dev/null", os.O_RDONLY | os.O_CLOEXEC)]
    assert fake.named("dup2") == [("dup2", 1003, 0), ("dup2", 1001, 1), ("dup2", 1001, 2), ("dup2", 1002, 3)]
    keep = channel[1].fileno()
    assert fake.named("closerange") == [("closerange", 4, keep), ("closerange", keep + 1, 1 << 20)]
    ((_, data, fds),) = fake.named("send")
    assert isinstance(decode_status(data), Executing) and len(fds) == 1  # with the bind() listener
    assert fake.order().index("install_seccomp_listener") < fake.order().index("drop_bounding_set")
    assert isinstance(decode_status(channel[0].recv(4096)), Executing)


def test_a_target_below_a_read_only_folder_is_made_in_a_cover_of_it_that_binds_its_entries_back(channel) -> None:
    # /etc is the host's, read-only in place: its entries are copied onto a tmpfs over it, the new
    # mount points made there, and the cover sealed after every mount; nothing is made in the host's /etc.
    fake = kernel(trees={60: [], 61: []}, file_trees=[61], links={**HOST_LINKS, "/etc/localtime": "/usr/share/zoneinfo/UTC"})
    binds = [MountOp("bind", "/etc/app/config.yaml", "/cfg/config.yaml"), MountOp("bind", "/etc/app2/data", "/srv/data")]
    walk(fake, request([IN_PLACE, *BASE, *binds]), channel, binds=(61, 60))
    calls = fake.calls
    cover = calls.index(("mount", "tmpfs", "/etc", "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "size=1m"))
    clones = [c for c in calls[:cover] if c[0] == "clone_tree"]
    assert clones == [("clone_tree", "/etc/hosts"), ("clone_tree", "/etc/resolv.conf")]  # the symlink is made again, not bound
    assert ("symlink", "/usr/share/zoneinfo/UTC", "/etc/localtime") in calls[cover:]
    assert cover < calls.index(("create_file", "/etc/hosts")) < calls.index(("create_file", "/etc/app/config.yaml")) < calls.index(("move_mount", 61, "/etc/app/config.yaml"))
    assert calls.count(("mount", "tmpfs", "/etc", "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "size=1m")) == 1  # /etc/app2 goes in the same cover
    assert calls.index(("move_mount", 60, "/etc/app2/data")) < calls.index(("mount_setattr", "/etc", READONLY | abi.MOUNT_ATTR_RDONLY, 0, False))
    assert "pivot_root" not in fake.order() and fake.lexists("/etc/hosts")


def test_a_target_on_the_sandboxs_own_tmpfs_or_an_image_needs_no_cover(channel) -> None:
    fake = kernel(trees={IMAGE_TREE: ["etc/"], 60: []})
    walk(fake, request([IN_PLACE, *BASE, MountOp("bind", "/tmp/a/b", "/srv/data")]), channel, binds=(60,))
    assert not fake.named("clone_tree") and ("makedirs", "/tmp/a", 0o777) in fake.calls
    fake = kernel(trees={IMAGE_TREE: ["etc/"], 60: []})
    walk(fake, request([MountOp("image-root", "/", IMAGE, readonly=True), *BASE, MountOp("bind", "/etc/app/x", "/srv/data")]), channel, binds=(60,))
    assert not fake.named("clone_tree") and ("move_mount", 60, "/etc/app/x") in fake.calls


def test_a_new_top_level_target_through_a_symlink_on_the_read_only_root_is_refused(channel) -> None:
    fake = kernel(links={**HOST_LINKS, "/srv/data": "/newtop/data"}, trees={60: []})
    code, message = failed(fake, request([IN_PLACE, *BASE, MountOp("bind", "/srv/data/x", "/srv")]), channel, binds=(60,))
    assert code == 127 and message.path == "/newtop/data/x" and "new top-level path" in message.detail
