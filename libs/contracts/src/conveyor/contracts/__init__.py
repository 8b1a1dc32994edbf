"""Conveyor's contracts: events, topic names, the pipeline spec and templates. No I/O."""

from conveyor.contracts.artifacts import (
    ARTIFACT_SCHEME,
    ArtifactRef,
    artifact_uri,
    parse_artifact_uri,
)
from conveyor.contracts.events import *  # noqa: F403
from conveyor.contracts.events import __all__ as _events_all
from conveyor.contracts.kinds import KIND_CONFIGS, RUNNER_KINDS
from conveyor.contracts.pipeline import *  # noqa: F403
from conveyor.contracts.pipeline import __all__ as _pipeline_all
from conveyor.contracts.prompts import *  # noqa: F403
from conveyor.contracts.prompts import __all__ as _prompts_all
from conveyor.contracts.topics import EventDecodeError, Topics, decode_event

__all__ = [
    *_events_all,
    *_pipeline_all,
    *_prompts_all,
    "ARTIFACT_SCHEME",
    "ArtifactRef",
    "KIND_CONFIGS",
    "RUNNER_KINDS",
    "EventDecodeError",
    "Topics",
    "artifact_uri",
    "decode_event",
    "parse_artifact_uri",
]
