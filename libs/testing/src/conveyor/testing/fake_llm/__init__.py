"""A fake LLM provider speaking the real OpenAI and Anthropic HTTP protocols.

Drive it with the real SDKs (``AsyncOpenAI(base_url=server.openai_base_url, ...)``,
``AsyncAnthropic(base_url=server.anthropic_base_url, ...)``). Script replies per model
with ``server.script(model, Reply(...), ...)``; unscripted requests get deterministic
answers derived from the prompt and valid against any requested JSON schema. Run it as a
process with ``python -m conveyor.testing.fake_llm --port 8790``.
"""

from conveyor.testing.fake_llm._app import KNOWN_MODELS, create_app
from conveyor.testing.fake_llm._model import count_tokens
from conveyor.testing.fake_llm._schema import schema_instance
from conveyor.testing.fake_llm._script import RecordedRequest, Reply, ToolCall
from conveyor.testing.fake_llm._server import FakeLLMServer

__all__ = [
    "KNOWN_MODELS",
    "FakeLLMServer",
    "RecordedRequest",
    "Reply",
    "ToolCall",
    "count_tokens",
    "create_app",
    "schema_instance",
]
