"""The tools of an llm step without a model: which kinds may be tools, how a call's config
is built from the model's arguments and run through the executor of its kind, and what
the model is given back."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import HttpConfig, TransformConfig
from conveyor.contracts.kinds_llm import LlmConfig, LlmTool, tool_kinds
from conveyor.runtime.runner import InvalidStepConfig, StepError, StepOutput
from conveyor.step_runner.llm.tools import ToolBox, result_text, tool_reply
from conveyor.step_runner.transform import run_transform

STEP = StepReady(
    run_id=uuid.uuid4(), pipeline="p", version=1, step_id="ask", attempt=1, kind="llm",
    config={},
)  # fmt: skip


class Recorder:
    """An executor that records what it was given and answers ``answer``."""

    def __init__(self, answer: Any = None, *, error: Exception | None = None) -> None:
        self.calls: list[tuple[BaseModel, StepReady]] = []
        self.answer = answer
        self.error = error

    async def __call__(self, config: BaseModel, step: StepReady) -> Any:
        self.calls.append((config, step))
        if self.error is not None:
            raise self.error
        return self.answer


def tool(type: str, with_: dict[str, Any], name: str = "t") -> LlmTool:
    return LlmTool.model_validate({"name": name, "type": type, "with": with_})


def test_tool_kinds_are_the_step_runner_kinds_but_llm() -> None:
    assert tool_kinds() == ("transform", "http")
    assert LlmTool.model_validate({"name": "t", "with": {"url": "http://x"}}).type == "http"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("media.probe", "'media.probe' steps run in the media service"),
        ("llm", "an llm step cannot call llm steps as tools"),
        ("shell", "unknown step type 'shell'"),
    ],
)
def test_kinds_that_cannot_be_tools(kind: str, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        LlmConfig.model_validate(
            {"model": "openai/m", "prompt": "p", "tools": [{"name": "t", "type": kind, "with": {}}]}
        )
    [error] = caught.value.errors()
    assert error["loc"] == ("tools", 0, "type")
    assert error["msg"].startswith(reason)
    assert error["msg"].endswith("; a tool's type is one of: transform, http")


def test_a_tools_with_is_validated_with_its_kinds_model() -> None:
    with pytest.raises(ValidationError) as caught:
        tool("transform", {"templ": "x"})
    assert {(e["loc"], e["type"]) for e in caught.value.errors()} == {
        (("with", "template"), "missing"),
        (("with", "templ"), "extra_forbidden"),
    }


async def test_the_call_runs_through_the_executor_of_its_kind() -> None:
    http = Recorder({"status": 200, "headers": {}, "json": None, "text": "ok"})
    box = ToolBox(
        [tool("http", {"url": "http://x/q"}, "get"),
         tool("http", {"method": "POST", "url": "http://x/p"}, "post")],
        executors={"http": http, "transform": run_transform},
    )  # fmt: skip
    got = await box.call("get", {"q": "otters"}, STEP)
    assert got == {"name": "get", "kind": "http", "arguments": {"q": "otters"},
                   "result": {"status": 200, "body": "ok"}}  # fmt: skip
    await box.call("post", {"q": "otters"}, STEP)
    (get_config, get_step), (post_config, _) = http.calls
    assert get_config == HttpConfig(url="http://x/q", params={"q": "otters"})
    assert post_config == HttpConfig.model_validate(
        {"method": "POST", "url": "http://x/p", "json": {"q": "otters"}}
    )
    assert (get_step.kind, get_step.run_id) == ("http", STEP.run_id)


async def test_args_templates_render_before_validation() -> None:
    transform = Recorder(StepOutput(output=["a", "b"]))
    box = ToolBox(
        [tool("transform", {"template": "{{ args.items }}"})], executors={"transform": transform}
    )
    got = await box.call("t", {"items": ["a", "b"]}, STEP)
    assert got["result"] == ["a", "b"]  # a StepOutput is unwrapped
    [(config, _)] = transform.calls
    assert config == TransformConfig(template=["a", "b"])


async def test_failures_go_back_to_the_model() -> None:
    failing = Recorder(error=StepError("down", type="HttpTimeout", retryable=True))
    box = ToolBox(
        [tool("http", {"url": "http://x"}, "slow"),
         tool("http", {"url": "{{ args.url }}"}, "typed")],
        executors={"http": failing},
    )  # fmt: skip
    slow = await box.call("slow", {}, STEP)
    assert slow["error"] == {"type": "HttpTimeout", "message": "down", "retryable": True}
    assert tool_reply(slow) == {"error": slow["error"]}
    assert result_text(tool_reply(slow)).startswith('{"error": {"type": "HttpTimeout"')
    typed = await box.call("typed", {"url": 5}, STEP)  # renders to a number: not a URL
    assert typed["error"]["type"] == "InvalidArguments"
    assert "url: Input should be a valid string" in typed["error"]["message"]
    unknown = await box.call("nope", {}, STEP)
    assert unknown["kind"] is None
    assert unknown["error"]["type"] == "UnknownTool"
    assert len(failing.calls) == 1


def test_configuration_errors_fail_the_step() -> None:
    with pytest.raises(InvalidStepConfig, match=r"cannot run 'http' tools \(it runs: transform\)"):
        ToolBox([tool("http", {"url": "http://x"})], executors={"transform": run_transform})
    with pytest.raises(InvalidStepConfig, match=r"tools\[t\]\.with\.template"):
        ToolBox(
            [tool("transform", {"template": "{{ args.a + }}"})],
            executors={"transform": run_transform},
        )


async def test_a_bug_in_an_executor_is_not_hidden() -> None:
    box = ToolBox([tool("transform", {"template": "x"})],
                  executors={"transform": Recorder(error=KeyError("oops"))})  # fmt: skip
    with pytest.raises(KeyError):
        await box.call("t", {}, STEP)
