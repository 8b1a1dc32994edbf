"""The step-runner: a stateless consumer group serving the ``transform`` and ``http`` kinds."""

from conveyor.step_runner.main import StepRunnerService, create_app, create_service, main

__all__ = ["StepRunnerService", "create_app", "create_service", "main"]
