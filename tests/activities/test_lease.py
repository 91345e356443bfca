"""The single trading lease: the contract on real databases (SQLite and PostgreSQL) and the
fenced handover activity against the sandbox venue. The old version's process is played by a
task that honours the contract the way the sample strategy does (read, record, acknowledge)."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import lease as handover_module
from activities.lease import LeaseActivities
from sandbox.admin_models import SeedOrder
from sandbox.prices import to_tick
from sandbox.strategy import lease
from sandbox.strategy.state import Database
from tests.fixtures.venues import MARKET_BY_SYMBOL, MakeRig
from workflows.deploy_models import StrategyRef
from workflows.deployment_models import HandoverRequest
from workflows.snapshot_models import DatabaseKind, DatabaseRef

OLD, NEW = "1.3.0", "1.4.0"
INTENT = "INSERT INTO intents (cid, version) VALUES (?, ?)"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.servers)])
def strategy_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[DatabaseRef, Database]:
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite"
        ref, db = DatabaseRef(kind=DatabaseKind.SQLITE, path=path), Database(path)
    else:
        dsn: str = request.getfixturevalue("pg_database")
        ref, db = DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=dsn), Database(dsn)
    db.init_schema()
    with db.transaction() as cur:
        cur.execute("CREATE TABLE intents (cid TEXT PRIMARY KEY, version TEXT NOT NULL)")
    return ref, db


def intents(db: Database) -> list[tuple[str, str]]:
    with db.transaction() as cur:
        return [(r[0], r[1]) for r in cur.execute("SELECT cid, version FROM intents").fetchall()]


def test_an_intent_is_recorded_only_under_the_epoch_it_was_decided_in(
    strategy_db: tuple[DatabaseRef, Database],
) -> None:
    _, db = strategy_db
    # No lease yet: the single running version trades (epoch 0).
    before = lease.may_send(db, "acct", OLD)
    assert before is not None and before.epoch == 0
    assert lease.record_intent(db, before, INTENT, ("c0", OLD))
    granted = lease.grant(db, "acct", OLD, "test", "first deploy")
    assert granted.epoch == 1 and lease.grant(db, "acct", OLD, "test", "again") == granted
    assert not lease.record_intent(db, before, INTENT, ("c1", OLD))  # epoch 0 is gone
    held = lease.may_send(db, "acct", OLD)
    assert held is not None and lease.record_intent(db, held, INTENT, ("c2", OLD))
    assert lease.may_send(db, "acct", NEW) is None  # the other version may not send
    fenced = lease.fence(db, "acct", "test", "handover")
    assert fenced.holder is None and fenced.epoch == 2
    assert not lease.record_intent(db, held, INTENT, ("c3", OLD))  # decided before the fence
    assert lease.may_send(db, "acct", OLD) is None and lease.may_send(db, "acct", NEW) is None
    new = lease.grant(db, "acct", NEW, "test", "handover")
    assert (new.epoch, new.holder) == (3, NEW)
    assert intents(db) == [("c0", OLD), ("c2", OLD)]
    assert lease.changes(db, "acct") == [(None, 1, OLD), (1, 2, None), (2, 3, NEW)]


async def play_version(db: Database, account: str, stop: asyncio.Event, version: str = OLD) -> None:
    """What a running version's loop does: acknowledge the epoch it sees, whoever holds it."""
    while not stop.is_set():
        current = await asyncio.to_thread(lease.read_lease, db, account)
        if current is not None:
            await asyncio.to_thread(lease.acknowledge, db, account, version, current.epoch)
        await asyncio.sleep(0.05)


async def test_handover_fences_cancels_the_old_orders_and_grants_the_new_version(
    make_rig: MakeRig, strategy_db: tuple[DatabaseRef, Database]
) -> None:
    ref, db = strategy_db
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    lease.grant(db, account.futures, OLD, "test", "running")
    price = (await rig.admin.prices()).prices["ETHUSDT"]
    await rig.admin.seed_orders(
        account.api_key,
        [
            SeedOrder(
                symbol="ETHUSDT",
                side="BUY",
                qty=Decimal("0.1"),
                price=to_tick(price * Decimal("0.9"), MARKET_BY_SYMBOL["ETHUSDT"].tick),
                client_order_id=f"old-{n}",
            )
            for n in range(3)
        ],
    )
    acts = LeaseActivities(rig.gateway())
    stop = asyncio.Event()
    old = asyncio.create_task(play_version(db, account.futures, stop))
    new = asyncio.create_task(play_version(db, account.futures, stop, NEW))
    request = HandoverRequest(
        ref=StrategyRef(strategy="sample", env="t"),
        database=ref,
        accounts=[account.futures],
        from_version=OLD,
        to_version=NEW,
        reason="deploy test",
    )
    try:
        result = await ActivityEnvironment().run(acts.handover, request)
        again = await ActivityEnvironment().run(acts.handover, request)  # a retry: nothing new
        # Route-back is the same handover in reverse: the warm old version trades again.
        back = await ActivityEnvironment().run(
            acts.handover,
            request.model_copy(update={"from_version": NEW, "to_version": OLD}),
        )
    finally:
        stop.set()
        await asyncio.gather(old, new)
        await acts.kill.gateway.close()
    assert (result.holder, result.orders_cancelled) == (NEW, 3)
    assert again.epoch == result.epoch and again.orders_cancelled == 0
    assert (await rig.admin.state(account.api_key)).open_orders == []
    steps = lease.changes(db, account.futures)
    # reduce (same epoch), fence (nobody), grant (the new version), and back: never two holders.
    assert [(to, holder) for _, to, holder in steps] == [
        (1, OLD),
        (1, OLD),
        (2, None),
        (3, NEW),
        (3, NEW),
        (4, None),
        (5, OLD),
    ]
    assert (back.holder, back.epoch) == (OLD, 5)
    current = lease.read_lease(db, account.futures)
    assert current is not None and current.holder == OLD


async def test_without_the_old_versions_ack_the_lease_stays_fenced(
    make_rig: MakeRig, strategy_db: tuple[DatabaseRef, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, db = strategy_db
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0]
    lease.grant(db, account.futures, OLD, "test", "running")
    monkeypatch.setattr(handover_module, "ACK_TIMEOUT_S", 0.5)
    acts = LeaseActivities(rig.gateway())
    try:
        with pytest.raises(ApplicationError) as refused:
            await ActivityEnvironment().run(
                acts.handover,
                HandoverRequest(
                    ref=StrategyRef(strategy="sample", env="t"),
                    database=ref,
                    accounts=[account.futures],
                    from_version=OLD,
                    to_version=NEW,
                    reason="deploy test",
                ),
            )
    finally:
        with contextlib.suppress(Exception):
            await acts.kill.gateway.close()
    assert refused.value.type == "NoAck" and not refused.value.non_retryable
    current = lease.read_lease(db, account.futures)
    assert current is not None and current.holder is None  # nobody may send: safe to retry
    assert lease.may_send(db, account.futures, OLD) is None
    assert lease.may_send(db, account.futures, NEW) is None
