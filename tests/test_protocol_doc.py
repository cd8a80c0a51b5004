"""docs/protocol.md is the whole contract: every request and event with its fields, every error
code, metric family and setting the code has is named in it, its contents' links lead to its
sections, and it points nowhere outside the repository."""

from __future__ import annotations

import dataclasses
import re

from prometheus_client.metrics_core import Metric

from server.config import Settings
from server.core.errors import ErrorCode, ToolErrorCode, TurnErrorCode
from server.core.models import EVENT_NAMES
from server.metrics import PrometheusMetrics
from server.transport.clients import REQUESTS
from server.transport.protocol_page import render_page
from tests.harness import ROOT

PROTOCOL = ROOT / "docs" / "protocol.md"
# Read by the OpenTelemetry SDK, not by Settings (docs/protocol.md, Traces).
OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
)


def _section(title: str) -> str:
    """The text of one `##` section."""
    text = PROTOCOL.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("| ")]


def _fields(payload: type) -> list[str]:
    if dataclasses.is_dataclass(payload):
        return [field.name for field in dataclasses.fields(payload)]
    return list(getattr(payload, "model_fields", {}))


def test_every_setting_is_in_the_settings_table() -> None:
    settings = _section("Running it").split("### Settings", 1)[1]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(_table_rows(settings))))
    variables = {name.upper() for name in Settings.model_fields}
    assert variables - named == set(), "settings missing from docs/protocol.md's Settings table"
    assert set(OTEL_VARIABLES) | {"PROMETHEUS_MULTIPROC_DIR"} <= named


def test_every_error_code_is_in_the_errors_tables() -> None:
    rows = "\n".join(_table_rows(_section("Errors")) + _table_rows(_section("HTTP")))
    for code in [*ErrorCode, *TurnErrorCode, *ToolErrorCode]:
        assert f"`{code.value}` |" in rows, code


def test_every_request_and_event_is_listed_with_its_fields() -> None:
    requests = _table_rows(_section("Client to server"))
    for name, (model, _) in REQUESTS.items():
        row = next(r for r in requests if r.startswith(f"| `{name}` |"))
        for field in model.model_fields:
            assert re.search(rf"\b{field}\b", row), (name, field)
    events = _table_rows(_section("Server to clients"))
    for event_type, name in EVENT_NAMES.items():
        row = next(r for r in events if r.startswith(f"| `{name}` |"))
        for field in _fields(event_type):
            if field != "ts":  # the benchmark's chunk timestamp, off unless asked for (see `chunk`)
                assert re.search(rf"\b{field}\b", row), (name, field)


def test_every_metric_family_is_in_the_metrics_table() -> None:
    rows = "\n".join(_table_rows(_section("Metrics")))
    families: list[Metric] = list(PrometheusMetrics(provider="offline").registry.collect())
    assert len(families) == 15
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        row = next(r for r in rows.splitlines() if r.startswith(f"| `{name}` |"))
        for label in labels:
            assert f"`{label}`" in row, (name, label)


def test_the_contents_lead_to_every_section() -> None:
    page = render_page(PROTOCOL)
    ids = set(re.findall(r'<h[1-6] id="([^"]+)"', page))
    contents = re.findall(r'href="#([^"]+)"', page)
    sections = re.findall(r'<h2 id="([^"]+)"', page)
    assert contents and set(contents) <= ids
    assert set(sections) - {"contents"} == set(contents)


def test_it_points_nowhere_outside_the_repository() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    assert re.search(r"(?<!\.)\.\./", text) is None  # `GET .../events` is a route, not a path
    for document in re.findall(r"\b[\w/-]+\.md\b", text):  # every Markdown file it names is here
        assert (ROOT / document.lstrip("/")).is_file(), document
    assert "original design" not in text
