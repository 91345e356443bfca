"""The shape every "start a workflow and follow it" command shares (kill, rollback, deploy):
validate the request, start it under its business-key id (joining out loud, or refusing, one that
runs), watch it by polling its status query while awaiting the result and saying when no worker
does its work, then print the report and turn it into an exit code; a server lost meanwhile is
one line and UNREACHABLE. Also the one way an operator's answer (an update) is sent."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
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
from worker.temporal_client import STALL_AFTER_S, Waiting, waiting_work
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
    """Refuse with this message (BAD_INPUT, nothing started) when the id runs and there is no
    ``join``."""
    search_attributes: TypedSearchAttributes | None = None
    join: Callable[[Client, WorkflowHandle], Awaitable[bool]] | None = None
    """Join the running workflow of that id (and say so); False: it had finished meanwhile, so
    start a new one."""


JOIN_ATTEMPTS = 3
"""A running workflow that finishes while we join it is started anew; this many times at most."""


_NO_CONTACT = (
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.CANCELLED,
    RPCStatusCode.UNKNOWN,
)


def _rpc_failed(settings: Settings, what: str, e: RPCError) -> NoReturn:
    """No contact is UNREACHABLE; a refusal (namespace, search attribute, permission) is
    configuration: BAD_INPUT. Either way nothing was started."""
    status = e.status.name if e.status else "an error"
    code = ExitCode.UNREACHABLE if e.status in _NO_CONTACT else ExitCode.BAD_INPUT
    abort(f"{what}: Temporal at {settings.temporal_address} answered {status}: {e.message}", code)


async def start(client: Client, settings: Settings, spec: Start) -> WorkflowHandle:
    """Start ``spec`` under its id; when that id runs: refuse, or join it (``spec.join``).

    Never USE_EXISTING: a silent join drops the second request's reason, requester and scope.
    """
    for _ in range(JOIN_ATTEMPTS):
        try:
            return await client.start_workflow(
                spec.workflow,
                spec.arg,
                id=spec.workflow_id,
                task_queue=settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                search_attributes=spec.search_attributes,
                execution_timeout=spec.execution_timeout,
                result_type=spec.result_type,
            )
        except WorkflowAlreadyStartedError:
            if spec.join is None:
                abort(
                    spec.already_running or f"{spec.workflow_id} is already running",
                    ExitCode.BAD_INPUT,
                )
            handle = client.get_workflow_handle(spec.workflow_id, result_type=spec.result_type)
            try:
                if await spec.join(client, handle):
                    return handle
            except RPCError as e:
                _rpc_failed(settings, f"cannot join the running {spec.workflow_id}", e)
        except RPCError as e:
            _rpc_failed(settings, f"cannot start {spec.workflow_id}", e)
    abort(
        f"{spec.workflow_id} finished {JOIN_ATTEMPTS} times while this request joined it: "
        f"see breakglass status {spec.workflow_id}",
        ExitCode.WORKFLOW_FAILED,
    )


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


REMIND_S = 30.0
"""While no worker does the work, the warning is repeated this often (with how long it waited)."""
WATCH_S = 1.0
"""How often the follower asks the server whether a worker is on it (a describe, no worker
needed)."""


class WorkerWatch:
    """Says on stderr, within seconds, when no worker does a started workflow's work (none
    polls, or the one that did just died), again while that lasts, and when a worker picks it
    up. Asks the server, never the worker: the status query needs the very worker that is gone.
    """

    def __init__(self, client: Client, workflow_id: str, task_queue: str, noun: str) -> None:
        self.client = client
        self.workflow_id = workflow_id
        self.task_queue = task_queue
        self.noun = noun
        self.warned_at: float | None = None
        self.waited_s = 0.0

    def _warning(self, waiting: Waiting, again: bool) -> str:
        what = f"the {self.noun} {self.workflow_id}"
        if waiting.activity is not None:
            what = f"{waiting.activity} of {what}"
        still = "still " if again else ""
        if waiting.no_pollers:
            return (
                f"warning: {still}no worker is polling task queue {self.task_queue!r}: {what} "
                "is queued and runs as soon as a worker starts (breakglass dev up, or deploy one)"
            )
        if waiting.started:
            return (
                f"warning: {still}no worker has answered for {waiting.since_s:.0f}s: the worker "
                f"that took {what} may have died; it goes on when another worker polls task "
                f"queue {self.task_queue!r}"
            )
        why = (
            "may have just died"
            if waiting.activity is None
            else "may have died, or be too busy to take it"
        )
        return (
            f"warning: {still}no worker has picked up {what} for {waiting.since_s:.0f}s (the "
            f"worker on task queue {self.task_queue!r} {why}): it is queued and goes on as soon "
            "as a worker polls (breakglass dev up, or start one)"
        )

    async def check(self) -> Waiting | None:
        """One look; print what changed. Server trouble is left to the result's await."""
        try:
            waiting = await waiting_work(self.client, self.workflow_id, self.task_queue)
        except (RPCError, TimeoutError):
            return None
        now = time.monotonic()
        if waiting is not None and waiting.stalled():
            if self.warned_at is None or now - self.warned_at >= REMIND_S:
                err_console.print(self._warning(waiting, self.warned_at is not None), markup=False)
                self.warned_at = now
            self.waited_s = max(self.waited_s, waiting.since_s)
        elif self.warned_at is not None:
            self.clear()
        return waiting

    def clear(self) -> None:
        """Take a standing warning back: a worker is doing the work (or has done it)."""
        if self.warned_at is None:
            return
        err_console.print(
            f"a worker picked up the {self.noun} {self.workflow_id} after "
            f"{self.waited_s:.0f}s of waiting",
            markup=False,
        )
        self.warned_at = None
        self.waited_s = 0.0

    async def first_look(self) -> None:
        """For a command that does not follow (``--detach``): wait until a worker took the
        first task or the warning is given, at most a little over the stall time."""
        deadline = time.monotonic() + STALL_AFTER_S + 1.0
        while time.monotonic() < deadline:
            waiting = await self.check()
            if self.warned_at is not None or waiting is None or waiting.started:
                return
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(WATCH_S)


