"""``breakglass kill`` and ``breakglass status``: start the kill switch, watch it, read its report
(``status`` hands rollbacks and deployments to their own modules).

Everything that can be checked before starting is checked first (accounts exist, input valid,
Temporal reachable); a refusal starts nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
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
from worker.cli_deploy import deploy_status
from worker.cli_rollback import rollback_status
from worker.cli_start import (
    Start,
    WorkerWatch,
    launch,
    query_or_none,
    start,
    validated,
    watch,
)
from worker.render import accounts_progress, report_view, steps_table
from worker.settings import Settings
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import (
    ExitCode,
    KillJoin,
    KillJoinResult,
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
JOIN_TIMEOUT = timedelta(seconds=10)
"""How long the ``join`` update may wait for a worker before the CLI says it could not confirm
the join and follows the queued kill anyway (an update needs a running worker)."""


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


@dataclass
class Joined:
    """This request joined a kill of the same accounts that was already running."""

    workflow_id: str
    running: KillSwitchInput | None
    """The running kill's own request (None: its history could not be read)."""
    asked: KillScope
    result: KillJoinResult | None
    """The running kill's answer; None: no worker answered within JOIN_TIMEOUT, so the join is
    not confirmed (it applies if the server still holds it when a worker picks the kill up)."""

    def said(self) -> str:
        who = (
            f"requested by {self.running.requested_by}: {self.running.reason!r}, "
            f"scope {self.running.scope.value}"
            if self.running is not None
            else "its request could not be read"
        )
        head = f"joined the running kill {self.workflow_id} ({who}) instead of starting another"
        if self.result is None:
            return (
                f"{head}; no worker answered the join within {JOIN_TIMEOUT.total_seconds():.0f}s, "
                f"so your reason and scope {self.asked.value} are not confirmed: the kill is "
                "queued and this command follows it"
            )
        if self.result.escalated:
            return (
                f"{head}; your scope {self.asked.value} escalated it to {self.result.scope.value}"
            )
        return f"{head}; its scope stays {self.result.scope.value}: {self.result.message}"

    def as_json(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "running_reason": self.running.reason if self.running else None,
            "running_requested_by": self.running.requested_by if self.running else None,
            "running_scope": self.running.scope.value if self.running else None,
            "asked_scope": self.asked.value,
            "confirmed": self.result is not None,
            "escalated": self.result.escalated if self.result else None,
            "scope": self.result.scope.value if self.result else None,
            "message": self.result.message if self.result else None,
        }


async def _running_request(client: Client, handle: WorkflowHandle) -> KillSwitchInput | None:
    """The running kill's request, from its first history event: no worker needed."""
    try:
        async for event in handle.fetch_history_events(page_size=1):
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            [request] = await client.data_converter.decode(payloads, [KillSwitchInput])
            return request if isinstance(request, KillSwitchInput) else None
    except Exception:  # the join goes ahead without the running kill's reason
        return None
    return None


async def _finished(handle: WorkflowHandle) -> bool:
    try:
        description = await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return True
        raise
    return description.status != WorkflowExecutionStatus.RUNNING


