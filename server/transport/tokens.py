"""Who a client is: a JWT (e.g. Supabase's user access token), verified with PyJWT.

HS256 tokens are verified with AUTH_JWT_SECRET (a Supabase project's legacy JWT secret);
asymmetric ones (RS256, ES256, EdDSA) against the keys at AUTH_JWKS_URL (Supabase's signing
keys), fetched and cached by PyJWT's JWKS client, which fetches again when a token names a key it
does not know yet: a rotated key is picked up without a restart. Every token needs `sub`, `exp`
and the configured audience; a claim of the wrong type or out of range (`exp` as a string or
beyond any date, an empty `sub`) makes the token invalid like any other fault.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt

ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"]
# Clocks of the issuer and this server may differ a little (AUTH_LEEWAY_SECONDS).
LEEWAY_SECONDS = 10


class InvalidToken(Exception):
    """Missing, malformed, badly signed, expired or for another audience. Never says which to clients."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: datetime  # the token's `exp`
    leeway_seconds: float = LEEWAY_SECONDS

    @property
    def valid_until(self) -> float:
        """When the token stops counting (Unix time): its `exp` plus the leeway."""
        return self.expires_at.timestamp() + self.leeway_seconds

    def expired(self) -> bool:
        return time.time() > self.valid_until


class TokenVerifier:
    def __init__(
        self,
        *,
        secret: str | None,
        jwks_url: str | None,
        audience: str,
        jwks_refresh_seconds: float = 30,
        leeway_seconds: float = LEEWAY_SECONDS,
    ) -> None:
        self._secret = secret
        self._audience = audience
        self._leeway = leeway_seconds
        # A token naming an unknown key fetches the JWKS again, at most once per refresh period
        # (PyJWT's cooldown), so forged key ids cannot make this server hammer the issuer.
        self._jwks = (
            jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5, cooldown_duration=jwks_refresh_seconds)
            if jwks_url
            else None
        )

    async def verify(self, token: object) -> Identity:
        if not isinstance(token, str) or not token:
            raise InvalidToken("no token")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm == "HS256" and self._secret:
                key: object = self._secret
                algorithms = ["HS256"]
            elif algorithm in ASYMMETRIC and self._jwks is not None:
                # urllib under the hood: off the event loop. Cached, so usually no request at all.
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
                algorithms = [algorithm]
            else:
                raise InvalidToken(f"no key for alg {algorithm!r}")
            claims = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=algorithms,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "aud"]},
            )
        # PyJWT checks claims by converting them (`int(exp)`): a wrong type it does not convert
        # raises TypeError or OverflowError, which are a bad token too, never a crash.
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            raise InvalidToken(type(exc).__name__) from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("no subject")
        return Identity(user_id=subject, expires_at=_expiry(claims.get("exp")), leeway_seconds=self._leeway)


def _expiry(exp: object) -> datetime:
    """`exp` as a date: a number of seconds within any date. A numeric string, which PyJWT lets
    through, is refused like any claim of the wrong type."""
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise InvalidToken("exp is not a number")
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidToken("exp is beyond any date") from None


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
