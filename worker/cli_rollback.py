"""``breakglass rollback`` and ``breakglass approve | reject``: start the rollback saga, watch its
timeline, and answer an approval: a rollback's flatten or a deployment's promotion (the same
updates Slack will call)."""

from __future__ import annotations

import getpass
import json
from datetime import timedelta
from typing import Any

import typer
from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from worker.cli_common import abort, console, load_settings, run_async
from worker.cli_start import (
    Start,
    answer,
    launch,
    query_or_none,
    runbook_and_consent,
    validated,
    watch,
)
from workflows.deployment import DeployWorkflow
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import (
    ApprovalDecision,
    ApprovalState,
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
    return validated(
        "rollback",
        lambda: RollbackInput(
            strategy=strategy,
            env=env,
            target_version=to,
            snapshot_id=snapshot,
            reason=reason,
            requested_by=who,
        ),
    )


async def _watch(handle: WorkflowHandle, as_json: bool) -> RollbackReport:
    shown = 0

    def timeline(status: RollbackStatus) -> None:
        nonlocal shown
        if as_json:
            return
        for entry in status.timeline[shown:]:
            console.print(f"{entry.step.value}: {entry.state.value} {entry.detail}".rstrip())
        shown = len(status.timeline)
        if status.awaiting_approval:
            console.print(
                f"waiting for approval: breakglass approve {handle.id} --as NAME",
                markup=False,
            )

    report: RollbackReport = await watch(handle, RollbackWorkflow.status, timeline, POLL_S)
    if not as_json:
        for entry in report.timeline[shown:]:
            console.print(f"{entry.step.value}: {entry.state.value} {entry.detail}".rstrip())
    return report


def outcome_line(report: RollbackReport) -> str:
    """What the rollback did, in one line: the versions once rolled back; after a safe stop,
    what was halted, stopped and cancelled (or that nothing was), then why."""
    if report.outcome is RollbackOutcome.ROLLED_BACK:
        line = (
            f"{report.outcome.value}: {report.version_from or 'none'} -> {report.version_to}, "
            f"positions {report.flatten or 'untouched'}"
        )
    else:
        step = report.failed_step.value if report.failed_step else "?"
        stop = report.safe_stop
        what = (
            stop.summary()
            if stop is not None
            else "what was stopped is not in the report (recorded by an older worker): check"
        )
        line = f"{report.outcome.value} at {step}: {what}"
        if report.version_to is not None:
            line += f" (rolling back {report.version_from or 'none'} -> {report.version_to})"
    return line + (f"; {report.error}" if report.error else "")


def _emit(report: RollbackReport, as_json: bool) -> ExitCode:
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        console.print(outcome_line(report), markup=False, soft_wrap=True)
        for c in report.reconcile.corrections if report.reconcile else []:
            console.print(
                f"  reconciled {c.table} {c.key}: database said {c.database}, "
                f"venue {c.venue} (venue wins)",
                markup=False,
            )
    ok = report.outcome is RollbackOutcome.ROLLED_BACK
    return ExitCode.OK if ok else ExitCode.UNVERIFIED


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
    question = f"Roll back {strategy}/{env} ({reason})?"
    runbook_and_consent(settings, strategy, env, yes=yes, verb="roll back", question=question)

    workflow_id = rollback_workflow_id(strategy, env)
    spec = Start(
        RollbackWorkflow.run,
        request,
        workflow_id=workflow_id,
        result_type=RollbackReport,
        execution_timeout=timedelta(hours=6),
        # Two rollbacks of one system must never run at once.
        already_running=f"a rollback of {strategy}/{env} is already running: "
        f"breakglass status {workflow_id}",
    )
    go = launch(
        settings,
        spec,
        title="rollback",
        noun="rollback",
        detach=detach,
        as_json=as_json,
        follow=lambda handle: _watch(handle, as_json),
        emit=lambda report: _emit(report, as_json),
        warn_without_worker=False,
    )
    raise typer.Exit(int(run_async(go)))


APPROVALS: dict[str, Any] = {
    "rollback/": RollbackWorkflow.approve_flatten,
    "deploy/": DeployWorkflow.approve_promotion,
}
"""Which update answers an approval, by the workflow id's business-key prefix."""


def _decide(workflow_id: str, approver: str, approve: bool, note: str) -> None:
    settings = load_settings()
    update = next((u for p, u in APPROVALS.items() if workflow_id.startswith(p)), None)
    if update is None:
        abort(
            f"nothing to approve in {workflow_id!r}: approvals answer rollback/<strategy>/<env> "
            "and deploy/<strategy>/<env>",
            ExitCode.BAD_INPUT,
        )
    try:
        decision = ApprovalDecision(approver=approver, approve=approve, note=note)
    except ValidationError as e:
        abort(f"invalid decision: {e.errors()[0]['msg']}", ExitCode.BAD_INPUT)

    verb = "approved" if approve else "rejected"

    def said(state: ApprovalState) -> str:
        return f"{verb} by {approver}; approvals so far: {', '.join(state.approvals)}"

    answer(settings, workflow_id, update, decision, said)


def approve(
    workflow_id: str = typer.Argument(..., help="e.g. rollback/momentum/prod, deploy/sample/prod"),
    approver: str = typer.Option(..., "--as", help="Your name, as listed in the runbook."),
    note: str = typer.Option("", "--note", help="Recorded with the decision."),
) -> None:
    """Approve a rollback's flatten step or a deployment's promotion (the requester cannot
    approve their own)."""
    _decide(workflow_id, approver, True, note)


def reject(
    workflow_id: str = typer.Argument(..., help="e.g. rollback/momentum/prod, deploy/sample/prod"),
    approver: str = typer.Option(..., "--as", help="Your name, as listed in the runbook."),
    note: str = typer.Option("", "--note", help="Recorded with the decision."),
) -> None:
    """Reject a rollback's flatten step (positions are held, the rollback goes on) or a
    deployment's promotion (it is not promoted: the previous version comes back)."""
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
            console.print(f"{workflow_id}: {outcome_line(report)}", markup=False, soft_wrap=True)
        return ExitCode.OK if report.outcome is RollbackOutcome.ROLLED_BACK else ExitCode.UNVERIFIED
    # No worker answering: the state alone is still worth showing.
    status: RollbackStatus | None = await query_or_none(handle, RollbackWorkflow.status)
    if as_json:
        body: dict[str, Any] = {"workflow_id": workflow_id, "status": state.name}
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
