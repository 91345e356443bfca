"""The kill switch: cancel_all → flatten → verify → notify for every account at once, with the
venue's dead-man switch (halt) armed beside the first cancel.

Deterministic orchestration only; every side effect is an activity. It never waits on Slack,
approvals or the strategy process: nothing here blocks on a human, and a failed notification
does not fail the kill. One failing step never ends an account's chain: what does not depend on
it goes ahead, verify always looks, and the report says what failed and what is unknown.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from workflows.shared import (
        AccountReport,
        AccountRequest,
        AccountState,
        BookFailure,
        CancelAllRequest,
        CancelAllResult,
        DeadManReport,
        DeadManState,
        FlattenOrder,
        FlattenRequest,
        FlattenResult,
        HaltRequest,
        HaltResult,
        KillJoin,
        KillJoinResult,
        KillOutcome,
        KillReport,
        KillScope,
        KillStatus,
        KillSwitchInput,
        NotifyRequest,
        Position,
        Step,
        StepState,
        StepStatus,
        VenueSnapshot,
    )

NON_RETRYABLE = ["AuthFailed", "ConfigError"]
# A cancel that cannot do anything at all gives up quickly: flatten (reduce-only, independent of
# the order books) and verify must not wait minutes behind it; the next round cancels again.
CANCEL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=4,
    non_retryable_error_types=NON_RETRYABLE,
)
# Flatten retries for tens of seconds, then verify looks and the next round tries again with
# fresh positions: one failed lookup or order costs that item (activity side), not the kill.
FLATTEN_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=8,
    non_retryable_error_types=NON_RETRYABLE,
)
# The dead-man switch is a safety net, never on the critical path: a few quick tries.
HALT_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE,
)
# The look before the first flatten (positions as they were when the kill began) is for the
# report only.
LOOK_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE,
)
# The verify look retries until the venue answers, within VERIFY_PATIENCE: a venue that rate
# limits us (one weight minute) must not turn a flat account into an "unverified" kill.
VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    non_retryable_error_types=NON_RETRYABLE,
)
VERIFY_PATIENCE = timedelta(seconds=90)
# A hard-killed worker is noticed after this long without a heartbeat, and the work moves on.
HEARTBEAT_TIMEOUT = timedelta(seconds=5)
LOOK_PATIENCE = timedelta(seconds=5)
"""The positions look before the first flatten is for the report: it never delays the flatten
longer than this."""
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=5))
KILL_V2_PATCH = "kill-v2-halt-beside-cancel"
"""Runs whose history lacks this marker were started by the code before issue 8 and finish in
:mod:`workflows.kill_switch_v1`."""
MAX_INPUT_ERRORS = 5
"""A crafted input may carry thousands of errors: the failure names the first few."""


def _key(position: Position) -> tuple[str, str | None]:
    return (position.symbol, position.position_side)


def unverified_positions(
    snapshot: VenueSnapshot, reported_dust: Sequence[Position]
) -> list[Position]:
    """Positions the verify step cannot accept: above the lot minimum and not reported as dust
    by the venue (spot remainders under the minimum notional are only known from its refusal)."""
    dust = {_key(p): abs(p.quantity) for p in reported_dust}
    return [p for p in snapshot.positions if abs(p.quantity) > dust.get(_key(p), -1)]


def _book_name(book: BookFailure) -> str:
    kind = "conditional" if book.conditional else "plain"
    return f"{kind} {book.symbol or 'account-wide'} {book.action}"


def unverified_reasons(
    scope: KillScope, snapshot: VenueSnapshot, reported_dust: Sequence[Position]
) -> list[str]:
    """Why the venue's answer does not yet count as killed (empty: verified)."""
    reasons = []
    if snapshot.open_orders:
        reasons.append(f"{len(snapshot.open_orders)} open orders")
    # A book the venue would not show us is not a book we know to be empty.
    if snapshot.unread_books:
        reasons.append("books not read: " + ", ".join(snapshot.unread_books))
    if scope is KillScope.FLATTEN and (left := unverified_positions(snapshot, reported_dust)):
        reasons.append(f"{len(left)} positions open")
    return reasons


def order_prefix(workflow_id: str, run_id: str, round_no: int) -> str:
    """Client-order-id prefix: the same for every retry of one round, new for each round/run."""
    digest = hashlib.sha256(f"{workflow_id}/{run_id}".encode()).hexdigest()[:10]
    return f"bg{digest}r{round_no}"


