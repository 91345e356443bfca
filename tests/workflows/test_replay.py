"""Recorded kill-switch and rollback histories must replay against today's workflow code: a
change that reorders commands (non-determinism) fails here, in CI, not in a running kill."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from worker.settings import Settings
from worker.temporal_client import data_converter
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow

HISTORIES = {
    p.stem: p.read_text() for p in sorted((Path(__file__).parent / "histories").glob("*.json"))
}


def test_histories_are_recorded() -> None:
    assert len(HISTORIES) >= 4, "run python -m tests.workflows.record_histories"


@pytest.mark.parametrize("name", sorted(HISTORIES))
async def test_recorded_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(f"record-{name}", HISTORIES[name])  # ids are part of it
    replayer = Replayer(
        workflows=[KillSwitchWorkflow, RollbackWorkflow],
        data_converter=data_converter(Settings(payload_key=None)),
    )
    await replayer.replay_workflow(history)
