"""What the command line loads before it does its work: the quick verbs (ls, ps, down) import
neither the spec machinery nor the supervisor's, and `main` builds only the given verb's
sub-parser, the same one the whole tree has. Each run is a fresh interpreter (a subprocess), its
runtime root a temporary folder (SANDBOXD_RUNTIME_DIR); what it imported is read from
sys.modules once `main` returns. No timing: only what is loaded counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sandboxd.cli.parser import VERBS, build_parser

# Modules a quick verb never needs: YAML and the specs, the plans, cgroups, the supervisor, asyncio.
NOT_FOR_QUICK_VERBS = ("yaml", "asyncio", "sandboxd.spec", "sandboxd.plan", "sandboxd.host.cgroups", "sandboxd.daemon", "sandboxd.sandbox",
                       "sandboxd.store", "sandboxd.kernel", "ctypes")
# Command modules of other verbs, and what only they import.
OTHER_VERBS = ("sandboxd.cli.logs", "sandboxd.cli.stats", "sandboxd.cli.export", "sandboxd.cli.upgrade", "sandboxd.cli.store",
               "sandboxd.cli.run", "sandboxd.cli.times", "datetime", "secrets")

RUN_MAIN = """
import json, sys
from sandboxd.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --help
    code = e.code
print("\\nMODULES " + json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def _main(runtime: Path, *argv: str) -> tuple[int, str, set[str]]:
    """Run `sandboxd ARGV` in a fresh interpreter: its exit code, output and the modules it imported."""
    env = {**os.environ, "SANDBOXD_RUNTIME_DIR": str(runtime), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", RUN_MAIN, *argv], capture_output=True, text=True, env=env, timeout=60)
    out, _, modules = done.stdout.rpartition("\nMODULES ")
    return done.returncode, out + done.stderr, set(json.loads(modules))


def _loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_ls_and_ps_import_neither_the_specs_nor_the_supervisor(tmp_path: Path) -> None:
    code, out, modules = _main(tmp_path, "ls", "--json")
    assert (code, out.strip()) == (0, "[]")
    assert _loaded(modules, NOT_FOR_QUICK_VERBS + OTHER_VERBS) == []
    code, out, modules = _main(tmp_path, "ps", "--json")
    assert code == 1 and "no stack is running" in out
    assert _loaded(modules, NOT_FOR_QUICK_VERBS + OTHER_VERBS + ("sandboxd.cli.stack",)) == []


class _FakeStack:
    """A stack's runtime directory whose 'supervisor' is a sleep this test started: its control
    socket answers status and down, and a down ends the sleep, as a supervisor ends."""

    def __init__(self, runtime: Path, name: str) -> None:
        self.directory = runtime / name
        self.directory.mkdir(parents=True)
        self.supervisor = subprocess.Popen(["sleep", "1000"])
        (self.directory / "state.json").write_text(json.dumps({"pid": self.supervisor.pid, "stop_timeout": 1.0}))
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.directory / "control.sock"))
        self.server.listen()
        self.asked: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                request = json.loads(conn.makefile().readline())
                self.asked.append(request["cmd"])
                conn.sendall(b'{"ok": true}\n')
                if request["cmd"] == "down":
                    self.supervisor.terminate()

    def close(self) -> None:
        self.server.close()
        self.supervisor.kill()
        self.supervisor.wait()


def test_down_waits_for_the_supervisor_without_the_spec_machinery(tmp_path: Path) -> None:
    stack = _FakeStack(tmp_path, "web")
    try:
        code, out, modules = _main(tmp_path, "down", "-p", "web")
        assert code == 0, out
        assert "stack 'web' is down" in out
        assert stack.asked == ["down"]
        assert stack.supervisor.poll() is not None  # down returned once its supervisor had ended
        assert _loaded(modules, NOT_FOR_QUICK_VERBS + OTHER_VERBS) == []
    finally:
        stack.close()


@pytest.mark.parametrize("verb", VERBS)
def test_a_verb_alone_parses_as_in_the_whole_tree(verb: str) -> None:
    def sub_parser(parser: object) -> str:
        choices = parser._subparsers._group_actions[0].choices  # type: ignore[attr-defined]
        return str(choices[verb].format_help())

    alone = build_parser(verb)
    assert list(alone._subparsers._group_actions[0].choices) == [verb]  # type: ignore[union-attr]
    assert sub_parser(alone) == sub_parser(build_parser())


def test_the_whole_tree_has_every_verb_in_order() -> None:
    assert tuple(build_parser()._subparsers._group_actions[0].choices) == VERBS  # type: ignore[union-attr]


def test_a_verb_imports_its_own_command_module_only(tmp_path: Path) -> None:
    code, out, modules = _main(tmp_path, "up", "--help")
    assert code == 0 and "usage: sandboxd up" in out
    assert _loaded(modules, OTHER_VERBS + ("sandboxd.cli.services",)) == []
