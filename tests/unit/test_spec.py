"""Unit tests of reading specs (sandboxd.spec): every bad spec is reported with file, line, key and an exact message."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from sandboxd.errors import SpecErrors
from sandboxd.spec.load import load_stack
from sandboxd.spec.model import DEFAULT_PIDS, Address, Limits, Mount, Service, Socket, StartLimit, Tmpfs
from sandboxd.spec.overrides import with_environment
from sandboxd.spec.values import parse_address, parse_duration
from .spec_snippets import Problems, WriteSpecs

SERVICE = "kind: service\nname: app\ncommand: [app]\n"


BAD_SPECS: list[tuple[str, dict[str, str], str]] = [
    (
        "unknown key, close match",
        {"app.yaml": "kind: service\ncommand: [app]\nenviroment: {}\n"},
        "app.yaml:3: enviroment: unknown key 'enviroment'; did you mean 'environment'?",
    ),
    (
        "unknown key, no close match",
        {"web.yaml": "kind: socket\nlisten: unix:/run/web.sock\nfrobnicate: 1\n"},
        (
            "web.yaml:3: frobnicate: unknown key 'frobnicate'; expected one of: "
            "kind, name, service, listen, fdname, backlog, mode, reuseport, netns, accept, max_connections, proxy, handoff"
        ),
    ),
    (
        "command of the wrong type",
        {"app.yaml": "kind: service\ncommand: {run: app}\n"},
        "app.yaml:2: command: expected a list of strings or a string, got a mapping",
    ),
    (
        "command item of the wrong type",
        {"app.yaml": "kind: service\ncommand:\n  - app\n  - [nested]\n"},
        "app.yaml:4: command[1]: expected a string, got a list",
    ),
    (
        "empty command",
        {"app.yaml": "kind: service\ncommand: ''\n"},
        "app.yaml:2: command: expected a program to run, got an empty command",
    ),
    (
        "command string with an open quote",
        {"app.yaml": "kind: service\ncommand: app 'unfinished\n"},
        "app.yaml:2: command: cannot split the command into words: no closing quotation",
    ),
    (
        "missing command",
        {"app.yaml": "kind: service\nworkdir: /srv\n"},
        "app.yaml:1: command: missing key 'command'; expected the program to run, as a list of strings or a string",
    ),
    (
        "environment name with '='",
        {"app.yaml": SERVICE + "environment:\n  A=B: x\n"},
        "app.yaml:5: environment.A=B: expected a variable name without '=', got 'A=B'",
    ),
    (
        "environment value that is a mapping",
        {"app.yaml": SERVICE + "environment:\n  DEBUG: {level: 1}\n"},
        "app.yaml:5: environment.DEBUG: expected a string, got a mapping",
    ),
    (
        "relative workdir",
        {"app.yaml": SERVICE + "workdir: srv\n"},
        "app.yaml:4: workdir: expected an absolute path, got 'srv'",
    ),
    (
        "hostname with an underscore",
        {"app.yaml": SERVICE + "hostname: my_host\n"},
        "app.yaml:4: hostname: expected a hostname of letters, digits, '-' and '.', at most 64 long, got 'my_host'",
    ),
    (
        "unknown restart policy",
        {"app.yaml": SERVICE + "restart: sometimes\n"},
        "app.yaml:4: restart: expected one of: no, on-success, on-failure, on-abnormal, on-watchdog, on-abort, always, got 'sometimes'",
    ),
    (
        "boolean where a duration is expected",
        {"app.yaml": SERVICE + "stop_timeout: yes\n"},
        (
            "app.yaml:4: stop_timeout: expected a duration like '100ms', '1.5s', '2m' or a number of seconds, "
            "got a boolean (true)"
        ),
    ),
    (
        "negative duration",
        {"app.yaml": SERVICE + "restart_delay: -1s\n"},
        "app.yaml:4: restart_delay: expected a duration of zero or more, got '-1s'",
    ),
    (
        "unknown signal",
        {"app.yaml": SERVICE + "stop_signal: SIGFOO\n"},
        "app.yaml:4: stop_signal: expected a signal name like 'SIGTERM' or 'TERM', or a signal number, got 'SIGFOO'",
    ),
    (
        "missing mount source",
        {"app.yaml": SERVICE + "mounts:\n  - {source: nothere, target: /data}\n"},
        "app.yaml:5: mounts[0].source: mount source 'nothere' does not exist (looked for <folder>/nothere)",
    ),
    (
        "relative mount target",
        {"app.yaml": SERVICE + "mounts:\n  - source: /\n    target: /ok\n  - source: /\n    target: data\n"},
        "app.yaml:8: mounts[1].target: expected an absolute path, got 'data'",
    ),
    (
        "unknown key in a mount",
        {"app.yaml": SERVICE + "mounts:\n  - source: /\n    target: /host\n    read_only: true\n"},
        "app.yaml:7: mounts[0].read_only: unknown key 'read_only'; did you mean 'readonly'?",
    ),
    (
        "mounts given as a mapping",
        {"app.yaml": SERVICE + "mounts: {source: /, target: /host}\n"},
        "app.yaml:4: mounts: expected a list of mappings with source, target and readonly, got a mapping",
    ),
    (
        "host name instead of an IP address",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: tcp:localhost:80\n"},
        (
            "app.yaml:7: listen: expected an IP address like 127.0.0.1 or [::1], got 'localhost' "
            "(host names are not resolved)"
        ),
    ),
    (
        "port out of range",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: [unix:/run/a.sock, 127.0.0.1:65536]\n"},
        "app.yaml:7: listen[1]: expected a port from 0 to 65535, got '65536'",
    ),
    (
        "IPv6 address without brackets",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: tcp:::1:80\n"},
        (
            "app.yaml:7: listen: expected HOST:PORT with an IP address like tcp:127.0.0.1:80 or tcp:[::1]:80, "
            "got '::1:80'"
        ),
    ),
    (
        "unknown address family",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: sctp:127.0.0.1:80\n"},
        (
            "app.yaml:7: listen: unknown address family 'sctp'; "
            "expected tcp:, udp:, unix:, unix-dgram: or unix-seqpacket: or HOST:PORT for tcp"
        ),
    ),
    (
        "relative unix socket path",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: unix:run/app.sock\n"},
        "app.yaml:7: listen: expected an absolute path or @name after 'unix:', got 'run/app.sock'",
    ),
    (
        "unix socket path too long",
        {"app.yaml": SERVICE + f"---\nkind: socket\nservice: app\nlisten: unix:/{'x' * 107}\n"},
        "app.yaml:7: listen: expected a unix socket path shorter than 108 bytes, got 108 bytes",
    ),
    (
        "empty listen list",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: []\n"},
        "app.yaml:7: listen: expected at least one address",
    ),
    (
        "missing listen",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\n"},
        (
            "app.yaml:5: listen: missing key 'listen'; expected an address like 'unix:/run/app.sock' or "
            "'tcp:127.0.0.1:80', or a list"
        ),
    ),
    (
        "boolean where a backlog is expected",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: unix:/run/a.sock\nbacklog: on\n"},
        "app.yaml:8: backlog: expected a backlog from 1 to 65535, got a boolean (true)",
    ),
    (
        "mode written as an unquoted decimal",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: unix:/run/a.sock\nmode: 666\n"},
        (
            "app.yaml:8: mode: expected a file mode from 0 to 0777 like '0660' or 0o660, got 666 "
            "(a number without a leading 0 is decimal; write '0666')"
        ),
    ),
    (
        "fdname with a colon",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten: unix:/run/a.sock\nfdname: 'a:b'\n"},
        "app.yaml:8: fdname: expected an fd name of 1 to 255 printable ASCII characters without ':', got 'a:b'",
    ),
    (
        "socket for a service that does not exist",
        {"api.yaml": SERVICE.replace("app", "api"), "web.yaml": "kind: socket\nservice: apii\nlisten: unix:/run/a\n"},
        "web.yaml:2: service: no service 'apii' to pass this socket to; did you mean 'api'?",
    ),
    (
        "socket named after no service",
        {"api.yaml": SERVICE.replace("app", "api"), "web.yaml": "kind: socket\nlisten: unix:/run/a\n"},
        "web.yaml:1: service: no service 'web' to pass this socket to; services in this folder: api",
    ),
    (
        "duplicate service across files",
        {"a.yaml": SERVICE, "b.yaml": "# the same again\n" + SERVICE},
        "b.yaml:3: name: duplicate service 'app' (also defined at a.yaml:2)",
    ),
    (
        "two sockets on one address",
        {
            "app.yaml": SERVICE,
            "a.yaml": "kind: socket\nservice: app\nlisten: unix:/run/x.sock\n",
            "b.yaml": "kind: socket\nservice: app\nlisten: ['unix:/run//x.sock']\n",
        },
        "b.yaml:3: listen[0]: unix:/run/x.sock is already used by socket 'a' (a.yaml:3)",
    ),
    (
        "wildcard address overlapping a specific one",
        {
            "app.yaml": SERVICE,
            "a.yaml": "kind: socket\nservice: app\nlisten: 127.0.0.1:80\n",
            "b.yaml": "kind: socket\nservice: app\nlisten: tcp:0.0.0.0:80\n",
        },
        "b.yaml:3: listen: tcp:0.0.0.0:80 overlaps tcp:127.0.0.1:80 of socket 'a' (a.yaml:3)",
    ),
    (
        "one address listed twice in a socket",
        {"app.yaml": SERVICE + "---\nkind: socket\nservice: app\nlisten:\n  - udp:[::1]:53\n  - udp:[0::1]:53\n"},
        "app.yaml:9: listen[1]: udp:[::1]:53 is already used by listen[0] of this socket (app.yaml:8)",
    ),
    (
        "uses naming a missing socket",
        {"app.yaml": SERVICE + "uses: [db]\n"},
        "app.yaml:4: uses[0]: no socket 'db' to use; this folder has no sockets",
    ),
    (
        "uses of a tcp socket",
        {"app.yaml": SERVICE + "uses: db\n", "db.yaml": "kind: socket\nservice: app\nlisten: 127.0.0.1:5432\n"},
        (
            "app.yaml:4: uses: socket 'db' listens on tcp:127.0.0.1:5432, but it is bound in the host's network "
            "namespace, which 'app' does not share; bind it in its service's namespace (netns: service) on a network "
            "both are attached to, or use a unix socket"
        ),
    ),
    (
        "uses of an abstract socket",
        {"app.yaml": SERVICE + "uses: [db]\n", "db.yaml": "kind: socket\nservice: app\nlisten: unix:@db\n"},
        "app.yaml:4: uses[0]: socket 'db' listens on unix:@db, but abstract sockets belong to one network namespace (the host's); use a path",
    ),
    (
        "unknown kind",
        {"app.yaml": SERVICE + "---\nkind: timer\n"},
        "app.yaml:5: kind: unknown kind 'timer'; expected one of: service, socket, network, volume",
    ),
    (
        "kind that is not a string",
        {"app.yaml": "kind: [service]\ncommand: [app]\n"},
        "app.yaml:1: kind: unknown kind a list; expected one of: service, socket, network, volume",
    ),
    (
        "missing kind",
        {"app.yaml": "name: app\ncommand: [app]\n"},
        "app.yaml:1: kind: missing key 'kind'; expected one of: service, socket, network, volume",
    ),
    (
        "document that is not a mapping",
        {"app.yaml": "- kind: service\n"},
        "app.yaml:1: expected a unit, a mapping with 'kind: service', 'kind: socket', 'kind: network' or 'kind: volume', got a list",
    ),
    (
        "invalid YAML",
        {"app.yaml": "kind: service\ncommand: [app\n"},
        "app.yaml:3: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)",
    ),
    (
        "text that is not UTF-8",
        {},
        "app.yaml: expected UTF-8 text, got byte 0xff",
    ),
    (
        "missing name with two units of a kind in one file",
        {"app.yaml": SERVICE + "---\nkind: service\ncommand: [other]\n"},
        "app.yaml:5: name: missing key 'name'; expected a name, since app.yaml holds more than one service",
    ),
    (
        "name that cannot be a cgroup name",
        {"app.yaml": "kind: service\nname: Web\ncommand: [web]\n"},
        (
            "app.yaml:2: name: expected a name of 1 to 63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit "
            "(names become cgroup and file names), got 'Web'"
        ),
    ),
    (
        "file stem that cannot be a name",
        {"My App.yaml": "kind: service\ncommand: [web]\n"},
        "My App.yaml:1: name: missing key 'name'; expected a name, since the file name 'My App' is not a valid one",
    ),
    (
        "key given twice",
        {"app.yaml": SERVICE + "command: [again]\n"},
        "app.yaml:4: command: duplicate key 'command' (also at line 3)",
    ),
    (
        "tmpfs size of nothing",
        {"app.yaml": SERVICE + "tmpfs:\n  - /cache\n  - {path: /scratch, size: 0}\n"},
        "app.yaml:6: tmpfs[1].size: expected a size of at least 4K (one page), like 64M, got 0; a tmpfs of size 0 would have no cap at all",
    ),
    (
        "tmpfs size that is not a size",
        {"app.yaml": SERVICE + "tmpfs: [{path: /scratch, size: lots}]\n"},
        "app.yaml:4: tmpfs[0].size: expected a size like 256M, 1G or a number of bytes, got 'lots'",
    ),
    (
        "tmpfs entry without a path",
        {"app.yaml": SERVICE + "tmpfs:\n  - size: 1M\n"},
        "app.yaml:5: tmpfs[0].path: missing key 'path'; expected the absolute path to mount it on",
    ),
    (
        "tmpfs entry with an unknown key",
        {"app.yaml": SERVICE + "tmpfs: [{path: /scratch, sise: 1M}]\n"},
        "app.yaml:4: tmpfs[0].sise: unknown key 'sise'; did you mean 'size'?",
    ),
    (
        "tmpfs on /dev/shm",
        {"app.yaml": SERVICE + "tmpfs: [{path: /dev/shm, size: 1G}]\n"},
        "app.yaml:4: tmpfs[0]: /dev/shm is the sandbox's own tmpfs already; set its size with shm_size",
    ),
    (
        "tmpfs path given twice",
        {"app.yaml": SERVICE + "tmpfs:\n  - /tmp\n  - {path: /tmp/, size: 1G}\n"},
        "app.yaml:6: tmpfs[1]: /tmp is in tmpfs[0] already",
    ),
    (
        "shm_size below a page",
        {"app.yaml": SERVICE + "shm_size: 1k\n"},
        "app.yaml:4: shm_size: expected a size of at least 4K (one page), like 64M, got '1k'",
    ),
    (
        "tmpfs_size of the wrong type",
        {"app.yaml": SERVICE + "tmpfs_size: [64M]\n"},
        "app.yaml:4: tmpfs_size: expected a size like 256M, 1G or a number of bytes, got a list",
    ),
]


@pytest.mark.parametrize(("files", "expected"), [case[1:] for case in BAD_SPECS], ids=[case[0] for case in BAD_SPECS])
def test_bad_spec_is_reported_with_file_line_key_and_message(tmp_path: Path, write_specs: WriteSpecs, problems: Problems, files: dict[str, str], expected: str) -> None:
    folder = write_specs(tmp_path / "stack", files)
    if not files:
        (folder / "app.yaml").write_bytes(b"kind: service\ncommand: [\xff]\n")
    assert problems(folder) == [expected]


def test_unknown_key_is_reported_with_nearest_match(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path, {"app.yaml": "kind: service\ncomand: [app]\n"})
    assert problems(folder) == [
        "app.yaml:1: command: missing key 'command'; expected the program to run, as a list of strings or a string",
        "app.yaml:2: comand: unknown key 'comand'; did you mean 'command'?",
    ]


def test_all_problems_of_all_files_are_reported_at_once(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(
        tmp_path,
        {
            "api.yaml": """\
                kind: service
                command: api
                workdir: relative
                stop_timeout: 5 parsecs
                mounts:
                  - {source: /, target: /ok}
                  - {source: missing, target: also/relative}
                """,
            "web.yaml": """\
                kind: socket
                service: api
                listen: [unix:/run/web.sock, tcp:localhost:80]
                backlog: 0
                """,
        },
    )
    assert problems(folder) == [
        "api.yaml:3: workdir: expected an absolute path, got 'relative'",
        (
            "api.yaml:4: stop_timeout: expected a duration like '100ms', '1.5s', '2m' or a number of seconds, "
            "got '5 parsecs'"
        ),
        "api.yaml:7: mounts[1].source: mount source 'missing' does not exist (looked for <folder>/missing)",
        "api.yaml:7: mounts[1].target: expected an absolute path, got 'also/relative'",
        (
            "web.yaml:3: listen[1]: expected an IP address like 127.0.0.1 or [::1], got 'localhost' "
            "(host names are not resolved)"
        ),
        "web.yaml:4: backlog: expected a backlog from 1 to 65535, got 0",
    ]


def test_unit_with_problems_still_counts_as_defined_for_other_checks(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(
        tmp_path,
        {
            "api.yaml": "kind: service\ncommand: [api]\nrestart: never\n",
            "api-socket.yaml": "kind: socket\nservice: api\nlisten: unix:/run/api.sock\n",
        },
    )
    assert problems(folder) == ["api.yaml:3: restart: expected one of: no, on-success, on-failure, on-abnormal, on-watchdog, on-abort, always, got 'never'"]


def test_unreadable_file_is_reported_on_line_zero(tmp_path: Path, write_specs: WriteSpecs, problems: Problems, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_specs(tmp_path, {"app.yaml": SERVICE, "secret.yaml": SERVICE})
    read_text = Path.read_text

    def refuse_secret(path: Path, *args: object, **kwargs: object) -> str:
        if path.name == "secret.yaml":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", refuse_secret)
    assert problems(folder) == ["secret.yaml: cannot read the file: Permission denied"]


def test_missing_folder_is_reported(tmp_path: Path, problems: Problems) -> None:
    assert problems(tmp_path / "nope") == ["<folder>: spec folder does not exist"]


def test_folder_without_spec_files_is_reported(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(tmp_path, {"README.md": "# not a spec\n", ".hidden.yaml": SERVICE})
    (folder / "sub.yaml").mkdir()
    assert problems(folder) == ["<folder>: no spec files (*.yaml, *.yml) in this folder"]


# --- good specs


def test_defaults_are_filled_in_and_name_defaults_to_the_file_stem(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(
        tmp_path / "shop",
        {
            "api.yml": "kind: service\ncommand: [api]\n",
            "api-sock.yaml": "kind: socket\nservice: api\nlisten: unix:/run/api.sock\n",
        },
    )
    stack = load_stack(folder)
    assert (stack.folder, stack.name) == (folder.resolve(), "shop")
    assert stack.services == (
        Service(
            name="api",
            file=folder.resolve() / "api.yml",
            line=1,
            command=("api",),
            environment=(),
            workdir="",
            hostname="api",
            restart="on-failure",
            restart_delay=0.1,
            restart_steps=0,
            restart_max_delay=5.0,
            start_limit=StartLimit(5, 10.0),
            stop_signal=signal.SIGTERM,
            reload_signal=signal.SIGHUP,
            reload=(),
            stop_timeout=10.0,
            mounts=(),
            uses=(),
            network="private",
            ready="started",
            notify_access="main",
            start_timeout=90.0,
            watchdog=0.0,
            start="eager",
            idle_stop=0.0,
            after=(),
            fdstore_max=0,
            capabilities=(),
            no_new_privs=True,
            limits=Limits(),
            limits_optional=False,
            seccomp="default",
            userns=True,
            readonly_root=True,
            user="",
            group="",
            tmpfs=(),
            tmpfs_size=64 << 20,
            shm_size=None,
            image="host",
        ),
    )
    assert stack.sockets == (
        Socket(
            name="api-sock",
            file=folder.resolve() / "api-sock.yaml",
            line=1,
            service="api",
            listen=(Address("unix", None, None, "/run/api.sock"),),
            fdname="api-sock",
            backlog=socket.SOMAXCONN,
            mode=0o666,
            reuseport=False,
            netns="host",
            accept=False,
            max_connections=64,
            proxy=None,
            handoff=None,
        ),
    )


def test_every_key_is_read(tmp_path: Path, write_specs: WriteSpecs) -> None:
    (tmp_path / "data").mkdir()
    folder = write_specs(
        tmp_path,
        {
            "web.yaml": """\
                kind: service
                name: web
                command: web-server --root '/srv/my site' -v
                environment: {ZED: last, ALPHA: 1.10, PORT: 8080, EMPTY: ""}
                workdir: /srv//www/
                hostname: web.example
                restart: no
                restart_delay: 250ms
                stop_signal: int
                stop_timeout: 1m
                mounts:
                  - source: data
                    target: /srv/data/
                    readonly: false
                  - {source: /etc/hostname, target: /etc/hostname}
                uses: [db]
                ---
                kind: socket
                name: db
                service: web
                listen: [unix:/run/db.sock]
                fdname: database
                backlog: 16
                mode: "0600"
                reuseport: true
                """
        },
    )
    stack = load_stack(folder)
    web = stack.service("web")
    assert web.command == ("web-server", "--root", "/srv/my site", "-v")
    assert web.environment == (("ZED", "last"), ("ALPHA", "1.10"), ("PORT", "8080"), ("EMPTY", ""))
    assert (web.workdir, web.hostname, web.restart, web.restart_delay) == ("/srv/www", "web.example", "no", 0.25)
    assert (web.stop_signal, web.stop_timeout, web.uses) == (signal.SIGINT, 60.0, ("db",))
    assert web.mounts == (
        Mount(source=folder.resolve() / "data", target="/srv/data", readonly=False, line=12, given="data"),
        Mount(source=Path("/etc/hostname"), target="/etc/hostname", readonly=True, line=15, given="/etc/hostname"),
    )
    (db,) = stack.sockets
    assert (db.line, db.fdname, db.backlog, db.mode, db.reuseport) == (18, "database", 16, 0o600, True)


def test_tmpfs_entries_and_their_sizes_are_read(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(
        tmp_path,
        {
            "app.yaml": SERVICE
            + "tmpfs_size: 16M\nshm_size: 1G\ntmpfs:\n  - /cache\n  - {path: /scratch/, size: 1.5G}\n  - {path: /tmp, size: 512k}\n"
        },
    )
    app = load_stack(folder).service("app")
    assert app.tmpfs == (Tmpfs("/cache", None, 7), Tmpfs("/scratch", 3 << 29, 8), Tmpfs("/tmp", 512 << 10, 9))
    assert (app.tmpfs_size, app.shm_size) == (16 << 20, 1 << 30)


def test_one_tmpfs_path_may_stand_alone(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(tmp_path, {"app.yaml": SERVICE + "tmpfs: /cache\n"})
    assert load_stack(folder).service("app").tmpfs == (Tmpfs("/cache", None, 4),)


def test_default_process_limit_applies_unless_pids_is_given() -> None:
    assert Limits().with_defaults() == Limits(pids=DEFAULT_PIDS)
    assert Limits(memory=1 << 30).with_defaults() == Limits(memory=1 << 30, pids=DEFAULT_PIDS)
    assert Limits(pids=10_000).with_defaults() == Limits(pids=10_000)
    assert DEFAULT_PIDS == 2048


def test_several_documents_per_file_are_read_and_empty_ones_skipped(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(
        tmp_path,
        {
            "all.yaml": """\
                ---
                ---
                kind: service
                name: b
                command: [b]
                ---
                kind: service
                name: a
                command: [a]
                ---
                kind: socket
                listen: unix:/run/a.sock
                service: a
                ---
                """
        },
    )
    stack = load_stack(folder)
    assert [(s.name, s.line) for s in stack.services] == [("a", 7), ("b", 3)]
    assert [(s.name, s.service) for s in stack.sockets] == [("all", "a")]


def test_sockets_of_a_service_are_ordered_by_socket_name(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(
        tmp_path,
        {
            "a.yaml": SERVICE + "---\nkind: socket\nname: zeta\nservice: app\nlisten: unix:/run/z\n",
            "b.yaml": (
                "kind: socket\nname: alpha\nservice: app\nlisten: unix:/run/a\n"
                "---\nkind: socket\nname: mid\nservice: app\nlisten: unix:/run/m\n"
            ),
            "c.yaml": "kind: service\ncommand: [c]\n",
        },
    )
    stack = load_stack(folder)
    assert [s.name for s in stack.sockets_of("app")] == ["alpha", "mid", "zeta"]
    assert stack.sockets_of("c") == ()


def test_unknown_service_lookup_raises_key_error(tmp_path: Path, write_specs: WriteSpecs) -> None:
    stack = load_stack(write_specs(tmp_path, {"app.yaml": SERVICE}))
    with pytest.raises(KeyError):
        stack.service("nope")


def test_a_stack_finds_its_units_and_the_sockets_bound_inside_a_service_by_name(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(
        tmp_path,
        {
            "a.yaml": SERVICE + "---\nkind: socket\nname: web\nservice: app\nlisten: tcp:127.0.0.1:0\nnetns: service\n",
            "c.yaml": "kind: service\ncommand: [c]\n---\nkind: socket\nname: cs\nservice: c\nlisten: unix:/run/c\n",
        },
    )
    stack = load_stack(folder)
    assert stack.service("c") is stack.services[1] and stack.socket("web").service == "app"
    assert stack.binds_inside("app") and not stack.binds_inside("c")
    with pytest.raises(KeyError):
        stack.socket("nope")


def test_yaml_is_read_into_the_same_nodes_by_either_parser(tmp_path: Path) -> None:
    import yaml

    from sandboxd.spec.load import _compose  # the module's own choice of parser, tested here

    text = "kind: service\ncommand: [a, 'b c', \"d\"]\nenv: {A: 1, B: ~, C: 0x10}\n---\n---\nkind: socket\nlisten: &x unix:/run/x\nname: *x\n"

    def shape(node: yaml.Node) -> object:
        inner = [shape(n) for n in node.value] if isinstance(node, yaml.SequenceNode) else [(shape(k), shape(v)) for k, v in node.value] if isinstance(node, yaml.MappingNode) else node.value
        return (type(node).__name__, node.tag, node.start_mark.line, node.start_mark.column, inner)

    assert [shape(n) for n in _compose(text)] == [shape(n) for n in yaml.compose_all(text, Loader=yaml.SafeLoader)]


def test_addresses_that_cannot_clash_are_accepted(tmp_path: Path, write_specs: WriteSpecs) -> None:
    folder = write_specs(
        tmp_path,
        {
            "app.yaml": SERVICE,
            "a.yaml": "kind: socket\nservice: app\nlisten: [tcp:127.0.0.1:0, udp:0.0.0.0:80, 'tcp:[::]:80']\n",
            "b.yaml": "kind: socket\nservice: app\nlisten: [tcp:127.0.0.1:0, tcp:127.0.0.1:80, udp:127.0.0.2:81]\n",
        },
    )
    assert len(load_stack(folder).sockets) == 2


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("tcp:127.0.0.1:8080", "tcp:127.0.0.1:8080"),
        ("127.0.0.1:80", "tcp:127.0.0.1:80"),
        ("[::1]:80", "tcp:[::1]:80"),
        ("tcp:[0:0::1]:0", "tcp:[::1]:0"),
        ("udp:0.0.0.0:53", "udp:0.0.0.0:53"),
        ("udp:[::]:53", "udp:[::]:53"),
        ("tcp:127.0.0.1:080", "tcp:127.0.0.1:80"),
        ("unix:/run/a.sock", "unix:/run/a.sock"),
        ("unix:/run/../run//a.sock", "unix:/run/a.sock"),
        ("unix:@abstract", "unix:@abstract"),
        ("unix-dgram:/run/log", "unix-dgram:/run/log"),
        ("unix-seqpacket:@seq", "unix-seqpacket:@seq"),
    ],
)
def test_address_has_a_canonical_form(text: str, canonical: str) -> None:
    address = parse_address(text)
    assert str(address) == canonical
    assert parse_address(canonical) == address


def test_address_parts_and_socket_types() -> None:
    assert parse_address("[::1]:80") == Address("tcp", "::1", 80, None)
    assert parse_address("unix:@x") == Address("unix", None, None, "@x")
    cases = {"tcp:1.2.3.4:1": (True, False, socket.SOCK_STREAM), "udp:1.2.3.4:1": (True, False, socket.SOCK_DGRAM)}
    cases |= {"unix:@x": (False, True, socket.SOCK_STREAM), "unix-dgram:/x": (False, False, socket.SOCK_DGRAM)}
    cases |= {"unix-seqpacket:/x": (False, False, socket.SOCK_SEQPACKET)}
    for text, (is_inet, is_abstract, socktype) in cases.items():
        address = parse_address(text)
        assert (address.is_inet, address.is_abstract, address.socktype) == (is_inet, is_abstract, socktype), text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "localhost:80",
            "expected an IP address like 127.0.0.1 or [::1], got 'localhost' (host names are not resolved)",
        ),
        ("tcp:[127.0.0.1]:80", "brackets are for IPv6 addresses only; write tcp:127.0.0.1:80"),
        ("tcp:80", "expected HOST:PORT with an IP address like tcp:127.0.0.1:80 or tcp:[::1]:80, got '80'"),
        ("udp::53", "expected HOST:PORT with an IP address like udp:127.0.0.1:80 or udp:[::1]:80, got ':53'"),
        ("tcp:1.2.3.4:http", "expected a port from 0 to 65535, got 'http'"),
        ("unix:", "expected an absolute path or @name after 'unix:', got ''"),
        ("unix-dgram:@", "expected an absolute path or @name after 'unix-dgram:', got '@'"),
        ("unix:@" + "a" * 107, "expected a unix socket path shorter than 108 bytes, got 108 bytes"),
    ],
)
def test_bad_address_says_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_address(text)
    assert str(raised.value) == message


def test_longest_unix_path_fits_in_sun_path() -> None:
    assert parse_address("unix:/" + "a" * 106).path == "/" + "a" * 106


@pytest.mark.parametrize(
    ("yaml_text", "mode"), [('"0666"', 0o666), ('"666"', 0o666), ('"0o640"', 0o640), ("0640", 0o640), ("438", 0o666)]
)
def test_mode_is_read_as_octal_text_or_as_a_number(tmp_path: Path, write_specs: WriteSpecs, yaml_text: str, mode: int) -> None:
    folder = write_specs(
        tmp_path, {"app.yaml": SERVICE + f"---\nkind: socket\nlisten: unix:/a\nservice: app\nmode: {yaml_text}\n"}
    )
    assert load_stack(folder).sockets[0].mode == mode


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("100ms", 0.1),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("250us", 0.00025),
        ("3", 3.0),
        (2, 2.0),
        (0.5, 0.5),
        ("0", 0.0),
    ],
)
def test_durations_are_read_in_seconds(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [-1, "-5ms", True, None, "5 days", "1e3", float("inf"), [1]])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", ["SIGHUP", "HUP", "sighup", "hup", "1"])
def test_stop_signal_is_read_by_name_or_number(tmp_path: Path, write_specs: WriteSpecs, value: str) -> None:
    folder = write_specs(tmp_path, {"app.yaml": SERVICE + f"stop_signal: {value}\n"})
    assert load_stack(folder).service("app").stop_signal == signal.SIGHUP


def test_dependency_cycle_is_named(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(
        tmp_path / "stack",
        {
            "a.yaml": "kind: service\ncommand: [x]\nafter: [b]\n",
            "b.yaml": "kind: service\ncommand: [x]\nafter: [{service: c, condition: ready}]\n",
            "c.yaml": "kind: service\ncommand: [x]\nafter: a\n",
        },
    )
    assert problems(folder) == ["a.yaml:3: after: dependency cycle: a -> b -> c -> a; use sockets instead, which need no order"]


def test_dependency_on_a_missing_service_is_reported(tmp_path: Path, write_specs: WriteSpecs, problems: Problems) -> None:
    folder = write_specs(
        tmp_path / "stack",
        {"a.yaml": "kind: service\nname: a\ncommand: [x]\nafter: [{service: dbb, condition: completed}]\n---\nkind: service\nname: db\ncommand: [x]\n"},
    )
    assert problems(folder) == ["a.yaml:4: after[0]: no service 'dbb' to wait for; did you mean 'db'?"]


def test_env_overrides_replace_and_add_variables_of_one_service(tmp_path: Path, write_specs: WriteSpecs) -> None:
    stack = load_stack(write_specs(tmp_path, {"app.yaml": SERVICE + "environment: {A: spec, B: spec}\n", "db.yaml": SERVICE.replace("app", "db")}))
    changed = with_environment(stack, ["app:B=cli", "app:C=x=y"])
    assert changed.service("app").environment == (("A", "spec"), ("B", "cli"), ("C", "x=y"))
    assert changed.service("db") == stack.service("db")


@pytest.mark.parametrize("override", ["app", "app:B", "app:=x", "nosuch:B=x"])
def test_a_malformed_env_override_is_a_spec_error_of_the_folder(tmp_path: Path, write_specs: WriteSpecs, override: str) -> None:
    stack = load_stack(write_specs(tmp_path, {"app.yaml": SERVICE}))
    with pytest.raises(SpecErrors) as raised:
        with_environment(stack, [override])
    assert [str(e) for e in raised.value.errors] == [f"{stack.folder}: --env: expected SERVICE:KEY=VALUE with a service of the stack, got {override!r}"]
