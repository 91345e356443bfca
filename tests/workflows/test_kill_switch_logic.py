"""KillSwitchWorkflow's orchestration on the time-skipping server, with hand-written fake
activities registered under the real names (the venue side is tested against the sandbox
elsewhere; here the point is rounds, failures and the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tests.helpers import fresh_id, new_worker
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import (
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
    KillSwitchInput,
    NotifyRequest,
    Position,
    PositionKind,
    StepState,
    VenueSnapshot,
)


def long(symbol: str, qty: str) -> Position:
    return Position(symbol=symbol, kind=PositionKind.DERIVATIVE, quantity=Decimal(qty))


@dataclass
class FakeVenue:
    """Per-account scripted venue: ``positions[account]`` lists what each flatten leaves behind;
    the snapshot shows what the last flatten left (nothing before any flatten)."""

    positions: dict[str, list[list[Position]]] = field(default_factory=dict)
    fail: dict[tuple[str, str], str] = field(default_factory=dict)
    notify_fails: bool = False
    flatten_calls: list[FlattenRequest] = field(default_factory=list)
    notified: list[NotifyRequest] = field(default_factory=list)
    left: dict[str, list[Position]] = field(default_factory=dict)
    rate_limited: dict[tuple[str, str], int] = field(default_factory=dict)
    """(activity, account) -> how many more calls the venue answers 429 to."""

    def _maybe_fail(self, step: str, account: str) -> None:
        if self.rate_limited.get((step, account), 0) > 0:
            self.rate_limited[(step, account)] -= 1
            raise ApplicationError(f"{account}: RateLimited: 429 weight", type="RateLimited")
        if (step, account) in self.fail:
            raise ApplicationError(
                self.fail[(step, account)], type="AuthFailed", non_retryable=True
            )

    def activities(self) -> list:
        @activity.defn(name="halt_account")
        async def halt(r: HaltRequest) -> HaltResult:
            self._maybe_fail("halt_account", r.account)
            return HaltResult(account=r.account, symbols_armed=["BTC/USDT:USDT"])

        @activity.defn(name="cancel_all")
        async def cancel_all(r: CancelAllRequest) -> CancelAllResult:
            self._maybe_fail("cancel_all", r.account)
            return CancelAllResult(account=r.account, orders_found=3, orders_cancelled=3)

        @activity.defn(name="flatten")
        async def flatten(r: FlattenRequest) -> FlattenResult:
            self.flatten_calls.append(r)
            script = self.positions.get(r.account, [])
            self.left[r.account] = script.pop(0) if script else []
            return FlattenResult(
                account=r.account,
                positions_before=[long("BTC/USDT:USDT", "1")],
                positions_after=self.left[r.account],
            )

        @activity.defn(name="snapshot_venue_state")
        async def snapshot(r: AccountRequest) -> VenueSnapshot:
            self._maybe_fail("snapshot_venue_state", r.account)
            return VenueSnapshot(
                account=r.account,
                taken_at=datetime.now(UTC),
                positions=self.left.get(r.account, []),
            )

        @activity.defn(name="notify")
        async def notify(r: NotifyRequest) -> int:
            if self.notify_fails:
                raise ApplicationError("slack down", non_retryable=True)
            self.notified.append(r)
            return 1

        return [halt, cancel_all, flatten, snapshot, notify]


async def run_kill(env, venue: FakeVenue, request: KillSwitchInput) -> KillReport:
    async with new_worker(env.client, KillSwitchWorkflow, activities=venue.activities()) as worker:
        return await env.client.execute_workflow(
            KillSwitchWorkflow.run,
            request,
            id=fresh_id("kill"),
            task_queue=worker.task_queue,
            result_type=KillReport,
        )


def request(*accounts: str, **kw) -> KillSwitchInput:
    return KillSwitchInput(accounts=list(accounts), reason="test kill", requested_by="pytest", **kw)


async def test_verified_in_one_round(time_env) -> None:
    venue = FakeVenue()
    report = await run_kill(time_env, venue, request("a", "b"))
    assert report.outcome is KillOutcome.VERIFIED
    assert report.rounds == 1
    assert report.time_to_flat_s is not None
    assert [a.account for a in report.accounts] == ["a", "b"]
    assert all(s.state is StepState.DONE for s in report.steps)
    assert venue.notified and "verified" in venue.notified[0].title


async def test_leftover_position_takes_another_round_with_new_order_ids(time_env) -> None:
    venue = FakeVenue(positions={"a": [[long("ETH/USDT:USDT", "2")], []]})
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.VERIFIED
    assert report.rounds == 2
    prefixes = [c.client_id_prefix for c in venue.flatten_calls]
    assert len(prefixes) == 2 and prefixes[0] != prefixes[1]


async def test_rounds_run_out_unverified(time_env) -> None:
    stuck = [long("ETH/USDT:USDT", "2")]
    venue = FakeVenue(positions={"a": [stuck, stuck, stuck]})
    report = await run_kill(time_env, venue, request("a", max_rounds=3))
    assert report.outcome is KillOutcome.UNVERIFIED
    assert report.rounds == 3
    assert report.time_to_flat_s is None
    assert venue.notified[0].severity == "critical"


async def test_one_account_failing_does_not_stop_the_others(time_env) -> None:
    venue = FakeVenue(fail={("cancel_all", "b"): "b: AuthFailed: Invalid API-key"})
    report = await run_kill(time_env, venue, request("a", "b"))
    assert report.outcome is KillOutcome.UNVERIFIED
    by_name = {a.account: a for a in report.accounts}
    assert by_name["a"].orders_cancelled == 3 and not by_name["a"].errors
    assert by_name["b"].errors and "Invalid API-key" in by_name["b"].errors[0]
    assert [c.account for c in venue.flatten_calls] == ["a"]


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
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an account name"):
        request("Bad Name!")
    with pytest.raises(ValidationError, match="named twice"):
        request("a", "a")
    with pytest.raises(ValidationError):
        KillSwitchInput(accounts=[], reason="x y z", requested_by="me")


async def test_a_failed_halt_does_not_stop_the_kill(time_env) -> None:
    venue = FakeVenue(fail={("halt_account", "a"): "a: AuthFailed: bad signature"})
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.VERIFIED
    assert report.accounts[0].errors == ["halt: a: AuthFailed: bad signature"]
    assert report.accounts[0].dead_man_symbols == 0


async def test_an_account_failing_every_step_ends_unverified_not_failed(time_env) -> None:
    venue = FakeVenue(
        fail={("halt_account", "a"): "AuthFailed: x", ("cancel_all", "a"): "AuthFailed: x"}
    )
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.UNVERIFIED
    assert len(report.accounts[0].errors) == 2


async def test_a_rate_limited_verify_waits_for_the_venue_instead_of_giving_up(time_env) -> None:
    venue = FakeVenue(rate_limited={("snapshot_venue_state", "a"): 6})
    report = await run_kill(time_env, venue, request("a"))
    assert report.outcome is KillOutcome.VERIFIED, report.accounts[0].errors
    assert venue.rate_limited[("snapshot_venue_state", "a")] == 0
