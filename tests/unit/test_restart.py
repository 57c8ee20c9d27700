"""restart: systemd's restart rules, delays and start limits, as pure functions."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from sandboxd.daemon.restart import StartLimiter, classify, exit_details, restart_delay, should_restart
from sandboxd.spec.load import load_stack
from sandboxd.spec.model import Service
from .spec_snippets import STEM_SERVICE


def service(tmp_path: Path, extra: str = "") -> Service:
    (tmp_path / "a.yaml").write_text(STEM_SERVICE + textwrap.dedent(extra))
    return load_stack(tmp_path).service("a")


def exited(code: int) -> int:
    return code << 8


def killed(sig: int) -> int:
    return sig


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (exited(0), ("success", "exited with code 0")),
        (exited(3), ("exit-code", "exited with code 3")),
        (killed(signal.SIGKILL), ("signal", "killed by SIGKILL")),
        (killed(signal.SIGTERM), ("success", "killed by SIGTERM")),
        (exited(128 + signal.SIGSEGV), ("signal", "killed by SIGSEGV")),  # as the init reports it
        (exited(128 + signal.SIGPIPE), ("success", "killed by SIGPIPE")),
    ],
)
def test_wait_status_is_classified_as_systemd_does(status: int, expected: tuple[str, str]) -> None:
    assert classify(status) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (exited(0), (0, None)),
        (exited(3), (3, None)),
        (exited(128), (128, None)),
        (killed(signal.SIGKILL), (None, "SIGKILL")),
        (exited(128 + signal.SIGSEGV), (None, "SIGSEGV")),  # as the init reports it, read as classify reads it
    ],
)
def test_an_exit_is_kept_as_its_code_or_its_signal_as_classify_reads_it(status: int, expected: tuple[int | None, str | None]) -> None:
    assert exit_details(status) == expected


@pytest.mark.parametrize(
    ("policy", "restarted_on"),
    [
        ("no", set()),
        ("on-success", {"success"}),
        ("on-failure", {"exit-code", "signal", "timeout", "watchdog"}),
        ("on-abnormal", {"signal", "timeout", "watchdog"}),
        ("on-watchdog", {"watchdog"}),
        ("on-abort", {"signal"}),
        ("always", {"success", "exit-code", "signal", "timeout", "watchdog"}),
    ],
)
def test_restart_policy_table_matches_systemd(policy, restarted_on) -> None:  # type: ignore[no-untyped-def]
    outcomes = {"success", "exit-code", "signal", "timeout", "watchdog"}
    assert {o for o in outcomes if should_restart(policy, o)} == restarted_on  # type: ignore[arg-type]


def test_delay_doubles_up_to_the_maximum_by_default(tmp_path: Path) -> None:
    svc = service(tmp_path, "restart_delay: 100ms\nrestart_max_delay: 1s\n")
    assert [round(restart_delay(svc, n), 3) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_delay_grows_geometrically_over_restart_steps(tmp_path: Path) -> None:
    svc = service(tmp_path, "restart_delay: 100ms\nrestart_steps: 2\nrestart_max_delay: 10s\n")
    assert [round(restart_delay(svc, n), 3) for n in range(1, 5)] == [0.1, 1.0, 10.0, 10.0]


def test_start_limit_counts_starts_within_the_interval(tmp_path: Path) -> None:
    limiter = StartLimiter(service(tmp_path, "start_limit: {burst: 3, interval: 10s}\n"))
    for now in (0.0, 1.0, 2.0):
        assert not limiter.exhausted(now)
        limiter.record(now)
    assert limiter.exhausted(3.0)
    assert not limiter.exhausted(10.5)  # the first start has left the interval
    assert limiter.in_a_row == 2
