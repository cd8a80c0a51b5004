"""The CPU a turn costs the service in google-genai, by conversation length: one process, the real
SDK, the model stub answering at once, so nothing but the client's own work is counted.

    .venv/bin/python bench/gemini_request_cost.py [--turns 1 5 20 50] [--repeat 40]

A turn is one `GeminiProvider.stream` read to its end (building the request, sending it, parsing
each streamed event). The stub's own CPU is in its own process and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from common import ROOT, ServerProcess

sys.path.insert(0, str(ROOT))

from server.core.ports import ConversationItem, ModelRequest, ModelText, UserText
from server.providers.gemini import GeminiConfig, GeminiProvider

QUESTION = "Tell me about streaming answers over a socket, with an example or two"


def conversation(turns: int) -> list[ConversationItem]:
    """`turns` questions with their answers before it, then this turn's question."""
    items: list[ConversationItem] = []
    for n in range(turns - 1):
        items += [UserText(f"{QUESTION} (number {n})"), ModelText(" ".join(["streamed"] * 60))]
    return [*items, UserText(QUESTION)]


async def cpu_per_turn(provider: GeminiProvider, turns: int, repeat: int) -> float:
    request = ModelRequest(conversation=conversation(turns), tools=[])
    async for _ in provider.stream(request):  # warm: connection, validators
        pass
    start = time.process_time()
    for _ in range(repeat):
        async for _ in provider.stream(request):
            pass
    return (time.process_time() - start) / repeat * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 5, 20, 50])
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    stub = await ServerProcess.start([str(ROOT / "bench" / "model_stub.py")], {"STUB_BURST_MS": "0"}, str(ROOT))
    provider = GeminiProvider(GeminiConfig(api_key="bench", model="bench", base_url=stub.url))
    try:
        print("| turns in the conversation | CPU per turn |\n|---|---|")
        for turns in args.turns:
            print(f"| {turns} | {await cpu_per_turn(provider, turns, args.repeat):.2f} ms |")
    finally:
        await provider.aclose()
        await stub.stop()


if __name__ == "__main__":
    asyncio.run(main())
