"""``breakglass rollback`` and ``breakglass approve | reject``: start the rollback saga, watch its
timeline, and answer its flatten approval (the same update Slack will call)."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import uuid
from datetime import timedelta

import typer
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.accounts import ConfigError
from activities.rollback_plan import find_runbook
from worker.cli_common import abort, connect_or_abort, console, load_settings, run_async
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    ApprovalDecision,
    RollbackInput,
    RollbackOutcome,
    RollbackReport,
    RollbackStatus,
    rollback_workflow_id,
)
from workflows.shared import ExitCode

POLL_S = 0.5


def _input(
    strategy: str, env: str, to: str | None, snapshot: str | None, reason: str, who: str
) -> RollbackInput:
    try:
        return RollbackInput(
            strategy=strategy,
            env=env,
            target_version=to,
            snapshot_id=snapshot,
            reason=reason,
            requested_by=who,
        )
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "input"
        abort(f"invalid rollback request: {field}: {first['msg']}", ExitCode.BAD_INPUT)


async def _watch(handle: WorkflowHandle, as_json: bool) -> RollbackReport:
    result = asyncio.ensure_future(handle.result())
    shown = 0
    while not result.done():
        try:
            status: RollbackStatus = await handle.query(
                RollbackWorkflow.status, rpc_timeout=timedelta(seconds=5)
            )
        except Exception:  # no worker yet: keep waiting, the saga is durable
            status = None  # type: ignore[assignment]
        if status is not None and not as_json:
            for entry in status.timeline[shown:]:
                console.print(f"{entry.step.value}: {entry.state.value} {entry.detail}".rstrip())
            shown = len(status.timeline)
            if status.awaiting_approval:
                console.print(
                    f"waiting for approval: breakglass approve {handle.id} --as NAME",
                    markup=False,
                )
        await asyncio.wait([result], timeout=POLL_S)
    report: RollbackReport = await result
    if not as_json:
        for entry in report.timeline[shown:]:
            console.print(f"{entry.step.value}: {entry.state.value} {entry.detail}".rstrip())
    return report


def rollback(
    strategy: str = typer.Argument(..., help="Strategy name, as in its runbook."),
    env: str = typer.Option(..., "--env", "-e", help="Environment, as in its runbook."),
    reason: str = typer.Option(..., "--reason", "-r", help="Why: recorded in the report."),
    to: str | None = typer.Option(None, "--to", help="Version to bring back (default: previous)."),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Snapshot id to restore."),
    requested_by: str = typer.Option("", "--as", help="Who is asking (default: login name)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, nothing else."),
    detach: bool = typer.Option(False, "--detach", help="Start and print the workflow id only."),
) -> None:
    """Roll a strategy back: freeze, stop, cancel, flatten (per runbook), restore its state
    database, bring back the previous version and check it is healthy.

    Exit 0 when rolled back; 1 when it stopped in a safe state (HALTED, nothing open); 2 bad
    input (nothing started, also when a rollback of the same system is already running).
    Reads BREAKGLASS_RUNBOOKS_DIR and the Temporal settings.
    """
    settings = load_settings()
    request = _input(strategy, env, to, snapshot, reason, requested_by or getpass.getuser())
    try:
        find_runbook(settings.runbooks_dir, strategy, env)
    except ConfigError as e:
        abort(str(e), ExitCode.BAD_INPUT)
    if not yes:
        if not sys.stdin.isatty():
            abort("refusing to roll back without confirmation: pass --yes", ExitCode.BAD_INPUT)
        typer.confirm(f"Roll back {strategy}/{env} ({reason})?", abort=True)

    async def go() -> ExitCode:
        client = await connect_or_abort(settings)
        workflow_id = rollback_workflow_id(strategy, env)
        try:
            handle = await client.start_workflow(
                RollbackWorkflow.run,
                request,
                id=workflow_id,
                task_queue=settings.task_queue,
                # Two rollbacks of one system must never run at once.
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                execution_timeout=timedelta(hours=6),
            )
        except WorkflowAlreadyStartedError:
            abort(
                f"a rollback of {strategy}/{env} is already running: "
                f"breakglass status {workflow_id}",
                ExitCode.BAD_INPUT,
            )
        if detach:
            print(handle.id)
            return ExitCode.OK
        if not as_json:
            console.print(f"rollback {handle.id} · UI {settings.ui_url_for(handle.id)}")
        try:
            report = await _watch(handle, as_json)
        except WorkflowFailureError as e:
            abort(f"rollback {handle.id} failed: {e.cause or e}", ExitCode.WORKFLOW_FAILED)
        if as_json:
            print(report.model_dump_json(indent=2))
        else:
            console.print(
                f"{report.outcome.value}: {report.version_from} -> {report.version_to}, "
                f"positions {report.flatten or 'untouched'}"
                + (f"; {report.error}" if report.error else "")
            )
            for c in report.reconcile.corrections if report.reconcile else []:
                console.print(
                    f"  reconciled {c.table} {c.key}: database said {c.database}, "
                    f"venue {c.venue} (venue wins)",
                    markup=False,
                )
        ok = report.outcome is RollbackOutcome.ROLLED_BACK
        return ExitCode.OK if ok else ExitCode.UNVERIFIED

    raise typer.Exit(int(run_async(go())))


def _decide(workflow_id: str, approver: str, approve: bool, note: str) -> None:
    settings = load_settings()
    try:
        decision = ApprovalDecision(approver=approver, approve=approve, note=note)
    except ValidationError as e:
        abort(f"invalid decision: {e.errors()[0]['msg']}", ExitCode.BAD_INPUT)

    async def go() -> ExitCode:
        client = await connect_or_abort(settings)
        handle = client.get_workflow_handle(workflow_id)
        try:
            state = await handle.execute_update(
                RollbackWorkflow.approve_flatten,
                decision,
                id=f"cli-{uuid.uuid4()}",
                rpc_timeout=timedelta(seconds=15),
            )
        except WorkflowUpdateFailedError as e:
            abort(f"refused: {getattr(e.cause, 'message', e.cause)}", ExitCode.BAD_INPUT)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                abort(f"no running workflow {workflow_id!r}", ExitCode.NOT_FOUND)
            abort(f"cannot reach {workflow_id}: {e.message}", ExitCode.UNREACHABLE)
        verb = "approved" if approve else "rejected"
        console.print(f"{verb} by {approver}; approvals so far: {', '.join(state.approvals)}")
        return ExitCode.OK

    raise typer.Exit(int(run_async(go())))


def approve(
    workflow_id: str = typer.Argument(..., help="e.g. rollback/momentum/prod"),
    approver: str = typer.Option(..., "--as", help="Your name, as listed in the runbook."),
    note: str = typer.Option("", "--note", help="Recorded with the decision."),
) -> None:
    """Approve a rollback's flatten step (the requester cannot approve their own)."""
    _decide(workflow_id, approver, True, note)


