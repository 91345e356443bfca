"""The bake's database side on real databases: capital allocation per version, and the decision
log a shadow version is compared with the live one by."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.bake import BakeActivities
from sandbox.strategy import decisions
from sandbox.strategy.allocation import capital_of
from sandbox.strategy.state import Database
from workflows.deployment_models import AllocationRequest
from workflows.snapshot_models import DatabaseKind, DatabaseRef


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.servers)])
def strategy_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[DatabaseRef, Database]:
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite"
        return DatabaseRef(kind=DatabaseKind.SQLITE, path=path), Database(path)
    dsn: str = request.getfixturevalue("pg_database")
    return DatabaseRef(kind=DatabaseKind.POSTGRES, dsn=dsn), Database(dsn)


async def test_allocation_is_per_version_and_defaults_to_everything(
    strategy_db: tuple[DatabaseRef, Database],
) -> None:
    ref, db = strategy_db
    assert capital_of(db, "1.4.0") == 1.0
    acts = BakeActivities(target_for=lambda ref: None)  # type: ignore[arg-type,return-value]
    for share in (0.05, 0.25):
        await ActivityEnvironment().run(
            acts.set_allocation,
            AllocationRequest(database=ref, version="1.4.0", capital=share, who="t", why="step"),
        )
        assert capital_of(db, "1.4.0") == share
    assert capital_of(db, "1.3.0") == 1.0


def test_shadow_agreement_counts_the_live_versions_decisions_the_shadow_also_made(
    strategy_db: tuple[DatabaseRef, Database],
) -> None:
    _, db = strategy_db
    since = datetime.now(UTC) - timedelta(seconds=1)
    decisions.init_decisions(db)
    px, qty = Decimal(100), Decimal(1)
    live = [("BTCUSDT", "buy", px, qty), ("BTCUSDT", "sell", px, qty), ("ETHUSDT", "buy", px, qty)]
    decisions.record_decisions(db, "1.3.0", live, sent=True)
    decisions.record_decisions(db, "1.4.0", live[:2], sent=False)  # never bought ETH
    compared, share = decisions.agreement(db, "1.3.0", "1.4.0", since)
    assert compared == 3 and share == pytest.approx(2 / 3)
    assert decisions.agreement(db, "1.3.0", "1.3.0", since) == (3, 1.0)
    assert decisions.agreement(db, "9.9.9", "1.4.0", since) == (0, 0.0)
