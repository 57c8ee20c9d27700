"""The pytest plugin, used the way a project's own tests would use it."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from conftest import wait_until, write

from sandboxd.errors import SandboxdError


def test_fixture_brings_a_stack_up_with_overrides_and_real_addresses(sandboxd_stack, spec_dir: Path) -> None:
    write(
        spec_dir,
        "api.py",
        "import os, socket\ns = socket.socket(fileno=3)\nprint('up', flush=True)\nwhile True:\n    c, _ = s.accept()\n    c.sendall(os.environ['GREETING'].encode() + b'\\n')\n    c.close()\n",
    )
    write(
        spec_dir,
        "api.yaml",
        "kind: service\ncommand: [python3, /t/api.py]\nenvironment: {GREETING: default}\nmounts: [{source: ., target: /t}]\n---\nkind: socket\nlisten: tcp:127.0.0.1:0\n",
    )
    first = sandboxd_stack(spec_dir, environment={"api": {"GREETING": "first"}})
    second = sandboxd_stack(spec_dir)  # the same folder, side by side, another name and port
    answers = []
    for stack in (first, second):
        stack.wait_ready()
        host, port = stack.address("api")
        with socket.create_connection((host, port), timeout=10) as c:
            answers.append(c.makefile().readline().strip())
    assert answers == ["first", "default"]
    assert first.address("api") != second.address("api")
    first.restart("api")
    first.wait_ready()  # restart returns once the new sandbox is launched, not once it runs
    # Its "up" reaches the log a moment after it is printed: wait for it, then count exactly.
    wait_until(lambda: first.logs("api").splitlines().count("up") >= 2, "the restarted api's 'up' in its log")
    assert first.logs("api").splitlines().count("up") == 2
    inside = first.exec("api", ["hostname"])
    assert (inside.returncode, inside.stdout.strip()) == (0, "api")


HTTP_SERVER = """
import http.server, socket
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"fine")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("", 0), Handler, bind_and_activate=False)
server.socket = socket.socket(fileno=3)
print("serving http on fd 3", flush=True)
server.serve_forever()
"""


def test_wait_strategies_see_a_log_line_and_an_http_answer(sandboxd_stack, spec_dir: Path) -> None:
    write(spec_dir, "web.py", HTTP_SERVER)
    write(spec_dir, "web.yaml", "kind: service\ncommand: [python3, /t/web.py]\nmounts: [{source: ., target: /t}]\n---\nkind: socket\nlisten: tcp:127.0.0.1:0\n")
    stack = sandboxd_stack(spec_dir)
    assert stack.wait_for_log("web", r"serving http on fd \d") == "serving http on fd 3"
    assert stack.wait_for_http("web", "/health") == b"fine"
    assert stack.wait_for_http("web", "/elsewhere", status=404) == b"fine"
    with pytest.raises(SandboxdError) as refused:
        stack.wait_for_log("web", "never printed", timeout=0.2)
    message = str(refused.value)
    assert "timed out after 0.2 s waiting for a line of web matching 'never printed'" in message
    assert "--- last lines of web ---\nserving http on fd 3" in message


def test_waiting_on_a_service_that_crashes_at_start_fails_at_once_with_its_output(sandboxd_stack, spec_dir: Path) -> None:
    """A service that exits at start is in backoff (restarting) or failed: bringing the stack up
    (`up -d --wait`), or else wait_ready, says so at once, with why and what it printed, instead
    of waiting its whole timeout."""
    write(spec_dir, "ok.yaml", "kind: service\ncommand: [sleep, '600']\n")
    write(spec_dir, "crash.yaml", "kind: service\nrestart: on-failure\ncommand: [sh, -c, 'echo config file missing >&2; exit 3']\n")
    with pytest.raises(SandboxdError) as failed:
        stack = sandboxd_stack(spec_dir)  # raises here if `up -d --wait` saw the crash
        stack.wait_ready(timeout=3600)
    message = str(failed.value)
    assert "timed out" not in message
    assert re.search(r"crash \((backoff|failed)\) while waiting for every service to be ready", message), message
    assert re.search(r"\ncrash: exited with code 3(; restarting in [0-9.]+ s|; gave up after .*)?\n", message), message
    assert "--- last lines of crash ---\nconfig file missing" in message
    assert message.index("--- last lines of crash ---") < message.index("--- last lines of ok ---")