def reject(
    workflow_id: str = typer.Argument(..., help="e.g. rollback/momentum/prod"),
    approver: str = typer.Option(..., "--as", help="Your name, as listed in the runbook."),
    note: str = typer.Option("", "--note", help="Recorded with the decision."),
) -> None:
    """Reject a rollback's flatten step: positions are held, the rollback goes on."""
    _decide(workflow_id, approver, False, note)


async def rollback_status(
    client: Client, workflow_id: str, state: WorkflowExecutionStatus, as_json: bool
) -> ExitCode:
    """``breakglass status rollback/...``: the saga's timeline, and its report once finished."""
    handle = client.get_workflow_handle(workflow_id, result_type=RollbackReport)
    if state == WorkflowExecutionStatus.COMPLETED:
        report = await handle.result()
        if as_json:
            print(report.model_dump_json(indent=2))
        else:
            console.print(
                f"{workflow_id}: {report.outcome.value} ({report.version_from} -> "
                f"{report.version_to}, positions {report.flatten or 'untouched'})"
            )
        return ExitCode.OK if report.outcome is RollbackOutcome.ROLLED_BACK else ExitCode.UNVERIFIED
    try:
        status: RollbackStatus | None = await handle.query(
            RollbackWorkflow.status, rpc_timeout=timedelta(seconds=5)
        )
    except Exception:  # no worker answering: the state alone is still worth showing
        status = None
    if as_json:
        body = {"workflow_id": workflow_id, "status": state.name}
        if status is not None:
            body["progress"] = status.model_dump(mode="json")
        print(json.dumps(body, indent=2))
    else:
        console.print(f"{workflow_id}: {state.name.lower()}")
        for entry in status.timeline if status else []:
            console.print(
                f"  {entry.at:%H:%M:%S} {entry.step.value}: {entry.state.value} {entry.detail}"
            )
        if status is not None and status.awaiting_approval:
            console.print(f"  waiting for approval: breakglass approve {workflow_id} --as NAME")
    return ExitCode.OK if state == WorkflowExecutionStatus.RUNNING else ExitCode.WORKFLOW_FAILED
