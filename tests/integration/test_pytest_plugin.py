"""The pytest plugin, used the way a project's own tests would use it."""

from __future__ import annotations

import socket
from pathlib import Path

from conftest import wait_until, write


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
