"""docker-compose.yml and the Dockerfile, checked offline (there may be no Docker engine)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.cli.stack import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_every_service_and_its_infrastructure_is_there(services: dict[str, Any]) -> None:
    assert set(services) >= {*SERVICES, "kafka", "postgres", "jaeger"}


def test_each_conveyor_service_runs_the_one_image_with_its_own_module(
    services: dict[str, Any],
) -> None:
    images = set()
    for name, module in SERVICES.items():
        service = services[name]
        assert service["command"] == ["python", "-m", module]
        assert service["build"] == "."
        images.add(service["image"])
    assert len(images) == 1


def test_conveyor_services_reach_kafka_postgres_and_jaeger(services: dict[str, Any]) -> None:
    for name in SERVICES:
        env = _env(services[name])
        assert env["CONVEYOR_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert (
            env["CONVEYOR_DATABASE_URL"] == "postgresql://postgres:postgres@postgres:5432/conveyor"
        )
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
        assert env["CONVEYOR_KAFKA_FETCH_MAX_WAIT_MS"] == "100"
        assert env["CONVEYOR_API_HOST"] == "0.0.0.0"
        assert env["CONVEYOR_RECORDER_HOST"] == "0.0.0.0"
        media = env["CONVEYOR_MEDIA_ROOT"]
        assert f"media:{media}" in services[name]["volumes"]
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("scheduler", "run-recorder"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_ports_replicas_and_volumes(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "8701:8701" in services["scheduler"]["ports"]
    assert "8700:8700" in services["run-recorder"]["ports"]
    assert "16686:16686" in services["jaeger"]["ports"]
    assert services["step-runner"]["deploy"]["replicas"] == 3
    assert "media" in compose["volumes"]


def test_kafka_is_a_single_kraft_node_reachable_as_kafka_9092(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "healthcheck" in kafka


def test_postgres_creates_the_conveyor_database_and_reports_health(
    services: dict[str, Any],
) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:17"
    env = _env(postgres)
    assert env["POSTGRES_DB"] == "conveyor"
    assert env["POSTGRES_PASSWORD"] == "postgres"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_jaeger_takes_otlp_over_http(services: dict[str, Any]) -> None:
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one")


def test_the_dockerfile_builds_one_locked_image_with_ffmpeg() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    assert "ffmpeg" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    assert ".git" in ignored
    # every workspace member's manifest is copied before the dependency layer is built
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]
    members = [m for pattern in workspace["members"] for m in sorted(ROOT.glob(pattern))]
    assert len(members) >= 7
    for member in members:
        path = member.relative_to(ROOT).as_posix()
        assert f"COPY {path}/pyproject.toml {path}/" in dockerfile


def test_media_keeps_its_artifacts_on_a_volume_of_their_own(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    media = services["media"]
    artifacts = _env(media)["CONVEYOR_MEDIA_ARTIFACT_DIR"]
    assert f"artifacts:{artifacts}" in media["volumes"]
    assert "artifacts" in compose["volumes"]
    # the image creates the mount point, so the volume belongs to the service's user
    assert artifacts in (ROOT / "Dockerfile").read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file() -> None:
    completed = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
