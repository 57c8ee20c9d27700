"""What a terminal is shown of a service's output, and what its log file keeps (no root needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sandboxd.daemon import logs
from sandboxd.daemon.console import Console, decode_output, escape_controls
from sandboxd.daemon.logs import LogFiles


@pytest.mark.parametrize(
    ("printed", "shown"),
    [
        (b"plain text, tabs\tstay", "plain text, tabs\tstay"),
        (b"\x1b]0;pwned\x07title", "\\x1b]0;pwned\\x07title"),  # a window title
        (b"\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # colours
        (b"mine\rweb     | forged", "mine\\x0dweb     | forged"),  # back to the start of the line
        (b"nul\x00 del\x7f bs\x08 ff\x0c", "nul\\x00 del\\x7f bs\\x08 ff\\x0c"),
        ("c1 \u009b31m and nel \u0085".encode(), "c1 \\xc2\\x9b31m and nel \\xc2\\x85"),  # 8-bit CSI, as its UTF-8 bytes
        (b"not utf-8: \xff\xfe \x9b", "not utf-8: \\xff\\xfe \\x9b"),
        ("unicode stays: é € 日本 \u00a0".encode(), "unicode stays: é € 日本 \u00a0"),
    ],
)
def test_control_characters_are_shown_escaped_as_journalctl_does(printed: bytes, shown: str) -> None:
    assert escape_controls(decode_output(printed)) == shown


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_escapes_on_a_terminal_and_the_log_file_keeps_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    terminal, pipe = _Terminal(), io.StringIO()
    on_terminal = Console(["web"], out=terminal, err=terminal)
    on_terminal.logs = LogFiles(tmp_path)
    on_terminal.line("web", b"a\x1b]0;x\x07b \xff\n")
    on_terminal.note("web: status: \x1b[2J")
    assert terminal.getvalue() == "web | a\\x1b]0;x\\x07b \\xff\nsandboxd: web: status: \\x1b[2J\n"
    assert (tmp_path / "web.log").read_bytes().split(b" ", 1)[1] == b"a\x1b]0;x\x07b \xff\n"
    Console(["web"], out=pipe, err=pipe).line("web", b"a\x1b]0;x\x07b \xff\n")
    assert pipe.getvalue() == "web | a\x1b]0;x\x07b \ufffd\n"  # not a terminal: as printed (a pipe takes no lone byte)


def test_log_lines_are_split_at_newlines_only(tmp_path: Path) -> None:
    files = LogFiles(tmp_path)
    files.write("web", decode_output(b"form\x0cfeed, nel\xc2\x85, separator\x1c, bad \xff"))
    files.close()
    ((_stamp, text),) = logs.read(tmp_path, "web")
    assert text.encode("utf-8", errors="surrogateescape") == b"form\x0cfeed, nel\xc2\x85, separator\x1c, bad \xff"
