"""The shape every "start a workflow and follow it" command shares (kill, rollback, deploy):
validate the request, start it under its business-key id (joining or refusing one that runs),
watch it by polling its status query while awaiting the result, then print the report and turn
it into an exit code. Also the one way an operator's answer (an update) is sent."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.accounts import ConfigError
from activities.rollback_plan import find_runbook
from worker.cli_common import abort, connect_or_abort, console, err_console, run_async
from worker.settings import Settings
from worker.temporal_client import live_pollers
from workflows.shared import ExitCode

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")

QUERY_TIMEOUT = timedelta(seconds=5)
UPDATE_TIMEOUT = timedelta(seconds=15)


def validated(what: str, build: Callable[[], M]) -> M:
    """The typed request ``build`` makes, or one line naming the first bad field (BAD_INPUT)."""
    try:
        return build()
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "input"
        abort(f"invalid {what} request: {field}: {first['msg']}", ExitCode.BAD_INPUT)


def runbook_and_consent(
    settings: Settings, strategy: str, env: str, *, yes: bool, verb: str, question: str
) -> None:
    """Refuse (BAD_INPUT) unless strategy/env has exactly one runbook and the operator agreed:
    ``--yes``, or a prompt on a terminal; without a terminal nothing starts unasked."""
    try:
        find_runbook(settings.runbooks_dir, strategy, env)
    except ConfigError as e:
        abort(str(e), ExitCode.BAD_INPUT)
    if not yes:
        if not sys.stdin.isatty():
            abort(f"refusing to {verb} without confirmation: pass --yes", ExitCode.BAD_INPUT)
        typer.confirm(question, abort=True)


@dataclass(frozen=True)
class Start:
    """What to start, under which id, and what happens when that id already runs."""

    workflow: Any
    """The workflow's ``run`` method."""
    arg: BaseModel
    workflow_id: str
    result_type: type
    execution_timeout: timedelta | None
    already_running: str | None = None
    """Refuse with this message (BAD_INPUT, nothing started) when the id runs; None: join it."""
    search_attributes: TypedSearchAttributes | None = None


async def start(client: Client, settings: Settings, spec: Start) -> WorkflowHandle:
    refuse = spec.already_running is not None
    try:
        return await client.start_workflow(
            spec.workflow,
            spec.arg,
            id=spec.workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=(
                WorkflowIDConflictPolicy.FAIL if refuse else WorkflowIDConflictPolicy.USE_EXISTING
            ),
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=spec.search_attributes,
            execution_timeout=spec.execution_timeout,
            result_type=spec.result_type,
        )
    except WorkflowAlreadyStartedError:
        abort(spec.already_running or f"{spec.workflow_id} is already running", ExitCode.BAD_INPUT)


async def query_or_none(handle: WorkflowHandle, query: Callable[..., Any]) -> Any | None:
    """The status query's answer, or None: a query needs a worker, and no answer is no error."""
    try:
        return await handle.query(query, rpc_timeout=QUERY_TIMEOUT)
    except Exception:
        return None


async def watch(
    handle: WorkflowHandle,
    query: Callable[..., Any],
    on_status: Callable[[Any], None],
    poll_s: float,
) -> Any:
    """Await the result, handing every status answer to ``on_status`` meanwhile."""
    result = asyncio.ensure_future(handle.result())
    while not result.done():
        status = await query_or_none(handle, query)
        if status is not None:
            on_status(status)
        await asyncio.wait([result], timeout=poll_s)
    return await result


async def launch(
    settings: Settings,
    spec: Start,
    *,
    title: str,
    noun: str,
    detach: bool,
    as_json: bool,
    follow: Callable[[WorkflowHandle], Awaitable[R]],
    emit: Callable[[R], ExitCode],
    warn_without_worker: bool = True,
) -> ExitCode:
    """Connect, start ``spec``, then either print its id (``--detach``) or follow it to its
    report; a failed workflow is one line and WORKFLOW_FAILED."""
    client = await connect_or_abort(settings)
    handle = await start(client, settings, spec)
    if warn_without_worker and not await live_pollers(client, settings.task_queue):
        # Started and durable, but nothing will happen until a worker runs: say so loudly.
        err_console.print(
            f"warning: no worker is polling task queue {settings.task_queue!r}: the {noun} is "
            "queued and runs as soon as a worker starts (breakglass dev up, or deploy one)",
            markup=False,
        )
    if detach:
        print(handle.id)
        return ExitCode.OK
    if not as_json:
        console.print(f"{title} {handle.id} · UI {settings.ui_url_for(handle.id)}")
    try:
        report = await follow(handle)
    except WorkflowFailureError as e:
        abort(f"{noun} {handle.id} failed: {e.cause or e}", ExitCode.WORKFLOW_FAILED)
    return emit(report)


def answer(
    settings: Settings,
    workflow_id: str,
    update: Any,
    arg: BaseModel,
    said: Callable[[Any], str],
) -> NoReturn:
    """Send an operator's answer (an update) and print ``said(result)``. The workflow
    validator's refusal is one line and BAD_INPUT, an unknown (or finished) workflow NOT_FOUND.
    A fresh update id per CLI request."""

    async def go() -> ExitCode:
        client = await connect_or_abort(settings)
        handle = client.get_workflow_handle(workflow_id)
        try:
            result = await handle.execute_update(
                update, arg, id=f"cli-{uuid.uuid4()}", rpc_timeout=UPDATE_TIMEOUT
            )
        except WorkflowUpdateFailedError as e:
            abort(f"refused: {getattr(e.cause, 'message', e.cause)}", ExitCode.BAD_INPUT)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                abort(f"no running workflow {workflow_id!r}", ExitCode.NOT_FOUND)
            abort(f"cannot reach {workflow_id}: {e.message}", ExitCode.UNREACHABLE)
        console.print(said(result), markup=False)
        return ExitCode.OK

    raise typer.Exit(int(run_async(go())))
