"""``breakglass kill`` and ``breakglass status``: start the kill switch, watch it, read its report
(``status`` hands rollbacks and deployments to their own modules).

Everything that can be checked before starting is checked first (accounts exist, input valid,
Temporal reachable); a refusal starts nothing.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import timedelta

import typer
from rich.live import Live
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from activities.accounts import ConfigError, load_accounts
from worker.cli_common import abort, connect_or_abort, console, load_settings, run_async
from worker.cli_deploy import deploy_status
from worker.cli_rollback import rollback_status
from worker.cli_start import Start, launch, query_or_none, start, validated, watch
from worker.render import report_view, steps_table
from worker.settings import Settings
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import (
    ExitCode,
    KillOutcome,
    KillReport,
    KillScope,
    KillStatus,
    KillSwitchInput,
    StepState,
    kill_workflow_id,
)

KIND = SearchAttributeKey.for_keyword("BreakglassKind")
ACCOUNTS = SearchAttributeKey.for_keyword_list("BreakglassAccounts")
POLL_S = 0.25


def _validated_input(
    settings: Settings, accounts: list[str], reason: str, requested_by: str, scope: KillScope
) -> KillSwitchInput:
    try:
        known = load_accounts(settings.accounts_file)
        for name in accounts:
            known.get(name)
    except ConfigError as e:
        abort(str(e), ExitCode.BAD_INPUT)
    return validated(
        "kill",
        lambda: KillSwitchInput(
            accounts=accounts, reason=reason, requested_by=requested_by, scope=scope
        ),
    )


def _spec(request: KillSwitchInput, settings: Settings) -> Start:
    attributes = (
        TypedSearchAttributes(
            [SearchAttributePair(KIND, "kill"), SearchAttributePair(ACCOUNTS, request.accounts)]
        )
        if settings.search_attributes
        else None
    )
    return Start(
        KillSwitchWorkflow.run,
        request,
        workflow_id=kill_workflow_id(request.accounts),
        result_type=KillReport,
        execution_timeout=timedelta(hours=1),
        # A second kill of the same accounts joins the running one instead of racing it.
        already_running=None,
        search_attributes=attributes,
    )


async def _start(client: Client, request: KillSwitchInput, settings: Settings) -> WorkflowHandle:
    return await start(client, settings, _spec(request, settings))


async def _query(handle: WorkflowHandle) -> KillStatus | None:
    status: KillStatus | None = await query_or_none(handle, KillSwitchWorkflow.status)
    return status


async def _watch(handle: WorkflowHandle, as_json: bool) -> KillReport:
    """Wait for the result while showing step progress (a live table on a terminal)."""
    if as_json or not sys.stdout.isatty():
        seen: dict[str, str] = {}

        def lines(status: KillStatus) -> None:
            for step in status.steps:
                changed = seen.get(step.step) != step.state
                if changed and step.state is not StepState.PENDING and not as_json:
                    seen[step.step] = step.state
                    console.print(f"{step.step.value}: {step.state.value} {step.detail}".rstrip())

        report: KillReport = await watch(handle, KillSwitchWorkflow.status, lines, POLL_S)
        return report
    with Live(console=console, refresh_per_second=8) as live:

        def table(status: KillStatus) -> None:
            live.update(steps_table(status.steps, title=f"{handle.id} · round {status.round}"))

        report = await watch(handle, KillSwitchWorkflow.status, table, POLL_S)
    return report


def _emit(report: KillReport, as_json: bool) -> ExitCode:
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        console.print(report_view(report))
    return ExitCode.OK if report.outcome is KillOutcome.VERIFIED else ExitCode.UNVERIFIED


def kill(
    account: list[str] = typer.Option(
        ..., "--account", "-a", help="Account name from the accounts file (repeatable)."
    ),
    reason: str = typer.Option(..., "--reason", "-r", help="Why: recorded in the report."),
    scope: KillScope = typer.Option(
        KillScope.FLATTEN, "--scope", help="flatten: cancel and close; cancel-only: orders only."
    ),
    requested_by: str = typer.Option(
        "", "--as", help="Who is asking (default: the login name).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, nothing else."),
    detach: bool = typer.Option(False, "--detach", help="Start and print the workflow id only."),
) -> None:
    """Emergency kill switch: cancel every open order and flatten every position, verified.

    Runs halt → cancel_all → flatten → verify → notify through Temporal. Exit 0 only when the
    venue shows every account flat. Reads BREAKGLASS_ACCOUNTS_FILE and the Temporal settings.
    """
    settings = load_settings()
    request = _validated_input(settings, account, reason, requested_by or getpass.getuser(), scope)

    go = launch(
        settings,
        _spec(request, settings),
        title="kill switch",
        noun="kill",
        detach=detach,
        as_json=as_json,
        follow=lambda handle: _watch(handle, as_json),
        emit=lambda report: _emit(report, as_json),
    )
    raise typer.Exit(int(run_async(go)))


def status(
    workflow_id: str = typer.Argument(
        ..., help="Workflow id, e.g. kill/alpha-futures, rollback/S/E, deploy/S/E."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show a kill switch's, a rollback's or a deployment's progress, and its report once
    finished (a deployment as a stage tree)."""
    settings = load_settings()

    async def go() -> ExitCode:
        client = await connect_or_abort(settings)
        handle = client.get_workflow_handle(workflow_id, result_type=KillReport)
        try:
            description = await handle.describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                abort(f"no workflow {workflow_id!r}", ExitCode.NOT_FOUND)
            raise
        state = description.status or WorkflowExecutionStatus.RUNNING
        if description.workflow_type == "Rollback":
            return await rollback_status(client, workflow_id, state, as_json)
        if description.workflow_type == "Deploy":
            return await deploy_status(client, workflow_id, state, as_json)
        if state == WorkflowExecutionStatus.COMPLETED:
            return _emit(await handle.result(), as_json)
        status = await _query(handle)
        if as_json:
            body = {"workflow_id": workflow_id, "status": state.name}
            if status:
                body["progress"] = json.loads(status.model_dump_json())
            print(json.dumps(body, indent=2))
        else:
            console.print(f"{workflow_id}: {state.name.lower()}")
            if status:
                console.print(steps_table(status.steps, title=f"round {status.round}"))
        if state == WorkflowExecutionStatus.RUNNING:
            return ExitCode.OK
        return ExitCode.WORKFLOW_FAILED

    raise typer.Exit(int(run_async(go())))
