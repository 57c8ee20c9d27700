"""The control socket's types (sandboxd/wire.py): the CLI refuses an answer that is not what its
request is answered with, saying which key is wrong, where it decodes it."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from sandboxd.cli.client import ask
from sandboxd.errors import SandboxdError
from sandboxd.wire import ExecInfoAnswer, StatusAnswer, conforms

SERVICE = {
    "name": "web", "state": "ready", "pid": 42, "uptime": 1.5, "restarts": 0, "ready": True, "status_text": "",
    "sockets": [{"socket": "web", "address": "tcp:127.0.0.1:8080", "fdname": "web", "netns": "host"}],
    "memory": 1 << 20, "cpu_seconds": 0.25, "processes": 1, "instances": 0, "reason": "",
}
STATUS = {"ok": True, "stack": "st", "folder": "/srv/st", "pid": 7, "started": 1.0, "userns": {}, "services": [SERVICE]}


def answered(answer: object) -> object:
    """What `ask` makes of a status request the other end answers with `answer`."""
    ours, theirs = socket.socketpair()

    def serve() -> None:
        theirs.recv(65536)
        theirs.sendall(json.dumps(answer).encode() + b"\n")

    server = threading.Thread(target=serve)
    server.start()
    try:
        return ask(ours, {"cmd": "status"})
    finally:
        server.join()
        ours.close()
        theirs.close()


def test_a_status_answer_of_the_right_shape_is_returned_as_it_came() -> None:
    assert answered(STATUS) == STATUS
    assert conforms({**STATUS, "userns": {"uid": 100000, "count": 65536}, "started": 3}, StatusAnswer) == ""


def test_a_status_answer_with_a_wrong_value_is_refused_naming_the_key() -> None:
    wrong = {**STATUS, "services": [{**SERVICE, "memory": "1M"}]}
    with pytest.raises(SandboxdError, match=r"answer.services\[0\].memory: expected int, got '1M'"):
        answered(wrong)


def test_a_refusal_is_raised_with_its_error() -> None:
    with pytest.raises(SandboxdError, match="no service 'db'"):
        answered({"ok": False, "error": "no service 'db' in stack 'st'"})


def test_an_exec_info_answer_without_a_key_is_refused() -> None:
    assert conforms({"ok": True, "init_pid": 1}, ExecInfoAnswer).startswith("answer: no capabilities, cgroup")
