"""The deployment part of ``make demo``: after the rollback, ``breakglass deploy`` releases the
next good version through Temporal — shadow beside 1.0.0, a 25 % capital canary judged on its
trading metrics, promotion approved by a runbook approver, monitoring, 1.0.0 retired.

The demo plays the humans with the real CLI: an approver approves the promotion, and a paused
canary step (too few trades on the demo's slow loop to judge) is continued by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from temporalio.client import Client

from worker.cli_common import console
from worker.settings import Settings
from worker.temporal_client import connect
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import DeployStatus, deploy_workflow_id

STRATEGY, ENV = "sample", "demo"
NEXT = "1.2.0"
APPROVER, OPERATOR = "bob", "carol"
"""Approvers in runbooks/sample-demo.yaml; the deployment is requested by ``demo``."""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


async def status_of(client: Client, workflow_id: str, run_id: str | None) -> DeployStatus | None:
    """The running deployment's status, once it has started (None before)."""
    if run_id is None:
        return None
    with contextlib.suppress(Exception):
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        return await handle.query(DeployWorkflow.status)
    return None


async def latest_run(client: Client, workflow_id: str, before: str | None) -> str | None:
    """Run id of the deployment the CLI started (not one a previous demo left finished)."""
    with contextlib.suppress(Exception):
        run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
        return run_id if run_id != before else None
    return None


async def run_deploy(settings: Settings) -> int:
    workflow_id = deploy_workflow_id(STRATEGY, ENV)
    client = await connect(settings)
    before = await latest_run(client, workflow_id, None)
    console.print(
        f"[bold]9. deploy {NEXT}[/bold] through Temporal: shadow beside 1.0.0, a 25 % capital "
        f"canary, promotion approved by {APPROVER}, monitoring, 1.0.0 retired"
    )
    console.print(
        f'   $ breakglass deploy {STRATEGY} --env {ENV} --version {NEXT} --reason "demo" --yes'
    )
    reason = "demo: the next release"
    argv = cli("deploy", STRATEGY, "--env", ENV, "--version", NEXT, "--reason", reason)
    deploying = await asyncio.create_subprocess_exec(*argv, "--yes", "--as", "demo")
    run_id: str | None = None
    answered: set[str] = set()
    while deploying.returncode is None:
        run_id = run_id or await latest_run(client, workflow_id, before)
        status = await status_of(client, workflow_id, run_id)
        if status is not None and status.paused and status.paused not in answered:
            answered.add(status.paused)
            console.print(f"   paused ({status.paused}): {OPERATOR} goes on")
            console.print(f"   $ breakglass promote {workflow_id} --as {OPERATOR}")
            note = "demo: few trades on a 5 s loop"
            await _call(cli("promote", workflow_id, "--as", OPERATOR, "--note", note))
        if status is not None and status.awaiting_approval and "approval" not in answered:
            answered.add("approval")
            console.print(f"   $ breakglass approve {workflow_id} --as {APPROVER}")
            await _call(cli("approve", workflow_id, "--as", APPROVER))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(deploying.wait(), timeout=1.0)
    console.print(f"   the step tree again, any time: breakglass status {workflow_id}")
    return deploying.returncode or 0


async def _call(argv: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*argv)
    return await proc.wait()