def readable(error: ValidationError) -> str:
    """``field: message`` per problem, without echoing the input (it may hold anything)."""
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in error.errors()
    ]
    more = len(problems) - MAX_INPUT_ERRORS
    return "; ".join(problems[:MAX_INPUT_ERRORS]) + (f" (and {more} more)" if more > 0 else "")


def parse_input(raw: object) -> KillSwitchInput:
    """The kill's input, validated inside the workflow: a crafted start (extra fields, wrong
    types, thousands of accounts) fails the workflow at once, readably, instead of failing its
    first workflow task for ever (what a decode error in the SDK does)."""
    if isinstance(raw, KillSwitchInput):
        return raw
    try:
        return KillSwitchInput.model_validate(raw)
    except ValidationError as e:
        raise ApplicationError(
            f"invalid kill switch input: {readable(e)}", type="InvalidInput", non_retryable=True
        ) from None


def _error_text(error: BaseException) -> str:
    # Activities fail as ActivityError(cause=…); local activities surface the cause itself.
    cause = error.cause if isinstance(error, ActivityError) else error
    return cause.message if isinstance(cause, ApplicationError) else str(cause)


def _retryable(error: BaseException) -> bool:
    cause = error.cause if isinstance(error, ActivityError) else error
    return not (isinstance(cause, ApplicationError) and cause.non_retryable)


def _merge_orders(known: dict[str, FlattenOrder], *batches: Sequence[FlattenOrder]) -> None:
    """The audit trail keeps every order once, by its client id, with the latest answer."""
    for batch in batches:
        for o in batch:
            known[o.client_order_id] = o


@dataclass
class _AccountRun:
    """One account's way through the kill (workflow-local bookkeeping, never serialised)."""

    account: str
    dead_man_on: bool
    steps: dict[Step, StepStatus] = field(default_factory=dict)
    state: AccountState = AccountState.UNKNOWN
    scope_done: KillScope | None = None
    """The scope of this account's last completed chain (None: never completed)."""
    rounds: int = 0
    verified_at: datetime | None = None
    orders_found: int | None = None
    orders_cancelled: int | None = None
    orders_still_open: int | None = None
    positions_before: list[Position] | None = None
    positions_after: list[Position] | None = None
    dust: list[Position] = field(default_factory=list)
    flatten_orders: dict[str, FlattenOrder] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failures: list[BookFailure] = field(default_factory=list)
    gave_up: str | None = None
    halt: Awaitable[None] | None = None
    supported: bool = True
    armed: list[str] = field(default_factory=list)
    arm_failed: dict[str, str] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    release_failed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps = {s: StepStatus(step=s) for s in Step if s is not Step.NOTIFY}

    def enter(self, step: Step) -> None:
        current = self.steps[step]
        self.steps[step] = current.model_copy(
            update={
                "state": StepState.RUNNING,
                "started_at": current.started_at or workflow.now(),
                "finished_at": None,
                "detail": "",
            }
        )

    def leave(self, step: Step, state: StepState, detail: str = "") -> None:
        now = workflow.now()
        current = self.steps[step]
        self.steps[step] = current.model_copy(
            update={
                "state": state,
                "detail": detail,
                "started_at": current.started_at or now,
                "finished_at": None if state is StepState.PENDING else now,
            }
        )

    def may_be_armed(self) -> list[str]:
        """Armed, or possibly armed: the venue's answer to the arming never came."""
        maybe = [s for s, why in self.arm_failed.items() if why.startswith("outcome unknown")]
        return [*self.armed, *(s for s in maybe if s not in self.armed)]

    def unreleased(self) -> list[str]:
        tried = [*self.armed, *(s for s in self.arm_failed if s != "*" and s not in self.armed)]
        return [s for s in tried if s not in self.released]

    def dead_man(self) -> DeadManReport:
        if not self.dead_man_on:
            state = DeadManState.OFF
        elif not self.supported:
            state = DeadManState.UNSUPPORTED
        elif self.armed:
            state = DeadManState.PARTIAL if self.arm_failed else DeadManState.ARMED
        else:
            state = DeadManState.NOT_ARMED
        return DeadManReport(
            supported=self.supported,
            armed=self.armed,
            failed=self.arm_failed,
            released=self.released,
            release_failed=self.release_failed,
            state=state,
        )

    def report(self) -> AccountReport:
        return AccountReport(
            account=self.account,
            state=self.state,
            orders_found=self.orders_found,
            orders_cancelled=self.orders_cancelled,
            orders_still_open=self.orders_still_open,
            positions_before=self.positions_before,
            positions_after=self.positions_after,
            dust=self.dust,
            flatten_orders=list(self.flatten_orders.values()),
            dead_man_symbols=len(self.armed),
            dead_man_released=bool(self.armed) and not self.release_failed,
            dead_man=self.dead_man(),
            steps=list(self.steps.values()),
            errors=self.errors,
            failures=self.failures,
            gave_up=self.gave_up,
            scope=self.scope_done,
            rounds=self.rounds,
        )


