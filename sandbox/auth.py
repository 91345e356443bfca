"""Binance request signing: HMAC-SHA256 over the raw query string plus the raw body."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl

from sandbox.engine import Account, Engine, VenueError, now_ms

# Binance rejects requests stamped more than 1 s in the future regardless of recvWindow.
FUTURE_TOLERANCE_MS = 1000
DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60000


def _strip_signature(raw: str) -> tuple[str, str | None]:
    parts = raw.split("&") if raw else []
    kept = [p for p in parts if not p.startswith("signature=")]
    sig = next((p.split("=", 1)[1] for p in parts if p.startswith("signature=")), None)
    return "&".join(kept), sig


def parse_params(raw_query: str, raw_body: str) -> dict[str, str]:
    """Query and form body merged, URL-decoded; the body wins as on Binance."""
    params = dict(parse_qsl(raw_query, keep_blank_values=True))
    params.update(parse_qsl(raw_body, keep_blank_values=True))
    return params


def authenticate(
    engine: Engine, api_key: str | None, raw_query: str, raw_body: str, params: dict[str, str]
) -> Account:
    """Return the signing account or raise the error Binance would answer with."""
    if not api_key or api_key not in engine.accounts:
        raise VenueError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
    acct = engine.accounts[api_key]
    query, qsig = _strip_signature(raw_query)
    body, bsig = _strip_signature(raw_body)
    signature = qsig or bsig
    if not signature:
        raise VenueError(
            -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed."
        )
    expected = hmac.new(acct.secret.encode(), (query + body).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.lower()):
        raise VenueError(-1022, "Signature for this request is not valid.")
    try:
        ts = int(params["timestamp"])
        window = int(params.get("recvWindow", DEFAULT_RECV_WINDOW_MS))
    except (KeyError, ValueError):
        raise VenueError(
            -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."
        ) from None
    if window > MAX_RECV_WINDOW_MS:
        raise VenueError(-1131, "recvWindow must be less than 60000")
    now = now_ms()
    if ts > now + FUTURE_TOLERANCE_MS or now - ts > window:
        raise VenueError(-1021, "Timestamp for this request is outside of the recvWindow.")
    return acct
