"""`FakeLLMServer`: the fake provider app served by uvicorn from a background thread."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import FastAPI

from conveyor.testing.fake_llm._app import create_app
from conveyor.testing.fake_llm._script import RecordedRequest, Reply, Script


class FakeLLMServer:
    """A local server speaking OpenAI's and Anthropic's HTTP protocols, for tests and demos.

    Point the real SDKs at it::

        with FakeLLMServer() as llm:
            llm.script("gpt-4o-mini", Reply(text="hello"), Reply(status=429, retry_after=2))
            client = AsyncOpenAI(base_url=llm.openai_base_url, api_key="test")
            anthropic = AsyncAnthropic(base_url=llm.anthropic_base_url, api_key="test")

    Without a script it answers deterministically: text derived from the prompt, or a
    valid instance of the requested JSON schema or tool input schema.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._script = Script()
        self.app: FastAPI = create_app(self._script)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> Self:
        """Bind the port and serve from a daemon thread; returns once it accepts requests."""
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-llm-server", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake LLM server did not start on {self._host}:{self._port}")
            time.sleep(0.01)
        return self

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop serving; in-flight requests get a second to finish."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fake LLM server is not started: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for ``openai.OpenAI`` / ``AsyncOpenAI``."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The ``base_url`` for ``anthropic.Anthropic`` / ``AsyncAnthropic``."""
        return self.url

    # -- scripting and assertions ----------------------------------------------------------

    def script(self, model: str | None, *replies: Reply | str) -> None:
        """Queue replies for ``model`` (``None``: any model), consumed in order.

        A model's own queue is used first, then the any-model queue, then the default
        answer. A plain string is shorthand for ``Reply(text=...)``.
        """
        self._script.add(model, replies)

    def pending(self, model: str | None = None) -> int:
        """How many scripted replies for ``model`` are still unused."""
        return self._script.pending(model)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        return self._script.requests

    def reset(self) -> None:
        """Forget scripted replies and recorded requests."""
        self._script.reset()
