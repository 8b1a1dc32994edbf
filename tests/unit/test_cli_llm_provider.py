"""``conveyor up`` / ``conveyor demo`` without an API key: the fake provider, announced.

The env the services get is computed by pure functions (checked first); then the local
stack is started with stand-in services to see the wiring end to end: the fake provider
runs as a supervised process, every service is pointed at it, and the console says so.
"""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from rich.console import Console

from conveyor.cli import _startup
from conveyor.cli.demo import runnable_examples
from conveyor.cli.up import local_stack
from conveyor.contracts import KIND_CONFIGS
from tests.unit.test_cli_stack import fakes, home  # noqa: F401  (fixtures)


@pytest.mark.parametrize(
    ("environ", "configured"),
    [
        ({}, False),
        ({"OPENAI_API_KEY": "  "}, False),
        ({"OPENAI_API_KEY": "sk-1"}, True),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, True),  # Ollama, no key
        ({"ANTHROPIC_API_KEY": "sk-ant"}, True),
        ({"ANTHROPIC_BASE_URL": "http://proxy"}, True),
        ({"CONVEYOR_LLM_ENDPOINTS": '{"local": "http://x"}'}, True),
        ({"PATH": "/bin"}, False),
    ],
)
def test_a_provider_is_configured_by_any_key_or_endpoint(
    environ: dict[str, str], configured: bool
) -> None:
    assert _startup.llm_configured(environ) is configured


def test_the_fake_provider_env_points_both_sdks_at_it() -> None:
    assert _startup.fake_provider_env("http://127.0.0.1:4242") == {
        "OPENAI_BASE_URL": "http://127.0.0.1:4242/v1",
        "OPENAI_API_KEY": "fake",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:4242",
        "ANTHROPIC_API_KEY": "fake",
    }
    notice = _startup.fake_provider_notice("http://127.0.0.1:4242")
    assert notice.startswith("no LLM API key found: LLM steps use Conveyor's fake provider")
    assert "http://127.0.0.1:4242" in notice
    assert "OPENAI_API_KEY or OPENAI_BASE_URL (e.g. Ollama)" in notice


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _clear_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in _startup.LLM_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_without_a_key_the_stack_runs_the_fake_provider_and_says_so(
    fakes: dict[str, Any],  # noqa: F811
    home: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_providers(monkeypatch)
    out = io.StringIO()
    console = Console(file=out, width=300)
    with local_stack(
        home=home,
        console=console,
        free_ports=True,
        services=["scheduler"],
        modules=fakes["modules"],
        extra_env=fakes["extra_env"],
        ready_timeout=30,
    ) as stack:
        url = stack.fake_llm_url
        assert url is not None
        env = _get_json(f"{stack.api_url}/env")
        assert env["OPENAI_BASE_URL"] == f"{url}/v1"
        assert env["OPENAI_API_KEY"] == "fake"
        assert env["ANTHROPIC_BASE_URL"] == url
        assert [p.name for p in stack.processes] == ["scheduler"]
        # a real SDK call, as a service would make it
        client = OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"])
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
    assert f"no LLM API key found: LLM steps use Conveyor's fake provider at {url}" in (
        out.getvalue()
    )
    assert (home / "logs" / "fake-llm.log").exists()
    # stopped with the stack
    assert not _startup.port_busy(int(url.rsplit(":", 1)[1]))


def test_a_configured_endpoint_is_used_and_no_fake_is_started(
    fakes: dict[str, Any],  # noqa: F811
    home: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_providers(monkeypatch)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    out = io.StringIO()
    with local_stack(
        home=home,
        console=Console(file=out, width=300),
        free_ports=True,
        services=["scheduler"],
        modules=fakes["modules"],
        extra_env=fakes["extra_env"],
        ready_timeout=30,
    ) as stack:
        assert stack.fake_llm_url is None
        env = _get_json(f"{stack.api_url}/env")
        assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:11434/v1"
        assert "OPENAI_API_KEY" not in env
    assert "fake provider" not in out.getvalue()


def test_the_demo_leaves_out_examples_whose_kind_no_runner_serves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nsteps: [{id: x, type: transform}]")
    (tmp_path / "b.yaml").write_text("name: b\nsteps: [{id: x, type: llm}]")
    monkeypatch.delitem(KIND_CONFIGS, "llm", raising=False)
    out = io.StringIO()
    assert [p.name for p in runnable_examples(tmp_path, Console(file=out))] == ["a.yaml"]
    assert "skipping b.yaml: no runner serves llm" in out.getvalue()
    monkeypatch.setitem(KIND_CONFIGS, "llm", object)  # type: ignore[arg-type]
    assert [p.name for p in runnable_examples(tmp_path)] == ["a.yaml", "b.yaml"]
