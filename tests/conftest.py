"""Fixtures for tests against the real thing: a Kafka-protocol broker and PostgreSQL.

Where they come from, in order:
- ``CONVEYOR_KAFKA_BOOTSTRAP`` / ``CONVEYOR_DATABASE_URL`` when set;
- testcontainers (Apache Kafka, PostgreSQL) where a Docker engine answers;
- else the embedded broker (Tansu) and the machine's PostgreSQL on 127.0.0.1:5432, or an
  embedded PostgreSQL when there is none.

Each test isolates itself with its own topic prefix (and so its own consumer groups);
each module that starts services gets its own database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.cli import stack


def _docker_running() -> bool:
    if os.environ.get("CONVEYOR_TESTCONTAINERS", "auto") == "off" or not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP"):
        yield os.environ["CONVEYOR_KAFKA_BOOTSTRAP"]
        return
    if _docker_running():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    broker = stack.start_broker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("CONVEYOR_DATABASE_URL"):
        yield os.environ["CONVEYOR_DATABASE_URL"]
        return
    local = stack.local_postgres_url()
    if local:
        yield local
        return
    if _docker_running():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None) as pg:
            yield pg.get_connection_url()
        return
    # Not under pytest's temporary root: each pytest session resets that to mode 0700,
    # which locks out the embedded server's own user when it runs as root.
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="conveyor-test-pg-"))
    server, url = stack.start_embedded_postgres(data / "data")
    try:
        yield url
    finally:
        server.cleanup()  # type: ignore[attr-defined]
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh database for the module, dropped afterwards."""
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    url = stack.create_database(postgres_server_url, name)
    try:
        yield url
    finally:
        stack.drop_database(postgres_server_url, name)


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
