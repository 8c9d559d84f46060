"""OpenTelemetry traces around decide → OPA → stores, when an exporter is configured.

Without one (the default) the tracer is OpenTelemetry's no-op tracer: nothing is
recorded and nothing is exported. `otlp` sends spans with the OTLP/HTTP exporter, which
reads the standard OTEL_EXPORTER_OTLP_* environment variables; `console` prints them.
"""

from __future__ import annotations

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
