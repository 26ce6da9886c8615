"""rest/progress.py: percent and time left when the size is known; library messages above the bar."""

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from rest.progress import BuildProgress

ROOT = Path(__file__).resolve().parents[2]


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120), out


def test_a_known_size_shows_percent_and_time_left():
    console, out = terminal()
    with BuildProgress(1000, console=console) as bar:
        bar.update(250, tokens=1234)
    text = out.getvalue()
    assert "100%" in text and "eta" in text and "1,234 tokens" in text


def test_an_unknown_size_shows_elapsed_time_and_tokens():
    console, out = terminal()
    with BuildProgress(None, console=console) as bar:
        bar.update(0, tokens=7)
    assert "7 tokens" in out.getvalue() and "%" not in out.getvalue()


MESSAGES_DURING_A_BUILD = """
import io, logging, sys, warnings
from rich.console import Console
from rest.progress import BuildProgress

library = logging.getLogger("some.library")
handler = logging.StreamHandler(sys.stderr)  # made before the bar, as transformers makes its own
library.addHandler(handler)
library.propagate = False
out = io.StringIO()
with BuildProgress(100, console=Console(file=out, force_terminal=True, width=120)) as bar:
    bar.update(50, tokens=10)
    library.warning("a library warning")
    warnings.warn("a python warning")
assert handler.stream is sys.stderr, "the handler's stream is restored"
print(repr(out.getvalue()))
"""


def test_library_log_messages_and_warnings_print_above_the_bar():
    done = subprocess.run([sys.executable, "-c", MESSAGES_DURING_A_BUILD], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # nothing went around the bar
    text = ast.literal_eval(done.stdout)
    # Each message is printed on a line of its own after the bar's line is cleared, then the
    # bar is drawn again below it.
    assert "\r\x1b[2Ka library warning\n" in text
    assert "UserWarning: a python warning\n" in text


def test_disabled_prints_nothing():
    console, out = terminal()
    with BuildProgress(10, console=console, enabled=False) as bar:
        bar.update(5, tokens=1)
    assert out.getvalue() == ""
