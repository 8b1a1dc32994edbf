"""The FastAPI app: both providers' endpoints over one script of replies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from conveyor.testing.fake_llm import _anthropic, _openai
from conveyor.testing.fake_llm._dialect import Dialect, InvalidRequest
from conveyor.testing.fake_llm._model import answer, count_tokens
from conveyor.testing.fake_llm._script import RecordedRequest, Script

KNOWN_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-5-mini",
    "claude-haiku-4-5",
    "claude-sonnet-4-6",
    "claude-opus-4-6",
)


def create_app(script: Script) -> FastAPI:
    """An app answering OpenAI's and Anthropic's endpoints from ``script``."""
    app = FastAPI(title="Conveyor fake LLM provider", docs_url=None, redoc_url=None)
    openai, anthropic = _openai.OpenAIDialect(), _anthropic.AnthropicDialect()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(openai, request, script)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await _serve(anthropic, request, script)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: Request) -> Response:
        body = await _json_body(request)
        if body is None:
            return JSONResponse(anthropic.error(400, message="invalid JSON body", code=None), 400)
        text = " ".join([json.dumps(body.get("system") or ""), json.dumps(body.get("messages"))])
        return JSONResponse({"input_tokens": max(1, count_tokens(text))})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        seen = [r.model for r in script.requests if r.model and r.model not in KNOWN_MODELS]
        names = list(dict.fromkeys([*KNOWN_MODELS, *seen]))
        if "anthropic-version" in request.headers:
            return JSONResponse(_anthropic.models_body(names))
        return JSONResponse(_openai.models_body(names))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _serve(dialect: Dialect, request: Request, script: Script) -> Response:
    """Record the request, take the next scripted reply and answer as the provider would."""
    body = await _json_body(request)
    if body is None:
        error = dialect.error(
            400, message="We could not parse the JSON body of your request.", code=None
        )
        return JSONResponse(
            error, 400, headers=dialect.headers(served=0, status=400, tokens=0, reply=None)
        )
    model = body.get("model") if isinstance(body.get("model"), str) else None
    served = script.record(
        RecordedRequest(
            provider=dialect.provider,
            method=request.method,
            path=request.url.path,
            model=model,
            body=body,
            headers=dict(request.headers),
        )
    )
    try:
        prompt = dialect.prompt(body)
    except InvalidRequest as exc:
        error = dialect.error(400, message=exc.message, code=None, param=exc.param)
        return JSONResponse(
            error, 400, headers=dialect.headers(served=served, status=400, tokens=0, reply=None)
        )
    reply = script.next_reply(model)
    if reply is not None and reply.delay > 0:
        await _delay(request, reply.delay)
    status = reply.status if reply is not None else 200
    result = answer(prompt, reply)
    headers = dialect.headers(
        served=served,
        status=status,
        tokens=result.prompt_tokens + result.completion_tokens,
        reply=reply,
    )
    headers.update(reply.headers if reply is not None else {})
    if reply is not None and reply.raw_body is not None:
        return Response(reply.raw_body, status, headers=headers, media_type="application/json")
    if reply is not None and status >= 400:
        error = dialect.error(status, message=reply.message, code=reply.code)
        return JSONResponse(error, status, headers=headers)
    if body.get("stream"):
        return StreamingResponse(
            _paced(dialect.events(result, body=body)),
            status,
            headers=headers,
            media_type="text/event-stream",
        )
    return JSONResponse(dialect.message(result, body=body), status, headers=headers)


async def _delay(request: Request, seconds: float) -> None:
    """Wait like a slow provider, but stop early when the client gave up (its timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        if await request.is_disconnected():
            return
        await asyncio.sleep(min(0.05, remaining))


async def _json_body(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def _paced(frames: Iterator[str]) -> AsyncIterator[bytes]:
    """Hand each frame to the event loop on its own, so clients see a real stream."""
    for frame in frames:
        yield frame.encode()
        await asyncio.sleep(0)