async def _ends_soon(handle: WorkflowHandle, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while not await _finished(handle):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _join(
    client: Client, handle: WorkflowHandle, request: KillSwitchInput, joined: list[Joined]
) -> bool:
    """Send the running kill this request's reason, requester and scope (update ``join``; a
    wider scope escalates it) and say so. False: it finished meanwhile, start a new one."""
    join = KillJoin(reason=request.reason, requested_by=request.requested_by, scope=request.scope)
    # Said before the update's wait: without a worker it lasts JOIN_TIMEOUT.
    err_console.print(
        f"a kill of these accounts is already running ({handle.id}): joining it", markup=False
    )
    running = await _running_request(client, handle)
    result: KillJoinResult | None
    try:
        result = await handle.execute_update(
            "join",
            join,
            id=f"cli-{uuid.uuid4()}",
            result_type=KillJoinResult,
            rpc_timeout=JOIN_TIMEOUT,
        )
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        result = None
    except WorkflowUpdateFailedError as e:
        # Refused because its report is final: it ends within moments, then a new kill starts.
        if await _ends_soon(handle):
            return False
        abort(
            f"the running kill {handle.id} refused to be joined: "
            f"{getattr(e.cause, 'message', e.cause)}",
            ExitCode.BAD_INPUT,
        )
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND or await _finished(handle):
            return False
        if e.status != RPCStatusCode.DEADLINE_EXCEEDED:
            raise
        result = None
    joined.append(Joined(handle.id, running, request.scope, result))
    return True


def _spec(
    request: KillSwitchInput, settings: Settings, joined: list[Joined] | None = None
) -> Start:
    attributes = (
        TypedSearchAttributes(
            [SearchAttributePair(KIND, "kill"), SearchAttributePair(ACCOUNTS, request.accounts)]
        )
        if settings.search_attributes
        else None
    )
    record: list[Joined] = joined if joined is not None else []
    return Start(
        KillSwitchWorkflow.run,
        request,
        workflow_id=kill_workflow_id(request.accounts),
        result_type=KillReport,
        execution_timeout=timedelta(hours=1),
        search_attributes=attributes,
        # A second kill of the same accounts joins the running one instead of racing it, and
        # hands it its reason, requester and scope.
        join=lambda client, handle: _join(client, handle, request, record),
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
            live.update(_progress(status, title=f"{handle.id} · round {status.round}"))

        report = await watch(handle, KillSwitchWorkflow.status, table, POLL_S)
    return report


def _progress(status: KillStatus, title: str) -> RenderableType:
    steps = steps_table(status.steps, title=title)
    return Group(steps, accounts_progress(status.accounts)) if status.accounts else steps


def _emit(report: KillReport, as_json: bool, joined: list[Joined] | None = None) -> ExitCode:
    """Print the report (JSON: the report's fields, plus ``joined`` for ``kill``: null, or what
    this request joined) and turn it into the exit code."""
    if as_json:
        body = json.loads(report.model_dump_json())
        if joined is not None:
            body["joined"] = joined[-1].as_json() if joined else None
        print(json.dumps(body, indent=2))
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

    Runs cancel_all (the dead-man armed beside it) → flatten → verify → notify through
    Temporal. Exit 0 only when the venue shows every account flat. Reads
    BREAKGLASS_ACCOUNTS_FILE and the Temporal settings.
    """
    settings = load_settings()
    request = _validated_input(settings, account, reason, requested_by or getpass.getuser(), scope)

    joined: list[Joined] = []

    def say_joined(_: WorkflowHandle) -> None:
        if joined:
            # Plain words on stderr with --json/--detach (stdout is for the script), else stdout.
            out = err_console if as_json or detach else console
            out.print(joined[-1].said(), markup=False)

    go = launch(
        settings,
        _spec(request, settings, joined),
        title="kill switch",
        noun="kill",
        detach=detach,
        as_json=as_json,
        follow=lambda handle: _watch(handle, as_json),
        emit=lambda report: _emit(report, as_json, joined),
        on_started=say_joined,
    )
    raise typer.Exit(int(run_async(go)))


async def _status(client: Client, workflow_id: str, as_json: bool) -> ExitCode:
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
    if state == WorkflowExecutionStatus.RUNNING:
        # Before the query (which needs a worker): say at once when no worker is on it.
        await WorkerWatch(client, workflow_id, description.task_queue, "kill").check()
    status = await _query(handle)
    if as_json:
        body = {"workflow_id": workflow_id, "status": state.name}
        if status:
            body["progress"] = json.loads(status.model_dump_json())
        print(json.dumps(body, indent=2))
    else:
        console.print(f"{workflow_id}: {state.name.lower()}", markup=False)
        if status:
            console.print(_progress(status, title=f"round {status.round}"))
    if state == WorkflowExecutionStatus.RUNNING:
        return ExitCode.OK
    return ExitCode.WORKFLOW_FAILED


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
        try:
            return await _status(client, workflow_id, as_json)
        except RPCError as e:
            abort(
                f"lost contact with Temporal at {settings.temporal_address} "
                f"({e.status.name if e.status else 'error'}: {e.message}) reading {workflow_id}",
                ExitCode.UNREACHABLE,
            )

    raise typer.Exit(int(run_async(go())))
