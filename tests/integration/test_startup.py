"""What `sandboxd up DIR` has imported when it sends its first launch request to the fork
server: none of what only an upgrade, the summary, a spec's mistake, another verb or an image
needs. The stack runs for real; a few lines run before the CLI (`python -c`) wrap the fork
server handle's send_launch to write down sys.modules at its first call, and change nothing else.
No timing: only what is loaded counts (scripts/bench --only startup measures the time)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import HANG, wait_until, write

# Never imported before the first launch of a stack of host-root services.
NOT_BEFORE_FIRST_LAUNCH = (
    "pickle", "statistics", "difflib", "ctypes.util", "platform", "secrets", "glob", "tempfile",
    "sandboxd.daemon.record", "sandboxd.daemon.capture", "sandboxd.daemon.resume", "sandboxd.daemon.reload", "sandboxd.daemon.reload_networks", "sandboxd.store.pull", "sandboxd.store.oci",
    "sandboxd.export", "sandboxd.cli.logs", "sandboxd.cli.stats", "sandboxd.cli.export", "sandboxd.cli.upgrade", "sandboxd.cli.store",
    "sandboxd.cli.run", "sandboxd.cli.times", "sandboxd.cli.services",
)  # fmt: skip

RECORD_FIRST_LAUNCH = """
import json, os, sys
from sandboxd.sandbox.handle import ForkServer
send_launch = ForkServer.send_launch
def first_launch(self, *args, **kwargs):
    if not os.path.exists(os.environ["SBD_TEST_MODULES"]):
        with open(os.environ["SBD_TEST_MODULES"] + ".tmp", "w") as f:
            json.dump(sorted(sys.modules), f)
        os.rename(os.environ["SBD_TEST_MODULES"] + ".tmp", os.environ["SBD_TEST_MODULES"])
    return send_launch(self, *args, **kwargs)
ForkServer.send_launch = first_launch
from sandboxd.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_up_sends_its_first_launch_before_importing_what_it_does_not_need(spec_dir: Path, socket_dir: Path, tmp_path: Path) -> None:
    for name in ("web", "worker"):
        write(spec_dir, f"{name}.yaml", f"kind: service\ncommand: sleep 1000\n---\nkind: socket\nlisten: unix:{socket_dir}/{name}.sock\n")
    record = tmp_path / "modules.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORD_FIRST_LAUNCH, "up", str(spec_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SBD_TEST_MODULES": str(record), "NO_COLOR": "1"},
    )
    try:
        wait_until(lambda: record.exists() or proc.poll() is not None, "the first launch request")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        modules = set(json.loads(record.read_text()))
        assert "sandboxd.daemon.supervisor" in modules  # the hook saw the supervisor's first launch
        assert _loaded(modules, NOT_BEFORE_FIRST_LAUNCH) == []
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err.decode()
