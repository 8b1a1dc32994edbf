"""What starting a local stack takes: ports, runnable services, topics, service output,
the LLM provider, and waiting until the APIs answer. Used by ``conveyor.cli.up.local_stack``.

LLM provider: with a key or an endpoint in the environment (``OPENAI_API_KEY``,
``OPENAI_BASE_URL`` for any OpenAI-compatible server such as Ollama or vLLM,
``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``, ``CONVEYOR_LLM_ENDPOINTS``) the services use
it as it is. Without any, the stack starts Conveyor's fake provider (``python -m
conveyor.testing.fake_llm``, the test seam speaking both providers' protocols), points
every service at it, and says so: a fake answer must never pass for a model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import httpx
from rich.console import Console
from rich.text import Text

from conveyor.cli import stack as _stack
from conveyor.cli.errors import BadInput, StackError

_PREFIX_STYLES = ("cyan", "magenta", "green", "blue", "yellow", "bright_cyan", "bright_magenta")


def port_of(url: str, default: int) -> int:
    try:
        return urlsplit(url).port or default
    except ValueError:
        raise BadInput(f"{url!r} is not a URL with a valid port") from None


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return urlunsplit((parts.scheme or "http", f"{host}:{port}", parts.path, "", "")).rstrip("/")


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def claim_port(port: int, *, what: str, env_hint: str, free_ports: bool) -> int:
    if not port_busy(port):
        return port
    if free_ports:
        return _stack.free_port()
    raise StackError(
        f"port {port} ({what}) is already in use: is another `conveyor up` running? "
        f"Stop it, or set {env_hint} to use another port"
    )


def check_runnable(modules: Mapping[str, str], names: Sequence[str]) -> None:
    for name in names:
        module = modules[name]
        try:
            found = importlib.util.find_spec(f"{module}.__main__") is not None
        except ModuleNotFoundError as exc:
            found = False
            if exc.name not in (module, f"{module}.__main__", *parents(module)):
                raise StackError(
                    f"service {name} cannot start: importing {module} failed: {exc}"
                ) from None
        except Exception as exc:
            raise StackError(
                f"service {name} cannot start: importing {module} failed: {exc!r}"
            ) from None
        if not found:
            raise StackError(
                f"service {name} cannot start: `python -m {module}` has nothing to run "
                f"(is the package installed? try `uv sync`)"
            )


def parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class ServiceOutput:
    """Where service output goes: a log file per process, and the console unless quiet."""

    def __init__(self, logs: Path, console: Console | None) -> None:
        self._logs = logs
        self._console = console
        self._files: dict[str, IO[str]] = {}
        self._styles: dict[str, str] = {}
        self._lock = threading.Lock()

    def sink_for(self, name: str) -> Callable[[str], None]:
        with self._lock:
            self._files[name] = open(self._logs / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115
            self._styles[name] = _PREFIX_STYLES[len(self._styles) % len(_PREFIX_STYLES)]
        handle, style, prefix = self._files[name], self._styles[name], f"[{name}] "

        def sink(line: str) -> None:
            body = line[len(prefix) :] if line.startswith(prefix) else line
            with contextlib.suppress(ValueError):  # closed during shutdown
                handle.write(body + "\n")
                handle.flush()
            if self._console is not None:
                self._console.print(Text.assemble((prefix, style), body), soft_wrap=True)

        return sink

    def supervisor_echo(self) -> Callable[[str], None]:
        return self.sink_for("supervisor")

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()


def wait_ready(
    checks: list[tuple[str, str, str]],
    *,
    supervisor: _stack.Supervisor,
    logs: Path,
    timeout: float,
) -> None:
    """Wait until each ``(what, url, service)`` answers /healthz; fail early on crash loops."""
    deadline = time.monotonic() + timeout
    pending = list(checks)
    with httpx.Client(timeout=2.0) as http:
        while pending:
            for check in list(pending):
                what, url, service = check
                if healthy(http, url):
                    pending.remove(check)
                elif supervisor.restarts.get(service, 0) >= 3:
                    raise StackError(
                        f"{service} keeps exiting before its {what} answers at {url}: "
                        f"{log_tail(logs / f'{service}.log')}"
                    )
            if not pending:
                return
            if time.monotonic() > deadline:
                what, url, service = pending[0]
                raise StackError(
                    f"the {what} did not answer at {url}/healthz within {timeout:.0f}s: "
                    f"{log_tail(logs / f'{service}.log')}"
                )
            time.sleep(0.2)


def healthy(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(f"{url}/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        tail = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()][-lines:]
    except OSError:
        tail = []
    where = f"see {path}"
    return (" | ".join(tail) + f" ({where})") if tail else where


def topic_partitions(*, runners: int, configured: str | None, embedded: bool) -> int | None:
    """How many partitions the local stack gives the topics it creates: what the user set
    (``CONVEYOR_KAFKA_PARTITIONS``); else, on the embedded broker, one per step-runner
    process and at least 2; else the services' default (``None``).

    The embedded broker's cost of a fetch grows with the partitions in it, and it answers
    every fetch only when the fetch wait is over, so idle consumers polling partitions
    nobody writes to took half of a core (README, Performance). More partitions than
    runners buy nothing: each is read by one member of a group."""
    if configured:
        try:
            value = int(configured)
        except ValueError:
            raise BadInput(
                f"CONVEYOR_KAFKA_PARTITIONS must be a number, not {configured!r}"
            ) from None
        if value < 1:
            raise BadInput(f"CONVEYOR_KAFKA_PARTITIONS must be at least 1, not {value}")
        return value
    return max(2, runners) if embedded else None


def ensure_topics(bootstrap: str, prefix: str, partitions: int | None = None) -> None:
    from conveyor.contracts import RUNNER_KINDS
    from conveyor.runtime import KafkaSettings, ensure_topics

    kafka = KafkaSettings(bootstrap=bootstrap, topic_prefix=prefix)
    if partitions is not None:
        kafka = kafka.model_copy(update={"partitions": partitions})
    topics = kafka.topics.core() + [
        kafka.topics.ready(kind) for kinds in RUNNER_KINDS.values() for kind in kinds
    ]
    try:
        asyncio.run(asyncio.wait_for(ensure_topics(kafka, topics), timeout=30))
    except Exception as exc:
        raise StackError(f"cannot create topics on the broker at {bootstrap}: {exc!r}") from None


def hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


# --- the LLM provider ------------------------------------------------------------------

FAKE_LLM_MODULE = "conveyor.testing.fake_llm"
LLM_VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "CONVEYOR_LLM_ENDPOINTS",
)
FAKE_API_KEY = "fake"


def llm_configured(environ: Mapping[str, str]) -> bool:
    """True when the environment names a provider: a key or an endpoint."""
    return any(environ.get(name, "").strip() for name in LLM_VARIABLES)


def fake_provider_available() -> bool:
    try:
        return importlib.util.find_spec(f"{FAKE_LLM_MODULE}.__main__") is not None
    except ModuleNotFoundError:
        return False


def fake_provider_env(url: str) -> dict[str, str]:
    """What points the SDKs (OpenAI's and Anthropic's) of every service at ``url``."""
    return {
        "OPENAI_BASE_URL": f"{url}/v1",
        "OPENAI_API_KEY": FAKE_API_KEY,
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": FAKE_API_KEY,
    }


def fake_provider_notice(url: str) -> str:
    return (
        f"no LLM API key found: LLM steps use Conveyor's fake provider at {url}; "
        f"set OPENAI_API_KEY or OPENAI_BASE_URL (e.g. Ollama) to use a real model"
    )


def fake_provider_process(port: int, sink: Callable[[str], None]) -> _stack.ServiceProcess:
    """The fake provider as a supervised process on ``port`` of 127.0.0.1."""
    return _stack.ServiceProcess(
        "fake-llm",
        FAKE_LLM_MODULE,
        {},
        sink=sink,
        args=["--host", "127.0.0.1", "--port", str(port)],
    )
