"""An OTLP/HTTP endpoint that takes every export and keeps nothing: what the service's traces cost
it with tracing on, without a collector's own work in the measurement.

    .venv/bin/python bench/otlp_sink.py --port 4318 &
    .venv/bin/python bench/run.py --workloads b --rounds 6 \\
        --variant traced=service:OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318

It prints how many exports and bytes it took when stopped (Ctrl-C / SIGTERM)."""

from __future__ import annotations

import argparse
import signal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

taken = {"exports": 0, "bytes": 0}


async def export(request: Request) -> Response:
    taken["exports"] += 1
    taken["bytes"] += len(await request.body())
    return Response(b"", media_type="application/x-protobuf")  # an empty ExportTraceServiceResponse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    app = Starlette(routes=[Route("/v1/traces", export, methods=["POST"])])
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        print(f"otlp sink: {taken['exports']} exports, {taken['bytes']:,} bytes")


if __name__ == "__main__":
    main()
