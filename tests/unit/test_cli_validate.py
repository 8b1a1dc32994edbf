"""``conveyor pipelines validate``: offline, every problem on its own line, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conveyor.cli.main import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

runner = CliRunner()


def _validate(*paths: Path | str) -> object:
    return runner.invoke(app, ["pipelines", "validate", *map(str, paths)], env={"COLUMNS": "200"})


def test_every_example_is_valid() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"hello.yaml", "fan-in.yaml"}
    result = _validate(*files)
    assert result.exit_code == 0, result.output
    assert "ok  hello (3 steps)" in result.stdout
    assert "ok  fan-in (3 steps)" in result.stdout
    assert result.stderr == ""


def test_a_directory_stands_for_the_definitions_in_it() -> None:
    result = _validate(EXAMPLES)
    assert result.exit_code == 0, result.output
    assert "ok  hello" in result.stdout


def test_every_problem_is_one_line_naming_file_step_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
name: bad
steps:
  - id: fetch
    type: http
    with: {method: GET}
  - id: use
    type: transform
    needs: [missing]
    with: {template: "{{ input.x }}", colour: red}
"""
    )
    result = _validate(bad)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert f"error: {bad}: step 'fetch': field 'with.url': Field required" in lines
    assert f"error: {bad}: step 'use': field 'with.colour': unknown field" in lines
    assert f"error: {bad}: step 'use': field 'needs': names unknown step 'missing'" in lines
    assert len(lines) == 3
    assert "Traceback" not in result.output


def test_good_files_are_reported_even_when_another_is_bad(tmp_path: Path) -> None:
    bad = tmp_path / "cycle.yaml"
    bad.write_text(
        "name: cycle\nsteps:\n"
        "  - {id: a, type: transform, needs: [b], with: {template: x}}\n"
        "  - {id: b, type: transform, needs: [a], with: {template: y}}\n"
    )
    result = _validate(EXAMPLES / "hello.yaml", bad)
    assert result.exit_code == 2
    assert "ok  hello (3 steps)" in result.stdout
    assert "needs form a cycle" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("name: x\nsteps: [\n", "not valid YAML at line"),
        ("- just\n- a list\n", "a pipeline must be a mapping"),
        (b"\xff\xfe\x00binary", "not UTF-8 text"),
        (
            "name: Not Valid\nsteps:\n  - {id: a, type: transform, with: {template: x}}\n",
            "field 'name'",
        ),
    ],
)
def test_unreadable_or_malformed_files_are_one_line_and_status_2(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "pipeline.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = _validate(path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}: ")
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_validate_needs_no_running_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_API_URL", "http://127.0.0.1:9")
    result = _validate(EXAMPLES / "fan-in.yaml")
    assert result.exit_code == 0, result.output
