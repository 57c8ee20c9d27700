"""The set-up interpreter (sandboxd/sandbox/setup/sbd-setup): what a failing step reports, and what
sandboxd says without it. The texts are those the Python set-up reported before it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write

REPO = Path(__file__).parents[2]


def image_with(spec_dir: Path, make: str) -> None:
    """A service on a root file system folder (./rootfs) with busybox, after `make` ran in it."""
    rootfs = spec_dir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
    subprocess.run(make, shell=True, cwd=rootfs, check=True)
    write(spec_dir, "box.yaml", 'kind: service\nimage: ./rootfs\ncommand: [/bin/busybox, "true"]\nrestart: "no"\n')


@pytest.mark.parametrize(
    ("make", "said"),
    [
        # An errno of the kernel's, with the path the failing call named.
        ("touch proc", "could not start: mount image-root on /: File exists (/run/sandboxd/stack/root/proc)"),
        # A refusal of the program's own (a guard), with the path inside the sandbox.
        ("ln -s / run", "could not start: mount image-root on /: is a symlink in the image; sandboxd mounts a directory there (/run)"),
    ],
)
def test_the_interpreter_reports_the_failing_step_and_its_path(run_stack, spec_dir: Path, make: str, said: str) -> None:
    image_with(spec_dir, make)
    stack = run_stack(spec_dir)
    assert stack.wait_exit() != 0
    assert said in stack.err
    assert "Traceback" not in stack.err


def test_without_the_interpreter_sandboxd_says_to_run_scripts_install(spec_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "sandboxd", copy / "sandboxd", ignore=shutil.ignore_patterns("sbd-setup", "__pycache__"))
    write(spec_dir, "box.yaml", "kind: service\ncommand: [/bin/true]\n")
    done = subprocess.run(
        [sys.executable, "-m", "sandboxd", "up", str(spec_dir)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(copy), "NO_COLOR": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "set-up interpreter" in done.stderr and "scripts/install" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
