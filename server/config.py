"""Settings from the environment and an optional `.env` file (each in docs/protocol.md, Running it: Settings)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import httpx
from dotenv import dotenv_values
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.storage import dsn
from server.tools.mcp_config import load_servers

DEFAULT_CORS_ORIGINS = r"http://localhost:*,http://127.0.0.1:*"
OPENAI_BASE_URL = "https://api.openai.com/v1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    # Processes `python -m server` runs on the one port (needs REDIS_URL).
    workers: int = Field(1, ge=1)
    # GC and GIL settings for the serving process (server/serve.py, measured).
    tune_interpreter: bool = True
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    # `json` writes one JSON object a line (docs/protocol.md, Running it: Logs).
    log_format: Literal["text", "json"] = "text"
    # A repeated warning (same logger and template) is logged once per this long.
    log_repeat_seconds: float = Field(10, ge=0)
    metrics_token: str | None = None
    # Traces (docs/protocol.md, Traces): on when an OTLP endpoint is set. The SDK reads the other
    # OTEL_* variables (headers, timeout, sampler, batch sizes) itself.
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    otel_service_name: str = "realtime-ai-backend"
    otel_sdk_disabled: bool = False
    otel_instrumentation_genai_capture_message_content: bool = False

    llm_provider: Literal["gemini", "openai", "offline"] | None = None
    # The instructions of every turn, inline or from a UTF-8 file (inline wins), for gemini and
    # openai; GEMINI_SYSTEM_PROMPT(_FILE), their earlier names, are read when these are unset.
    system_prompt: str | None = None
    system_prompt_file: Path | None = None
    gemini_api_key: str | None = None
    gemini_model: str = "gemini-3.8-flash"
    gemini_base_url: str | None = None
    # How the Gemini provider talks to the API (docs/protocol.md, Models).
    gemini_api_version: str = "v1beta"
    gemini_system_prompt: str | None = None
    gemini_system_prompt_file: Path | None = None
    gemini_timeout_seconds: float = Field(60, gt=0)
    gemini_max_output_tokens: int | None = Field(None, gt=0)
    gemini_retry_attempts: int = Field(4, ge=1)
    gemini_retry_initial_seconds: float = Field(0.5, gt=0)
    gemini_retry_budget_seconds: float = Field(20, gt=0)
    openai_base_url: str = OPENAI_BASE_URL
    openai_api_key: str | None = None
    openai_model: str | None = None
    # How the openai provider talks to its endpoint (as the gemini_* ones).
    openai_timeout_seconds: float = Field(60, gt=0)
    openai_max_output_tokens: int | None = Field(None, gt=0)
    openai_retry_attempts: int = Field(4, ge=1)
    openai_retry_initial_seconds: float = Field(0.5, gt=0)
    openai_retry_budget_seconds: float = Field(20, gt=0)
    offline_chunk_delay_ms: float = Field(40, ge=0)
    # Merge text deltas arriving within this window into one `chunk` (0: off).
    chunk_coalesce_ms: float = Field(0, ge=0)
    # Benchmark only: chunks carry `ts`, the monotonic clock in ms at the delta.
    bench_chunk_timestamps: bool = False

    storage_backend: Literal["sqlite", "postgres", "supabase"] | None = None
    sqlite_path: Path = Path("./data/realtime.db")
    database_url: str | None = None
    supabase_url: str | None = None
    supabase_key: str | None = None
    redis_url: str | None = None
    # The prefix of the service's Redis keys and channels (one per deployment),
    # and how long a crashed process can keep a session's turn lock.
    redis_channel: str = "realtime"
    turn_lock_seconds: float = Field(15, gt=0)
    # How long a storage operation is retried before it counts as failed (see the outbox).
    storage_retry_seconds: float = Field(10, gt=0)
    # One storage request's timeout (PostgreSQL command, Supabase HTTP request).
    storage_timeout_seconds: float = Field(10, gt=0)
    # The local durable queue for events PostgreSQL / Supabase cannot take yet.
    outbox_path: Path = Path("./data/outbox.db")

    summary_delay_seconds: float = Field(5, ge=0)
    # First wait before a failed summary is tried again (it doubles, up to an hour).
    summary_retry_seconds: float = Field(30, gt=0)
    max_message_chars: int = Field(8000, gt=0)
    # Events in a `join` answer when the client names no `history_limit`.
    join_history_limit: int = Field(1000, ge=1, le=1000)
    # What one model request may carry of the conversation, in tokens (Long conversations).
    context_max_tokens: int = Field(32_000, ge=256)
    # A session's title is asked of the model after its first answer that ends with `stop`.
    title_generation: bool = True
    # Tools whose calls wait for a person's approval (names or shell-style patterns, comma-separated).
    tool_approval: str = ""
    tool_approval_timeout_seconds: float = Field(300, gt=0, le=86_400)
    # Files with a message (Attachments): the largest upload, and how many one message may name.
    attachment_max_bytes: int = Field(10_485_760, ge=1024)
    attachments_per_message: int = Field(5, ge=1, le=100)
    # How old an upload no message names gets before it is deleted (a
    # day), and how often they are looked for.
    attachment_unused_seconds: float = Field(86_400, gt=0)
    attachment_expiry_interval_seconds: float = Field(3600, gt=0)
    message_rate_limit: int = Field(30, gt=0)
    cors_origins: str = DEFAULT_CORS_ORIGINS
    playground: bool = True
    send_queue_limit_bytes: int = Field(1_048_576, ge=4096)

    auth_jwt_secret: str | None = None
    auth_jwt_audience: str = "authenticated"
    auth_jwks_url: str | None = None
    # The least time between two JWKS fetches caused by an unknown key id.
    auth_jwks_refresh_seconds: float = Field(30, ge=0)
    # The verification leeway for clock skew (at most 30 s); a connected
    # client is closed when its token's `exp` plus this has passed.
    auth_leeway_seconds: float = Field(10, ge=0, le=30)
    # Abuse limits besides the message rate and length.
    max_sessions_per_socket: int = Field(20, ge=1)
    max_connections_per_address: int = Field(100, ge=1)
    # The proxies whose X-Forwarded-For names the client (uvicorn's own variable,
    # read here so that `.env` sets it too); the per-address limit then counts the client's address.
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # The largest packet or frame a client may send (`packet_limit`: unset, derived from MAX_MESSAGE_CHARS).
    max_packet_bytes: int | None = Field(None, ge=1024)

    # The weather tool's upstreams and the bounds of a turn.
    weather_geocoding_url: str = "https://geocoding-api.open-meteo.com"
    weather_forecast_url: str = "https://api.open-meteo.com"
    weather_timeout_seconds: float = Field(5, gt=0)
    max_tool_rounds: int = Field(5, ge=1)
    shutdown_grace_seconds: float = Field(10, gt=0)

    mcp_servers_file: Path | None = None
    mcp_tool_timeout_seconds: float = Field(30, gt=0)
    # The longest MCP result (as JSON text) a model request and the event log take.
    mcp_result_max_chars: int = Field(20_000, ge=1000)

    @field_validator(
        "llm_provider",
        "storage_backend",
        "gemini_api_key",
        "gemini_base_url",
        "gemini_system_prompt",
        "gemini_system_prompt_file",
        "gemini_max_output_tokens",
        "system_prompt",
        "system_prompt_file",
        "openai_api_key",
        "openai_model",
        "openai_max_output_tokens",
        "database_url",
        "supabase_url",
        "supabase_key",
        "redis_url",
        "auth_jwt_secret",
        "auth_jwks_url",
        "metrics_token",
        "mcp_servers_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("log_level", "log_format", "llm_provider", "storage_backend", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("openai_base_url", mode="before")
    @classmethod
    def _http_url(cls, value: object) -> object:
        if value == "":
            return OPENAI_BASE_URL
        try:
            url = httpx.URL(value) if isinstance(value, str) else None
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http(s) URL, e.g. http://localhost:11434/v1")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Only where it is used: a platform may set DATABASE_URL for another program beside this one.
        if value is not None and info.data.get("storage_backend") == "postgres":
            problem = dsn.shape_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("mcp_servers_file")
    @classmethod
    def _readable_servers_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            load_servers(value)  # a file the service cannot use stops it at start, saying why
        return value

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        if self.llm_provider is None:
            self.llm_provider = "gemini" if self.gemini_api_key else "offline"
        if self.llm_provider == "openai" and not self.openai_model:
            raise ValueError("LLM_PROVIDER=openai needs OPENAI_MODEL (the model's name at OPENAI_BASE_URL)")
        if self.storage_backend is None:
            self.storage_backend = "supabase" if self.supabase_url else "sqlite"
        if self.storage_backend == "postgres" and not self.database_url:
            raise ValueError("STORAGE_BACKEND=postgres needs DATABASE_URL (a PostgreSQL DSN)")
        if self.storage_backend == "supabase" and not (self.supabase_url and self.supabase_key):
            raise ValueError("STORAGE_BACKEND=supabase needs SUPABASE_URL and SUPABASE_KEY (the service-role key)")
        if self.workers > 1 and not self.redis_url:
            raise ValueError("WORKERS > 1 needs REDIS_URL: without it each process would keep sessions of its own")
        return self

    @property
    def packet_limit(self) -> int:
        # By default a message of MAX_MESSAGE_CHARS characters of any kind fits, however a client
        # encodes them: an emoji escaped as two \uXXXX is 12 bytes; 16 KiB for the other fields.
        return self.max_packet_bytes or max(64 * 1024, 12 * self.max_message_chars + 16 * 1024)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_jwt_secret or self.auth_jwks_url)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


class UnusableSetting(Exception):
    """A setting found unusable once the service tries it (DATABASE_URL names no database): the
    service stops at start with this one line, as for a value the settings check refuses."""

    def __init__(self, variable: str, value: str | None, reason: str) -> None:
        super().__init__(unusable(variable, value, reason))
        self.variable = variable

    def report(self) -> str:
        return report([str(self)])


def load_settings() -> Settings:
    """The settings, or an exit with one message per unusable setting (no stack trace)."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise SystemExit(describe_invalid(exc)) from None
    share_otel_dotenv()
    return settings