def aggregate(step: Step, runs: Sequence[_AccountRun]) -> StepStatus:
    """One step over accounts that run their chains concurrently: running while any account is
    in it, failed when any account failed it; its times span the first start to the last end."""
    by_state: dict[StepState, list[str]] = {s: [] for s in StepState}
    statuses = [r.steps[step] for r in runs]
    for run, status in zip(runs, statuses, strict=True):
        by_state[status.state].append(run.account)
    partial = [r.account for r, s in zip(runs, statuses, strict=True) if "partial" in s.detail]
    running, failed, done = (
        by_state[s] for s in (StepState.RUNNING, StepState.FAILED, StepState.DONE)
    )
    skipped = by_state[StepState.SKIPPED]
    if running:
        state = StepState.RUNNING
    elif failed:
        state = StepState.FAILED
    elif runs and len(skipped) == len(runs):
        state = StepState.SKIPPED
    elif done:
        state = StepState.DONE
    else:
        state = StepState.PENDING
    if state is StepState.SKIPPED:
        detail = statuses[0].detail
    else:
        parts = [f"{len(done)}/{len(runs)} done"]
        if running:
            parts.append(f"{len(running)} running")
        if failed:
            parts.append("failed: " + ", ".join(failed))
        if partial:
            parts.append("partial: " + ", ".join(partial))
        if skipped:
            parts.append("skipped: " + ", ".join(skipped))
        detail = ", ".join(parts)
    starts = [s.started_at for s in statuses if s.started_at is not None]
    ends = [s.finished_at for s in statuses if s.finished_at is not None]
    return StepStatus(
        step=step,
        state=state,
        started_at=min(starts) if starts else None,
        finished_at=max(ends) if ends and not running else None,
        detail=detail,
    )


