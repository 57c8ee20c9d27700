"""The bash and zsh completion and the man page generated from the parser (cli/completion.py):
valid scripts that complete the verbs, options and a running stack's services, and a page that
man renders. They need the `shell` extra (shtab, argparse-manpage), which scripts/test installs:
in CI a missing one fails the test, elsewhere it skips."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sandboxd.cli.parser import build_parser


def _need(module: str) -> None:
    if os.environ.get("CI"):
        __import__(module)
    else:
        pytest.importorskip(module)


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        assert not os.environ.get("CI"), f"{name} is missing (scripts/test installs it)"
        pytest.skip(f"no {name} here")
    return found


VERBS = [verb for verb in build_parser()._subparsers._group_actions[0].choices]  # type: ignore[union-attr]


def _complete(script: Path, words: list[str], path: str = os.environ.get("PATH", "")) -> list[str]:
    """What bash offers for the last of `words`, with the generated script sourced."""
    line = " ".join(f"'{w}'" for w in words)
    program = f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _shtab_sandboxd; printf "%s\\n" "${{COMPREPLY[@]}}"'
    result = subprocess.run([_program("bash"), "-c", program], capture_output=True, text=True, env={**os.environ, "PATH": path}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.fixture
def bash_script(tmp_path: Path) -> Path:
    _need("shtab")
    from sandboxd.cli.completion import bash_completion

    path = tmp_path / "sandboxd"
    path.write_text(bash_completion())
    return path


def test_the_bash_completion_is_valid_bash_and_names_every_verb(bash_script: Path) -> None:
    subprocess.run([_program("bash"), "-n", str(bash_script)], check=True, timeout=60)
    text = bash_script.read_text()
    assert VERBS and all(verb in text for verb in VERBS)


def test_bash_completes_verbs_options_and_folders(bash_script: Path, tmp_path: Path) -> None:
    assert _complete(bash_script, ["sandboxd", "lo"]) == ["logs"]
    assert "--since" in _complete(bash_script, ["sandboxd", "logs", "--s"])
    (tmp_path / "mystack").mkdir()
    assert str(tmp_path / "mystack") in _complete(bash_script, ["sandboxd", "up", str(tmp_path / "mys")])


def test_bash_completes_services_from_ps_services(bash_script: Path, tmp_path: Path) -> None:
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "sandboxd").write_text('#!/bin/sh\n[ "$*" = "ps --services" ] && printf "web\\nworker\\ndb\\n"\n')
    (stub / "sandboxd").chmod(0o755)
    offered = _complete(bash_script, ["sandboxd", "restart", "w"], f"{stub}:{os.environ.get('PATH', '')}")
    assert sorted(offered) == ["web", "worker"]


def test_the_zsh_completion_is_valid_zsh(tmp_path: Path) -> None:
    _need("shtab")
    from sandboxd.cli.completion import zsh_completion

    path = tmp_path / "_sandboxd"
    path.write_text(zsh_completion())
    subprocess.run([_program("zsh"), "-n", str(path)], check=True, timeout=60)
    assert path.read_text().startswith("#compdef sandboxd") and all(verb in path.read_text() for verb in VERBS)


def test_the_man_page_renders_every_verb_and_option(tmp_path: Path) -> None:
    _need("argparse_manpage")
    from sandboxd.cli.completion import man_page

    path = tmp_path / "sandboxd.1"
    path.write_text(man_page())
    rendered = subprocess.run(  # -k: through preconv, as man runs it (the help texts have "…")
        [_program("groff"), "-k", "-man", "-Tutf8", "-ww", str(path)], capture_output=True, text=True, check=True, timeout=60
    )
    assert rendered.stderr == ""  # no warning
    text = re.sub(".\b", "", rendered.stdout)  # grotty's bold and underline, by overstriking
    for needle in ("SANDBOXD(1)", "sandboxd logs", "--since WHEN", "--timestamps", "sandboxd stats", "--json"):
        assert needle in text, needle


def test_the_install_script_writes_the_three_files(tmp_path: Path) -> None:
    _need("shtab")
    _need("argparse_manpage")
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "BASH_COMPLETION_DIR": str(tmp_path / "bash"), "ZSH_COMPLETION_DIR": str(tmp_path / "zsh"),
           "MAN_DIR": str(tmp_path / "man" / "man1"), "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([str(root / "scripts" / "install-shell-files"), sys.executable], check=True, env=env, capture_output=True, timeout=120)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"bash/sandboxd", "zsh/_sandboxd", "man/man1/sandboxd.1"} <= written  # and mandb's index, where mandb is
