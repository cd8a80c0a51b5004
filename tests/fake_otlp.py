"""A local OTLP/HTTP receiver: what a collector (Jaeger, Tempo, the OpenTelemetry Collector) is
sent, decoded with OpenTelemetry's own protobuf messages, kept as plain spans for tests to read."""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

KINDS = {SpanMessage.SPAN_KIND_INTERNAL: "internal", SpanMessage.SPAN_KIND_CLIENT: "client"}


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    attributes: dict[str, Any]
    error: bool  # status ERROR
    resource: dict[str, Any] = field(default_factory=dict)


class FakeOtlp:
    def __init__(self) -> None:
        self.url = ""  # the base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), set once it serves
        self.spans: list[ReceivedSpan] = []
        self.requests: list[dict[str, str]] = []  # each export's headers
        self._arrived = asyncio.Event()
        self.app = Starlette(routes=[Route("/v1/traces", self._export, methods=["POST"])])

    async def _export(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers["content-type"] == "application/x-protobuf", request.headers
        self.requests.append(dict(request.headers))
        exported = ExportTraceServiceRequest.FromString(body)
        for resource_spans in exported.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(_span(span, resource) for span in scope_spans.spans)
        self._arrived.set()
        answer = ExportTraceServiceResponse().SerializeToString()
        return Response(answer, media_type="application/x-protobuf")

    async def wait_for(self, name: str, count: int = 1, timeout: float = 10) -> list[ReceivedSpan]:
        """The spans of this name, once at least `count` have arrived."""
        async with asyncio.timeout(timeout):
            while len(found := self.named(name)) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return found

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def children(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.parent_span_id == parent.span_id]


def _span(span: SpanMessage, resource: dict[str, Any]) -> ReceivedSpan:
    return ReceivedSpan(
        name=span.name,
        kind=KINDS.get(span.kind, str(span.kind)),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        attributes=_attributes(span.attributes),
        error=span.status.code == Status.STATUS_CODE_ERROR,
        resource=resource,
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None
