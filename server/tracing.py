"""OpenTelemetry behind the core's Tracer (docs/protocol.md, Traces): the SDK's tracer provider,
its batch processor and the OTLP/HTTP exporter, which read the standard OTEL_* variables. Imported
only when an endpoint is set: with tracing off nothing of it is loaded.

The provider is the service's own, never the process-wide one: several services in one process
(the tests) each export where they were told."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server import logs
from server.config import Settings
from server.core.ports import Span, SpanValue

_PROPAGATOR = TraceContextTextMapPropagator()
FLUSH_AT_STOP_MILLIS = 5000


def traces_endpoint(settings: Settings) -> str | None:
    """Where spans go: the traces endpoint as given, else the base endpoint's `/v1/traces`."""
    if settings.otel_exporter_otlp_traces_endpoint:
        return settings.otel_exporter_otlp_traces_endpoint
    if settings.otel_exporter_otlp_endpoint:
        return settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    return None


class OtelSpan:
    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def set(self, attributes: Mapping[str, SpanValue | None]) -> None:
        self.span.set_attributes({key: value for key, value in attributes.items() if value is not None})

    def fail(self, error_type: str) -> None:
        self.span.set_attribute("error.type", error_type)
        self.span.set_status(Status(StatusCode.ERROR))

    def end(self) -> None:
        self.span.end()


class OtelTracer:
    def __init__(self, provider: TracerProvider, capture_content: bool) -> None:
        self.capture_content = capture_content
        self._provider = provider
        self._tracer = provider.get_tracer("realtime-ai-backend")

    def start(
        self,
        name: str,
        attributes: Mapping[str, SpanValue | None],
        *,
        client: bool = False,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Span:
        context = None
        if traceparent is not None:  # an invalid one gives an empty context: a new trace
            carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
            context = _PROPAGATOR.extract(carrier)
        span = self._tracer.start_span(
            name,
            context=context,
            kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
            attributes={key: value for key, value in attributes.items() if value is not None},
        )
        return OtelSpan(span)

    def current(self, span: Span) -> AbstractContextManager[object]:
        if not isinstance(span, OtelSpan):
            return nullcontext()
        # The turn reports its own outcome: an exception leaving the block is not the span's.
        return trace.use_span(span.span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def within_span(self) -> bool:
        return trace.get_current_span().get_span_context().is_valid

    async def aclose(self) -> None:
        """Send what is still held (for a few seconds at most), then stop the exporter's thread."""

        def flush_and_stop() -> None:
            self._provider.force_flush(FLUSH_AT_STOP_MILLIS)
            self._provider.shutdown()

        await asyncio.to_thread(flush_and_stop)


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids (hex), for a log line written within it."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def start_tracing(settings: Settings) -> OtelTracer | None:
    """The tracer, when an endpoint is set (and OTEL_SDK_DISABLED is not)."""
    endpoint = traces_endpoint(settings)
    if endpoint is None or settings.otel_sdk_disabled:
        return None
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: settings.otel_service_name}), shutdown_on_exit=False
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    logs.trace_ids = current_ids
    return OtelTracer(provider, settings.otel_instrumentation_genai_capture_message_content)
