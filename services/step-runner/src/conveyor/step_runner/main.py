"""Composition root of the step-runner: settings, telemetry, broker, executors, router."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from faststream import FastStream
from faststream.kafka import KafkaBroker

from conveyor.runtime import (
    KafkaSettings,
    create_broker,
    create_tracer_provider,
    run_service,
)
from conveyor.runtime.runner import (
    Executor,
    RunnerSettings,
    StepDispatcher,
    StepHarness,
    create_runner_app,
)
from conveyor.step_runner.handlers import create_router
from conveyor.step_runner.http_step import HttpStep
from conveyor.step_runner.llm.step import LlmStep
from conveyor.step_runner.settings import LlmSettings, StepRunnerSettings
from conveyor.step_runner.transform import run_transform

__all__ = ["SERVICE", "StepRunnerService", "create_app", "create_service", "main"]

SERVICE = "step-runner"


@dataclass(frozen=True)
class StepRunnerService:
    app: FastStream
    broker: KafkaBroker
    harness: StepHarness
    dispatcher: StepDispatcher
    http_client: httpx.AsyncClient
    llm: LlmStep


def create_service(
    *,
    kafka: KafkaSettings | None = None,
    settings: StepRunnerSettings | None = None,
    runner: RunnerSettings | None = None,
    llm: LlmSettings | None = None,
) -> StepRunnerService:
    kafka = kafka or KafkaSettings()
    settings = settings or StepRunnerSettings()
    runner = runner or RunnerSettings()
    llm = llm or LlmSettings()
    tracer_provider = create_tracer_provider(SERVICE)
    broker = create_broker(kafka, service=SERVICE, tracer_provider=tracer_provider)
    # One client, so one connection pool, for every http step of the process.
    http_client = httpx.AsyncClient(
        timeout=settings.http_timeout_s,
        limits=httpx.Limits(max_connections=settings.http_max_connections),
        headers={"user-agent": "conveyor-step-runner"},
    )
    http_step = HttpStep(http_client, max_body_bytes=settings.http_max_body_bytes)
    # Provider clients, the rate limiter and the answer cache are made at first use.
    # An llm step's tools run through the same executors as steps of their kinds.
    executors: dict[str, Executor] = {"transform": run_transform, "http": http_step}
    llm_step = LlmStep(llm, tools=executors)

    async def close_clients() -> None:
        # After the broker stopped, so after the drain: steps in hand need the client.
        await llm_step.aclose()
        await http_client.aclose()
        tracer_provider.shutdown()

    wired = create_runner_app(
        service=SERVICE,
        kafka=kafka,
        runner=runner,
        broker=broker,
        executors={**executors, "llm": llm_step},
        create_router=create_router,
        tracer_provider=tracer_provider,
        after_shutdown=[close_clients],
    )
    app, harness, dispatcher = wired.app, wired.harness, wired.dispatcher
    return StepRunnerService(
        app=app,
        broker=broker,
        harness=harness,
        dispatcher=dispatcher,
        http_client=http_client,
        llm=llm_step,
    )


def create_app() -> FastStream:
    """For ``faststream run|docs gen --factory conveyor.step_runner.main:create_app``."""
    return create_service().app


def main() -> None:
    run_service(create_app(), name=SERVICE)
