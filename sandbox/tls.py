"""A throw-away CA and a server certificate carrying the venues' real hostnames."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

HOSTNAMES = ("api.binance.com", "fapi.binance.com", "localhost", "127.0.0.1")


def server_context(state_dir: Path) -> ssl.SSLContext:
    """Create the CA, write it to ``<state_dir>/ca.pem`` and return the server's TLS context."""
    ca = trustme.CA()
    cert = ca.issue_cert(*HOSTNAMES)
    ca.cert_pem.write_to_path(str(state_dir / "ca.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx
