"""Deleting a run, end to end through the real broker and PostgreSQL: the recorder's
``DELETE /runs/{id}`` deletes the history and publishes RunDeleted, the media service
deletes the run's artifacts, the scheduler its state, late events do not bring the run
back, and ``conveyor artifacts gc`` catches up for a media runner that was down."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaProducer
from sqlalchemy import select
from typer.testing import CliRunner

from conveyor.cli import stack
from conveyor.cli.client import ConveyorClient
from conveyor.cli.commands_artifacts import collect_garbage
from conveyor.cli.main import app
from conveyor.contracts import (
    ErrorInfo,
    Event,
    RetryRun,
    RunDeleted,
    RunFailed,
    RunQueued,
    RunRequested,
    RunStarted,
    StepCompleted,
    StepFailed,
    Topics,
    decode_event,
    load_pipeline,
)
from conveyor.media import MediaService, create_service
from conveyor.media.artifacts import ArtifactStore, LocalArtifactStore
from conveyor.media.errors import MediaNotFound
from conveyor.media.settings import MediaSettings
from conveyor.run_recorder import MIGRATIONS as RECORDER_MIGRATIONS
from conveyor.run_recorder import RecorderService, RecorderSettings, create_api, record_event
from conveyor.run_recorder import create_service as create_recorder
from conveyor.runtime import (
    DatabaseSettings,
    KafkaSettings,
    Undeliverable,
    create_db_engine,
    upgrade_schema,
)
from conveyor.scheduler import tables
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler


@pytest.fixture
def kafka(kafka_bootstrap: str, topic_prefix: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        session_timeout_ms=2000,  # fast group joins on the embedded broker
        heartbeat_interval_ms=500,
    )


@pytest.fixture
async def services(
    kafka: KafkaSettings, database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[RecorderService, MediaService]]:
    """The recorder and a media runner, in this process, started side by side (each joins
    a consumer group: together they take the time of one)."""
    recorder = create_recorder(
        kafka=kafka, database=DatabaseSettings(url=database_url), recorder=RecorderSettings()
    )
    media = create_service(
        kafka=kafka,
        settings=MediaSettings(
            root=tmp_path / "media", artifact_dir=tmp_path / "artifacts", ffprobe="off"
        ),
    )
    apps = (recorder.app, media.app)
    started = await asyncio.gather(*(app.start() for app in apps), return_exceptions=True)
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield recorder, media
    finally:
        await asyncio.gather(*(app.stop() for app in apps), return_exceptions=True)


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # pytest keeps its signal handlers
        yield


@contextlib.asynccontextmanager
async def _serving(app: Any) -> AsyncIterator[str]:
    """The recorder's API on a real port, for the synchronous CLI client."""
    port = stack.free_port()
    server = _Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the API did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.1)


async def _put(store: ArtifactStore, directory: Path, content: bytes, run_id: uuid.UUID) -> str:
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.bin"
    await asyncio.to_thread(path.write_bytes, content)
    return (await store.put_file(path, mime="application/octet-stream", run_id=run_id)).sha256


async def _gone(store: ArtifactStore, sha256: str) -> bool:
    try:
        await store.local_path(sha256)
    except MediaNotFound:
        return True
    return False


def test_run_deleted_travels_on_the_control_topic() -> None:
    topics = Topics("x")
    event = RunDeleted(run_id=uuid.uuid4(), requested_by="cli")
    raw = event.model_dump_json().encode()
    assert decode_event(topics, topics.runs_control, raw, fallback_event_id=uuid.uuid4()) == event