# Unsandboxed: the sandbox re-imports this module for every run, measured at 40-60 ms of the first
# workflow task on a busy 2-core machine, and that task stands between the request and the first
# cancel. The code only calls workflow APIs (no clock, no I/O); replay tests guard determinism.
@workflow.defn(name="KillSwitch", sandboxed=False)
class KillSwitchWorkflow:
    @workflow.init
    def __init__(self, request: KillSwitchInput | Any = None) -> None:
        # Parsed here so that the status query and the join validator work from the first task.
        self._input: KillSwitchInput | None = None
        self._invalid: ApplicationError | None = None
        try:
            self._input = parse_input(request)
        except ApplicationError as e:
            self._invalid = e
        self._scope = self._input.scope if self._input else KillScope.FLATTEN
        self._runs: dict[str, _AccountRun] = {}
        if self._input is not None:
            self._runs = {
                a: _AccountRun(account=a, dead_man_on=self._input.dead_man)
                for a in self._input.accounts
            }
        self._notify_step = StepStatus(step=Step.NOTIFY)
        self._joins: list[KillJoin] = []
        self._round = 0
        self._requested_at: datetime | None = None
        self._picked_up_at: datetime | None = None
        self._report: KillReport | None = None
        self._legacy: Any = None
        """A run of the code before issue 8 (see ``KILL_V2_PATCH``)."""

    # ------------------------------------------------------------------ messages

    @workflow.query(name="status")
    def status(self) -> KillStatus:
        if self._legacy is not None:
            return self._legacy.status()
        return KillStatus(
            workflow_id=workflow.info().workflow_id,
            round=self._round,
            steps=self._steps(),
            report=self._report,
            accounts=[r.report() for r in self._runs.values()],
            requested_at=self._requested_at,
            picked_up_at=self._picked_up_at,
        )

    @workflow.update(name="join")
    def join(self, request: KillJoin | Any) -> KillJoinResult:
        """A second kill of the same accounts joins this one: its reason, requester and scope are
        recorded, and a flatten joining a cancel-only kill escalates it (every account then
        flattens and verifies, also those already verified cancel-only)."""
        joined = KillJoin.model_validate(request)
        self._joins.append(joined)
        assert self._input is not None  # the validator refused joins to an invalid kill
        running = f"joined the running kill ({self._input.reason!r}, by {self._input.requested_by})"
        if joined.scope is KillScope.FLATTEN and self._scope is KillScope.CANCEL_ONLY:
            self._scope = KillScope.FLATTEN
            for run in self._runs.values():
                if run.steps[Step.FLATTEN].state is StepState.SKIPPED:
                    run.leave(Step.FLATTEN, StepState.PENDING, "escalated by a join")
            return KillJoinResult(
                escalated=True,
                scope=self._scope,
                message=f"{running}; escalated from cancel-only to flatten: every account is "
                "flattened and verified",
            )
        what = "it already flattens" if self._scope is KillScope.FLATTEN else "it is cancel-only"
        return KillJoinResult(escalated=False, scope=self._scope, message=f"{running}; {what}")

    @join.validator
    def _validate_join(self, request: KillJoin | Any) -> None:
        if self._input is None:
            raise ApplicationError("this kill's input is invalid: it is failing", type="Refused")
        if self._report is not None:
            raise ApplicationError("this kill has finished: start a new one", type="Refused")
        if self._legacy is not None:
            raise ApplicationError(
                "this kill runs the previous version's code, which cannot take joins: start a "
                "new kill once it has ended",
                type="Refused",
            )
        try:
            KillJoin.model_validate(request)
        except ValidationError as e:
            raise ApplicationError(f"invalid join: {readable(e)}", type="Refused") from None

    # ------------------------------------------------------------------ the kill

    @workflow.run
    async def run(self, request: KillSwitchInput | Any = None) -> KillReport:
        if self._input is None:
            assert self._invalid is not None
            raise self._invalid
        kill = self._input
        if not workflow.patched(KILL_V2_PATCH):
            # Started by the code before issue 8 (no marker in its history): finish it that way.
            from workflows.kill_switch_v1 import LegacyKillSwitch

            self._legacy = LegacyKillSwitch()
            return await self._legacy.run(kill)
        info = workflow.info()
        self._requested_at = info.workflow_start_time
        self._picked_up_at = workflow.now()
        runs = self._runs
        for run in runs.values():
            if not kill.dead_man:
                run.leave(Step.HALT, StepState.SKIPPED, "dead-man switch off for this kill")
            if self._scope is KillScope.CANCEL_ONLY:
                run.leave(Step.FLATTEN, StepState.SKIPPED, "scope is cancel-only")
        # The first commands of the first workflow task are every account's cancel-all (eager
        # dispatch reserves slots in that order); the dead-man switch goes out beside them,
        # never in front, while the cancels' first listing may still be in flight.
        first_cancel = {a: self._start_cancel(runs[a], kill) for a in kill.accounts}
        if kill.dead_man:
            for a in kill.accounts:
                runs[a].halt = asyncio.ensure_future(self._halt(runs[a], self._start_halt(runs[a])))

        while True:
            # Every account runs its own chain: a slow or broken venue never holds back the
            # others. A join that widens the scope sends finished accounts round again.
            while pending := [r for r in runs.values() if r.scope_done is not self._scope]:
                await asyncio.gather(
                    *(
                        self._kill_account(kill, r, first_cancel.pop(r.account, None))
                        for r in pending
                    )
                )
            await asyncio.gather(*(r.halt for r in runs.values() if r.halt is not None))
            await self._release_dead_man(
                [r for r in runs.values() if r.state is AccountState.VERIFIED]
            )
            report = self._build_report(kill)
            await self._notify(report)
            if all(r.scope_done is self._scope for r in runs.values()):
                break
        report = self._build_report(kill)
        self._report = report
        await workflow.wait_condition(workflow.all_handlers_finished)
        return report

    def _build_report(self, kill: KillSwitchInput) -> KillReport:
        runs = list(self._runs.values())
        verified = all(r.state is AccountState.VERIFIED for r in runs)
        requested = self._requested_at or workflow.info().workflow_start_time
        picked = self._picked_up_at or requested
        time_to_flat = None
        if verified:
            last = max(r.verified_at for r in runs if r.verified_at is not None)
            time_to_flat = (last - requested).total_seconds()
        return KillReport(
            workflow_id=workflow.info().workflow_id,
            reason=kill.reason,
            requested_by=kill.requested_by,
            scope=self._scope,
            outcome=KillOutcome.VERIFIED if verified else KillOutcome.UNVERIFIED,
            started_at=requested,
            finished_at=workflow.now(),
            time_to_flat_s=time_to_flat,
            rounds=max(r.rounds for r in runs),
            accounts=[r.report() for r in runs],
            steps=self._steps(),
            requested_at=requested,
            picked_up_at=picked,
            queue_wait_s=max(0.0, (picked - requested).total_seconds()),
            joins=self._joins,
        )

    def _steps(self) -> list[StepStatus]:
        runs = list(self._runs.values())
        return [aggregate(s, runs) for s in Step if s is not Step.NOTIFY] + [self._notify_step]

    # ------------------------------------------------------------------ one account's chain

    def _start_cancel(self, run: _AccountRun, kill: KillSwitchInput) -> Any:
        run.enter(Step.CANCEL_ALL)
        return workflow.start_activity(
            "cancel_all",
            CancelAllRequest(account=run.account, verify_deadline_s=kill.verify_deadline_s),
            result_type=CancelAllResult,
            start_to_close_timeout=timedelta(seconds=kill.verify_deadline_s + 60),
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=CANCEL_RETRY,
        )

    async def _kill_account(
        self, kill: KillSwitchInput, run: _AccountRun, first_cancel: Any | None
    ) -> None:
        """Rounds of cancel -> flatten -> verify until the venue shows the account killed, the
        rounds run out, or the venue cannot be read; every step runs whatever the one before
        it did, and only the verify decides."""
        info = workflow.info()
        run.gave_up = None
        if run.state is AccountState.VERIFIED:
            # Verified under a narrower scope; a join widened it: not verified for this one.
            run.state, run.verified_at = AccountState.UNVERIFIED, None
        scope, reasons = self._scope, []
        for _ in range(kill.max_rounds):
            scope = self._scope
            run.rounds += 1
            self._round = max(self._round, run.rounds)
            handle = first_cancel or self._start_cancel(run, kill)
            first_cancel = None
            cancel = await self._outcome(run, Step.CANCEL_ALL, handle)
            if isinstance(cancel, CancelAllResult):
                self._record_cancel(run, cancel)

            dust: list[Position] = run.dust
            if scope is KillScope.FLATTEN:
                run.enter(Step.FLATTEN)
                if run.positions_before is None:
                    await self._look_before_flatten(run)
                flat = await self._outcome(
                    run,
                    Step.FLATTEN,
                    workflow.execute_activity(
                        "flatten",
                        FlattenRequest(
                            account=run.account,
                            client_id_prefix=order_prefix(
                                info.workflow_id, info.run_id, run.rounds
                            ),
                            # A retry after a SIGKILL looks earlier orders up on these legs even
                            # when the dead attempt's heartbeat never reached the server.
                            known_positions=run.positions_before or [],
                        ),
                        result_type=FlattenResult,
                        start_to_close_timeout=timedelta(minutes=2),
                        heartbeat_timeout=HEARTBEAT_TIMEOUT,
                        retry_policy=FLATTEN_RETRY,
                    ),
                )
                if isinstance(flat, FlattenResult):
                    self._record_flatten(run, flat)
                    dust = flat.dust

            run.enter(Step.VERIFY)
            snapshot = await self._outcome(
                run,
                Step.VERIFY,
                workflow.execute_local_activity(
                    "snapshot_venue_state",
                    AccountRequest(account=run.account),
                    result_type=VenueSnapshot,
                    start_to_close_timeout=timedelta(seconds=20),
                    schedule_to_close_timeout=VERIFY_PATIENCE,
                    retry_policy=VERIFY_RETRY,
                ),
            )
            if not isinstance(snapshot, VenueSnapshot):
                # Without a look at the venue nothing is verified, and another round would act
                # blind: stop, and say why.
                run.gave_up = f"verify could not read the venue: {snapshot}"
                run.scope_done = scope
                return
            unread = set(snapshot.unread_books)
            # What a book the venue would not show holds is unknown: never written as 0 or [].
            if not unread & {"orders", "conditional-orders"}:
                run.orders_still_open = len(snapshot.open_orders)
            elif run.orders_still_open == 0:
                run.orders_still_open = None
            if "positions" not in unread:
                run.positions_after = snapshot.positions + snapshot.dust
                if scope is KillScope.CANCEL_ONLY and run.positions_before is None:
                    # Cancelling leaves positions alone: the first look is how they were.
                    run.positions_before = run.positions_after
            reasons = unverified_reasons(scope, snapshot, dust)
            if not reasons:
                run.leave(Step.VERIFY, StepState.DONE, "verified")
                run.state = AccountState.VERIFIED
                run.verified_at = workflow.now()
                run.scope_done = scope
                return
            run.state = AccountState.UNVERIFIED
            run.leave(Step.VERIFY, StepState.FAILED, ", ".join(reasons))
        run.gave_up = f"gave up after {kill.max_rounds} rounds: " + ", ".join(reasons)
        # Escalated during the last round: the outer loop runs this account again.
        run.scope_done = scope

    async def _outcome(self, run: _AccountRun, step: Step, call: Awaitable[Any]) -> Any:
        """The activity's result, or the failure's text (recorded, step FAILED): a failed step is
        never raised into this account's later steps nor into the other accounts."""
        try:
            return await call
        except (ActivityError, ApplicationError) as e:
            message = _error_text(e)
            run.errors.append(f"{step.value}: {message}")
            run.leave(step, StepState.FAILED, message)
            return message

    def _record_cancel(self, run: _AccountRun, cancel: CancelAllResult) -> None:
        run.orders_found = (run.orders_found or 0) + cancel.orders_found
        run.orders_cancelled = (run.orders_cancelled or 0) + cancel.orders_cancelled
        run.orders_still_open = len(cancel.still_open)
        books = list(cancel.failed_books)
        run.failures.extend(b for b in books if b not in run.failures)
        if books or not cancel.complete:
            detail = "partial: " + (", ".join(_book_name(b) for b in books) or "incomplete")
        else:
            detail = f"{cancel.orders_cancelled}/{cancel.orders_found} cancelled"
        run.leave(Step.CANCEL_ALL, StepState.DONE, detail)

    def _record_flatten(self, run: _AccountRun, flat: FlattenResult) -> None:
        if run.positions_before is None and not flat.recovered_orders:
            # The start look did not answer in time: the first flatten's own first read is
            # the next best, unless an earlier attempt had already sent orders.
            run.positions_before = flat.positions_before
        _merge_orders(run.flatten_orders, flat.recovered_orders, flat.orders)
        run.positions_after = flat.positions_after
        run.dust = flat.dust
        if flat.failures:
            run.errors.extend(f"flatten: {f}" for f in flat.failures)
            run.leave(Step.FLATTEN, StepState.DONE, "partial: " + "; ".join(flat.failures))
        else:
            run.leave(Step.FLATTEN, StepState.DONE, f"{len(flat.orders)} orders")

    async def _look_before_flatten(self, run: _AccountRun) -> None:
        """Positions as they were when the kill began, read before the first flatten sends
        anything: a retried flatten's own first read comes after its crashed attempt's orders.
        After the cancels (not beside them) the look is one cheap read that never competes with
        the first cancel for the venue or the worker; it cannot hold the flatten back long."""
        try:
            snapshot = await workflow.execute_local_activity(
                "snapshot_venue_state",
                AccountRequest(account=run.account),
                result_type=VenueSnapshot,
                start_to_close_timeout=timedelta(seconds=5),
                schedule_to_close_timeout=LOOK_PATIENCE,
                retry_policy=LOOK_RETRY,
            )
        except (ActivityError, ApplicationError):
            return  # the flatten's own first read stands in (when it is a first attempt)
        if "positions" not in snapshot.unread_books:
            run.positions_before = snapshot.positions + snapshot.dust

    # ------------------------------------------------------------------ dead-man switch

    def _start_halt(self, run: _AccountRun) -> Any:
        run.enter(Step.HALT)
        return workflow.start_activity(
            "halt_account",
            HaltRequest(account=run.account),
            result_type=HaltResult,
            start_to_close_timeout=timedelta(seconds=20),
            retry_policy=HALT_RETRY,
        )

    async def _halt(self, run: _AccountRun, handle: Awaitable[HaltResult]) -> None:
        """Arm the venue's dead-man switch beside the first cancel: if this worker dies mid-kill,
        the venue still cancels when the timer runs out. It never fails the kill."""
        try:
            result = await handle
        except (ActivityError, ApplicationError) as e:
            message = _error_text(e)
            run.errors.append(f"halt: {message}")
            run.arm_failed = {"*": message}
            run.leave(Step.HALT, StepState.FAILED, f"not armed: {message}")
            return
        run.supported = result.supported
        run.armed = [*run.armed, *(s for s in result.symbols_armed if s not in run.armed)]
        run.arm_failed = dict(result.symbols_failed)
        if not result.supported:
            run.leave(Step.HALT, StepState.DONE, "venue has no dead-man switch")
        elif result.symbols_failed:
            failed = ", ".join(f"{s}: {e}" for s, e in sorted(result.symbols_failed.items()))
            run.leave(
                Step.HALT,
                StepState.DONE,
                f"partial: {len(run.armed)} armed, not armed {failed}",
            )
        else:
            run.leave(Step.HALT, StepState.DONE, f"{len(run.armed)} symbols armed")

    async def _release_dead_man(self, runs: list[_AccountRun]) -> None:
        """Disarm the countdowns the halt armed, for verified accounts: a timer left running
        would cancel the orders of whatever trades next. Symbols whose arming failed are
        disarmed too (a timeout may have armed them; disarming nothing is harmless). What could
        not be disarmed is reported (it runs out by itself)."""
        todo = [r for r in runs if r.unreleased()]
        asked = {r.account: r.unreleased() for r in todo}
        results = await asyncio.gather(
            *(
                workflow.execute_local_activity(
                    "halt_account",
                    HaltRequest(account=r.account, dead_man_seconds=0, symbols=asked[r.account]),
                    result_type=HaltResult,
                    start_to_close_timeout=timedelta(seconds=20),
                    retry_policy=RetryPolicy(maximum_attempts=3),
                )
                for r in todo
            ),
            return_exceptions=True,
        )
        for run, result in zip(todo, results, strict=True):
            if isinstance(result, HaltResult):
                released = [s for s in asked[run.account] if s in result.symbols_released]
            else:
                released = []
                run.errors.append(f"halt: release failed: {_error_text(result)}")
            run.released = [*run.released, *released]
            run.release_failed = [s for s in run.may_be_armed() if s not in run.released]

    async def _notify(self, report: KillReport) -> None:
        self._notify_step = StepStatus(
            step=Step.NOTIFY, state=StepState.RUNNING, started_at=workflow.now()
        )
        names = [a.account for a in report.accounts]
        severity = "info" if report.outcome is KillOutcome.VERIFIED else "critical"
        state, detail = StepState.DONE, ""
        try:
            await workflow.execute_activity(
                "notify",
                NotifyRequest(
                    title=f"Kill switch {report.outcome.value}: {', '.join(names)}",
                    text=summary(report),
                    severity=severity,
                ),
                result_type=int,
                start_to_close_timeout=timedelta(seconds=30),
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=NOTIFY_RETRY,
            )
        except ActivityError as e:
            # People not being told is bad; the kill being reported as failed for it is worse.
            state, detail = StepState.FAILED, str(e.cause or e)
        self._notify_step = self._notify_step.model_copy(
            update={"state": state, "detail": detail, "finished_at": workflow.now()}
        )


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def summary(report: KillReport) -> str:
    """Plain-text summary for notifications (channels add their own formatting); what is not
    known is shown as ``?``, never as 0."""
    lines = [
        f"reason: {report.reason} (requested by {report.requested_by})",
        f"outcome: {report.outcome.value}"
        + (f", time to flat {report.time_to_flat_s:.2f}s" if report.time_to_flat_s else ""),
    ]
    for a in report.accounts:
        before = "?" if a.positions_before is None else str(len(a.positions_before))
        after = (
            "?"
            if a.positions_after is None
            else str(len([p for p in a.positions_after if p not in a.dust]))
        )
        lines.append(
            f"{a.account} ({a.state.value}): orders cancelled "
            f"{_count(a.orders_cancelled)}/{_count(a.orders_found)}, "
            f"still open {_count(a.orders_still_open)}, positions {before} -> {after} "
            f"(+{len(a.dust)} dust)"
            + (f", dead-man {a.dead_man.state.value}" if a.dead_man else "")
            + (f", gave up: {a.gave_up}" if a.gave_up else "")
            + (f", errors: {'; '.join(a.errors)}" if a.errors else "")
        )
    for j in report.joins:
        lines.append(f"joined by {j.requested_by} ({j.scope.value}): {j.reason}")
    return "\n".join(lines)