def lost_contact(settings: Settings, workflow_id: str, noun: str, error: RPCError) -> NoReturn:
    """The server went away while following: the workflow is durable and goes on without us."""
    reason = error.status.name if error.status else "error"
    abort(
        f"lost contact with Temporal at {settings.temporal_address} ({reason}: {error.message}) "
        f"while following {workflow_id}: the {noun} goes on on the server; follow it with "
        f"`breakglass status {workflow_id}` once Temporal answers "
        f"(UI {settings.ui_url_for(workflow_id)})",
        ExitCode.UNREACHABLE,
    )


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
    on_started: Callable[[WorkflowHandle], None] | None = None,
) -> ExitCode:
    """Connect, start ``spec``, then either print its id (``--detach``) or follow it to its
    report; a failed workflow is one line and WORKFLOW_FAILED, a server lost meanwhile one line
    and UNREACHABLE. Meanwhile a ``WorkerWatch`` says when no worker does the work.
    ``on_started`` runs once the workflow is started (or joined), after the header."""
    client = await connect_or_abort(settings)
    handle = await start(client, settings, spec)
    watch_workers = WorkerWatch(client, handle.id, settings.task_queue, noun)
    if detach:
        if on_started is not None:
            on_started(handle)
        if warn_without_worker:
            await watch_workers.first_look()
        print(handle.id)
        return ExitCode.OK
    if not as_json:
        console.print(f"{title} {handle.id} · UI {settings.ui_url_for(handle.id)}", markup=False)
    if on_started is not None:
        on_started(handle)
    watching = asyncio.ensure_future(watch_workers.run() if warn_without_worker else _idle())
    try:
        report = await follow(handle)
    except WorkflowFailureError as e:
        abort(f"{noun} {handle.id} failed: {e.cause or e}", ExitCode.WORKFLOW_FAILED)
    except RPCError as e:
        lost_contact(settings, handle.id, noun, e)
    except asyncio.CancelledError:
        # Ctrl-C (asyncio.run cancels us, then run_async exits 130): only the following stops.
        err_console.print(
            f"stopped following {handle.id}: the {noun} goes on; follow it with "
            f"`breakglass status {handle.id}`",
            markup=False,
        )
        raise
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    # A worker finished it between two looks: the warning must not be left standing.
    watch_workers.clear()
    return emit(report)


async def _idle() -> None:
    await asyncio.Event().wait()


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
