"""``breakglass kill`` and ``breakglass status``: start the kill switch, watch it, read its report.

Everything that can be checked before starting is checked first (accounts exist, input valid,
Temporal reachable); a refusal starts nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from datetime import timedelta

import typer
from pydantic import ValidationError
from rich.live import Live
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.accounts import ConfigError, load_accounts
from worker.cli_common import (
    abort,
    connect_or_abort,
    console,
    err_console,
    load_settings,
    run_async,
)
from worker.cli_rollback import rollback_status
from worker.render import report_view, steps_table
from worker.settings import Settings
from worker.temporal_client import live_pollers
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
        return KillSwitchInput(
            accounts=accounts, reason=reason, requested_by=requested_by, scope=scope
        )
    except ConfigError as e:
        abort(str(e), ExitCode.BAD_INPUT)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "input"
        abort(f"invalid kill request: {field}: {first['msg']}", ExitCode.BAD_INPUT)


async def _start(client: Client, request: KillSwitchInput, settings: Settings) -> WorkflowHandle:
    workflow_id = kill_workflow_id(request.accounts)
    attributes = (
        TypedSearchAttributes(
            [SearchAttributePair(KIND, "kill"), SearchAttributePair(ACCOUNTS, request.accounts)]
        )
        if settings.search_attributes
        else None
    )
    return await client.start_workflow(
        KillSwitchWorkflow.run,
        request,
        id=workflow_id,
        task_queue=settings.task_queue,
        # A second kill of the same accounts joins the running one instead of racing it.
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=attributes,
        execution_timeout=timedelta(hours=1),
        result_type=KillReport,
    )


async def _query(handle: WorkflowHandle) -> KillStatus | None:
    try:
        return await handle.query(KillSwitchWorkflow.status, rpc_timeout=timedelta(seconds=5))
    except Exception:  # a query needs a worker; no answer yet is not an error
        return None


async def _watch(handle: WorkflowHandle, as_json: bool) -> KillReport:
    """Wait for the result while showing step progress (a live table on a terminal)."""
    result = asyncio.ensure_future(handle.result())
    if as_json or not sys.stdout.isatty():
        seen: dict[str, str] = {}
        while not result.done():
            status = await _query(handle)
            for step in status.steps if status else []:
                changed = seen.get(step.step) != step.state
                if changed and step.state is not StepState.PENDING and not as_json:
                    seen[step.step] = step.state
                    console.print(f"{step.step.value}: {step.state.value} {step.detail}".rstrip())
            await asyncio.wait([result], timeout=POLL_S)
        return await result
    with Live(console=console, refresh_per_second=8) as live:
        while not result.done():
            status = await _query(handle)
            if status:
                live.update(steps_table(status.steps, title=f"{handle.id} · round {status.round}"))
            await asyncio.wait([result], timeout=POLL_S)
    return await result


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

    async def go() -> ExitCode:
        client = await connect_or_abort(settings)
        handle = await _start(client, request, settings)
        if not await live_pollers(client, settings.task_queue):
            # Started and durable, but nothing will happen until a worker runs: say so loudly.
            err_console.print(
                f"warning: no worker is polling task queue {settings.task_queue!r}: the kill is "
                "queued and runs as soon as a worker starts (breakglass dev up, or deploy one)",
                markup=False,
            )
        if detach:
            print(handle.id)
            return ExitCode.OK
        if not as_json:
            console.print(f"kill switch {handle.id} · UI {settings.ui_url_for(handle.id)}")
        try:
            report = await _watch(handle, as_json)
        except WorkflowFailureError as e:
            abort(f"kill {handle.id} failed: {e.cause or e}", ExitCode.WORKFLOW_FAILED)
        return _emit(report, as_json)

    raise typer.Exit(int(run_async(go())))


def status(
    workflow_id: str = typer.Argument(..., help="Workflow id, e.g. kill/alpha-futures."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show a kill switch's or a rollback's progress, and its report once finished."""
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
