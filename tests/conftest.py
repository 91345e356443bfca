"""Shared fixtures (the sandbox exchange, the Temporal servers, PostgreSQL: each in its own module
under ``tests/fixtures/``) and the two tiers.

Tiers: a test that uses a server fixture is marked ``servers`` here, from the fixtures it uses
(directly or through another fixture), so nobody has to remember to mark it. ``make test-fast``
runs ``-m "not servers"``: no Temporal server, no sandbox, no PostgreSQL, no process. In that
run a test that starts one anyway without the mark (a subprocess of its own, a direct
``psycopg.connect``) is skipped, saying so, instead of silently making the fast tier slow;
mark it ``@pytest.mark.servers``. ``make test`` runs everything.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

pytest_plugins = [
    "tests.fixtures.sandbox",
    "tests.fixtures.temporal",
    "tests.fixtures.venues",
    "tests.fixtures.postgres",
    "tests.fixtures.rollback",
]

SERVERS = "servers"
SERVER_FIXTURES = frozenset(
    {
        "sandbox",  # the sandbox exchange process (and everything built on it: rigs, scenarios)
        "own_sandbox",  # a module's private sandbox exchange
        "dev_env",  # the Temporal CLI dev server (``client`` too)
        "time_env",  # the Temporal time-skipping server
        "pg_server",  # PostgreSQL (``pg_database`` too)
    }
)
"""The fixtures that start or reach a server; a test using any of them, even through another
fixture, is in the ``servers`` tier."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(SERVERS)


def _fast_tier(config: pytest.Config) -> bool:
    """This run leaves the ``servers`` tier out (``-m "not servers"``)."""
    expr = " ".join(str(config.getoption("markexpr", "") or "").split())
    return f"not {SERVERS}" in expr


@pytest.fixture(autouse=True)
def _no_servers_in_the_fast_tier(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """In the fast tier, an unmarked test that starts a process or reaches a server is skipped
    with the reason (see the module docstring); elsewhere this does nothing."""
    if not _fast_tier(request.config) or request.node.get_closest_marker(SERVERS):
        yield
        return

    def refuse(what: str) -> Any:
        def refused(*args: object, **kwargs: object) -> Any:
            reason = (
                f"{what}: not in the fast tier; mark it @pytest.mark.{SERVERS} (make test runs it)"
            )
            raise pytest.skip.Exception(reason, _use_item_location=True)

        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse("starts a process"))
    monkeypatch.setattr(asyncio, "create_subprocess_shell", refuse("starts a process"))
    monkeypatch.setattr(psycopg, "connect", refuse("connects to PostgreSQL"))
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refuse("connects to PostgreSQL"))
    monkeypatch.setattr(Client, "connect", refuse("connects to a Temporal server"))
    for start in ("start_local", "start_time_skipping"):
        monkeypatch.setattr(WorkflowEnvironment, start, refuse("starts a Temporal server"))
    yield
