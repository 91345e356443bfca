"""The venue adapter's error vocabulary: ccxt's exceptions mapped once onto what the caller must do.

Each class answers one question for the activity: retry as is, re-read the venue before acting,
treat as done, or give up. Messages are scrubbed of query strings and credentials.
"""

from __future__ import annotations

import re

import ccxt.async_support as ccxt

_QUERY = re.compile(r"\?[^\s\"']*")
_CODE = re.compile(r'"code"\s*:\s*"?(-?\d+)')

REDUCE_ONLY_REJECTED_CODES = {-2022, -4118}
"""-2022 reduce-only rejected (nothing to reduce); -4118 reduce-only orders already cover it."""
BELOW_MINIMUM_CODES = {-4164, -1013, -4003}
"""Min notional / filter failure / quantity below zero: the remainder is dust."""


class VenueError(Exception):
    """A venue call failed; ``retryable`` says whether the same call may simply be made again."""

    retryable = True


class VenueUnavailable(VenueError):
    """5xx, connection failure, maintenance: nothing happened or it is safe to ask again."""


class RateLimited(VenueUnavailable):
    """429/418: back off; hammering on turns a 429 into an IP ban."""


class OutcomeUnknown(VenueError):
    """A write timed out or answered -1007: it may or may not have been applied.

    Never resend blindly: re-read the venue (order by client id, positions) and decide again.
    """


class OrderGone(VenueError):
    """The order is not open any more (cancelled or filled): terminal for a cancel."""

    retryable = False


class AuthFailed(VenueError):
    """Bad key, signature or permissions: retrying cannot help."""

    retryable = False


class OrderRejected(VenueError):
    """The venue refused the order as invalid; resending the same order cannot help."""

    retryable = False


class ReduceOnlyRejected(OrderRejected):
    """Reduce-only refused: the position is probably already flat. Re-read before anything else."""


class BelowMinimum(OrderRejected):
    """Below the venue's minimum size or notional: the remainder is dust, reported not retried."""


def error_code(message: str) -> int | None:
    match = _CODE.search(message)
    return int(match.group(1)) if match else None


def scrub(message: str, *secrets: str) -> str:
    """Drop query strings (they carry signatures) and any credential text from a message."""
    cleaned = _QUERY.sub("?…", message)
    for secret in secrets:
        if secret:
            cleaned = cleaned.replace(secret, "***")
    return cleaned[:500]


def translate(error: Exception, *secrets: str) -> VenueError:
    """Map a ccxt exception onto the domain hierarchy (the one place this decision is made)."""
    message = scrub(f"{type(error).__name__}: {error}", *secrets)
    code = error_code(str(error))
    mapped: type[VenueError]
    if isinstance(error, ccxt.OrderNotFound):
        mapped = OrderGone
    elif isinstance(error, ccxt.RequestTimeout):
        mapped = OutcomeUnknown
    elif isinstance(error, ccxt.DDoSProtection):  # RateLimitExceeded is a subclass
        mapped = RateLimited
    elif isinstance(error, ccxt.NetworkError):
        mapped = VenueUnavailable
    elif isinstance(error, ccxt.AuthenticationError | ccxt.PermissionDenied):
        mapped = AuthFailed
    elif code in REDUCE_ONLY_REJECTED_CODES:
        mapped = ReduceOnlyRejected
    elif code in BELOW_MINIMUM_CODES:
        mapped = BelowMinimum
    elif isinstance(error, ccxt.InvalidOrder | ccxt.BadRequest | ccxt.InsufficientFunds):
        mapped = OrderRejected
    elif isinstance(error, ccxt.InvalidNonce):
        mapped = VenueUnavailable  # clock skew (-1021): a fresh timestamp fixes it
    else:
        # Unknown venue error: assume nothing about its outcome, let the caller re-read and retry.
        mapped = VenueUnavailable
    return mapped(message)
