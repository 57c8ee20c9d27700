"""The command line's pure parts: --since/--until times, the merge of log lines, what --json
prints (checked against wire.py's shapes), stats' CPU % and counters, and the parser's help."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sandboxd.cli.logs import log_json, select
from sandboxd.cli.parser import build_parser
from sandboxd.cli.results import down_result, listing, reload_result, up_result
from sandboxd.cli.stats import combine, human_bytes, table
from sandboxd.cli.times import as_stamp, parse_duration, parse_moment
from sandboxd.daemon.usage import parse_net_dev
from sandboxd.host.cgroups import Cgroup
from sandboxd.wire import DownResult, LogLine, ReloadResult, ServiceStats, StackListing, UpResult, conforms

NOW = datetime(2026, 11, 26, 6, 0, 0, tzinfo=UTC)
SERVICE: Any = {
    "name": "web", "state": "ready", "pid": 42, "uptime": 1.5, "restarts": 0, "ready": True, "status_text": "",
    "sockets": [], "memory": 1 << 20, "cpu_seconds": 0.25, "processes": 1, "instances": 0, "reason": "",
}
STATUS: Any = {"stack": "st", "folder": "/srv/st", "pid": 7, "started": 1.0, "userns": {}, "services": [SERVICE, {**SERVICE, "name": "db", "pid": 0, "state": "stopped"}]}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("2h", 7200), ("30s", 30), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5), ("2h0m5s", 7205)],
)
def test_durations_are_read_as_go_and_docker_read_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "ten minutes", "10 m", "-5m"])
def test_what_is_not_a_duration_is_not_taken_for_one(text: str) -> None:
    assert parse_duration(text) is None


def test_a_duration_counts_back_from_now() -> None:
    assert parse_moment("10m", NOW) == NOW - timedelta(minutes=10)


def test_rfc3339_times_keep_their_offset() -> None:
    assert parse_moment("2026-11-26T05:00:00Z", NOW) == datetime(2026, 11, 26, 5, tzinfo=UTC)
    assert parse_moment("2026-11-26T06:00:00+01:00", NOW) == datetime(2026, 11, 26, 5, tzinfo=UTC)
    assert parse_moment("1764136800", NOW) == datetime.fromtimestamp(1764136800, UTC)


def test_a_time_without_an_offset_is_local_time_as_docker_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Etc/GMT-2")  # POSIX sign: two hours east of UTC
    time.tzset()
    try:
        assert parse_moment("2026-11-26T08:00:00", NOW) == datetime(2026, 11, 26, 6, tzinfo=UTC)
        assert parse_moment("2026-11-26", NOW) == datetime(2026, 11, 25, 22, tzinfo=UTC)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_bad_time_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match="expected a duration or a time, like 10m"):
        parse_moment("yesterday", NOW)


def test_a_bound_orders_as_the_log_stamps_do() -> None:
    written = datetime(2026, 11, 26, 5, 59, 59, 999999, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert written < as_stamp(parse_moment("2026-11-26T06:00:00Z", NOW)) <= as_stamp(NOW)
    assert as_stamp(datetime(2026, 11, 26, 7, tzinfo=timezone(timedelta(hours=1)))) == "2026-11-26T06:00:00.000000Z"


def test_lines_of_several_services_are_merged_by_time_and_keep_their_order() -> None:
    lines = [("T2", "web", "b"), ("T2", "web", "a"), ("T1", "db", "z"), ("T3", "db", "y")]
    assert select(lines, None, None, None) == [("T1", "db", "z"), ("T2", "web", "b"), ("T2", "web", "a"), ("T3", "db", "y")]


def test_since_until_and_tail_pick_a_range() -> None:
    lines = [(f"T{i}", "web", str(i)) for i in range(1, 8)]
    assert [t for _s, _n, t in select(lines, "T3", "T6", None)] == ["3", "4", "5"]
    assert [t for _s, _n, t in select(lines, "T3", None, 2)] == ["6", "7"]
    assert select(lines, None, None, 0) == []


def test_a_json_log_line_is_a_log_line_and_valid_utf8() -> None:
    line = log_json("2026-11-26T06:00:00.000000Z", "web", "caf\udcc3 ok")  # a byte that is not UTF-8
    assert conforms(line, LogLine) == ""
    assert line["text"] == "caf\ufffd ok"
    assert "stream" not in line


def test_cpu_percent_is_the_cpu_time_used_over_the_interval() -> None:
    before: Any = (10.0, [{**SERVICE, "cpu_seconds": 1.0}], {})
    after: Any = (12.0, [{**SERVICE, "cpu_seconds": 2.5}, {**SERVICE, "name": "new", "cpu_seconds": 3.0}],
             {"web": {"name": "web", "io_read_bytes": 5, "io_write_bytes": 6, "net_rx_bytes": 7, "net_tx_bytes": 8}})
    stats = combine(before, after)
    assert [s["cpu_percent"] for s in stats] == [75.0, 0.0]  # 1.5 s in 2 s; new since: nothing measured
    assert stats[0]["net_tx_bytes"] == 8 and "io_read_bytes" not in stats[1]
    assert all(conforms(s, ServiceStats) == "" for s in stats)
    assert "75.0%" in table(stats) and "7B / 8B" in table(stats)


def test_a_restarted_service_shows_no_negative_cpu() -> None:
    before: Any = (0.0, [{**SERVICE, "cpu_seconds": 9.0}], {})
    after: Any = (1.0, [{**SERVICE, "cpu_seconds": 0.1}], {})
    stats = combine(before, after)
    assert stats[0]["cpu_percent"] == 0.0


def test_bytes_are_shown_as_docker_stats_shows_them() -> None:
    assert [human_bytes(n) for n in (0, 999, 1500, 12_300_000)] == ["0B", "999B", "1.5kB", "12.3MB"]


def test_net_dev_sums_every_link_but_lo() -> None:
    lines = [
        "    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0",
        "  eth0: 2000 20 0 0 0 0 0 0 3000 30 0 0 0 0 0 0",
        "sbd-a1:50 1 0 0 0 0 0 0 60 1 0 0 0 0 0 0",
    ]
    assert parse_net_dev(lines) == (2050, 3060)


def test_io_bytes_come_from_io_stat_or_blkio(tmp_path: Path) -> None:
    (tmp_path / "io.stat").write_text("8:0 rbytes=100 wbytes=20 rios=1 wios=1\n8:16 rbytes=5 wbytes=1 rios=1 wios=1\n")
    assert Cgroup(tmp_path, can_kill=True).io_bytes() == (105, 21)
    v2, blkio = tmp_path / "v2", tmp_path / "blkio"
    v2.mkdir()
    blkio.mkdir()
    (blkio / "blkio.throttle.io_service_bytes").write_text("8:0 Read 40\n8:0 Write 2\n8:0 Sync 42\n8:0 Total 42\nTotal 42\n")
    assert Cgroup(v2, v1={"blkio": blkio}, can_kill=True).io_bytes() == (40, 2)
    assert Cgroup(v2, can_kill=True).io_bytes() is None  # no io.stat, no blkio, no process


def test_stack_results_have_their_shapes() -> None:
    up = up_result(STATUS)
    assert conforms(up, UpResult) == "" and up["started"] == ["web"]
    down = down_result(STATUS)
    assert conforms(down, DownResult) == "" and down == {"stack": "st", "pid": 7, "stopped": ["web"]}
    applied = reload_result("st", {"added": ["a"], "removed": [], "changed": ["b"], "sockets_replaced": []})
    assert conforms(applied, ReloadResult) == ""
    assert all(conforms(entry, StackListing) == "" for entry in listing({"st": 7}))


def _options(parser: argparse.ArgumentParser, path: str = "sandboxd") -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _options(sub, f"{path} {name}")
        else:
            found.append((path, action))
    return found


def test_every_option_and_argument_says_what_it_does() -> None:
    silent = [f"{path} {action.option_strings or action.dest}" for path, action in _options(build_parser())
              if not action.help and action.help != argparse.SUPPRESS]
    assert silent == []


def test_every_reporting_verb_takes_json() -> None:
    parser = build_parser()
    for verb in (["ps"], ["ls"], ["logs"], ["stats"], ["volume", "ls"], ["image", "ls"], ["up", "-d", "x"], ["down"], ["config", "x"], ["restart"]):
        assert parser.parse_args([*verb, "--json"]).json is True


def test_start_stop_and_restart_take_no_service_to_mean_all() -> None:
    for verb in ("start", "stop", "restart"):
        assert build_parser().parse_args([verb]).services == []


def test_since_is_parsed_when_the_command_line_is(capsys: pytest.CaptureFixture[str]) -> None:
    since = build_parser().parse_args(["logs", "--since", "10m"]).since
    assert since.endswith("Z") and since < as_stamp(datetime.now(UTC))
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["logs", "--since", "soon"])
    assert e.value.code == 2 and "expected a duration or a time" in capsys.readouterr().err


@pytest.mark.parametrize(("count", "text"), [(0, "0 services"), (1, "1 service"), (2, "2 services")])
def test_counts_take_the_noun_in_their_number(count: int, text: str) -> None:
    from sandboxd.daemon.summary import counted

    assert counted(count, "service") == text


@pytest.mark.parametrize("values", [[4.0], [3.0, 1.0], [5.0, 1.0, 3.0], [2.5, 9.0, 0.5, 7.0], [1.0, 1.0, 2.0, 8.0, 8.0, 9.0]])
def test_the_summarys_median_launch_is_statistics_median(values: list[float]) -> None:
    import statistics

    from sandboxd.daemon.summary import _median

    assert _median(values) == statistics.median(values)
