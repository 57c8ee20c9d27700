"""`sandboxd export systemd`: its units pass `systemd-analyze verify` of this machine's systemd (252)
with nothing said (verify exits 0 even for an unknown directive, so its output must be empty too),
each mapped key arrives as the directive the decision names (read from the parsed unit file), and
directives newer than the stated version are left out.

verify checks that each ExecStart= program exists: the test stacks name real binaries of this
machine by absolute path (/usr/bin/python3, /bin/sleep, /bin/cat); the repository's stacks name
theirs by name (python3, sh, nginx, redis-server), which systemd finds in its own search path, as
scripts/test installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxd.cli.main import main
from sandboxd.export.systemd import export_systemd
from sandboxd.export.unitfile import parse_unit, quote_command
from sandboxd.spec.load import load_stack

from .export_stacks import RICH, SMALL
from .spec_snippets import WriteSpecs

REPO = Path(__file__).resolve().parents[2]
Units = dict[str, dict[str, list[tuple[str, str]]]]


def verify(folder: Path) -> None:
    """systemd-analyze verify on every unit of `folder`: exit 0 and not a word on stdout or stderr."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (scripts/test installs systemd)")
        pytest.skip("no systemd-analyze on this machine")
    units = sorted(str(p) for p in folder.iterdir())
    result = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True, timeout=120, cwd=folder)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def export_into(folder: Path, out: Path, *args: str) -> Units:
    assert main(["export", "systemd", str(folder), str(out), *args]) == 0
    return {p.name: parse_unit(p.read_text()) for p in out.iterdir()}


@pytest.mark.parametrize("folder", ["specs", "specs/examples/real"])
def test_the_repository_stacks_pass_systemd_analyze_verify(tmp_path: Path, folder: str) -> None:
    export_into(REPO / folder, tmp_path / "units")
    verify(tmp_path / "units")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_small_stack_passes_systemd_analyze_verify(tmp_path: Path, write_specs: WriteSpecs, name: str) -> None:
    export_into(write_specs(tmp_path / "stack", SMALL[name].replace("IMAGE", "host")), tmp_path / "units")
    verify(tmp_path / "units")


def rich_folder(tmp_path: Path, image: str = "host") -> Path:
    folder = tmp_path / "rich"
    (folder / "app").mkdir(parents=True, exist_ok=True)
    (folder / "root").mkdir(exist_ok=True)
    (folder / "api.env").write_text("FROM_FILE=1\n")
    (folder / "stack.yaml").write_text(RICH.replace("IMAGE", image))
    return folder


@pytest.mark.parametrize("image", ["host", "./root"])
def test_the_rich_stack_passes_systemd_analyze_verify(tmp_path: Path, image: str) -> None:
    export_into(rich_folder(tmp_path, image), tmp_path / "units")
    verify(tmp_path / "units")


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Units:
    tmp_path = tmp_path_factory.mktemp("rich")
    return export_into(rich_folder(tmp_path), tmp_path / "units")


def values(units: Units, unit: str, section: str, directive: str) -> list[str]:
    return [value for d, value in units[unit].get(section, []) if d == directive]


def one(units: Units, unit: str, section: str, directive: str) -> str:
    [value] = values(units, unit, section, directive)
    return value


