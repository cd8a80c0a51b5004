"""`get_weather(location)`: Open-Meteo's free geocoding and forecast APIs (no key needed)."""

from __future__ import annotations

import httpx

from server.core.errors import ToolErrorCode
from server.core.models import JSONValue
from server.core.ports import ToolSpec
from server.core.tools import Tool, ToolError
from server.tools.mcp_schema import model_schema

# What the arguments are checked against; the model is shown its subset every provider accepts.
INPUT_SCHEMA: dict[str, JSONValue] = {
    "type": "object",
    "properties": {
        "location": {
            "type": "string",
            "description": "A city or place name, e.g. 'Delhi'.",
            "pattern": r"\S",  # not blank
        }
    },
    "required": ["location"],
}
SPEC = ToolSpec(
    name="get_weather",
    description="Current weather (temperature, conditions, humidity, wind) for a named place.",
    parameters=model_schema(INPUT_SCHEMA),
)

# WMO weather interpretation codes, as Open-Meteo documents them.
WMO_CODES = {
    0: "clear sky",
    1: "mainly clear",
    2: "partly cloudy",
    3: "overcast",
    45: "fog",
    48: "depositing rime fog",
    51: "light drizzle",
    53: "moderate drizzle",
    55: "dense drizzle",
    56: "light freezing drizzle",
    57: "dense freezing drizzle",
    61: "slight rain",
    63: "moderate rain",
    65: "heavy rain",
    66: "light freezing rain",
    67: "heavy freezing rain",
    71: "slight snow",
    73: "moderate snow",
    75: "heavy snow",
    77: "snow grains",
    80: "slight rain showers",
    81: "moderate rain showers",
    82: "violent rain showers",
    85: "slight snow showers",
    86: "heavy snow showers",
    95: "thunderstorm",
    96: "thunderstorm with slight hail",
    99: "thunderstorm with heavy hail",
}


def weather_tool(client: httpx.AsyncClient, geocoding_url: str, forecast_url: str) -> Tool:
    geocoding_url = geocoding_url.rstrip("/")
    forecast_url = forecast_url.rstrip("/")

    async def get_json(url: str, params: dict[str, str | int | float]) -> dict[str, JSONValue]:
        try:
            response = await client.get(url, params=params)
            response.raise_for_status()
            body = response.json()
        except httpx.HTTPStatusError as exc:
            raise ToolError(
                ToolErrorCode.WEATHER_UNAVAILABLE, f"the weather service answered HTTP {exc.response.status_code}"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ToolError(ToolErrorCode.WEATHER_UNAVAILABLE, "the weather service did not answer in time") from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise ToolError(ToolErrorCode.WEATHER_UNAVAILABLE, "the weather service could not be reached") from exc
        if not isinstance(body, dict):
            raise ToolError(ToolErrorCode.WEATHER_UNAVAILABLE, "the weather service sent an unexpected answer")
        return body

    async def run(args: dict[str, JSONValue]) -> JSONValue:
        location = str(args["location"])  # the registry checked it is a string, not blank
        found = await get_json(
            f"{geocoding_url}/v1/search",
            {"name": location.strip(), "count": 1, "language": "en", "format": "json"},
        )
        places = found.get("results") or []
        if not places:
            raise ToolError(ToolErrorCode.UNKNOWN_LOCATION, f"no place called {location.strip()!r} was found")
        place, latitude, longitude = _first_place(places)
        forecast = await get_json(
            f"{forecast_url}/v1/forecast",
            {
                "latitude": latitude,
                "longitude": longitude,
                "current": "temperature_2m,relative_humidity_2m,wind_speed_10m,weather_code",
                "timezone": "auto",
            },
        )
        current = forecast.get("current")
        if not isinstance(current, dict):
            raise ToolError(ToolErrorCode.WEATHER_UNAVAILABLE, "the weather service sent no current conditions")
        code = current.get("weather_code")
        return {
            "location": place.get("name", location),
            "country": place.get("country"),
            "latitude": latitude,
            "longitude": longitude,
            "temperature_c": current.get("temperature_2m"),
            "humidity_percent": current.get("relative_humidity_2m"),
            "wind_speed_kmh": current.get("wind_speed_10m"),
            "conditions": WMO_CODES.get(code, "unknown") if isinstance(code, int) else "unknown",
            "observed_at": current.get("time"),
        }

    return Tool(spec=SPEC, run=run, input_schema=INPUT_SCHEMA)


def _first_place(places: JSONValue) -> tuple[dict[str, JSONValue], float, float]:
    """The first place of a geocoding answer, with its latitude and longitude."""
    place = places[0] if isinstance(places, list) and places else None
    if isinstance(place, dict):
        latitude, longitude = place.get("latitude"), place.get("longitude")
        if isinstance(latitude, int | float) and isinstance(longitude, int | float):
            return place, latitude, longitude
    raise ToolError(ToolErrorCode.WEATHER_UNAVAILABLE, "the weather service sent a place without coordinates")
