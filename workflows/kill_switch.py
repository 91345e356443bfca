"""The kill switch: halt → cancel_all → flatten → verify → notify, for every account at once.

Deterministic orchestration only; every side effect is an activity. It never waits on Slack,
approvals or the strategy process: nothing here blocks on a human, and a failed notification
does not fail the kill.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
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

# Venue work retries quickly and for minutes, not hours: a kill switch that gives up early leaves
# risk on, one that retries for ever hides a broken account. Auth/config errors stop at once.
VENUE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=20,
    non_retryable_error_types=["AuthFailed", "ConfigError"],
)
# A hard-killed worker is noticed after this long without a heartbeat, and the work moves on.
HEARTBEAT_TIMEOUT = timedelta(seconds=5)
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=5))


def _key(position: Position) -> tuple[str, str | None]:
    return (position.symbol, position.position_side)


def unverified_positions(
    snapshot: VenueSnapshot, reported_dust: Sequence[Position]
) -> list[Position]:
    """Positions the verify step cannot accept: above the lot minimum and not reported as dust
    by the venue (spot remainders under the minimum notional are only known from its refusal)."""
    dust = {_key(p): abs(p.quantity) for p in reported_dust}
    return [p for p in snapshot.positions if abs(p.quantity) > dust.get(_key(p), -1)]


def order_prefix(workflow_id: str, run_id: str, round_no: int) -> str:
    """Client-order-id prefix: the same for every retry of one round, new for each round/run."""
    digest = hashlib.sha256(f"{workflow_id}/{run_id}".encode()).hexdigest()[:10]
    return f"bg{digest}r{round_no}"


@workflow.defn(name="KillSwitch")
class KillSwitchWorkflow:
    def __init__(self) -> None:
        self._steps = {step: StepStatus(step=step) for step in Step}
        self._round = 0
        self._report: KillReport | None = None

    @workflow.query(name="status")
    def status(self) -> KillStatus:
        return KillStatus(
            workflow_id=workflow.info().workflow_id,
            round=self._round,
            steps=list(self._steps.values()),
            report=self._report,
        )

    @workflow.run
    async def run(self, request: KillSwitchInput) -> KillReport:
        info = workflow.info()
        started = info.start_time
        reports = {a: AccountReport(account=a) for a in request.accounts}
        errors: dict[str, list[str]] = {a: [] for a in request.accounts}
        live = list(request.accounts)  # accounts not yet failed for good
        time_to_flat: float | None = None
        dust: dict[str, list[Position]] = {a: [] for a in request.accounts}

        halts = await self._run_step(
            Step.HALT,
            live,
            lambda a: workflow.execute_local_activity(
                "halt_account",
                HaltRequest(account=a),
                result_type=HaltResult,
                start_to_close_timeout=timedelta(seconds=20),
                retry_policy=RetryPolicy(maximum_attempts=3),
            ),
            errors,
            # The dead-man switch is a safety net: without it the kill still goes on.
            fatal=False,
        )
        for account, halt in halts.items():
            reports[account] = reports[account].model_copy(
                update={"dead_man_symbols": len(halt.symbols_armed)}
            )

        snapshots: dict[str, VenueSnapshot] = {}
        for round_no in range(1, request.max_rounds + 1):
            self._round = round_no
            cancels = await self._run_step(
                Step.CANCEL_ALL,
                live,
                lambda a: workflow.execute_activity(
                    "cancel_all",
                    CancelAllRequest(account=a, verify_deadline_s=request.verify_deadline_s),
                    result_type=CancelAllResult,
                    start_to_close_timeout=timedelta(seconds=request.verify_deadline_s + 60),
                    heartbeat_timeout=HEARTBEAT_TIMEOUT,
                    retry_policy=VENUE_RETRY,
                ),
                errors,
            )
            live = [a for a in live if a in cancels]
            for account, cancel in cancels.items():
                previous = reports[account]
                reports[account] = previous.model_copy(
                    update={
                        "orders_found": previous.orders_found + cancel.orders_found,
                        "orders_cancelled": previous.orders_cancelled + cancel.orders_cancelled,
                        "orders_still_open": len(cancel.still_open),
                    }
                )

            if request.scope is KillScope.FLATTEN:
                prefix = order_prefix(info.workflow_id, info.run_id, round_no)
                flattens = await self._run_step(
                    Step.FLATTEN,
                    live,
                    lambda a, prefix=prefix: workflow.execute_activity(  # type: ignore[misc]
                        "flatten",
                        FlattenRequest(account=a, client_id_prefix=prefix),
                        result_type=FlattenResult,
                        start_to_close_timeout=timedelta(minutes=2),
                        heartbeat_timeout=HEARTBEAT_TIMEOUT,
                        retry_policy=VENUE_RETRY,
                    ),
                    errors,
                )
                live = [a for a in live if a in flattens]
                for account, flat in flattens.items():
                    previous = reports[account]
                    dust[account] = flat.dust
                    reports[account] = previous.model_copy(
                        update={
                            "positions_before": previous.positions_before or flat.positions_before,
                            "positions_after": flat.positions_after,
                            "dust": flat.dust,
                            "flatten_orders": previous.flatten_orders + flat.orders,
                        }
                    )
            else:
                self._mark(Step.FLATTEN, StepState.SKIPPED, "scope is cancel-only")

            snapshots = await self._run_step(
                Step.VERIFY,
                live,
                lambda a: workflow.execute_local_activity(
                    "snapshot_venue_state",
                    AccountRequest(account=a),
                    result_type=VenueSnapshot,
                    start_to_close_timeout=timedelta(seconds=20),
                    retry_policy=RetryPolicy(maximum_attempts=5),
                ),
                errors,
            )
            pending = self._unverified(request.scope, snapshots, dust)
            if not pending and len(snapshots) == len(request.accounts):
                time_to_flat = (workflow.now() - started).total_seconds()
                self._mark(
                    Step.VERIFY, StepState.DONE, f"verified on the venue in round {round_no}"
                )
                break
            if len(snapshots) < len(request.accounts) and not pending:
                break  # what is left failed for good; more rounds cannot help
            self._mark(Step.VERIFY, StepState.FAILED, "not flat: " + ", ".join(pending))

        for account, snapshot in snapshots.items():
            reports[account] = reports[account].model_copy(
                update={
                    "orders_still_open": len(snapshot.open_orders),
                    "positions_after": snapshot.positions + snapshot.dust,
                }
            )
        outcome = KillOutcome.VERIFIED if time_to_flat is not None else KillOutcome.UNVERIFIED
        if outcome is KillOutcome.VERIFIED:
            released = await self._release_dead_man(halts)
            for account in released:
                reports[account] = reports[account].model_copy(update={"dead_man_released": True})
        report = KillReport(
            workflow_id=info.workflow_id,
            reason=request.reason,
            requested_by=request.requested_by,
            scope=request.scope,
            outcome=outcome,
            started_at=started,
            finished_at=workflow.now(),
            time_to_flat_s=time_to_flat,
            rounds=self._round,
            accounts=[
                reports[a].model_copy(update={"errors": errors[a]}) for a in request.accounts
            ],
            steps=list(self._steps.values()),
        )
        await self._notify(report)
        report = report.model_copy(
            update={"finished_at": workflow.now(), "steps": list(self._steps.values())}
        )
        self._report = report
        return report

    # ------------------------------------------------------------------ helpers

    async def _run_step(
        self,
        step: Step,
        accounts: list[str],
        call: Callable[[str], Awaitable[Any]],
        errors: dict[str, list[str]],
        fatal: bool = True,
    ) -> dict[str, Any]:
        """Run one step for every account at once; an account that fails is recorded, not fatal
        to the others. Returns the results of the accounts that succeeded."""
        self._mark(step, StepState.RUNNING, f"round {self._round}" if self._round else "")
        results = await asyncio.gather(*(call(a) for a in accounts), return_exceptions=True)
        done: dict[str, Any] = {}
        failures = []
        for account, result in zip(accounts, results, strict=True):
            # Activities fail as ActivityError(cause=…); local activities surface the cause itself.
            if isinstance(result, ActivityError | ApplicationError):
                cause = result.cause if isinstance(result, ActivityError) else result
                message = cause.message if isinstance(cause, ApplicationError) else str(cause)
                errors[account].append(f"{step.value}: {message}")
                failures.append(account)
                if not fatal:
                    workflow.logger.warning("step %s failed for %s (not fatal)", step, account)
            elif isinstance(result, BaseException):
                raise result
            else:
                done[account] = result
        state = StepState.FAILED if failures and fatal else StepState.DONE
        detail = f"failed: {', '.join(failures)}" if failures else f"{len(done)} account(s)"
        self._mark(step, state, detail)
        return done

    async def _release_dead_man(self, halts: dict[str, HaltResult]) -> list[str]:
        """Disarm the countdowns armed by the halt: the account is verified flat, and a timer left
        running would cancel the orders of whatever trades next. Best effort: if this fails the
        timers simply run out."""
        armed = {a: h.symbols_armed for a, h in halts.items() if h.symbols_armed}
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
        return [a for a, r in zip(armed, results, strict=True) if isinstance(r, HaltResult)]

    def _mark(self, step: Step, state: StepState, detail: str = "") -> None:
        current = self._steps[step]
        now = workflow.now()
        update: dict[str, Any] = {"state": state, "detail": detail}
        if state is StepState.RUNNING and current.state is not StepState.RUNNING:
            update["started_at"] = current.started_at or now
            update["finished_at"] = None
        if state in (StepState.DONE, StepState.FAILED, StepState.SKIPPED):
            update["finished_at"] = now
            update["started_at"] = current.started_at or now
        self._steps[step] = current.model_copy(update=update)

    @staticmethod
    def _unverified(
        scope: KillScope, snapshots: dict[str, VenueSnapshot], dust: dict[str, list[Position]]
    ) -> list[str]:
        pending = []
        for account, snapshot in sorted(snapshots.items()):
            if snapshot.open_orders:
                pending.append(f"{account} ({len(snapshot.open_orders)} open orders)")
            elif scope is KillScope.FLATTEN and unverified_positions(snapshot, dust[account]):
                pending.append(f"{account} (positions open)")
        return pending

    async def _notify(self, report: KillReport) -> None:
        self._mark(Step.NOTIFY, StepState.RUNNING)
        names = [a.account for a in report.accounts]
        severity = "info" if report.outcome is KillOutcome.VERIFIED else "critical"
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
                retry_policy=NOTIFY_RETRY,
            )
            self._mark(Step.NOTIFY, StepState.DONE)
        except ActivityError as e:
            # People not being told is bad; the kill being reported as failed for it is worse.
            self._mark(Step.NOTIFY, StepState.FAILED, str(e.cause or e))


def summary(report: KillReport) -> str:
    """Plain-text summary for notifications (channels add their own formatting)."""
    lines = [
        f"reason: {report.reason} (requested by {report.requested_by})",
        f"outcome: {report.outcome.value}"
        + (f", time to flat {report.time_to_flat_s:.2f}s" if report.time_to_flat_s else ""),
    ]
    for a in report.accounts:
        lines.append(
            f"{a.account}: orders cancelled {a.orders_cancelled}/{a.orders_found}, "
            f"still open {a.orders_still_open}, positions {len(a.positions_before)} -> "
            f"{len([p for p in a.positions_after if p not in a.dust])} (+{len(a.dust)} dust)"
            + (f", errors: {'; '.join(a.errors)}" if a.errors else "")
        )
    return "\n".join(lines)
