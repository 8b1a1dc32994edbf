"""Run a service process: its FastStream app, and its HTTP API when it has one.

SIGTERM or SIGINT stops it gracefully: the HTTP server stops taking requests, the broker
finishes the message in hand, commits and leaves its consumer groups, then shutdown hooks
run. A failure to start exits non-zero so that a supervisor restarts the process.

While it runs, a ``BrokerWatchdog`` reports broker outages and exits with status 75 when
the broker lost the service's topics (see ``watchdog``); aiokafka's own complaints during
an outage (a few hundred a second) are cut to one line per kind every 30 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from faststream import FastStream

from conveyor.runtime.settings import KafkaSettings
from conveyor.runtime.watchdog import BrokerWatchdog

__all__ = ["configure_logging", "run_service"]

_REPEAT_WINDOW_S = 30.0
_DIGITS = re.compile(r"\d+")


class _RepeatFilter(logging.Filter):
    """Lets one record of a kind (the message with its numbers blanked) through per window
    and counts the rest, for libraries that log every failed retry."""

    def __init__(self, prefix: str, *, window_s: float = _REPEAT_WINDOW_S) -> None:
        super().__init__()
        self._prefix = prefix
        self._window_s = window_s
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, _DIGITS.sub("N", message))
        now = time.monotonic()
        last, suppressed = self._seen.get(key, (-self._window_s, 0))
        if now - last < self._window_s:
            self._seen[key] = (last, suppressed + 1)
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if suppressed:
            record.msg = f"{message} (and {suppressed} more like it in {self._window_s:.0f}s)"
            record.args = ()
        return True


def configure_logging(service: str) -> None:
    level = os.environ.get("CONVEYOR_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    quiet = logging.WARNING if level != "DEBUG" else logging.DEBUG
    # Per-message "Received/Processed" lines and migration chatter drown what matters.
    for noisy in ("aiokafka", "uvicorn.access", "httpx", "alembic", f"conveyor.{service}.broker"):
        logging.getLogger(noisy).setLevel(quiet)
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RepeatFilter("aiokafka"))


def run_service(
    app: FastStream, *, name: str, http: Any = None, host: str = "127.0.0.1", port: int = 0
) -> None:
    configure_logging(name)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(app, name=name, http=http, host=host, port=port))


async def _serve(app: FastStream, *, name: str, http: Any, host: str, port: int) -> None:
    log = logging.getLogger(f"conveyor.{name}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await app.start()
    watchdog = _watchdog(app, name)
    if watchdog is not None:
        await watchdog.start()
    server_task: asyncio.Task[None] | None = None
    server = None
    if http is not None and port:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # signals are ours, not uvicorn's
                yield

        server = _Server(
            uvicorn.Config(http, host=host, port=port, log_level="warning", lifespan="off")
        )
        server_task = asyncio.create_task(server.serve(), name=f"{name}-http")
        log.info("%s API on http://%s:%d", name, host, port)
    log.info("%s started (pid %d)", name, os.getpid())
    stop_wait = asyncio.create_task(stop.wait())
    waiters: list[asyncio.Task[Any]] = [stop_wait]
    if server_task is not None:
        waiters.append(server_task)
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    log.info("%s stopping", name)
    if watchdog is not None:
        await watchdog.stop()
    if server is not None and server_task is not None:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await server_task
    await app.stop()
    stop_wait.cancel()
    log.info("%s stopped", name)
    if server_task is not None and server_task.done() and not stop.is_set():
        raise SystemExit(f"{name}: HTTP server exited (port {port} in use?)")


def _watchdog(app: FastStream, name: str) -> BrokerWatchdog | None:
    """A watchdog over the topics the app's subscribers read (they exist once it started)."""
    broker = app.broker
    if broker is None:
        return None
    topics = {t for sub in broker.subscribers for t in getattr(sub, "topic_names", ())}
    if not topics:
        return None
    return BrokerWatchdog(bootstrap=KafkaSettings().bootstrap, topics=topics, service=name)
