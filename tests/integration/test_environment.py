"""Environment as compose has it, seen from inside a service: env_file, .env, ${VAR}, a reload
that sees a changed .env, and an unset variable that stops `up` before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write

SERVICE = """
    kind: service
    name: box
    env_file: [box.env, {path: absent.env, required: false}]
    environment:
      FROM_SPEC: spec
      OVERRIDDEN: spec
      DEBUG: true
      PORT: 8000
      GREETING: ${GREETING}
      FROM_SHELL:
    command: [sh, -c, 'echo "$$FROM_FILE $$OVERRIDDEN $$FROM_SPEC $$DEBUG $$PORT $$GREETING $$FROM_SHELL ${TAG:-none} 5$$"; exec sleep 1000']
    """


def _sandboxd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=120)


def test_service_sees_env_files_environment_and_interpolated_values_and_a_changed_dotenv(
    run_stack, spec_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FROM_SHELL", "shell")
    monkeypatch.delenv("GREETING", raising=False)
    monkeypatch.delenv("TAG", raising=False)
    write(spec_dir, "box.yaml", SERVICE)
    write(spec_dir, "box.env", "FROM_FILE='from file'\nOVERRIDDEN=file\n")
    write(spec_dir, ".env", "GREETING=hello\n")
    stack = run_stack(spec_dir)
    assert stack.wait_lines("box", 1) == ["from file spec spec true 8000 hello shell none 5$"]
    write(spec_dir, ".env", "GREETING=again\nTAG=v2\n")
    reload = _sandboxd("up", "-d", str(spec_dir))
    assert reload.returncode == 0, reload.stderr
    assert "changed: box" in reload.stdout
    assert stack.wait_lines("box", 2)[1] == "from file spec spec true 8000 again shell v2 5$"


@pytest.mark.parametrize("detach", [True, False], ids=["up -d", "up"])
def test_unset_variable_stops_up_with_exit_2_and_nothing_started(spec_dir: Path, monkeypatch: pytest.MonkeyPatch, detach: bool) -> None:
    monkeypatch.delenv("GREETING", raising=False)
    write(spec_dir, "box.yaml", SERVICE)
    write(spec_dir, "box.env", "FROM_FILE=1\n")
    result = _sandboxd("up", *(["-d"] if detach else []), str(spec_dir))
    assert result.returncode == 2, result.stderr
    assert f"{spec_dir / 'box.yaml'}:9: environment.GREETING: variable GREETING is not set" in result.stderr
    assert _sandboxd("ls").stdout == ""
