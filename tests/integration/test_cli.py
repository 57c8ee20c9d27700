"""The command line as scripts use it, on real stacks: what every reporting verb prints with
--json, logs -t/--since/--until, start/stop/restart without names, and what a user who is not
root is told."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import wait_until, write

from sandboxd.wire import DownResult, LogLine, StackListing, StackStats, UpResult, VolumeListing, conforms


def sbd(*args: str, check: bool = True, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*(user or []), sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _two_services(folder: Path) -> None:
    """talker prints a line every time it is asked (by a restart) and sleeps; spinner uses CPU."""
    write(folder, "talker.yaml", 'kind: service\ncommand: [sh, -c, "echo talker says hello; echo talker again; exec sleep 1000"]\n')
    write(folder, "spinner.yaml", 'kind: service\ncommand: [python3, -c, "print(\'spinning\', flush=True)\\nwhile True: pass"]\n')


def _json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def _pids(stack: str) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in json.loads(sbd("ps", "--json", "-p", stack).stdout)["services"]}


def _all_running(stack: str) -> dict[str, int] | None:
    """Each service's pid, once every one is running (its state past 'starting')."""
    services = json.loads(sbd("ps", "--json", "-p", stack).stdout)["services"]
    return {s["name"]: s["pid"] for s in services} if all(s["state"] == "running" and s["pid"] for s in services) else None


def test_every_reporting_verb_prints_json(spec_dir: Path) -> None:
    _two_services(spec_dir)
    up = json.loads(sbd("up", "-d", "--json", "-p", "js", str(spec_dir)).stdout)
    try:
        assert conforms(up, UpResult) == ""
        assert up["stack"] == "js" and up["pid"] > 0 and sorted(up["started"]) == ["spinner", "talker"]
        assert conforms(json.loads(sbd("ls", "--json").stdout), list[StackListing]) == ""

        wait_until(lambda: "spinning" in sbd("logs", "-p", "js").stdout, "spinner's first line")
        lines = _json_lines(sbd("logs", "--json", "-p", "js").stdout)
        assert all(conforms(line, LogLine) == "" for line in lines)
        assert {"service": "talker", "text": "talker says hello"} in [{k: line[k] for k in ("service", "text")} for line in lines]

        stats = _json_lines(sbd("stats", "--once", "--json", "--interval", "0.2", "-p", "js").stdout)
        assert len(stats) == 1 and conforms(stats[0], StackStats) == ""
        by_name = {s["name"]: s for s in stats[0]["services"]}
        assert by_name["spinner"]["cpu_percent"] > 0  # it used CPU between the two samples
        for service in by_name.values():  # a private network: its own namespace, lo only, counted from 0
            assert service["net_rx_bytes"] == 0 and service["net_tx_bytes"] == 0
            assert isinstance(service["io_read_bytes"], int) and isinstance(service["io_write_bytes"], int)
        table = sbd("stats", "--once", "--interval", "0.2", "-p", "js").stdout
        assert "CPU %" in table and "spinner" in table

        assert conforms(json.loads(sbd("volume", "ls", "--json").stdout), list[VolumeListing]) == ""
        config = json.loads(sbd("config", "--json", str(spec_dir)).stdout)
        assert {s["name"] for s in config["stack"]["services"]} == {"spinner", "talker"}
    finally:
        down = json.loads(sbd("down", "--json", "-p", "js").stdout)
    assert conforms(down, DownResult) == ""
    assert down["stack"] == "js" and down["pid"] == up["pid"] and sorted(down["stopped"]) == ["spinner", "talker"]


def test_logs_take_timestamps_since_and_until(spec_dir: Path) -> None:
    _two_services(spec_dir)
    sbd("up", "-d", "-p", "lg", str(spec_dir))
    try:
        wait_until(lambda: "spinning" in sbd("logs", "-p", "lg").stdout and "talker again" in sbd("logs", "-p", "lg").stdout, "both services' lines")
        stamped = sbd("logs", "-t", "-p", "lg").stdout.splitlines()
        stamps = [line.split(" | ", 1)[1].split(" ", 1)[0] for line in stamped]
        assert stamps == sorted(stamps) and len({line.split(" ", 1)[0] for line in stamped}) == 2  # both, merged by time
        hello = next(line for line in stamped if line.endswith("talker says hello")).split(" | ", 1)[1].split(" ")[0]
        assert hello.endswith("Z") and hello[:4].isdigit()

        def texts(*options: str) -> list[str]:
            return [line.split(" | ", 1)[1] for line in sbd("logs", "-p", "lg", "talker", *options).stdout.splitlines()]

        assert texts("--since", "1h") == ["talker says hello", "talker again"]
        assert texts("--since", "0s") == []  # nothing printed from now on
        assert texts("--until", "1h") == []  # nothing an hour ago
        assert "talker says hello" not in texts("--since", _after(hello))
        assert texts("--until", hello) == []
        talker = [(line.split(" | ", 1)[1].split(" ", 1)) for line in stamped if line.startswith("talker")]
        assert texts("--until", _after(hello)) == [text for stamp, text in talker if stamp <= hello]  # two lines may share a stamp
        assert texts("--until", _after(hello))[0] == "talker says hello"
        bad = sbd("logs", "-p", "lg", "--since", "soon", check=False)
        assert bad.returncode == 2 and "expected a duration or a time" in bad.stderr
    finally:
        sbd("down", "-p", "lg")


def _after(stamp: str) -> str:
    """The stamp one microsecond later (RFC 3339 with Z)."""
    from datetime import datetime, timedelta

    moment = datetime.fromisoformat(stamp) + timedelta(microseconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_start_stop_and_restart_without_names_mean_every_service(spec_dir: Path) -> None:
    _two_services(spec_dir)
    sbd("up", "-d", "-p", "all", str(spec_dir))
    try:
        before = _pids("all")
        restarted = json.loads(sbd("restart", "--json", "-p", "all").stdout)
        assert sorted(restarted["services"]) == ["spinner", "talker"] and restarted["done"] == "restarted"
        after = wait_until(lambda: _all_running("all"), "both services running again")
        assert all(after[name] != before[name] for name in before)
        assert sorted(sbd("stop", "-p", "all").stdout.splitlines()) == ["spinner: stopped", "talker: stopped"]
        assert set(_pids("all").values()) == {0}
        sbd("start", "-p", "all")
        wait_until(lambda: _all_running("all"), "both services started again")
    finally:
        sbd("down", "-p", "all")


def test_a_user_who_is_not_root_is_told_in_one_line(spec_dir: Path) -> None:
    _two_services(spec_dir)
    sbd("up", "-d", "-p", "nr", str(spec_dir))
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        for verb in (["logs"], ["ps"], ["stats", "--once"], ["restart"], ["down"]):
            result = sbd(*verb, "-p", "nr", check=False, user=nobody)
            assert result.returncode == 1, (verb, result.stderr)
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (verb, result.stderr)
            assert "root" in result.stderr and "sudo sandboxd" in result.stderr, (verb, result.stderr)
    finally:
        sbd("down", "-p", "nr")
