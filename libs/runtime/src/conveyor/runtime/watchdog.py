"""The broker watchdog every service runs: it reports an outage in a few lines rather than
thousands, and ends the process when the broker comes back without the service's topics.

aiokafka reconnects by itself once the broker answers again, and with a broker that keeps
its data (Apache Kafka) nothing more is needed: the watchdog only says when the outage
began and ended. A broker that lost its data is another matter. The embedded broker (Tansu)
keeps everything in memory, so a restart loses every topic, offset and consumer group, and
consumers cannot recover in place: aiokafka retries an offset commit to a topic that no
longer exists forever, which wedges the handler that waits for it, and positions point into
logs that are gone. When a probe finds a topic the service reads missing, the watchdog logs
why and exits the process at once with status 75 (``EX_TEMPFAIL``), as a crash would: the
database holds every state and the outbox every unsent event, and what the broker lost is
lost already. The supervisor (``conveyor up``, a container runtime's restart policy) starts
the service again; a fresh start creates the topics and joins the consumer groups anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable

from aiokafka.client import AIOKafkaClient

__all__ = ["EXIT_BROKER_LOST_DATA", "BrokerWatchdog", "exit_process"]

EXIT_BROKER_LOST_DATA = 75
"""The exit status of a service whose broker lost its topics (``EX_TEMPFAIL``: start it
again)."""

log = logging.getLogger("conveyor.runtime.watchdog")


def exit_process(status: int) -> None:
    """End the process now: log handlers flushed, no shutdown hooks (they would talk to a
    broker that lost its data, and auto-create topics with the wrong partition count)."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(status)


class BrokerWatchdog:
    """Probes the broker every ``interval_s`` for the topics a service reads."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Iterable[str],
        service: str,
        interval_s: float = 1.0,
        probe_timeout_s: float = 10.0,
        report_every_s: float = 30.0,
        on_lost_topics: Callable[[str], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = frozenset(topics)
        self.service = service
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.report_every_s = report_every_s
        self._on_lost_topics = on_lost_topics or self._exit
        self.unreachable_since: float | None = None
        """``time.monotonic()`` of the first failed probe of the current outage."""
        self._reported_at = 0.0
        self._stopped = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-broker-watchdog")

    async def stop(self) -> None:
        """Stop probing. Waits for a probe in progress a moment at most: a cancellation can
        be lost inside aiokafka's connection timeouts, and a stopping service must not hang
        on its watchdog."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
            self._task = None

    async def probe(self) -> set[str]:
        """The broker's topic names; raises when the broker does not answer."""
        client = AIOKafkaClient(
            bootstrap_servers=self.bootstrap,
            client_id=f"conveyor-{self.service}-watchdog",
            request_timeout_ms=int(self.probe_timeout_s * 1000),
        )
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await client.bootstrap()
            return set(client.cluster.topics())
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def check(self) -> None:
        """One probe, and what follows from it."""
        try:
            present = await self.probe()
        except Exception as exc:
            self._unreachable(exc)
            return
        if self._stopped:
            return
        if self.unreachable_since is not None:
            down_for = time.monotonic() - self.unreachable_since
            log.warning("broker %s answers again after %.0fs", self.bootstrap, down_for)
            self.unreachable_since = None
        missing = sorted(self.topics - present)
        if missing:
            self._on_lost_topics(
                f"broker {self.bootstrap} no longer has topic(s) {', '.join(missing)} that "
                f"{self.service} reads: it lost its data (the embedded broker keeps everything "
                "in memory, and a restart loses it). Exiting with status "
                f"{EXIT_BROKER_LOST_DATA} so that the supervisor starts {self.service} "
                "again: a fresh start creates the topics and joins the consumer groups anew"
            )

    def _unreachable(self, exc: BaseException) -> None:
        now = time.monotonic()
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.unreachable_since is None:
            self.unreachable_since = self._reported_at = now
            log.warning(
                "broker %s unreachable (%s): consumers and producers retry until it is "
                "back; events waiting to be published stay in the outbox",
                self.bootstrap,
                why,
            )
        elif now - self._reported_at >= self.report_every_s:
            self._reported_at = now
            log.warning(
                "broker %s still unreachable after %.0fs (%s)",
                self.bootstrap,
                now - self.unreachable_since,
                why,
            )

    def _exit(self, message: str) -> None:
        log.error("%s", message)
        exit_process(EXIT_BROKER_LOST_DATA)

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # the watchdog must never take the service down by mistake
                log.exception("broker watchdog probe failed")
