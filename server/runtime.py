"""Builds the service from settings, and takes it down again."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from redis.asyncio import Redis

from server.config import Settings
from server.coordination.local import LocalCoordination
from server.coordination.quota import RedisQuota
from server.coordination.redis import RedisCoordination, redis_client
from server.core.approvals import ApprovalPolicy
from server.core.attachments import Attachments, UploadExpiry
from server.core.catalog import SessionCatalog
from server.core.conversation import ConversationService
from server.core.limits import Limits
from server.core.ports import (
    Coordination,
    MessageQuota,
    Metrics,
    ModelProvider,
    Storage,
    StorageRefused,
    StorageUnavailable,
)
from server.core.rate_limit import LocalQuota
from server.core.tasks import TaskTracker
from server.core.tools import ToolRegistry
from server.core.traces import TracedProvider
from server.metrics import PrometheusMetrics
from server.providers.offline import OfflineProvider
from server.providers.prompts import DEFAULT_SYSTEM_PROMPT
from server.providers.retry import RetryPolicy
from server.rooms.hub import RoomHub
from server.storage.measured import MeasuredOutbox, MeasuredRepository
from server.storage.outbox import SqliteOutbox
from server.storage.postgres import PostgresRepository
from server.storage.sqlite import SqliteRepository
from server.storage.supabase import SupabaseRepository
from server.tools.mcp import CallLimits, McpTools
from server.tools.mcp_config import load_servers
from server.tools.weather import weather_tool

if TYPE_CHECKING:
    from server.providers.gemini import GeminiConfig
    from server.providers.openai_chat import OpenAIConfig
    from server.tracing import OtelTracer

log = logging.getLogger("server")


class ConfigurationError(RuntimeError):
    """A setting asks for something this build cannot do."""


async def open_repository(settings: Settings) -> Storage:
    if settings.storage_backend == "sqlite":
        return await SqliteRepository.open(settings.sqlite_path, settings.storage_retry_seconds)
    if settings.storage_backend == "postgres":
        assert settings.database_url  # Settings requires it
        # A server that does not answer yet is waited for (/readyz 503), not a crash loop beside a
        # database that starts or restarts with the service; one that refuses the URL stops it.
        return await PostgresRepository.open(
            settings.database_url,
            settings.storage_retry_seconds,
            command_timeout=settings.storage_timeout_seconds,
            wait=True,
        )
    assert settings.supabase_url and settings.supabase_key  # Settings requires them
    return await SupabaseRepository.open(
        settings.supabase_url,
        settings.supabase_key,
        settings.storage_retry_seconds,
        timeout_seconds=settings.storage_timeout_seconds,
    )


# `db.system.name` of each storage backend (Supabase serves PostgreSQL through its REST API).
TRACED_STORAGE = {"sqlite": "sqlite", "postgres": "postgresql", "supabase": "supabase"}


def start_tracing(settings: Settings) -> OtelTracer | None:
    """The OpenTelemetry tracer when an OTLP endpoint is set; its SDK is imported only then."""
    if not (settings.otel_exporter_otlp_endpoint or settings.otel_exporter_otlp_traces_endpoint):
        return None
    from server.tracing import start_tracing as start_otel

    return start_otel(settings)


async def make_provider(settings: Settings, metrics: Metrics) -> ModelProvider:
    # A vendor's SDK is imported only when it is the one used: each costs a start a third of a second.
    if settings.llm_provider == "offline":
        return OfflineProvider(chunk_delay_ms=settings.offline_chunk_delay_ms)
    if settings.llm_provider == "openai":
        from server.providers.openai_chat import OpenAIChatProvider

        return OpenAIChatProvider(await openai_config(settings), metrics)
    from server.providers.gemini import GeminiProvider

    return GeminiProvider(await gemini_config(settings), metrics)


async def system_prompt(settings: Settings) -> str:
    """SYSTEM_PROMPT, else SYSTEM_PROMPT_FILE's text, else the earlier GEMINI_ names, else the default."""
    for prompt, variable, path in (
        (settings.system_prompt, "SYSTEM_PROMPT_FILE", settings.system_prompt_file),
        (settings.gemini_system_prompt, "GEMINI_SYSTEM_PROMPT_FILE", settings.gemini_system_prompt_file),
    ):
        if prompt is not None:
            return prompt
        if path is not None:
            try:
                return await asyncio.to_thread(path.read_text, encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigurationError(f"{variable} cannot be read as UTF-8 text: {exc}") from exc
    return DEFAULT_SYSTEM_PROMPT


async def gemini_config(settings: Settings) -> GeminiConfig:
    from server.providers.gemini import GeminiConfig

    if not settings.gemini_api_key:
        log.warning("LLM_PROVIDER=gemini without GEMINI_API_KEY: /readyz reports it and every turn fails")
    return GeminiConfig(
        api_key=settings.gemini_api_key,
        model=settings.gemini_model,
        base_url=settings.gemini_base_url,
        api_version=settings.gemini_api_version,
        system_prompt=await system_prompt(settings),
        timeout_seconds=settings.gemini_timeout_seconds,
        max_output_tokens=settings.gemini_max_output_tokens,
        retry=RetryPolicy(
            attempts=settings.gemini_retry_attempts,
            initial_seconds=settings.gemini_retry_initial_seconds,
            budget_seconds=settings.gemini_retry_budget_seconds,
        ),
    )


async def openai_config(settings: Settings) -> OpenAIConfig:
    from server.providers.openai_chat import OpenAIConfig

    assert settings.openai_model  # Settings requires it with LLM_PROVIDER=openai
    return OpenAIConfig(
        model=settings.openai_model,
        base_url=settings.openai_base_url,
        api_key=settings.openai_api_key,
        system_prompt=await system_prompt(settings),
        timeout_seconds=settings.openai_timeout_seconds,
        max_output_tokens=settings.openai_max_output_tokens,
        retry=RetryPolicy(
            attempts=settings.openai_retry_attempts,
            initial_seconds=settings.openai_retry_initial_seconds,
            budget_seconds=settings.openai_retry_budget_seconds,
        ),
    )


def model_shown(settings: Settings) -> str:
    """The model in the start line: its name, and an OpenAI-compatible endpoint's host."""
    if settings.llm_provider == "gemini":
        return f" ({settings.gemini_model})"
    if settings.llm_provider == "openai":
        return f" ({settings.openai_model} at {httpx.URL(settings.openai_base_url).host})"
    return ""


@dataclass
class Shared:
    """What processes share: their coordination and rooms, and a user's message limit."""

    coordination: Coordination
    hub: RoomHub
    user_quota: MessageQuota
    redis: Redis | None = None

    @classmethod
    async def open(cls, settings: Settings, tasks: TaskTracker) -> Shared:
        if not settings.redis_url:
            return cls(LocalCoordination(), RoomHub(tasks), LocalQuota(settings.message_rate_limit))
        redis = redis_client(settings.redis_url)
        try:
            coordination = await RedisCoordination.open(
                redis, settings.redis_channel, settings.turn_lock_seconds, tasks
            )
        except BaseException:
            await redis.aclose()
            raise
        hub = RoomHub(tasks, fanout=coordination.rooms)
        # A user's limit counts their messages on every process (the socket's stays local).
        quota = RedisQuota(settings.redis_url, redis, settings.redis_channel, settings.message_rate_limit)
        return cls(coordination, hub, quota, redis)

    async def serve(self, service: ConversationService) -> None:
        """Start the rooms' fan-out, once the service they catch up from is built."""
        self.hub.catch_up_from(service)
        self.hub.on_session_deleted(service.session_deleted)
        if isinstance(self.coordination, RedisCoordination):
            await self.coordination.serve_rooms(self.hub)


@dataclass
class Runtime:
    settings: Settings
    repo: Storage
    provider: ModelProvider
    shared: Shared
    http: httpx.AsyncClient
    tasks: TaskTracker
    service: ConversationService
    outbox: SqliteOutbox | None = None
    mcp: McpTools | None = None
    expiry: UploadExpiry | None = None
    tracer: OtelTracer | None = None

    @property
    def hub(self) -> RoomHub:
        return self.shared.hub

    @property
    def coordination(self) -> Coordination:
        return self.shared.coordination

    @functools.cached_property
    def catalog(self) -> SessionCatalog:
        return SessionCatalog(self.repo, self.hub, self.service)

    @functools.cached_property
    def attachments(self) -> Attachments:
        return Attachments(self.catalog, self.repo)

    @classmethod
    async def start(cls, settings: Settings, metrics: PrometheusMetrics) -> Runtime:
        tasks = TaskTracker()
        tracer = start_tracing(settings)
        provider = await make_provider(settings, metrics)
        if tracer is not None:
            provider = TracedProvider(provider, tracer)
        shared = await Shared.open(settings, tasks)
        repo = MeasuredRepository(
            await open_repository(settings), metrics, tracer, TRACED_STORAGE[settings.storage_backend or "sqlite"]
        )
        # The embedded SQLite store is on the local disk already: a queue beside it adds nothing.
        outbox = await SqliteOutbox.open(settings.outbox_path) if settings.storage_backend != "sqlite" else None
        http = httpx.AsyncClient(timeout=httpx.Timeout(settings.weather_timeout_seconds))
        tools = ToolRegistry([weather_tool(http, settings.weather_geocoding_url, settings.weather_forecast_url)])
        metrics.declare_tools(spec.name for spec in tools.specs)
        mcp = await _start_mcp(settings, tools, metrics)
        service = ConversationService(
            repo=repo,
            provider=provider,
            tools=tools,
            emitter=shared.hub,
            coordination=shared.coordination,
            tasks=tasks,
            limits=Limits(
                max_message_chars=settings.max_message_chars,
                messages_per_minute=settings.message_rate_limit,
                max_tool_rounds=settings.max_tool_rounds,
                max_sessions_per_member=settings.max_sessions_per_socket,
                chunk_coalesce_seconds=settings.chunk_coalesce_ms / 1000,
                chunk_timestamps=settings.bench_chunk_timestamps,
                join_history_limit=settings.join_history_limit,
                context_max_tokens=settings.context_max_tokens,
                attachments_per_message=settings.attachments_per_message,
            ),
            summary_delay_seconds=settings.summary_delay_seconds,
            summary_retry_seconds=settings.summary_retry_seconds,
            outbox=MeasuredOutbox(outbox, metrics) if outbox is not None else None,
            user_quota=shared.user_quota,
            metrics=metrics,
            title_generation=settings.title_generation,
            approval=ApprovalPolicy.parse(settings.tool_approval, settings.tool_approval_timeout_seconds),
            tracer=tracer,
        )
        service.start()
        expiry = UploadExpiry(
            repo, tasks, settings.attachment_unused_seconds, settings.attachment_expiry_interval_seconds
        )
        expiry.start()
        await shared.serve(service)
        log.info(
            "serving with provider=%s%s storage=%s%s",
            provider.name,
            model_shown(settings),
            settings.storage_backend,
            f" ({settings.sqlite_path})" if settings.storage_backend == "sqlite" else "",
        )
        return cls(settings, repo, provider, shared, http, tasks, service, outbox, mcp, expiry, tracer)

    async def readiness_problems(self) -> list[str]:
        problems = []
        reason = self.provider.not_ready_reason()
        if reason:
            problems.append(f"provider: {reason}")
        try:
            await asyncio.wait_for(self.repo.ping(), timeout=2)
        except (StorageRefused, StorageUnavailable) as exc:
            problems.append(f"storage: {exc}")
        except Exception as exc:
            problems.append(f"storage: {type(exc).__name__}")
        if self.settings.redis_url:
            try:
                await asyncio.wait_for(self.coordination.ping(), timeout=2)
            except Exception as exc:
                problems.append(f"redis: {type(exc).__name__}")
        if self.mcp is not None:
            problems.extend(self.mcp.problems())
        if self.service.storage_outage:
            problems.append(f"storage: unreachable past its retry budget; {self.service.queued_events} events queued")
        return problems

    async def drain_turns(self) -> None:
        """End running turns with `done` while clients are still connected to hear it."""
        await self.service.shutdown(self.settings.shutdown_grace_seconds)

    async def stop(self) -> None:
        await self.drain_turns()
        if self.mcp is not None:
            await self.mcp.aclose()  # its stdio servers are stopped with it
        await self.service.disconnect_all()
        if self.expiry is not None:
            await self.expiry.stop()
        await self.service.close_storage()
        await self.hub.close()
        await self.tasks.drain(self.settings.shutdown_grace_seconds)
        if self.service.queued_events and self.outbox is not None:
            log.error("%d events stay in the local queue (%s)", self.service.queued_events, self.outbox.path)
        clean = True
        closers = [
            self.provider.aclose,
            self.http.aclose,
            self.coordination.aclose,
            self.shared.user_quota.aclose,
            self.repo.aclose,
        ]
        if self.shared.redis is not None:
            closers.append(self.shared.redis.aclose)
        if self.outbox is not None:
            closers.append(self.outbox.aclose)
        if self.tracer is not None:
            closers.append(self.tracer.aclose)  # last: the spans of everything above go out
        for close in closers:
            try:
                await close()
            except Exception:
                clean = False
                log.exception("closing %s failed", getattr(close, "__self__", close))
        await self.tasks.close()
        if clean:
            log.info("stopped cleanly")


async def _start_mcp(settings: Settings, tools: ToolRegistry, metrics: PrometheusMetrics) -> McpTools | None:
    if settings.mcp_servers_file is None:
        return None
    servers = load_servers(settings.mcp_servers_file)
    mcp = McpTools(servers, tools, CallLimits(settings.mcp_tool_timeout_seconds, settings.mcp_result_max_chars))
    mcp.on_tools_changed = metrics.declare_tools
    log.info("MCP: %d servers in %s (%s)", len(servers), settings.mcp_servers_file, ", ".join(servers) or "none")
    await mcp.start()
    return mcp