def share_otel_dotenv(path: str = ".env") -> None:
    """The OpenTelemetry SDK reads its variables (headers, sampler, batch sizes) from the process
    environment only: the OTEL_* ones a `.env` holds, as it may hold every setting, go there too
    (the environment wins)."""
    for name, value in dotenv_values(path).items():
        if name.upper().startswith("OTEL_") and value is not None:
            os.environ.setdefault(name.upper(), value)


def describe_invalid(error: ValidationError) -> str:
    """Each unusable setting by its variable's name, with its value and what it accepts."""
    lines = []
    for problem in error.errors(include_url=False):
        accepts = problem["msg"].removeprefix("Value error, ").removeprefix("Input ")
        if problem["loc"]:
            variable = str(problem["loc"][0]).upper()
            lines.append(unusable(variable, shown_value(variable, problem["input"]), accepts))
        else:
            lines.append(accepts)
    return report(lines)


def unusable(variable: str, value: str | None, reason: str) -> str:
    """`value` None: not shown (it may hold a secret)."""
    return f"{variable}{'' if value is None else f'={value!r}'} cannot be used: it {reason}"


def shown_value(variable: str, value: object) -> str | None:
    if variable == "DATABASE_URL":
        return dsn.shown(value) if isinstance(value, str) else None
    return str(value)


def report(lines: list[str]) -> str:
    """One line for one setting (what an operator's log shows first); a list for several."""
    if len(lines) == 1:
        return f"invalid setting (from the environment or .env): {lines[0]}"
    return "invalid settings (from the environment or .env):\n  " + "\n  ".join(lines)
