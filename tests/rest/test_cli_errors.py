"""rest/cli_errors.py: one line and status 1 for errors, 2 for usage, tracebacks only on request."""

import subprocess
import sys

import click
import pytest

from rest.cli_errors import debug_requested, one_line, without_debug_flag

SCRIPT = """
import click, sys
from rest.cli_errors import run

@click.command()
@click.option("--fail", type=click.Choice(["none", "click", "value", "key", "os"]), default="none")
def cmd(fail):
    if fail == "click":
        raise click.ClickException("the datastore is missing: build it first")
    if fail == "value":
        raise ValueError("budget must be >= 0,\\n got -1")
    if fail == "key":
        raise KeyError("unknown shard 'x'")
    if fail == "os":
        open("/nonexistent/file")
    print("ok")

run(cmd, "prog")
"""


def run_script(*args, env=None):
    import os

    environ = {k: v for k, v in os.environ.items() if k != "REST_DEBUG"} | (env or {})
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True,
                          env=environ, timeout=60)


@pytest.mark.parametrize("fail, expected", [
    ("click", "prog: error: the datastore is missing: build it first"),
    ("value", "prog: error: budget must be >= 0, got -1"),
    ("key", "prog: error: KeyError: unknown shard 'x'"),
    ("os", "prog: error: [Errno 2] No such file or directory: '/nonexistent/file'"),
])
def test_an_error_is_one_line_with_status_1(fail, expected):
    done = run_script("--fail", fail)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(expected)
    assert "Traceback" not in done.stderr


def test_usage_error_exits_2_and_success_exits_0():
    assert run_script("--fail", "nope").returncode == 2
    assert run_script("--help").returncode == 0
    done = run_script()
    assert done.returncode == 0 and done.stdout == "ok\n"


def test_debug_flag_or_environment_shows_the_traceback():
    for done in (run_script("--fail", "value", "--debug"),
                 run_script("--fail", "value", env={"REST_DEBUG": "1"})):
        assert done.returncode == 1
        assert "Traceback" in done.stderr and "ValueError" in done.stderr


def test_debug_switch_parsing():
    assert debug_requested(["a", "--debug"], {})
    assert not debug_requested(["--", "--debug"], {})
    assert debug_requested([], {"REST_DEBUG": "yes"})
    assert not debug_requested([], {"REST_DEBUG": "0"})
    assert without_debug_flag(["x", "--debug", "--", "--debug"]) == ["x", "--", "--debug"]


def test_one_line_names_the_type_only_when_needed():
    assert one_line(ValueError("bad\n value")) == "bad value"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(click.ClickException("x  y")) == "x y"
