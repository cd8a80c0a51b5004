"""Who a client is: a JWT (e.g. Supabase's user access token), verified with PyJWT.

HS256 tokens are verified with AUTH_JWT_SECRET (a Supabase project's legacy JWT secret);
asymmetric ones (RS256, ES256, EdDSA) against the keys at AUTH_JWKS_URL (Supabase's signing
keys), fetched and cached by PyJWT's JWKS client, which fetches again when a token names a key it
does not know yet: a rotated key is picked up without a restart. Every token needs `sub`, `exp`
and the configured audience.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt

ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"]
# Clocks of the issuer and this server may differ a little.
LEEWAY_SECONDS = 10


class InvalidToken(Exception):
    """Missing, malformed, badly signed, expired or for another audience. Never says which to clients."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: datetime

    def expired(self) -> bool:
        return datetime.now(UTC).timestamp() > self.expires_at.timestamp() + LEEWAY_SECONDS


class TokenVerifier:
    def __init__(
        self, *, secret: str | None, jwks_url: str | None, audience: str, jwks_refresh_seconds: float = 30
    ) -> None:
        self._secret = secret
        self._audience = audience
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
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub", "aud"]},
            )
        except (jwt.PyJWTError, ValueError) as exc:
            raise InvalidToken(type(exc).__name__) from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("no subject")
        return Identity(user_id=subject, expires_at=datetime.fromtimestamp(claims["exp"], UTC))


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