API = "rich-api.service"
ARRIVES: dict[str, tuple[Callable[[Units], object], object]] = {
    "service.command": (lambda u: one(u, API, "Service", "ExecStart"), quote_command(("/usr/bin/python3", "-u", "/app/api.py", "100%", str(Path.home())))),
    "service.environment": (lambda u: values(u, API, "Service", "Environment")[1:], ['"MODE=fast lane"', "LEVEL=3"]),
    "service.env_file": (lambda u: values(u, API, "Service", "Environment")[0], "FROM_FILE=1"),
    "service.workdir": (lambda u: one(u, API, "Service", "WorkingDirectory"), "/app"),
    "service.restart": (lambda u: one(u, API, "Service", "Restart"), "always"),
    "service.restart_delay": (lambda u: one(u, API, "Service", "RestartSec"), "2s"),
    "service.start_limit": (lambda u: (one(u, API, "Unit", "StartLimitBurst"), one(u, API, "Unit", "StartLimitIntervalSec")), ("7", "20s")),
    "service.stop_signal": (lambda u: one(u, API, "Service", "KillSignal"), "SIGINT"),
    "service.reload_signal": (lambda u: one(u, API, "Service", "ExecReload"), "/bin/kill -s SIGUSR1 $MAINPID"),
    "service.reload": (lambda u: one(u, "rich-migrate.service", "Service", "ExecReload"), "/bin/true"),
    "service.stop_timeout": (lambda u: one(u, API, "Service", "TimeoutStopSec"), "15s"),
    "service.mounts": (lambda u: (values(u, API, "Service", "BindReadOnlyPaths")[-1], one(u, API, "Service", "BindPaths")),
                       ("APP:/app", "/var/lib/sandboxd/volumes/data:/var/lib/api")),
    "service.uses": (lambda u: (values(u, API, "Unit", "Requires")[-1]), "rich-cache.socket"),
    "service.network": (lambda u: one(u, API, "Service", "PrivateNetwork"), "yes"),
    "service.ready (notify)": (lambda u: one(u, API, "Service", "Type"), "notify"),
    "service.ready (check)": (lambda u: one(u, "rich-cache.service", "Service", "ExecStartPost"),
                              quote_command(("/bin/sh", "-c", "until timeout 2s /usr/bin/python3 /app/check.py; do sleep 3.0; done"))),
    "service.notify_access": (lambda u: one(u, API, "Service", "NotifyAccess"), "all"),
    "service.start_timeout": (lambda u: one(u, API, "Service", "TimeoutStartSec"), "40s"),
    "service.watchdog": (lambda u: one(u, API, "Service", "WatchdogSec"), "30s"),
    "service.start": (lambda u: ("rich-cache.service" in values(u, "rich.target", "Unit", "Wants"), API in values(u, "rich.target", "Unit", "Wants")), (False, True)),
    "service.after": (lambda u: (values(u, API, "Unit", "After")[0], values(u, API, "Unit", "Requires")[0], one(u, "rich-migrate.service", "Service", "Type")),
                      ("rich-migrate.service", "rich-migrate.service", "oneshot")),
    "service.fdstore_max": (lambda u: one(u, API, "Service", "FileDescriptorStoreMax"), "4"),
    "service.capabilities": (lambda u: (one(u, API, "Service", "CapabilityBoundingSet"), one(u, API, "Service", "AmbientCapabilities")), ("CAP_NET_BIND_SERVICE",) * 2),
    "service.no_new_privs": (lambda u: one(u, API, "Service", "NoNewPrivileges"), "yes"),
    "service.limits": (lambda u: [one(u, API, "Service", d) for d in ("MemoryMax", "MemoryHigh", "MemorySwapMax", "TasksMax", "CPUQuota", "CPUWeight", "IOWeight")],
                       [str(256 << 20), str(200 << 20), str(64 << 20), "100", "150%", "200", "300"]),
    "service.seccomp": (lambda u: ("ptrace" in one(u, API, "Service", "SystemCallFilter").split(), "mount" in one(u, API, "Service", "SystemCallFilter").split()), (False, True)),
    "service.userns": (lambda u: (one(u, API, "Service", "PrivateUsers"), values(u, "rich-cache.service", "Service", "DynamicUser")), ("yes", ["yes"])),
    "service.readonly_root": (lambda u: one(u, API, "Service", "ProtectSystem"), "strict"),
    "service.user": (lambda u: one(u, API, "Service", "User"), "1000"),
    "service.group": (lambda u: one(u, API, "Service", "Group"), "1000"),
    "service.tmpfs": (lambda u: values(u, API, "Service", "TemporaryFileSystem")[1], "/var/cache/api:size=8388608,mode=1777"),
    "service.tmpfs_size": (lambda u: values(u, API, "Service", "TemporaryFileSystem")[0], "/tmp:size=33554432,mode=1777"),
    "service.shm_size": (lambda u: values(u, API, "Service", "TemporaryFileSystem")[2], "/dev/shm:size=16777216,mode=1777"),
    "service.image": (lambda u: values(u, API, "Service", "RootDirectory"), []),
    "socket.service": (lambda u: one(u, "rich-api.socket", "Socket", "Service"), API),
    "socket.listen": (lambda u: values(u, "rich-api.socket", "Socket", "ListenStream"), ["0.0.0.0:8080", "/run/rich/api.sock"]),
    "socket.fdname": (lambda u: one(u, "rich-api.socket", "Socket", "FileDescriptorName"), "http"),
    "socket.backlog": (lambda u: one(u, "rich-api.socket", "Socket", "Backlog"), "32"),
    "socket.mode": (lambda u: one(u, "rich-api.socket", "Socket", "SocketMode"), "0660"),
    "socket.reuseport": (lambda u: one(u, "rich-api.socket", "Socket", "ReusePort"), "yes"),
    "socket.netns": (lambda u: (one(u, "rich-cache.socket", "Socket", "PrivateNetwork"), one(u, "rich-cache.service", "Unit", "JoinsNamespaceOf")), ("yes", "rich-cache.socket")),
    "socket.accept": (lambda u: (one(u, "rich-echo.socket", "Socket", "Accept"), "rich-echo@.service" in u), ("yes", True)),
    "socket.max_connections": (lambda u: one(u, "rich-echo.socket", "Socket", "MaxConnections"), "16"),
    "socket.proxy": (lambda u: (one(u, "rich-web.socket", "Socket", "Service"), one(u, "rich-web-proxy.service", "Service", "ExecStart"),
                                one(u, "rich-web-proxy.service", "Unit", "JoinsNamespaceOf")),
                     ("rich-web-proxy.service", "/lib/systemd/systemd-socket-proxyd 127.0.0.1:8001", "rich-web.service")),
    "service.listen": (lambda u: (one(u, "rich-metrics.socket", "Socket", "ListenStream"), one(u, "rich-metrics.socket", "Socket", "Service")), ("0.0.0.0:9100", "rich-metrics.service")),
    "volume": (lambda u: values(u, API, "Service", "ExecStartPre"), ["+/bin/mkdir -p /var/lib/sandboxd/volumes/data", "+/bin/chown 1000:1000 /var/lib/sandboxd/volumes/data"]),
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(ARRIVES))
def test_a_mapped_key_arrives(units: Units, key: str) -> None:
    read, expected = ARRIVES[key]
    found = read(units)
    if key == "service.mounts":  # the source is the spec folder's app/, wherever the test made it
        assert isinstance(found, tuple) and found[0].endswith("/rich/app:/app") and found[1] == expected[1]  # type: ignore[index]
        return
    assert found == expected


