"""Crafted kill-switch inputs started by hand through Temporal (a raw payload, no pydantic model
on the client side) fail the workflow at once with a readable, non-retryable error: no workflow
task retried for ever, no activity started. On the dev server, as an operator's client would."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from tests.fixtures.kill import FakeVenue
from tests.helpers import fresh_id, new_worker
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import KillOutcome, KillReport

VALID: dict[str, Any] = {"accounts": ["alpha"], "reason": "by hand", "requested_by": "mallory"}
NO_ARGUMENT = object()

CRAFTED = {
    "extra field": ({**VALID, "dry_run": True}, "dry_run: Extra inputs are not permitted"),
    "wrong type": ({**VALID, "accounts": "alpha"}, "accounts: Input should be a valid list"),
    "bad scope": ({**VALID, "scope": "nuke"}, "scope: Input should be 'flatten' or 'cancel-only'"),
    "empty object": ({}, "accounts: Field required"),
    "huge max_rounds": ({**VALID, "max_rounds": 1e6}, "max_rounds: Input should be less than"),
    "5000 accounts": (
        {**VALID, "accounts": [f"a{i}" for i in range(5000)]},
        "accounts: List should have at most 50 items",
    ),
    "not an object": ("kill everything", "input: Input should be a valid dictionary"),
    "no argument": (NO_ARGUMENT, "input: Input should be a valid dictionary"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
async def test_a_crafted_input_fails_the_workflow_at_once(client: Client, case: str) -> None:
    payload, expected = CRAFTED[case]
    venue = FakeVenue()
    async with new_worker(client, KillSwitchWorkflow, activities=venue.activities()) as worker:
        args: list[Any] = [] if payload is NO_ARGUMENT else [payload]
        handle = await client.start_workflow(
            "KillSwitch",
            args=args,
            id=fresh_id("kill-crafted"),
            task_queue=worker.task_queue,
            execution_timeout=timedelta(minutes=5),
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), timeout=30)
        history = await handle.fetch_history()
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == "InvalidInput" and cause.non_retryable
    assert cause.message.startswith("invalid kill switch input: ")
    assert expected in cause.message, cause.message
    assert len(cause.message) < 1000
    assert venue.calls == [] and venue.halt_calls == [], "a crafted input reached the venue"
    assert not any(e.HasField("workflow_task_failed_event_attributes") for e in history.events)


async def test_a_raw_but_valid_input_runs(client: Client) -> None:
    venue = FakeVenue()
    async with new_worker(client, KillSwitchWorkflow, activities=venue.activities()) as worker:
        report = await client.execute_workflow(
            "KillSwitch",
            {**VALID, "max_rounds": 2.0, "scope": "cancel-only"},
            id=fresh_id("kill-raw"),
            task_queue=worker.task_queue,
            result_type=KillReport,
            execution_timeout=timedelta(minutes=5),
        )
    assert report.outcome is KillOutcome.VERIFIED
    assert [a.account for a in report.accounts] == ["alpha"]
