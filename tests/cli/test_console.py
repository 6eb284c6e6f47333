"""The terminal side of a command: the live progress line and the closing lines."""

from __future__ import annotations

import io
import logging

from saeray.cli import console


def test_live_line_rewrites_one_line_and_a_log_record_clears_it_first():
    out = io.StringIO()
    live = console.LiveLine(out)
    live("units 1 | 10 tokens")
    live("units 2 | 20 tokens")
    assert out.getvalue() == "\runits 1 | 10 tokens\x1b[K\runits 2 | 20 tokens\x1b[K"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert console._clear_live(record) is True  # the filter lets the record through after clearing the line
    assert out.getvalue().endswith("\r\x1b[K")
    live("units 3 | 30 tokens")
    live.done()
    assert out.getvalue().endswith("units 3 | 30 tokens\x1b[K\n") and console.LiveLine.active is None


def test_next_steps_align_commands_and_name_each():
    text = console.after_run("runs/mine")
    lines = text.splitlines()
    assert lines[0] == "next:"
    assert len({ln.index("#") for ln in lines[1:]}) == 1  # one column for the comments
    for cmd in ("stats", "top", "report", "diff", "separate", "export"):
        assert any(ln.strip().startswith(f"saeray {cmd} ") and "runs/mine" in ln for ln in lines[1:]), text
