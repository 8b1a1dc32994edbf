"""Tracer provider for a service: OTLP when configured, a JSON-lines file for local checks."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from conveyor.runtime.settings import TelemetrySettings

__all__ = ["JsonLinesSpanExporter", "create_tracer_provider"]


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object a span: enough to check that a run is one trace."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            if ctx is None:
                continue
            lines.append(
                json.dumps(
                    {
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "attributes": {k: str(v) for k, v in (span.attributes or {}).items()},
                    }
                )
            )
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def create_tracer_provider(
    service: str, settings: TelemetrySettings | None = None
) -> TracerProvider:
    settings = settings or TelemetrySettings()
    provider = TracerProvider(resource=Resource.create({"service.name": f"conveyor-{service}"}))
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if settings.conveyor_trace_file:
        provider.add_span_processor(
            SimpleSpanProcessor(JsonLinesSpanExporter(settings.conveyor_trace_file))
        )
    return provider
