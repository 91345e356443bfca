"""KillSwitchWorkflow's orchestration on the time-skipping server, with hand-written fake
activities registered under the real names (the venue side is tested against the sandbox
elsewhere; here the point is rounds, failures and the report)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pydantic import ValidationError
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from tests.fixtures.kill import BTC, FakeVenue, long, order, request
from tests.helpers import assert_eventually, fresh_id, new_worker
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import (
    AccountState,
    BookFailure,
    DeadManState,
    KillJoin,
    KillJoinResult,
    KillOutcome,
    KillReport,
    KillScope,
    KillSwitchInput,
    Step,
    StepState,
)

ETH = "ETH/USDT:USDT"
SOL = "SOL/USDT:USDT"


async def run_kill(env: WorkflowEnvironment, venue: FakeVenue, kill: KillSwitchInput) -> KillReport:
    async with new_worker(env.client, KillSwitchWorkflow, activities=venue.activities()) as worker:
        return await env.client.execute_workflow(
            KillSwitchWorkflow.run,
            kill,
            id=fresh_id("kill"),
            task_queue=worker.task_queue,
            result_type=KillReport,
            execution_timeout=timedelta(minutes=30),
        )


def steps(report_steps: list) -> dict[str, StepState]:
    return {s.step: s.state for s in report_steps}


async def test_verified_in_one_round(time_env) -> None:
    venue = FakeVenue()
    report = await run_kill(time_env, venue, request("a", "b"))
    assert report.outcome is KillOutcome.VERIFIED
    assert report.rounds == 1
    assert report.time_to_flat_s is not None
    assert [a.account for a in report.accounts] == ["a", "b"]
    assert all(s.state is StepState.DONE for s in report.steps)
    assert all(a.state is AccountState.VERIFIED for a in report.accounts)
    assert all(steps(a.steps)[Step.HALT] is StepState.DONE for a in report.accounts)
    assert venue.notified and "verified" in venue.notified[0].title


async def test_leftover_position_takes_another_round_with_new_order_ids(time_env) -> None:
    venue = FakeVenue(positions={"a": [[long(ETH, "2")], []]})
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.VERIFIED
    assert report.rounds == 2
    prefixes = [c.client_id_prefix for c in venue.flatten_calls]
    assert len(prefixes) == 2 and prefixes[0] != prefixes[1]


async def test_rounds_run_out_unverified_and_the_report_says_why(time_env) -> None:
    stuck = [long(ETH, "2")]
    venue = FakeVenue(positions={"a": [stuck, stuck, stuck]})
    report = await run_kill(time_env, venue, request("a", max_rounds=3))
    assert report.outcome is KillOutcome.UNVERIFIED
    assert report.rounds == 3
    assert report.time_to_flat_s is None
    assert venue.notified[0].severity == "critical"
    account = report.accounts[0]
    assert account.state is AccountState.UNVERIFIED
    assert (
        account.gave_up and "3 rounds" in account.gave_up and "1 positions open" in account.gave_up
    )
    assert account.positions_after == stuck


async def test_one_account_failing_does_not_stop_the_others(time_env) -> None:
    venue = FakeVenue(fail={("cancel_all", "b"): "b: AuthFailed: Invalid API-key"})
    report = await run_kill(time_env, venue, request("a", "b"))
    by_name = {a.account: a for a in report.accounts}
    assert by_name["a"].orders_cancelled == 3 and not by_name["a"].errors
    assert by_name["a"].state is AccountState.VERIFIED
    assert by_name["b"].errors and "Invalid API-key" in by_name["b"].errors[0]
    assert steps(by_name["b"].steps)[Step.CANCEL_ALL] is StepState.FAILED


async def test_failed_notification_does_not_fail_the_kill(time_env) -> None:
    venue = FakeVenue(notify_fails=True)
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.VERIFIED
    notify = next(s for s in report.steps if s.step == "notify")
    assert notify.state is StepState.FAILED


async def test_cancel_only_scope_skips_flatten(time_env) -> None:
    venue = FakeVenue()
    report = await run_kill(time_env, venue, request("a", scope=KillScope.CANCEL_ONLY))
    assert report.outcome is KillOutcome.VERIFIED
    assert venue.flatten_calls == []
    flatten = next(s for s in report.steps if s.step == "flatten")
    assert flatten.state is StepState.SKIPPED


def test_bad_input_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValidationError, match="not an account name"):
        request("Bad Name!")
    with pytest.raises(ValidationError, match="named twice"):
        request("a", "a")
    with pytest.raises(ValidationError):
        KillSwitchInput(accounts=[], reason="x y z", requested_by="me")
    with pytest.raises(ValidationError, match="at most 50"):
        request(*(f"a{i}" for i in range(51)))


async def test_a_rate_limited_verify_waits_for_the_venue_instead_of_giving_up(time_env) -> None:
    # Six 429s on the verify look (the start snapshot takes the first one).
    venue = FakeVenue(rate_limited={("snapshot_venue_state", "a"): 6})
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.VERIFIED, report.accounts[0].errors
    assert venue.rate_limited[("snapshot_venue_state", "a")] == 0


# --------------------------------------------------------------------------- defect 1


async def test_a_failing_cancel_all_still_flattens_verifies_and_arms(time_env) -> None:
    venue = FakeVenue(fail={("cancel_all", "a"): "a: BadRequest: 400 on openAlgoOrders"})
    report = await run_kill(time_env, venue, request("a", max_rounds=1))
    account = report.accounts[0]
    assert [c.account for c in venue.flatten_calls] == ["a"]
    assert venue.count("snapshot_venue_state", "a") >= 2  # the start and the verify
    assert account.dead_man is not None and account.dead_man.armed == [BTC]
    assert steps(account.steps) == {
        Step.HALT: StepState.DONE,
        Step.CANCEL_ALL: StepState.FAILED,
        Step.FLATTEN: StepState.DONE,
        Step.VERIFY: StepState.DONE,
    }
    # The venue's own re-read shows nothing open: the account is verified despite the failure.
    assert account.state is AccountState.VERIFIED
    assert any("400 on openAlgoOrders" in e for e in account.errors)


async def test_a_failed_book_is_reported_and_the_rest_goes_ahead(time_env) -> None:
    book = BookFailure(symbol=None, conditional=True, action="list", error="BadRequest: 400")
    venue = FakeVenue(failed_books={"a": [book]}, unread_books={"a": ["conditional-orders"]})
    report = await run_kill(time_env, venue, request("a", max_rounds=2))
    account = report.accounts[0]
    assert account.failures == [book]
    assert account.orders_cancelled == 6
    assert len(venue.flatten_calls) == 2
    cancel = next(s for s in account.steps if s.step is Step.CANCEL_ALL)
    assert cancel.state is StepState.DONE and cancel.detail.startswith("partial")
    # A book the verify could not read keeps the account unverified, never verified.
    assert account.state is AccountState.UNVERIFIED
    assert account.gave_up and "conditional-orders" in account.gave_up
    assert account.orders_still_open is None  # not 0: the conditional book was not read


# --------------------------------------------------------------------------- defect 2 and 13


async def test_a_failed_halt_shows_failed_and_the_dead_man_not_armed(time_env) -> None:
    venue = FakeVenue(fail={("halt_account", "a"): "a: AuthFailed: bad signature"})
    report = await run_kill(time_env, venue, request("a", "b"))
    assert report.outcome is KillOutcome.VERIFIED
    by_name = {a.account: a for a in report.accounts}
    assert by_name["a"].errors == ["halt: a: AuthFailed: bad signature"]
    assert steps(by_name["a"].steps)[Step.HALT] is StepState.FAILED
    assert steps(by_name["b"].steps)[Step.HALT] is StepState.DONE
    assert steps(report.steps)[Step.HALT] is StepState.FAILED
    halt = next(s for s in report.steps if s.step is Step.HALT)
    assert "a" in halt.detail
    dead_man = by_name["a"].dead_man
    assert dead_man is not None and dead_man.state is DeadManState.NOT_ARMED
    assert dead_man.armed == [] and dead_man.failed


async def test_a_partial_halt_is_partial_and_exactly_what_was_armed_is_released(time_env) -> None:
    venue = FakeVenue(
        armed={"a": [BTC, ETH]},
        arm_failed={"a": {SOL: "VenueUnavailable: 503"}},
        release_failed={"a": {ETH: "VenueUnavailable: 503"}},
    )
    report = await run_kill(time_env, venue, request("a"))
    account = report.accounts[0]
    halt = next(s for s in account.steps if s.step is Step.HALT)
    assert halt.state is StepState.DONE and halt.detail.startswith("partial")
    dead_man = account.dead_man
    assert dead_man is not None
    assert dead_man.state is DeadManState.PARTIAL
    assert dead_man.armed == [BTC, ETH]
    assert dead_man.failed == {SOL: "VenueUnavailable: 503"}
    assert dead_man.released == [BTC, SOL]  # SOL's arming failed: disarmed too, harmlessly
    assert dead_man.release_failed == [ETH]
    release = [h for h in venue.halt_calls if h.dead_man_seconds == 0]
    assert [h.symbols for h in release] == [[BTC, ETH, SOL]]
    assert account.dead_man_symbols == 2


async def test_a_possibly_armed_countdown_that_stays_armed_is_reported(time_env) -> None:
    venue = FakeVenue(
        arm_failed={"a": {ETH: "outcome unknown: timeout"}},
        release_failed={"a": {ETH: "VenueUnavailable: 503"}},
    )
    report = await run_kill(time_env, venue, request("a"))
    dead_man = report.accounts[0].dead_man
    assert dead_man is not None
    assert (dead_man.released, dead_man.release_failed) == ([BTC], [ETH])


async def test_no_dead_man_when_the_caller_turns_it_off(time_env) -> None:
    venue = FakeVenue()
    report = await run_kill(time_env, venue, request("a", dead_man=False))
    assert report.outcome is KillOutcome.VERIFIED
    assert venue.halt_calls == []
    account = report.accounts[0]
    assert account.dead_man is not None and account.dead_man.state is DeadManState.OFF
    assert steps(account.steps)[Step.HALT] is StepState.SKIPPED
    assert steps(report.steps)[Step.HALT] is StepState.SKIPPED


# --------------------------------------------------------------------------- defect 3 and 17


async def test_an_account_that_cannot_be_read_is_unknown_not_flat(time_env) -> None:
    broken = "b: AuthFailed: Invalid API-key"
    venue = FakeVenue(
        fail={
            (step, "b"): broken
            for step in ("halt_account", "cancel_all", "flatten", "snapshot_venue_state")
        }
    )
    report = await run_kill(time_env, venue, request("a", "b"))
    assert report.outcome is KillOutcome.UNVERIFIED
    b = next(a for a in report.accounts if a.account == "b")
    assert b.state is AccountState.UNKNOWN
    assert (b.orders_found, b.orders_cancelled, b.orders_still_open) == (None, None, None)
    assert (b.positions_before, b.positions_after) == (None, None)
    assert b.gave_up and "Invalid API-key" in b.gave_up
    assert venue.count("snapshot_venue_state", "b") == 2  # no further rounds against a dead key


async def test_a_failing_flatten_still_verifies_and_explains_giving_up(time_env) -> None:
    venue = FakeVenue(fail={("flatten", "a"): "a: VenueUnavailable: 503"})
    report = await run_kill(time_env, venue, request("a", max_rounds=2))
    account = report.accounts[0]
    assert account.state is AccountState.UNVERIFIED
    assert account.positions_after == [long(BTC, "1")]  # read by verify, not zero
    assert account.positions_before == [long(BTC, "1")]
    assert venue.count("snapshot_venue_state", "a") == 3  # start + a verify per round
    assert account.gave_up and "1 positions open" in account.gave_up
    assert steps(account.steps)[Step.FLATTEN] is StepState.FAILED


# --------------------------------------------------------------------------- defect 4


async def test_time_to_flat_counts_from_the_request_and_reports_the_queue_wait(time_env) -> None:
    venue = FakeVenue()
    async with new_worker(
        time_env.client, KillSwitchWorkflow, activities=venue.activities()
    ) as worker:
        # The request waits 90 s before any worker may pick it up (as if none were running).
        report = await time_env.client.execute_workflow(
            KillSwitchWorkflow.run,
            request("a"),
            id=fresh_id("kill"),
            task_queue=worker.task_queue,
            result_type=KillReport,
            start_delay=timedelta(seconds=90),
        )
    assert report.requested_at is not None and report.picked_up_at is not None
    assert report.queue_wait_s is not None and report.queue_wait_s >= 89
    assert report.time_to_flat_s is not None and report.time_to_flat_s >= 89


# --------------------------------------------------------------------------- defect 14


async def test_the_report_keeps_work_done_before_a_crash(time_env) -> None:
    # The flatten's answer comes from a retried attempt: BTC was closed by the attempt that died.
    venue = FakeVenue(
        initial={"a": [long(BTC, "1"), long(ETH, "-2")]},
        flatten_before={"a": [long(ETH, "-2")]},
        recovered={"a": [order("bgx-btc-0"), order("bgx-eth-0", ETH, "buy")]},
        sent={"a": [order("bgx-eth-0", ETH, "buy"), order("bgx-eth-1", ETH, "buy")]},
    )
    report = await run_kill(time_env, venue, request("a"))
    account = report.accounts[0]
    assert account.positions_before == [long(BTC, "1"), long(ETH, "-2")]
    assert [o.client_order_id for o in account.flatten_orders] == [
        "bgx-btc-0",
        "bgx-eth-0",
        "bgx-eth-1",
    ]


# --------------------------------------------------------------------------- speed


async def test_the_halt_runs_beside_the_first_cancel_not_before_it(time_env) -> None:
    venue = FakeVenue(halt_waits_for_cancel=True)
    async with new_worker(
        time_env.client, KillSwitchWorkflow, activities=venue.activities()
    ) as worker:
        handle = await time_env.client.start_workflow(
            KillSwitchWorkflow.run,
            request("a", "b"),
            id=fresh_id("kill"),
            task_queue=worker.task_queue,
            result_type=KillReport,
        )
        report = await handle.result()
        history = await handle.fetch_history()
    assert all(a.dead_man and a.dead_man.state is DeadManState.ARMED for a in report.accounts)
    # One workflow task, and the cancels are its first commands.
    first_tasks = 0
    scheduled = []
    for e in history.events:
        if e.HasField("workflow_task_completed_event_attributes") and not scheduled:
            first_tasks += 1
        if e.HasField("activity_task_scheduled_event_attributes"):
            scheduled.append(e.activity_task_scheduled_event_attributes.activity_type.name)
    assert first_tasks == 1
    assert scheduled[:2] == ["cancel_all", "cancel_all"]


# --------------------------------------------------------------------------- defect 6: joins


async def start_kill(
    env: WorkflowEnvironment, worker_tq: str, kill: KillSwitchInput
) -> WorkflowHandle:
    return await env.client.start_workflow(
        KillSwitchWorkflow.run,
        kill,
        id=fresh_id("kill"),
        task_queue=worker_tq,
        result_type=KillReport,
        execution_timeout=timedelta(minutes=30),
    )


async def join(handle: WorkflowHandle, payload: object) -> KillJoinResult:
    return await handle.execute_update(
        "join", payload, result_type=KillJoinResult, rpc_timeout=timedelta(seconds=20)
    )


async def test_a_flatten_join_escalates_a_cancel_only_kill(time_env) -> None:
    # b's cancel hangs until the join is in: a is verified cancel-only by then.
    release_b = asyncio.Event()
    venue = FakeVenue(gates={("cancel_all", "b"): release_b})
    async with new_worker(
        time_env.client, KillSwitchWorkflow, activities=venue.activities()
    ) as worker:
        handle = await start_kill(
            time_env, worker.task_queue, request("a", "b", scope=KillScope.CANCEL_ONLY)
        )

        async def a_verified() -> bool:
            status = await handle.query(KillSwitchWorkflow.status)
            return any(
                x.account == "a" and x.state is AccountState.VERIFIED for x in status.accounts
            )

        await assert_eventually(a_verified, timeout=30)
        answer = await join(
            handle, KillJoin(reason="desk says flatten", requested_by="carol", scope="flatten")
        )
        release_b.set()
        report = await handle.result()
    assert answer.escalated and answer.scope is KillScope.FLATTEN
    assert report.scope is KillScope.FLATTEN
    assert sorted(c.account for c in venue.flatten_calls) == ["a", "b"]
    assert all(a.state is AccountState.VERIFIED for a in report.accounts)
    assert all(a.scope is KillScope.FLATTEN for a in report.accounts)
    assert [(j.requested_by, j.scope) for j in report.joins] == [("carol", KillScope.FLATTEN)]
    assert steps(report.steps)[Step.FLATTEN] is StepState.DONE


async def test_a_same_scope_join_is_recorded_and_bad_joins_are_refused(time_env) -> None:
    release = asyncio.Event()
    venue = FakeVenue(gates={("cancel_all", "a"): release})
    async with new_worker(
        time_env.client, KillSwitchWorkflow, activities=venue.activities()
    ) as worker:
        handle = await start_kill(time_env, worker.task_queue, request("a"))
        answer = await join(
            handle, KillJoin(reason="second pager", requested_by="dave", scope="cancel-only")
        )
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await join(handle, {"reason": "x", "requested_by": "eve", "scope": "nuke"})
        release.set()
        report = await handle.result()
    assert not answer.escalated and answer.scope is KillScope.FLATTEN
    assert "already flattens" in answer.message
    cause = refused.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "Refused"
    assert "reason" in cause.message and "scope" in cause.message
    assert [j.requested_by for j in report.joins] == ["dave"]
