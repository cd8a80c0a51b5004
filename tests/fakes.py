"""A local stand-in for Open-Meteo's geocoding and forecast APIs."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Query

PLACES = {
    "delhi": {"name": "Delhi", "country": "India", "latitude": 28.65195, "longitude": 77.23149},
    "paris": {"name": "Paris", "country": "France", "latitude": 48.85341, "longitude": 2.3488},
    # Answers only after SLOW_SECONDS: for stopping a turn while its tool runs.
    "slowtown": {"name": "Slowtown", "country": "Nowhere", "latitude": 1.0, "longitude": 1.0},
    # Found without coordinates: an answer the tool cannot use.
    "nullplace": {"name": "Nullplace", "country": "Nowhere", "latitude": None},
}
SLOW_SECONDS = 3


def open_meteo_app() -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    @app.get("/v1/search")
    async def search(name: str = Query(), count: int = Query(1)) -> dict[str, Any]:
        app.state.requests.append(("search", name))
        place = PLACES.get(name.lower())
        if name.lower() == "slowtown":
            await asyncio.sleep(SLOW_SECONDS)
        return {"results": [place], "generationtime_ms": 0.5} if place else {"generationtime_ms": 0.5}

    @app.get("/v1/forecast")
    async def forecast(latitude: float = Query(), longitude: float = Query(), current: str = Query()) -> dict[str, Any]:
        app.state.requests.append(("forecast", latitude, longitude, current))
        return {
            "latitude": latitude,
            "longitude": longitude,
            "current_units": {"temperature_2m": "°C"},
            "current": {
                "time": "2026-11-27T15:00",
                "temperature_2m": 24.5,
                "relative_humidity_2m": 40,
                "wind_speed_10m": 7.2,
                "weather_code": 1,
            },
        }

    return app
