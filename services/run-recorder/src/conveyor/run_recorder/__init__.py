"""The run recorder: projects Conveyor's event stream into a queryable run history and
error log, and serves it over HTTP (``/runs``, ``/errors``, ``/dead-letters``, ...)."""

from conveyor.run_recorder.api import create_api
from conveyor.run_recorder.handlers import create_router, recorded_topics
from conveyor.run_recorder.main import (
    MIGRATIONS,
    RecorderService,
    RecorderSettings,
    create_app,
    create_service,
    main,
)
from conveyor.run_recorder.projection import project_event, record_event

__all__ = [
    "MIGRATIONS",
    "RecorderService",
    "RecorderSettings",
    "create_api",
    "create_app",
    "create_router",
    "create_service",
    "main",
    "project_event",
    "record_event",
    "recorded_topics",
]
