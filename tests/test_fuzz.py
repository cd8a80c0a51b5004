"""Property: no payload disconnects a socket, gets an answer outside the contract, or disturbs another session."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerFactory, TabFactory
from tests.harness import RunningServer
from tests.test_turns import assert_well_formed_turn

ERROR_CODES = {
    "invalid_payload",
    "invalid_session_id",
    "not_joined",
    "empty_message",
    "message_too_long",
    "rate_limited",
    "busy",
    "no_active_turn",
}  # not `unavailable`: storage is healthy here, so that would be a crash answered politely
FIELDS = ["session_id", "text", "user_id", "after_event_id", "client_message_id"]
OWN_SESSION = str(uuid.uuid4())


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from([OWN_SESSION, OWN_SESSION.upper(), str(uuid.uuid4()), "", " ", "not-a-uuid", "x" * 9000]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3), max_leaves=8
)
payloads = st.one_of(
    json_values,
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text), json_values, max_size=5),
)
events = st.sampled_from(["join", "message", "cancel", "leave", "nonsense", "disconnect", "connect", "valid message"])
valid_text = st.text(max_size=40)  # any Unicode that UTF-8 can encode


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    # The bystander sends its next message as soon as a turn ends, far more than 30 a minute.
    return await start_server(message_rate_limit=100_000)


async def test_malformed_payloads_never_disconnect_or_disturb(server: RunningServer, connect: TabFactory) -> None:
    fuzzer = await connect(server)
    bystander = await connect(server, "polling")
    bystander_sid = (await bystander.join())["session"]["session_id"]
    turns: list[str] = []
    stop = asyncio.Event()

    async def bystander_chats() -> None:
        while not stop.is_set():
            ack = await bystander.call("message", {"session_id": bystander_sid, "text": f"turn {len(turns)}"})
            assert ack["ok"], ack
            turns.append(ack["turn_id"])
            await bystander.turn(ack["turn_id"])

    chatting = asyncio.create_task(bystander_chats())
    answers: list[Any] = []
    loop = asyncio.get_running_loop()

    async def send(event: str, payload: Any, with_ack: bool, text: str) -> None:
        if event == "valid message":
            assert (await fuzzer.call("join", {"session_id": OWN_SESSION}))["ok"]
            answer = await fuzzer.call("message", {"session_id": OWN_SESSION, "text": text}, timeout=5)
            refused = set() if answer["ok"] else {answer["error"]["code"]}
            assert refused <= {"empty_message", "rate_limited", "busy"}, (text, answer)
            return
        if event in {"join", "message", "cancel", "leave"} and with_ack:
            answer = await fuzzer.call(event, payload, timeout=5)
            answers.append(answer)
            assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
            if not answer["ok"]:
                assert answer["error"]["code"] in ERROR_CODES, answer
            if not isinstance(payload, dict):
                assert answer["error"]["code"] == "invalid_payload", answer
            elif isinstance(payload.get("session_id"), str) and not _is_uuid(payload["session_id"]):
                assert answer["error"]["code"] in {"invalid_payload", "invalid_session_id"}, answer
        else:
            await fuzzer.client.emit(event, payload)
        assert fuzzer.client.connected

    # Hypothesis drives synchronous functions: it runs in a thread and hands each example to
    # the event loop that serves the sockets, so shrinking and reporting work as usual.
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(event=events, payload=payloads, with_ack=st.booleans(), text=valid_text)
    def fuzz(event: str, payload: Any, with_ack: bool, text: str) -> None:
        asyncio.run_coroutine_threadsafe(send(event, payload, with_ack, text), loop).result(timeout=10)

    await asyncio.to_thread(fuzz)
    stop.set()
    await asyncio.wait_for(chatting, 15)

    assert fuzzer.client.connected and bystander.client.connected
    assert any(not a["ok"] for a in answers) and len(answers) > 20
    # The bystander saw exactly its own turns, each whole.
    assert len(turns) >= 2
    for turn_id in turns:
        assert_well_formed_turn(await bystander.turn(turn_id), bystander_sid, turn_id)
    assert {d["session_id"] for _, d in bystander.events} == {bystander_sid}
    still = await fuzzer.call("join", {"session_id": OWN_SESSION})
    assert still["ok"]
