"""The packet JSON module: orjson's output where it can, the standard module's where it cannot."""

from __future__ import annotations

import json

import pytest

from server.transport import fast_json


@pytest.mark.parametrize(
    "value",
    [
        {"session_id": "s", "index": 3, "text": 'naïve 😀 "quoted"\n', "ts": 1.5, "usage": None, "ok": True},
        ["chunk", {"text": ""}],
        {"lone": "\ud800"},  # orjson refuses lone surrogates
        {1: "int key"},  # and non-string keys
        {"big": 2**70},  # and integers beyond 64 bits
    ],
)
def test_what_it_writes_reads_back_as_the_standard_module_writes_it(value: object) -> None:
    encoded = fast_json.dumps(value, separators=(",", ":"))
    assert json.loads(encoded) == json.loads(json.dumps(value, separators=(",", ":")))


def test_a_chunk_is_written_compactly_in_utf_8() -> None:
    chunk = {"session_id": "s", "turn_id": "t", "index": 0, "text": "naïve 😀 ", "ts": 12.25}
    assert fast_json.dumps(chunk) == json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)


def test_client_packets_are_parsed_as_engineio_parses_them() -> None:
    assert fast_json.loads('{"after_event_id": 123456789012345678901234567890}') == {
        "after_event_id": 123456789012345678901234567890
    }
    with pytest.raises(ValueError):
        fast_json.loads("1" * 200)  # engineio refuses absurdly long integers
