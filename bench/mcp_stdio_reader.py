"""How long a stdio MCP server's long line holds the service's event loop: the SDK's `stdio_client`
against the service's own `stdio_transport` (server/tools/mcp_stdio.py), in one process.

    .venv/bin/python bench/mcp_stdio_reader.py [--mib 1 4 17 50]

A child writes one line of N MiB, then a JSON-RPC notification. Each reader reads both (the
service's with its bound lifted, so that both read the whole line); measured: the time until the
notification arrives, and the longest gap between two ticks of a 5 ms timer meanwhile (the event
loop's lag: what every other session waits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from common import ROOT

sys.path.insert(0, str(ROOT))

from mcp.client._transport import TransportStreams
from mcp.client.stdio import StdioServerParameters, stdio_client

from server.tools.mcp_stdio import stdio_transport

CHILD = (
    "import sys\n"
    "out = sys.stdout.buffer\n"
    "out.write(b'x' * ({size}) + b'\\n')\n"
    'out.write(b\'{{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}}\\n\')\n'
    "out.flush()\n"
    "sys.stdin.read()\n"
)


@contextlib.asynccontextmanager
async def lag_meter() -> AsyncIterator[list[float]]:
    """The longest gap between two ticks of a 5 ms timer, in its one item, once the block ends."""
    longest = [0.0]

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            longest[0] = max(longest[0], now - last - 0.005)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        yield longest
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def measure(open_reader: Callable[[], AbstractAsyncContextManager[TransportStreams]]) -> tuple[float, float]:
    async with open_reader() as (read, _write), lag_meter() as lag:
        start = time.monotonic()
        async for item in read:
            if not isinstance(item, Exception):
                break
        return time.monotonic() - start, lag[0]


async def main(sizes: list[int]) -> None:
    logging.disable(logging.CRITICAL)  # the SDK's ERROR for the unparsable line, the bench's noise
    quiet = logging.getLogger("bench")
    print("| line | SDK stdio_client: read | its longest loop lag | stdio_transport: read | its longest loop lag |")
    print("|---|---|---|---|---|")
    for mib in sizes:
        params = StdioServerParameters(command=sys.executable, args=["-c", CHILD.format(size=mib * 1024 * 1024)])
        sdk = await measure(lambda params=params: stdio_client(params))
        ours = await measure(lambda params=params: stdio_transport(params, quiet, max_line_bytes=1 << 40))
        print(f"| {mib} MiB | {sdk[0]:.2f} s | {sdk[1] * 1000:.0f} ms | {ours[0]:.2f} s | {ours[1] * 1000:.0f} ms |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[1, 4, 17, 50])
    asyncio.run(main(parser.parse_args().mib))
