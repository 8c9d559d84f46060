"""OpenTelemetry traces around decide → OPA → stores, when an exporter is configured.

Without one (the default) the tracer is OpenTelemetry's no-op tracer: nothing is
recorded and nothing is exported. `otlp` sends spans with the OTLP/HTTP exporter, which
reads the standard OTEL_EXPORTER_OTLP_* environment variables; `console` prints them.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

from engine import __version__

TRACER_NAME = "mcp-policy-engine"


def provider_for(exporter: str) -> TracerProvider | None:
    """A tracer provider exporting to `exporter` ("otlp", "console"), or None for "none"."""
    if exporter == "none":
        return None
    chosen: SpanExporter
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        chosen = OTLPSpanExporter()
    elif exporter == "console":
        chosen = ConsoleSpanExporter()
    else:
        raise ValueError(f"unknown trace exporter {exporter!r}")
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": "mcp-policy-engine", "service.version": __version__}
        )
    )
    provider.add_span_processor(BatchSpanProcessor(chosen))
    return provider


def tracer_from(provider: TracerProvider | None) -> trace.Tracer:
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(TRACER_NAME, __version__)


class _Unrecorded:
    """What a span is when nothing records spans: attributes go nowhere."""

    def set_attribute(self, key: str, value: Any) -> None:
        return None


_UNRECORDED = contextlib.nullcontext(_Unrecorded())


def span(tracer: trace.Tracer, name: str) -> AbstractContextManager[Any]:
    """`tracer.start_as_current_span(name)`, or, for the no-op tracer (no exporter), a
    context that costs nothing: OpenTelemetry's own no-op span still costs microseconds
    per span, on every decision."""
    if isinstance(tracer, trace.NoOpTracer):
        return _UNRECORDED
    return tracer.start_as_current_span(name)
