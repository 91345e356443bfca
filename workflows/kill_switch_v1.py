"""The kill switch as the code before issue 8 ran it (halt first, a failed step ends the
account's chain), kept only so that a kill that code started finishes the same way on a new
worker (``workflow.patched`` in :mod:`workflows.kill_switch`). Delete it once no such run can be
open: kills last minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.shared import (
        AccountReport,
        AccountRequest,
        CancelAllRequest,
        CancelAllResult,
        FlattenRequest,
        FlattenResult,
        HaltRequest,
        HaltResult,
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

from workflows.kill_switch import order_prefix, summary, unverified_reasons

# Venue work retries quickly and for minutes, not hours: a kill switch that gives up early leaves
# risk on, one that retries for ever hides a broken account. Auth/config errors stop at once.
VENUE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=20,
    non_retryable_error_types=["AuthFailed", "ConfigError"],
)
# The verify look retries until the venue answers, within VERIFY_PATIENCE: a venue that rate
# limits us (one weight minute) must not turn a flat account into an "unverified" kill.
VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    non_retryable_error_types=["AuthFailed", "ConfigError"],
)
VERIFY_PATIENCE = timedelta(seconds=90)
# A hard-killed worker is noticed after this long without a heartbeat, and the work moves on.
HEARTBEAT_TIMEOUT = timedelta(seconds=5)
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=5))


@dataclass
class _AccountRun:
    """One account's way through the kill (workflow-local bookkeeping, never serialised)."""

    report: AccountReport
    rounds: int = 0
    verified_at: datetime | None = None
    armed: list[str] = field(default_factory=list)


class _StepBoard:
    """Step status aggregated over accounts that run their chains concurrently: a step is
    running while any account is in it, and its times span the first start to the last end."""

    def __init__(self, accounts: int) -> None:
        self.accounts = accounts
        self.steps = {step: StepStatus(step=step) for step in Step}
        self._running: dict[Step, int] = dict.fromkeys(Step, 0)
        self._done: dict[Step, set[str]] = {step: set() for step in Step}
        self._failed: dict[Step, set[str]] = {step: set() for step in Step}

    def enter(self, step: Step, account: str) -> None:
        self._running[step] += 1
        self._failed[step].discard(account)
        current = self.steps[step]
        self.steps[step] = current.model_copy(
            update={
                "state": StepState.RUNNING,
                "started_at": current.started_at or workflow.now(),
                "finished_at": None,
            }
        )
        self._refresh(step)

    def leave(self, step: Step, account: str, ok: bool, fatal: bool = True) -> None:
        self._running[step] -= 1
        (self._done if ok or not fatal else self._failed)[step].add(account)
        if self._running[step] == 0:
            self.steps[step] = self.steps[step].model_copy(update={"finished_at": workflow.now()})
        self._refresh(step)

    def set(self, step: Step, state: StepState, detail: str) -> None:
        now = workflow.now()
        current = self.steps[step]
        self.steps[step] = current.model_copy(
            update={
                "state": state,
                "detail": detail,
                "started_at": current.started_at or now,
                "finished_at": now if state is not StepState.RUNNING else None,
            }
        )

    def _refresh(self, step: Step) -> None:
        running, done, failed = self._running[step], self._done[step], self._failed[step]
        if running:
            state = StepState.RUNNING
        elif failed:
            state = StepState.FAILED
        else:
            state = StepState.DONE
        parts = [f"{len(done)}/{self.accounts} done"]
        if running:
            parts.append(f"{running} running")
        if failed:
            parts.append("failed: " + ", ".join(sorted(failed)))
        self.steps[step] = self.steps[step].model_copy(
            update={"state": state, "detail": ", ".join(parts)}
        )


