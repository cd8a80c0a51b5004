"""The spans the core makes, in OpenTelemetry's GenAI conventions (docs/protocol.md, Traces): their
names and attributes in one place, so that every model request and tool call reads the same."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Literal

from server.core.models import ErrorInfo, JSONValue, Usage
from server.core.ports import (
    Approval,
    ConversationItem,
    Finished,
    ModelEvent,
    ModelInfo,
    ModelProvider,
    ModelRequest,
    ModelText,
    ProviderError,
    Span,
    SpanValue,
    TextDelta,
    ToolCallItem,
    ToolCallRequest,
    ToolResultItem,
    TraceParent,
    Tracer,
    UsageReport,
    UserText,
)

AGENT = "realtime"
Purpose = Literal["summary", "title", "compaction"]  # a model request that is not a turn's


def turn_span(tracer: Tracer, info: ModelInfo, session_id: str, turn_id: str, trace: TraceParent | None) -> Span:
    """A turn, within the trace its client sent (`trace`), or a trace of its own."""
    return tracer.start(
        f"invoke_agent {AGENT}",
        {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": AGENT,
            "gen_ai.conversation.id": session_id,
            "realtime.turn.id": turn_id,
            "gen_ai.provider.name": info.provider,
            "gen_ai.request.model": info.model,
        },
        traceparent=trace.traceparent if trace is not None else None,
        tracestate=trace.tracestate if trace is not None else None,
    )


def model_span(tracer: Tracer, info: ModelInfo, purpose: Purpose | None = None) -> Span:
    return tracer.start(
        f"{info.operation} {info.model}",
        {
            "gen_ai.operation.name": info.operation,
            "gen_ai.provider.name": info.provider,
            "gen_ai.request.model": info.model,
            "server.address": info.server_address,
            "server.port": info.server_port,
            "realtime.request.purpose": purpose,
        },
        client=True,
    )


def ended(span: Span, finish_reason: str | None, usage: Usage | None, error: str | None = None) -> None:
    """What a model request or a turn came to, and the span's end."""
    span.set(
        {
            "gen_ai.response.finish_reasons": [finish_reason] if finish_reason else None,
            "gen_ai.usage.input_tokens": usage.input_tokens if usage is not None else None,
            "gen_ai.usage.output_tokens": usage.output_tokens if usage is not None else None,
        }
    )
    if error is not None:
        span.fail(error)
    span.end()


def error_type(exc: BaseException) -> str:
    """A failure as `error.type`: the code clients see, else the exception's class."""
    return str(exc.code) if isinstance(exc, ProviderError) else type(exc).__name__


@asynccontextmanager
async def model_request(tracer: Tracer, info: ModelInfo, purpose: Purpose) -> AsyncIterator[Span]:
    """A request that is not a turn's (a summary, a title, a compaction), as its own span."""
    span = model_span(tracer, info, purpose)
    try:
        yield span
    except Exception as exc:
        span.fail(error_type(exc))
        raise
    finally:
        span.end()


class TracedProvider:
    """A provider whose every request is a span: a turn's streams (their finish reason and usage
    read as they pass), summaries, titles and compactions. Only used with tracing on."""

    def __init__(self, provider: ModelProvider, tracer: Tracer) -> None:
        self._provider = provider
        self._tracer = tracer
        self.name = provider.name
        self.info = provider.info
        self.max_request_file_bytes = provider.max_request_file_bytes
        self.takes_files = provider.takes_files

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        tracer = self._tracer
        span = model_span(tracer, self.info)
        span.set(input_messages(tracer, request.conversation))
        text: list[str] = []
        calls: list[ToolCallItem] = []
        finish: str | None = None
        usage: Usage | None = None
        failure: str | None = None
        try:
            async with aclosing(self._provider.stream(request)) as events:
                async for event in events:
                    if isinstance(event, TextDelta) and tracer.capture_content:
                        text.append(event.text)
                    elif isinstance(event, ToolCallRequest):
                        calls.append(ToolCallItem(event.call_id, event.name, event.args))
                    elif isinstance(event, UsageReport):
                        usage = event.usage
                    elif isinstance(event, Finished):
                        finish = event.reason
                    yield event
        except Exception as exc:
            failure = error_type(exc)
            raise
        finally:
            span.set(output_messages(tracer, "".join(text), calls))
            ended(span, finish, usage, failure)

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str:
        async with model_request(self._tracer, self.info, "summary"):
            return await self._provider.summarise(conversation)

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        async with model_request(self._tracer, self.info, "title"):
            return await self._provider.title(conversation)

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        async with model_request(self._tracer, self.info, "compaction"):
            return await self._provider.compact(summary, conversation)

    def not_ready_reason(self) -> str | None:
        return self._provider.not_ready_reason()

    async def aclose(self) -> None:
        await self._provider.aclose()


def input_messages(tracer: Tracer, conversation: Sequence[ConversationItem]) -> dict[str, SpanValue | None]:
    """`gen_ai.input.messages` when content is captured: each item's role and text (files by name)."""
    if not tracer.capture_content:
        return {}
    return {"gen_ai.input.messages": json.dumps([_message(item) for item in conversation], ensure_ascii=False)}


def output_messages(tracer: Tracer, text: str, calls: Sequence[ToolCallItem]) -> dict[str, SpanValue | None]:
    if not tracer.capture_content:
        return {}
    parts: list[dict[str, JSONValue]] = [{"type": "text", "content": text}] if text else []
    parts += [{"type": "tool_call", "id": c.call_id, "name": c.name, "arguments": c.args} for c in calls]
    return {"gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": parts}], ensure_ascii=False)}


def _message(item: ConversationItem) -> dict[str, JSONValue]:
    if isinstance(item, UserText):
        parts: list[JSONValue] = [{"type": "text", "content": item.text}]
        parts += [{"type": "file", "name": f.name, "mime_type": f.mime_type, "size": f.size} for f in item.files]
        return {"role": "user", "parts": parts}
    if isinstance(item, ModelText):
        return {"role": "assistant", "parts": [{"type": "text", "content": item.text}]}
    if isinstance(item, ToolCallItem):
        call: JSONValue = {"type": "tool_call", "id": item.call_id, "name": item.name, "arguments": item.args}
        return {"role": "assistant", "parts": [call]}
    outcome = item.error.model_dump() if item.error is not None else item.result
    return {"role": "tool", "parts": [{"type": "tool_call_response", "id": item.call_id, "response": outcome}]}


def tool_span(tracer: Tracer, call: ToolCallItem, mcp_server: str | None) -> Span:
    attributes: dict[str, SpanValue | None] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": call.name,
        "gen_ai.tool.call.id": call.call_id,
        "gen_ai.tool.type": "function",
        "realtime.mcp.server": mcp_server,
    }
    if tracer.capture_content:
        attributes["gen_ai.tool.call.arguments"] = json.dumps(call.args, ensure_ascii=False)
    return tracer.start(f"execute_tool {call.name}", attributes)


def tool_ended(tracer: Tracer, span: Span, result: ToolResultItem) -> None:
    span.set({"realtime.tool.approval": _approval(result.approval)})
    if tracer.capture_content and result.error is None:
        span.set({"gen_ai.tool.call.result": json.dumps(result.result, ensure_ascii=False)})
    if result.error is not None:
        span.fail(str(result.error.code))
    span.end()


def _approval(approval: Approval | None) -> str | None:
    if approval is None:
        return None
    if approval.source == "person":
        return "approved" if approval.approved else "denied"
    return approval.source


def failed_turn(error: ErrorInfo | None) -> str | None:
    return str(error.code) if error is not None else None
