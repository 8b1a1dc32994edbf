"""Pytest fixtures for the fake LLM provider, registered as a ``pytest11`` entry point.

- ``fake_llm_server``: one `FakeLLMServer` for the whole session.
- ``fake_llm``: that server, with scripts and recorded requests cleared before and after
  the test, so each test starts from the deterministic default answers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conveyor.testing.fake_llm import FakeLLMServer


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLMServer]:
    """One fake LLM provider for the whole test session."""
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLMServer) -> Iterator[FakeLLMServer]:
    """The session's fake LLM provider, with no script and no recorded request."""
    fake_llm_server.reset()
    yield fake_llm_server
    fake_llm_server.reset()
