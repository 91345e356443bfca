"""``breakglass deploy``, ``promote | abort`` and ``status deploy/...``: start a deployment, watch
its stage tree, and answer a paused canary (the same update Slack will call).

Approving or rejecting the promotion is ``breakglass approve | reject`` (``worker.cli_rollback``),
which answers rollbacks and deployments alike.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable

import typer
from rich.live import Live
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from activities.targets.supervisor import NAME_OK as RELEASE_NAME
from worker.cli_common import abort, console, err_console, load_settings, run_async
from worker.cli_start import (
    Start,
    answer,
    launch,
    query_or_none,
    runbook_and_consent,
    validated,
    watch,
)
from worker.render import deploy_hint, deploy_report_view, deploy_status_view
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import (
    DeployInput,
    DeployOutcome,
    DeployReport,
    DeployStatus,
    PauseDecision,
    StageNode,
    deploy_workflow_id,
)
from workflows.shared import ExitCode

POLL_S = 0.5
EXIT = {
    DeployOutcome.PROMOTED: ExitCode.OK,
    DeployOutcome.REJECTED: ExitCode.UNVERIFIED,
    DeployOutcome.ROLLED_BACK: ExitCode.UNVERIFIED,
    DeployOutcome.ROLLBACK_FAILED: ExitCode.WORKFLOW_FAILED,
}
"""A rejected or rolled-back release left a safe, known system (1); a failed rollback needs a
human (4), like a failed workflow."""


def _lines() -> Callable[[DeployStatus], None]:
    """Progress without a terminal: one line per stage or step change, each hint once."""
    seen: dict[str, tuple[str, str]] = {}
    last_hint: str | None = None

    def line(name: str, node: StageNode) -> None:
        now = (node.state.value, node.detail)
        if node.state.value != "pending" and seen.get(name) != now:
            seen[name] = now
            console.print(f"{name}: {node.state.value} {node.detail}".rstrip(), markup=False)

    def show(status: DeployStatus) -> None:
        nonlocal last_hint
        for node in status.tree:
            line(node.name, node)
            for leaf in node.children:
                line(f"{node.name} [{leaf.name}]", leaf)
        hint = deploy_hint(status)
        if hint is not None and hint != last_hint:
            console.print(hint, markup=False)
        last_hint = hint

    return show


async def _follow(handle: WorkflowHandle, as_json: bool) -> DeployReport:
    if as_json:
        report: DeployReport = await watch(handle, DeployWorkflow.status, lambda _: None, POLL_S)
        return report
    if not sys.stdout.isatty():
        report = await watch(handle, DeployWorkflow.status, _lines(), POLL_S)
        return report
    # transient: the final report draws the finished tree once, below the header line.
    with Live(console=console, refresh_per_second=4, transient=True) as live:

        def tree(status: DeployStatus) -> None:
            live.update(deploy_status_view(status))

        report = await watch(handle, DeployWorkflow.status, tree, POLL_S)
    return report


def _emit(report: DeployReport, as_json: bool) -> ExitCode:
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        console.print(deploy_report_view(report))
    return EXIT[report.outcome]


def deploy(
    strategy: str = typer.Argument(..., help="Strategy name, as in its runbook."),
    env: str = typer.Option(..., "--env", "-e", help="Environment, as in its runbook."),
    version: str = typer.Option(..., "--version", "-V", help="Release to deploy, e.g. 1.4.0."),
    reason: str = typer.Option(..., "--reason", "-r", help="Why: recorded in the report."),
    requested_by: str = typer.Option("", "--as", help="Who is asking (default: login name)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, nothing else."),
    detach: bool = typer.Option(False, "--detach", help="Start and print the workflow id only."),
) -> None:
    """Deploy a release: staging checks, snapshot, shadow, then a capital canary judged per
    step (the trading lease moves to it, fenced), promotion approval, monitoring; the old
    version stays warm, then is retired.

    Exit 0 when promoted; 1 when rejected before production or rolled back after the first
    switch; 2 bad input (nothing started, also when a deployment of the same system is already
    running); 4 the rollback or the workflow failed. Reads BREAKGLASS_RUNBOOKS_DIR and the
    Temporal settings.
    """
    settings = load_settings()
    request = validated(
        "deploy",
        lambda: DeployInput(
            strategy=strategy,
            env=env,
            version=version,
            reason=reason,
            requested_by=requested_by or getpass.getuser(),
        ),
    )
    if not RELEASE_NAME.fullmatch(version) or version == "current":
        abort(
            f"invalid deploy request: version: {version!r} is not a release name "
            "(letters, digits, '.', '_', '-')",
            ExitCode.BAD_INPUT,
        )
    question = f"Deploy {version} to {strategy}/{env} ({reason})?"
    runbook_and_consent(settings, strategy, env, yes=yes, verb="deploy", question=question)

    workflow_id = deploy_workflow_id(strategy, env)
    spec = Start(
        DeployWorkflow.run,
        request,
        workflow_id=workflow_id,
        result_type=DeployReport,
        # No execution timeout: every wait in the workflow has its own (pause, approval, bakes),
        # and a deployment cut off after its first switch would skip its rollback.
        execution_timeout=None,
        # Two deployments of one system must never run at once.
        already_running=f"a deployment of {strategy}/{env} is already running: "
        f"breakglass status {workflow_id}",
    )
    go = launch(
        settings,
        spec,
        title="deployment",
        noun="deployment",
        detach=detach,
        as_json=as_json,
        follow=lambda handle: _follow(handle, as_json),
        emit=lambda report: _emit(report, as_json),
    )
    raise typer.Exit(int(run_async(go)))


def _resume(workflow_id: str, by: str, proceed: bool, note: str) -> None:
    verb = "promote" if proceed else "abort"
    if not workflow_id.startswith("deploy/"):
        abort(
            f"{workflow_id!r} is not a deployment: {verb} answers a paused deploy/<strategy>/<env>",
            ExitCode.BAD_INPUT,
        )
    settings = load_settings()
    decision = validated(verb, lambda: PauseDecision(by=by, proceed=proceed, note=note))

    done = "promoted" if proceed else "aborted"
    answer(
        settings,
        workflow_id,
        DeployWorkflow.resume,
        decision,
        lambda state: f"{done} by {by}: {workflow_id} is {state}",
    )


def promote(
    workflow_id: str = typer.Argument(..., help="e.g. deploy/sample/prod"),
    by: str = typer.Option(..., "--as", help="Your name, as listed in the runbook's approvers."),
    note: str = typer.Option("", "--note", help="Recorded with the decision."),
) -> None:
    """Go on past a paused canary step (an approver other than the requester)."""
    _resume(workflow_id, by, True, note)


def abort_(
    workflow_id: str = typer.Argument(..., help="e.g. deploy/sample/prod"),
    by: str = typer.Option(..., "--as", help="Your name (anyone may stop a deployment)."),
    note: str = typer.Option("", "--note", help="Recorded with the decision."),
) -> None:
    """Stop a paused deployment: the previous version comes back (rollback saga)."""
    _resume(workflow_id, by, False, note)


async def deploy_status(
    client: Client, workflow_id: str, state: WorkflowExecutionStatus, as_json: bool
) -> ExitCode:
    """``breakglass status deploy/...``: the stage tree, and the report once finished."""
    handle = client.get_workflow_handle(workflow_id, result_type=DeployReport)
    if state == WorkflowExecutionStatus.COMPLETED:
        report: DeployReport = await handle.result()
        if as_json:
            done = DeployStatus(
                workflow_id=workflow_id,
                stage=report.failed_stage,
                approvals=report.approvals,
                tree=report.tree,
                report=report,
            )
            print(done.model_dump_json(indent=2))
        else:
            console.print(deploy_report_view(report))
        return EXIT[report.outcome]
    # No worker answering: the execution state alone is still worth showing.
    status: DeployStatus | None = await query_or_none(handle, DeployWorkflow.status)
    if as_json:
        if status is None:
            print(json.dumps({"workflow_id": workflow_id, "status": state.name}, indent=2))
        else:
            print(status.model_dump_json(indent=2))
    else:
        if state != WorkflowExecutionStatus.RUNNING or status is None:
            console.print(f"{workflow_id}: {state.name.lower()}", markup=False)
        if status is None:
            err_console.print("warning: no worker answered the status query", markup=False)
        else:
            console.print(deploy_status_view(status))
    return ExitCode.OK if state == WorkflowExecutionStatus.RUNNING else ExitCode.WORKFLOW_FAILED
