from tests.harness import Tab


async def test_one_turn(tabs) -> None:
    tab: Tab = await tabs()
    joined = await tab.join()
    sid = joined["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "hello there"})
    assert ack["ok"], ack
    events = await tab.turn(ack["turn_id"])
    print(events)
    assert events[-1][0] == "done"