class LegacyKillSwitch:
    """The previous KillSwitchWorkflow's run, driven by the current workflow class."""

    def __init__(self) -> None:
        self._board = _StepBoard(0)
        self._round = 0
        self._report: KillReport | None = None

    def status(self) -> KillStatus:
        return KillStatus(
            workflow_id=workflow.info().workflow_id,
            round=self._round,
            steps=list(self._board.steps.values()),
            report=self._report,
        )

    async def run(self, request: KillSwitchInput) -> KillReport:
        info = workflow.info()
        started = info.start_time
        self._board = _StepBoard(len(request.accounts))
        if request.scope is KillScope.CANCEL_ONLY:
            self._board.set(Step.FLATTEN, StepState.SKIPPED, "scope is cancel-only")
        # Every account runs its own halt -> cancel -> flatten -> verify chain: a slow or broken
        # venue never holds back the others' flatten.
        runs = {a: _AccountRun(report=AccountReport(account=a)) for a in request.accounts}
        await asyncio.gather(*(self._kill_account(request, runs[a]) for a in request.accounts))

        verified = all(r.verified_at is not None for r in runs.values())
        time_to_flat = None
        if verified:
            last = max(r.verified_at for r in runs.values() if r.verified_at is not None)
            time_to_flat = (last - started).total_seconds()
            await self._release_dead_man(runs)
        report = KillReport(
            workflow_id=info.workflow_id,
            reason=request.reason,
            requested_by=request.requested_by,
            scope=request.scope,
            outcome=KillOutcome.VERIFIED if verified else KillOutcome.UNVERIFIED,
            started_at=started,
            finished_at=workflow.now(),
            time_to_flat_s=time_to_flat,
            rounds=max(r.rounds for r in runs.values()),
            accounts=[runs[a].report for a in request.accounts],
            steps=list(self._board.steps.values()),
        )
        await self._notify(report)
        report = report.model_copy(
            update={"finished_at": workflow.now(), "steps": list(self._board.steps.values())}
        )
        self._report = report
        return report

    # ------------------------------------------------------------------ one account's chain

    async def _kill_account(self, request: KillSwitchInput, run: _AccountRun) -> None:
        account = run.report.account
        info = workflow.info()
        halt = await self._step(
            Step.HALT,
            run,
            workflow.execute_local_activity(
                "halt_account",
                HaltRequest(account=account),
                result_type=HaltResult,
                start_to_close_timeout=timedelta(seconds=20),
                retry_policy=RetryPolicy(maximum_attempts=3),
            ),
            # The dead-man switch is a safety net: without it the kill still goes on.
            fatal=False,
        )
        if halt is not None:
            run.armed = halt.symbols_armed
            self._update(run, dead_man_symbols=len(halt.symbols_armed))

        dust: list[Position] = []
        for round_no in range(1, request.max_rounds + 1):
            run.rounds = round_no
            self._round = max(self._round, round_no)
            cancel = await self._step(
                Step.CANCEL_ALL,
                run,
                workflow.execute_activity(
                    "cancel_all",
                    CancelAllRequest(account=account, verify_deadline_s=request.verify_deadline_s),
                    result_type=CancelAllResult,
                    start_to_close_timeout=timedelta(seconds=request.verify_deadline_s + 60),
                    heartbeat_timeout=HEARTBEAT_TIMEOUT,
                    retry_policy=VENUE_RETRY,
                ),
            )
            if cancel is None:
                return
            self._update(
                run,
                orders_found=(run.report.orders_found or 0) + cancel.orders_found,
                orders_cancelled=(run.report.orders_cancelled or 0) + cancel.orders_cancelled,
                orders_still_open=len(cancel.still_open),
            )
            if request.scope is KillScope.FLATTEN:
                flat = await self._step(
                    Step.FLATTEN,
                    run,
                    workflow.execute_activity(
                        "flatten",
                        FlattenRequest(
                            account=account,
                            client_id_prefix=order_prefix(info.workflow_id, info.run_id, round_no),
                        ),
                        result_type=FlattenResult,
                        start_to_close_timeout=timedelta(minutes=2),
                        heartbeat_timeout=HEARTBEAT_TIMEOUT,
                        retry_policy=VENUE_RETRY,
                    ),
                )
                if flat is None:
                    return
                dust = flat.dust
                self._update(
                    run,
                    positions_before=run.report.positions_before or flat.positions_before,
                    positions_after=flat.positions_after,
                    dust=flat.dust,
                    flatten_orders=run.report.flatten_orders + flat.orders,
                )

            def flat_enough(snap: VenueSnapshot, dust: list[Position] = dust) -> bool:
                return not unverified_reasons(request.scope, snap, dust)

            snapshot = await self._step(
                Step.VERIFY,
                run,
                workflow.execute_local_activity(
                    "snapshot_venue_state",
                    AccountRequest(account=account),
                    result_type=VenueSnapshot,
                    start_to_close_timeout=timedelta(seconds=20),
                    schedule_to_close_timeout=VERIFY_PATIENCE,
                    retry_policy=VERIFY_RETRY,
                ),
                ok=flat_enough,
            )
            if snapshot is None:
                return
            self._update(
                run,
                orders_still_open=len(snapshot.open_orders),
                positions_after=snapshot.positions + snapshot.dust,
            )
            if not unverified_reasons(request.scope, snapshot, dust):
                run.verified_at = workflow.now()
                return

    async def _step(
        self,
        step: Step,
        run: _AccountRun,
        call: Awaitable[Any],
        fatal: bool = True,
        ok: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        """Run one step for one account; a failure after retries is recorded in the account's
        report (and ends its chain when ``fatal``), never raised into the other accounts."""
        account = run.report.account
        self._board.enter(step, account)
        try:
            result = await call
        except (ActivityError, ApplicationError) as e:
            # Activities fail as ActivityError(cause=…); local activities surface the cause itself.
            cause = e.cause if isinstance(e, ActivityError) else e
            message = cause.message if isinstance(cause, ApplicationError) else str(cause)
            self._update(run, errors=[*run.report.errors, f"{step.value}: {message}"])
            self._board.leave(step, account, ok=False, fatal=fatal)
            return None
        self._board.leave(step, account, ok=ok(result))
        return result

    @staticmethod
    def _update(run: _AccountRun, **fields: Any) -> None:
        run.report = run.report.model_copy(update=fields)

    async def _release_dead_man(self, runs: dict[str, _AccountRun]) -> None:
        """Disarm the countdowns armed by the halt: the account is verified flat, and a timer left
        running would cancel the orders of whatever trades next. Best effort: if this fails the
        timers simply run out."""
        armed = {a: r.armed for a, r in runs.items() if r.armed}
        results = await asyncio.gather(
            *(
                workflow.execute_local_activity(
                    "halt_account",
                    HaltRequest(account=a, dead_man_seconds=0, symbols=symbols),
                    result_type=HaltResult,
                    start_to_close_timeout=timedelta(seconds=20),
                    retry_policy=RetryPolicy(maximum_attempts=3),
                )
                for a, symbols in armed.items()
            ),
            return_exceptions=True,
        )
        for account, result in zip(armed, results, strict=True):
            if isinstance(result, HaltResult):
                self._update(runs[account], dead_man_released=True)

    async def _notify(self, report: KillReport) -> None:
        self._board.set(Step.NOTIFY, StepState.RUNNING, "")
        names = [a.account for a in report.accounts]
        severity = "info" if report.outcome is KillOutcome.VERIFIED else "critical"
        try:
            await workflow.execute_activity(
                "notify",
                NotifyRequest(
                    title=f"Kill switch {report.outcome.value}: {', '.join(names)}",
                    text=summary(report),  # the current one: unknowns shown as ?
                    severity=severity,
                ),
                result_type=int,
                start_to_close_timeout=timedelta(seconds=30),
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=NOTIFY_RETRY,
            )
            self._board.set(Step.NOTIFY, StepState.DONE, "")
        except ActivityError as e:
            # People not being told is bad; the kill being reported as failed for it is worse.
            self._board.set(Step.NOTIFY, StepState.FAILED, str(e.cause or e))
