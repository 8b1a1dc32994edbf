"""``-i key=value`` parsing, and bad input or an absent stack as one line with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from typer.testing import CliRunner

from conveyor.cli import stack
from conveyor.cli.commands_runs import parse_input, parse_input_value
from conveyor.cli.errors import BadInput
from conveyor.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ada", "Ada"),
        ("3", 3),
        ("-2.5", -2.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ('"3"', "3"),
        ("", ""),
        ("hello world", "hello world"),
        ("a=b", "a=b"),
        ("[unclosed", "[unclosed"),
    ],
)
def test_a_value_is_json_when_it_parses_else_text(text: str, expected: Any) -> None:
    assert parse_input_value(text) == expected


def test_pairs_split_on_the_first_equals_and_override_input_json() -> None:
    result = parse_input(
        ["name=Ada", "expr=a=b", "n=2", 'tags=["x"]'], '{"name": "Bob", "keep": true}'
    )
    assert result == {"name": "Ada", "expr": "a=b", "n": 2, "tags": ["x"], "keep": True}


@pytest.mark.parametrize(
    ("pairs", "input_json", "message"),
    [
        (["name"], None, "-i 'name' is not key=value"),
        (["=value"], None, "-i '=value' is not key=value"),
        ([], "{not json", "--input-json is not valid JSON"),
        ([], "[1, 2]", "--input-json must be a JSON object, got an array"),
    ],
)
def test_bad_input_names_what_is_wrong(
    pairs: list[str], input_json: str | None, message: str
) -> None:
    with pytest.raises(BadInput, match=message.replace("[", r"\[")):
        parse_input(pairs, input_json)


def _closed_url() -> str:
    return f"http://127.0.0.1:{stack.free_port()}"


def test_run_with_a_bad_i_exits_2_before_contacting_anything() -> None:
    result = runner.invoke(
        app, ["run", "hello", "-i", "oops"], env={"CONVEYOR_API_URL": _closed_url()}
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: -i 'oops' is not key=value (e.g. -i name=Ada -i count=3)"
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["pipelines", "list"],
        ["run", "hello", "-i", "name=Ada"],
        ["run", "hello", "--follow"],
    ],
)
def test_an_unreachable_control_api_is_one_line_and_status_2(args: list[str]) -> None:
    url = _closed_url()
    result = runner.invoke(app, args, env={"CONVEYOR_API_URL": url})
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach the control API at {url}: is `conveyor up` running?"
    ]
    assert result.stdout == ""


@pytest.mark.parametrize("args", [["runs", "list"], ["runs", "show", "abc"], ["errors"]])
def test_an_unreachable_recorder_is_one_line_and_status_2(args: list[str]) -> None:
    url = _closed_url()
    result = runner.invoke(app, args, env={"CONVEYOR_RECORDER_URL": url})
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach the run recorder at {url}: is `conveyor up` running?"
    ]


def test_the_installed_command_prints_no_traceback() -> None:
    """The real entry point in a real process: stderr is exactly one line."""
    url = _closed_url()
    completed = subprocess.run(
        [sys.executable, "-c", "from conveyor.cli.main import main; main()", "pipelines", "list"],
        env={**os.environ, "CONVEYOR_API_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: cannot reach the control API at {url}: is `conveyor up` running?"
    ]


def test_up_rejects_an_unknown_service() -> None:
    result = runner.invoke(app, ["up", "--services", "scheduler,cron"])
    assert result.exit_code == 2
    assert "unknown service 'cron'" in result.stderr