async def test_deleting_a_run_deletes_its_history_state_and_artifacts(
    services: tuple[RecorderService, MediaService],
    producer: AIOKafkaProducer,
    kafka: KafkaSettings,
    tmp_path: Path,
) -> None:
    recorder, media = services
    topics = kafka.topics
    ended, running, warm = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store, work = media.store, tmp_path / "made"
    shared = await _put(store, work, b"shared by both runs", ended)
    await _put(store, work, b"shared by both runs", running)
    own = await _put(store, work, b"the ended run's own", ended)
    warm_only = await _put(store, work, b"warming up", warm)
    # A media runner that is down while the run is deleted: it keeps its references.
    missed = LocalArtifactStore(tmp_path / "missed")
    await missed.prepare()
    missed_own = await _put(missed, work, b"made while the other was up", ended)
    never_recorded = uuid.uuid4()
    missed_unknown = await _put(missed, work, b"of a run nobody recorded", never_recorded)

    async def send(topic: str, *events: Event | bytes, key: bytes = b"k") -> None:
        for event in events:
            raw = event if isinstance(event, bytes) else event.model_dump_json().encode()
            await producer.send_and_wait(topic, raw, key=key)

    error = ErrorInfo(type="Boom", message="it broke")
    await send(
        topics.runs_events,
        RunQueued(run_id=ended, pipeline="p"),
        RunStarted(run_id=ended, pipeline="p", version=1),
        RunFailed(run_id=ended, error=error, step_id="s"),
        RunQueued(run_id=running, pipeline="p"),
        RunStarted(run_id=running, pipeline="p", version=1),
        f'{{"type": "Nonsense", "run_id": "{ended}"}}'.encode(),  # dead-lettered
    )
    await send(
        topics.steps_completed, StepFailed(run_id=ended, step_id="s", attempt=1, error=error)
    )

    transport = httpx.ASGITransport(app=recorder.http)
    async with httpx.AsyncClient(transport=transport, base_url="http://recorder") as client:

        async def shows(path: str, done: Callable[[Any], bool], **params: str) -> bool:
            response = await client.get(path, params=params)
            return response.status_code == 200 and done(response.json())

        await _until(lambda: shows(f"/runs/{ended}", lambda r: r["status"] == "failed"), "ended")
        await _until(lambda: shows(f"/runs/{running}", lambda r: r["status"] == "running"), "run")
        about_ended = {"run_id": str(ended)}
        await _until(
            lambda: shows("/errors", lambda b: len(b["items"]) == 3, **about_ended), "errors"
        )
        letters = (await client.get("/dead-letters")).json()["items"]
        assert [str(ended) in letter["value"] for letter in letters] == [True]

        # The media runner reads the control topic from its end: once it deleted a warm-up
        # run's artifacts, it reads what follows.
        async def warmed() -> bool:
            await send(topics.runs_control, RunDeleted(run_id=warm))
            return await _gone(store, warm_only)

        await _until(warmed, "the media runner reading runs.control")

        refused = await client.delete(f"/runs/{running}")
        assert refused.status_code == 409, refused.text
        assert "is running" in refused.json()["detail"]
        assert (await client.delete(f"/runs/{uuid.uuid4()}")).status_code == 404

        deleted = await client.delete(f"/runs/{ended}", params={"requested_by": "ada"})
        assert deleted.status_code == 200, deleted.text
        body = deleted.json()
        assert (body["run_id"], body["deleted_by"], body["already_deleted"]) == (
            str(ended),
            "ada",
            False,
        )

        # through the broker: the media runner deletes what only the deleted run had
        await _until(lambda: _gone(store, own), "the deleted run's own artifact deleted")
        assert (await store.local_path(shared)).read_bytes() == b"shared by both runs"
        assert await store.run_ids() == [running]

        gone = await client.get(f"/runs/{ended}")
        assert gone.status_code == 410
        assert "was deleted at" in gone.json()["detail"]
        assert "by ada" in gone.json()["detail"]
        assert (await client.get(f"/runs/{ended}/events")).status_code == 410
        assert (await client.get("/errors", params=about_ended)).json()["items"] == []
        assert (await client.get("/dead-letters")).json()["items"] == []
        assert (await client.get(f"/runs/{running}")).status_code == 200

        # A late event about the deleted run does not bring it back: a marker sent after
        # it on the same partition shows that it was read.
        marker = uuid.uuid4()
        late = StepCompleted(run_id=ended, step_id="s", attempt=2, output="late")
        await send(
            topics.steps_completed,
            late,
            StepCompleted(run_id=marker, step_id="s", attempt=1),
            key=b"late",
        )
        await _until(
            lambda: shows(f"/runs/{marker}/events", lambda b: bool(b["items"])), "the marker"
        )
        assert (await client.get(f"/runs/{ended}")).status_code == 410

    # The CLI, against the recorder's API on a real port.
    async with _serving(recorder.http) as url:
        env = {"CONVEYOR_RECORDER_URL": url, "CONVEYOR_MEDIA_ARTIFACT_DIR": str(missed.directory)}

        def conveyor(*args: str) -> Any:
            return CliRunner().invoke(app, list(args), env=env)

        # deleting again announces it again, for runners that missed it
        again = await asyncio.to_thread(conveyor, "runs", "delete", str(ended))
        assert again.exit_code == 0, again.output
        assert f"deleted run {ended} (it had been deleted before" in again.output
        busy = await asyncio.to_thread(conveyor, "runs", "delete", str(running))
        assert busy.exit_code == 2
        assert f"run {running} is running" in busy.output
        shown = await asyncio.to_thread(conveyor, "runs", "show", str(ended))
        assert shown.exit_code == 2
        assert f"run {ended} was deleted at" in shown.output

        # `conveyor artifacts gc` for the runner that was down
        with ConveyorClient(api_url="http://127.0.0.1:9", recorder_url=url) as cli:
            dry = await asyncio.to_thread(collect_garbage, missed, cli, dry_run=True)
        assert dry == ([ended], [never_recorded], 0)
        assert not await _gone(missed, missed_own)
        gc = await asyncio.to_thread(conveyor, "artifacts", "gc")
        assert gc.exit_code == 0, gc.output
        assert "1 artifact(s) of 1 deleted run(s) deleted" in gc.output
        assert "kept the references of 1 run(s) the recorder does not know" in gc.output
    assert await _gone(missed, missed_own)
    assert not await _gone(missed, missed_unknown)
    assert await missed.run_ids() == [never_recorded]


