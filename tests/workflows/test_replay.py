"""Recorded kill-switch, rollback and deployment histories must replay against today's workflow
code: a change that reorders commands (non-determinism) fails here, in CI, not in a running kill."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from worker.settings import Settings
from worker.temporal_client import data_converter
from workflows.deployment import DeployWorkflow
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow

ROOT = Path(__file__).parent / "histories"
HISTORIES = {str(p.relative_to(ROOT).with_suffix("")): p for p in sorted(ROOT.rglob("*.json"))}
"""Today's shapes at the top; shapes of older code (still replayed: runs of that code may be
open when a new worker starts) in sub-folders named after the change that followed them."""


def test_histories_are_recorded() -> None:
    assert len(HISTORIES) >= 9, "run python -m tests.workflows.record_histories"


@pytest.mark.parametrize("name", sorted(HISTORIES))
async def test_recorded_history_replays(name: str) -> None:
    path = HISTORIES[name]
    history = WorkflowHistory.from_json(f"record-{path.stem}", path.read_text())  # ids matter
    replayer = Replayer(
        workflows=[KillSwitchWorkflow, RollbackWorkflow, DeployWorkflow],
        data_converter=data_converter(Settings(payload_key=None)),
    )
    await replayer.replay_workflow(history)