def test_a_folder_image_is_the_root_directory(tmp_path: Path) -> None:
    folder = rich_folder(tmp_path, "./root")
    found = export_into(folder, tmp_path / "units")
    assert one(found, API, "Service", "RootDirectory") == str(folder.resolve() / "root")


def test_the_stack_target_wants_its_sockets(units: Units) -> None:
    wants = values(units, "rich.target", "Unit", "Wants")
    assert {"rich-api.socket", "rich-cache.socket", "rich-echo.socket", "rich-web.socket"} <= set(wants)
    assert "rich-echo@.service" not in wants
    assert all(one(units, name, "Unit", "PartOf") == "rich.target" for name in units if name != "rich.target")


def test_directives_newer_than_the_version_are_left_out(tmp_path: Path) -> None:
    old = export_into(rich_folder(tmp_path / "a"), tmp_path / "old")
    new = export_into(rich_folder(tmp_path / "b"), tmp_path / "new", "--systemd-version", "257")
    assert values(old, API, "Service", "RestartSteps") == [] and values(old, API, "Service", "PrivatePIDs") == []
    assert one(old, API, "Service", "ProtectProc") == "invisible"
    assert (one(new, API, "Service", "RestartSteps"), one(new, API, "Service", "RestartMaxDelaySec"), one(new, API, "Service", "PrivatePIDs")) == ("3", "30s", "yes")


def test_a_registry_image_is_refused_with_what_to_do(tmp_path: Path, write_specs: WriteSpecs, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_specs(tmp_path / "s", SMALL["accept mode"].replace("IMAGE", "redis:7"))
    assert main(["export", "systemd", str(folder), str(tmp_path / "units")]) == 2
    err = capsys.readouterr().err
    assert f"{folder.resolve() / 'stack.yaml'}:3: image: image 'redis:7' has no systemd form" in err
    assert "RootDirectory=" in err
    assert not (tmp_path / "units").exists()


def test_the_units_are_the_texts_the_decisions_describe(tmp_path: Path) -> None:
    texts, decisions = export_systemd(load_stack(rich_folder(tmp_path)))
    mapped = {d.key: d.to for d in decisions if d.unit == "api" and d.status == "mapped"}
    directives = {d for text in texts.values() for section in parse_unit(text).values() for d, _ in section}
    for key, to in mapped.items():
        for name in (part.strip().split("=")[0] for part in to.split(",")):
            if name and name[0].isupper() and not name.startswith(("Wants", "Service ")):
                assert name in directives, (key, to)