@dataclass
class _Origin:
    topic: str
    partition: int = 0
    offset: int = 0


async def test_a_replayed_stream_ends_with_the_run_deleted(database_url: str) -> None:
    """Rebuilding the read model from the stream: the run's events, RunDeleted, then an
    event about it that was read later. Nothing of the run is left, and the tombstone
    answers 410."""
    upgrade_schema(database_url, migrations=RECORDER_MIGRATIONS, schema="recorder")
    engine = create_db_engine(DatabaseSettings(url=database_url))
    run_id = uuid.uuid4()
    error = ErrorInfo(type="Boom", message="it broke")
    try:
        for event in (
            RunQueued(run_id=run_id, pipeline="p"),
            StepFailed(run_id=run_id, step_id="s", attempt=1, error=error),
            RunFailed(run_id=run_id, error=error, step_id="s"),
        ):
            assert await record_event(engine, event, _Origin("x.runs.events"))
        deletion = RunDeleted(run_id=run_id, requested_by="replay")
        assert await record_event(engine, deletion, _Origin("x.runs.control"))
        assert await record_event(engine, deletion, _Origin("x.runs.control"))  # idempotent
        late = StepCompleted(run_id=run_id, step_id="s", attempt=2)
        assert not await record_event(engine, late, _Origin("x.steps.completed"))

        transport = httpx.ASGITransport(app=create_api(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            gone = await client.get(f"/runs/{run_id}")
            assert gone.status_code == 410
            assert "by replay" in gone.json()["detail"]
            errors = await client.get("/errors", params={"run_id": str(run_id)})
            assert errors.json()["items"] == []
            # no broker here: the deletion is recorded, and nothing is announced
            again = await client.delete(f"/runs/{run_id}")
            assert again.status_code == 200
            assert again.json()["already_deleted"] is True
    finally:
        await engine.dispose()


NAME = f"deleted-{uuid.uuid4().hex[:6]}"
PIPELINE = f"""
name: {NAME}
steps:
  - id: t
    type: transform
    with: {{template: "done"}}
"""


async def test_the_scheduler_forgets_a_deleted_run_once_it_has_ended(database_url: str) -> None:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    engine = create_db_engine(DatabaseSettings(url=database_url))
    try:
        scheduler = Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
        await register_pipeline(scheduler, load_pipeline(PIPELINE), source_file="p.yaml")
        ended = RunRequested(pipeline=NAME, idempotency_key=f"k-{uuid.uuid4()}")
        running = RunRequested(pipeline=NAME)
        for request in (ended, running):
            await scheduler.handle(request)
        await scheduler.handle(
            StepCompleted(run_id=ended.resolved_run_id(), step_id="t", attempt=1, output="done")
        )

        for run_id in (ended.resolved_run_id(), running.resolved_run_id(), uuid.uuid4()):
            await scheduler.handle(RunDeleted(run_id=run_id))  # an unknown run: nothing

        async with engine.connect() as conn:
            left = (await conn.execute(select(tables.runs.c.id, tables.runs.c.status))).all()
            keys = (
                await conn.execute(
                    select(tables.idempotency_keys.c.key).where(
                        tables.idempotency_keys.c.key == ended.idempotency_key
                    )
                )
            ).all()
        assert (ended.resolved_run_id(), "succeeded") not in left
        assert (running.resolved_run_id(), "running") in left  # not over: kept
        assert keys == []  # the key may start a new run
        with pytest.raises(Undeliverable, match="does not exist"):
            await scheduler.handle(RetryRun(run_id=ended.resolved_run_id()))
    finally:
        await engine.dispose()
