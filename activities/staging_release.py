"""The ``release`` staging check: the release being deployed trades on staging for a bake window.

It starts under the staging runbook's deploy target (beside nothing: staging must be idle and its
accounts clean), on the staging accounts and state database, and is measured while it trades:

- health: every probe of its /healthz during the bake (a release that exits fails as ``exited``);
- decision speed: p50/p99 of its own ``strategy_decision_seconds`` (/metrics);
- resources: CPU seconds per second of the bake and peak RSS, from /proc of the pid the target
  reports;
- risk: the largest order notional and position notional the venue showed for the release's
  client ids, against its config's ``order_notional`` and ``max_position_notional``; its reject
  rate (/metrics);
- reconciliation and persistence: set HALTED (it must cancel what rests), stopped by the target
  (SIGTERM), then its database must agree with the venue (``reconcile.py``'s comparison) and hold
  every fill the venue shows on its orders.

Whatever happens, the release is stopped and removed from the target, every staging account is
cancelled, flattened and verified by re-query with the kill switch's own activities, and the
trading state found is written back. Limits come from the staging runbook's ``deploy`` section.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.bake import BakeActivities
from activities.errors import VenueError
from activities.heartbeat import heartbeating
from activities.kill import KillActivities, as_application_error
from activities.metrics_scrape import LATENCY, ORDERS, REJECTS, histogram_quantile
from activities.reconcile import ReconcileActivities, _differences, _read_database
from activities.runbooks import Runbook
from activities.targets.base import DeployTarget, TargetError
from activities.targets.registry import runbook_target
from activities.trading_state import db_target
from activities.venues import VenueGateway, VenueSession
from sandbox.strategy.app import version_tag
from sandbox.strategy.config import StrategyConfig
from sandbox.strategy.state import (
    Database,
    TradingState,
    get_trading_state,
    missing_table,
    set_trading_state,
    state_history,
)
from workflows.analysis_models import MetricsScrape
from workflows.deployment_models import CheckRequest, CheckResult
from workflows.shared import AccountRequest, CancelAllRequest, FlattenRequest

DECISION = "strategy_decision_seconds"
CAP_SLACK = Decimal("1.25")
"""Caps are judged with this much room: the release sized at one mark price, the venue is read at
a later one. A faulty size is many times the cap."""
SETTLE_S = 10.0
"""How long a HALTED release has to cancel what rests and record its fills before it is stopped."""
CLEAN_ROUNDS = 3
"""Cancel-flatten-verify rounds before a staging account left unclean fails the check."""
GONE = {"BACKOFF", "EXITED", "FATAL", "STOPPED"}
"""Supervisor states in which the process has exited."""
WHO = "breakglass release check"
MAX_LOOKUPS = 500
"""Orders looked up on the venue after the bake (the newest first)."""

TargetFor = Callable[[Runbook], DeployTarget]


@dataclass
class Seen:
    """What the venue and the release showed during one check."""

    probes: int = 0
    unhealthy: list[str] = field(default_factory=list)
    exited: str | None = None
    max_order: Decimal = Decimal(0)
    max_order_allowed: Decimal = Decimal(0)
    max_position: Decimal = Decimal(0)
    order_ids: dict[str, str] = field(default_factory=dict)
    """client id -> ccxt symbol of every order of the release seen on the venue."""


class ReleaseCheck:
    def __init__(
        self, gateway: VenueGateway, kill: KillActivities, target_for: TargetFor = runbook_target
    ) -> None:
        self.gateway = gateway
        self.kill = kill
        self.reconcile = ReconcileActivities(gateway)
        self.target_for = target_for

    async def __call__(self, runbook: Runbook, request: CheckRequest) -> CheckResult:
        target = self.target_for(runbook)
        try:
            config = await asyncio.to_thread(StrategyConfig.load, runbook.target.strategy_config)
        except (OSError, ValueError) as e:
            raise ApplicationError(
                f"{runbook.ref}: strategy config {runbook.target.strategy_config}: "
                f"{type(e).__name__}",
                type="ConfigError",
                non_retryable=True,
            ) from None
        tag = _tag(request)
        progress: dict[str, object] = {"check": "release", "phase": "looking at staging"}
        async with heartbeating(progress):
            if activity.info().attempt > 1:
                # The earlier attempt ran the release on a staging env it found clean and idle:
                # whatever runs or rests there now is its own, so it is unwound first.
                await self._leave_clean(runbook, target, request.version, tag + "p", None)
            refusal = await self._refusal(runbook, target)
            if refusal:
                return CheckResult(check="release", passed=False, detail=refusal)
            database = Database(db_target(runbook.database))
            found = await _found_state(database)
            try:
                return await self._run(runbook, target, config, database, request, progress)
            finally:
                progress["phase"] = "leaving staging clean"
                await self._leave_clean(runbook, target, request.version, tag, found)

    # ------------------------------------------------------------------ the run

    async def _run(
        self,
        runbook: Runbook,
        target: DeployTarget,
        config: StrategyConfig,
        database: Database,
        request: CheckRequest,
        progress: dict[str, object],
    ) -> CheckResult:
        version = request.version
        account = config.account if config.account in runbook.accounts else runbook.accounts[0]
        venue = await self._session(account)
        prefix = f"{config.client_id_prefix}-{version_tag(version)}-"
        seen = Seen()
        numbers: dict[str, float] = {}
        started_at = time.time()

        if await _trading_state(database) not in (None, TradingState.ACTIVE):
            await _set_state(database, TradingState.ACTIVE, f"staging check of {version}")
        progress["phase"] = f"starting {version}"
        await _target_call(target, lambda t: _start(t, version))
        exited = await self._until_healthy(runbook, target, version)
        if exited is not None:
            return CheckResult(check="release", passed=False, detail=exited)

        progress["phase"] = f"baking {runbook.deploy.staging_bake_s:g}s"
        failed = await self._bake(runbook, target, venue, config, version, prefix, seen, numbers)
        if failed is not None:
            return CheckResult(check="release", passed=False, detail=failed, measurements=numbers)

        progress["phase"] = "halting and stopping"
        await _set_state(database, TradingState.HALTED, f"staging check of {version}: stop")
        left = await self._settle(venue, runbook, database, config, prefix, seen)
        numbers["open_after_halt"] = left
        await _target_call(target, lambda t: _stop(t, version))
        progress["phase"] = "reconciling"
        disagreements = await self._disagreements(runbook, database)
        missing, fills_venue, fills_db = await self._persistence(
            venue, database, version, prefix, started_at, config, seen
        )
        numbers |= {
            "max_order_notional": float(seen.max_order),
            "max_position_notional": float(seen.max_position),
            "disagreements": len(disagreements),
            "filled_qty_venue": float(fills_venue),
            "filled_qty_db": float(fills_db),
        }
        problems = _judge(runbook, config, numbers, seen)
        if left:
            problems.append(f"{left} orders still open {SETTLE_S:.0f}s after HALTED")
        if disagreements:
            problems.append(f"reconcile: {'; '.join(disagreements[:3])}")
        if missing:
            problems.append(f"persistence: {'; '.join(missing[:3])}")
        detail = "; ".join(problems) or (
            f"traded {numbers['bake_s']:.0f}s: {numbers.get('orders_sent', 0):.0f} orders, "
            f"decision p99 {numbers.get('decision_p99_s', 0) * 1000:.1f} ms, max order "
            f"{seen.max_order:.0f}/{config.order_notional} USDT, reconciled"
        )
        return CheckResult(
            check="release", passed=not problems, detail=detail, measurements=numbers
        )

    async def _bake(
        self,
        runbook: Runbook,
        target: DeployTarget,
        venue: VenueSession,
        config: StrategyConfig,
        version: str,
        prefix: str,
        seen: Seen,
        numbers: dict[str, float],
    ) -> str | None:
        """Let the healthy release trade for the bake window, watching its health and what it
        puts on the venue; then its resource use and its own metrics. Returns why it exited."""
        pid = await _pid(target, version)
        try:
            cpu_before = _cpu_seconds(pid) if pid is not None else None
        except FileNotFoundError:
            cpu_before = None
        if pid is None or cpu_before is None:
            return "exited: no live process"
        baked = time.monotonic()
        deadline = baked + runbook.deploy.staging_bake_s
        while time.monotonic() < deadline and seen.exited is None:
            await asyncio.sleep(min(runbook.health.interval_s, deadline - time.monotonic()))
            await self._probe(target, version, pid, seen)
            await self._look(venue, config, prefix, seen)
        bake_s = time.monotonic() - baked
        numbers |= {"bake_s": round(bake_s, 3), "probes": seen.probes}
        numbers["unhealthy_probes"] = len(seen.unhealthy)
        if seen.exited is not None:
            return seen.exited
        try:
            cpu_s, rss_mb = _cpu_seconds(pid) - cpu_before, _peak_rss_mb(pid)
        except FileNotFoundError:
            return f"exited: process {pid} gone at the end of the bake"
        numbers |= {"cpu_s": round(cpu_s, 3), "cpu_cores": round(cpu_s / bake_s, 4)}
        numbers["rss_peak_mb"] = round(rss_mb, 1)
        numbers |= _trading_numbers(await _scrape(target, version))
        return None

    async def _until_healthy(
        self, runbook: Runbook, target: DeployTarget, version: str
    ) -> str | None:
        """None once healthy; else why not (``exited``/``unhealthy``), within the health timeout."""
        deadline = time.monotonic() + runbook.health.timeout_s
        while True:
            report = await target.health(timeout_s=2.0, version=version)
            if report.healthy:
                return None
            if report.process_state in GONE:
                return f"exited before it was healthy (supervisor: {report.process_state})"
            if time.monotonic() > deadline:
                return (
                    f"unhealthy: not healthy within {runbook.health.timeout_s}s "
                    f"({report.detail or report.process_state})"
                )
            await asyncio.sleep(runbook.health.interval_s)

    async def _probe(self, target: DeployTarget, version: str, pid: int, seen: Seen) -> None:
        report = await target.health(timeout_s=2.0, version=version)
        seen.probes += 1
        if report.process_state in GONE:
            seen.exited = f"exited during the bake (supervisor: {report.process_state})"
        elif (now := await _pid(target, version)) not in (pid, None):
            seen.exited = f"exited during the bake (restarted: pid {pid} -> {now})"
        elif not report.healthy:
            seen.unhealthy.append(report.detail or "unhealthy")

    async def _look(
        self, venue: VenueSession, config: StrategyConfig, prefix: str, s: Seen
    ) -> None:
        """The release's open orders and the account's positions, as the venue shows them."""
        symbols = [_ccxt(venue, sym) for sym in config.symbols]
        try:
            lists, positions = await asyncio.gather(
                asyncio.gather(*(venue.call(venue.exchange.fetch_open_orders, x) for x in symbols)),
                venue.positions(),
            )
        except VenueError as e:
            raise as_application_error(e, venue.name) from None
        for order in (o for lst in lists for o in lst):
            if str(order.get("clientOrderId") or "").startswith(prefix):
                _order_seen(venue, config, order, s)
        for p in positions:
            if p.mark_price is not None:
                s.max_position = max(s.max_position, abs(p.quantity) * p.mark_price)

    async def _settle(
        self,
        venue: VenueSession,
        runbook: Runbook,
        database: Database,
        config: StrategyConfig,
        prefix: str,
        seen: Seen,
    ) -> int:
        """Wait until the HALTED release has nothing open and its database agrees with the venue
        (bounded); returns how many of its orders are still open."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                orders = await venue.open_orders()
            except VenueError as e:
                raise as_application_error(e, venue.name) from None
            mine = [o for o in orders if (o.client_order_id or "").startswith(prefix)]
            if not mine and not await self._disagreements(runbook, database):
                return 0
            if time.monotonic() > deadline:
                return len(mine)
            await self._look(venue, config, prefix, seen)
            await asyncio.sleep(config.loop_interval_s)  # one loop of the release

    async def _disagreements(self, runbook: Runbook, database: Database) -> list[str]:
        """What the database and the venue disagree on (``reconcile.py``'s comparison)."""
        venue = await self.reconcile._read_venue(runbook.accounts)
        positions, open_orders = await asyncio.to_thread(_read_database, database)
        return _differences(venue, positions, open_orders)

    async def _persistence(
        self,
        venue: VenueSession,
        database: Database,
        version: str,
        prefix: str,
        since: float,
        config: StrategyConfig,
        seen: Seen,
    ) -> tuple[list[str], Decimal, Decimal]:
        """Each order of the release, looked up on the venue: its size counts toward the caps,
        and its fills must be in the database. Returns what is missing and the fill totals."""
        recorded = await asyncio.to_thread(_recorded, database, version, since)
        unknown = sorted(set(seen.order_ids) - set(recorded))
        wanted = {
            cid: seen.order_ids.get(cid) or _ccxt(venue, sym) for cid, sym in recorded.items()
        }
        wanted |= {cid: seen.order_ids[cid] for cid in unknown}
        lookups = sorted(wanted.items())[-MAX_LOOKUPS:]
        gate = asyncio.Semaphore(8)

        async def look(cid: str, symbol: str) -> dict[str, Any] | None:
            async with gate:
                try:
                    raw: dict[str, Any] = await venue.call(
                        venue.exchange.fetch_order, None, symbol, {"origClientOrderId": cid}
                    )
                except VenueError as e:
                    if e.retryable:
                        raise as_application_error(e, venue.name) from None
                    return None  # never accepted (a rejected intent)
                return raw

        orders = await asyncio.gather(*(look(cid, sym) for cid, sym in lookups))
        fills = await asyncio.to_thread(_fills, database, [cid for cid, _ in lookups])
        missing = [f"order {cid} on the venue, not in the database" for cid in unknown]
        on_venue = Decimal(0)
        for (cid, _), raw in zip(lookups, orders, strict=True):
            if raw is None:
                continue
            _order_seen(venue, config, raw, seen)
            filled = Decimal(str(raw.get("filled") or 0))
            on_venue += filled
            if filled != fills.get(cid, Decimal(0)):
                missing.append(f"order {cid}: venue filled {filled}, database {fills.get(cid, 0)}")
        return missing, on_venue, sum(fills.values(), Decimal(0))

    # ------------------------------------------------------------------ before and after

    async def _refusal(self, runbook: Runbook, target: DeployTarget) -> str | None:
        """Why the check may not run here (staging busy or not clean), or None."""
        running = await _target_call(target, lambda t: t.running_versions())
        if running:
            return (
                f"staging {runbook.ref} runs {', '.join(running)}: the release check needs the "
                "staging env idle"
            )
        for account in runbook.accounts:
            look = await self.kill.snapshot_venue_state(AccountRequest(account=account))
            if look.open_orders or look.positions or look.unread_books:
                return (
                    f"staging account {account} is not clean ({len(look.open_orders)} open orders, "
                    f"{len(look.positions)} positions, unread: {look.unread_books or 'none'}): "
                    "a check only touches what it opened"
                )
        return None

    async def _leave_clean(
        self,
        runbook: Runbook,
        target: DeployTarget,
        version: str,
        tag: str,
        found: TradingState | None,
    ) -> None:
        """Release stopped and removed, every account flat with nothing open (verified on the
        venue), the trading state found written back. Raises when any of it is not so."""
        problems: list[str] = []
        stopped = False
        database = Database(db_target(runbook.database))
        try:
            await _target_call(target, lambda t: _stop(t, version))
            stopped = version not in await target.running_versions()
            if not stopped:
                problems.append(f"{version} still runs on {runbook.ref}")
        except (ApplicationError, TargetError) as e:
            problems.append(f"stopping {version}: {e}")
        if not stopped:
            # It may still trade: HALTED makes it cancel and send nothing, and stays written.
            try:
                await _set_state(database, TradingState.HALTED, "the check could not stop it")
            except Exception as e:
                problems.append(f"halting {version}: {type(e).__name__}")
        for account in runbook.accounts:
            problems += await self._flat(account, tag)
        if stopped and found is not None and await _trading_state(database) != found:
            await _set_state(database, found, "staging check done: the state it found")
        if problems:
            raise ApplicationError(
                f"staging not left clean: {'; '.join(problems)}", type="StagingNotClean"
            )

    async def _flat(self, account: str, tag: str) -> list[str]:
        """Cancel, flatten, re-read, up to ``CLEAN_ROUNDS`` times; what is left, if anything."""
        for n in range(CLEAN_ROUNDS):
            await self.kill.cancel_all(CancelAllRequest(account=account))
            prefix = f"{tag}r{n}"
            await self.kill.flatten(FlattenRequest(account=account, client_id_prefix=prefix))
            look = await self.kill.snapshot_venue_state(AccountRequest(account=account))
            if not look.open_orders and not look.positions and not look.unread_books:
                return []
        return [
            f"{account}: {len(look.open_orders)} open orders, {len(look.positions)} positions left"
        ]

    async def _session(self, account: str) -> VenueSession:
        try:
            return await self.gateway.session(account)
        except VenueError as e:
            raise as_application_error(e, account) from None


# ---------------------------------------------------------------------- helpers


def _tag(request: CheckRequest) -> str:
    """Client-id prefix of the orders this check attempt sends (deterministic, per attempt)."""
    info = activity.info()
    digest = hashlib.sha256(f"{info.workflow_id}/{request.check}".encode()).hexdigest()[:8]
    return f"bgrel{digest}a{info.attempt}"


async def _start(target: DeployTarget, version: str) -> object:
    """Beside no other version: ``current`` stays what it was, unless it is this version."""
    why = f"staging release check of {version}"
    if await target.current() == version:
        return await target.activate(version, requested_by=WHO, reason=why)
    return await target.start_candidate(version, requested_by=WHO, reason=why)


async def _stop(target: DeployTarget, version: str) -> object:
    """SIGTERM through the target; a candidate is removed again (idempotent)."""
    if await target.current() == version:
        return await target.stop()
    return await target.retire(version, requested_by=WHO, reason="staging release check done")


async def _target_call(target: DeployTarget, step: Callable[[DeployTarget], Awaitable[Any]]) -> Any:
    try:
        return await step(target)
    except TargetError as e:
        raise ApplicationError(
            f"{target.ref}: {type(e).__name__}: {e}",
            type=type(e).__name__,
            non_retryable=not e.retryable,
        ) from None


async def _pid(target: DeployTarget, version: str) -> int | None:
    """The pid the target reports for the version (None: no live process)."""
    view = await _target_call(target, lambda t: t.versions())
    return next((p.pid for p in view.processes if p.version == version), None)


async def _scrape(target: DeployTarget, version: str) -> MetricsScrape:
    async with aiohttp.ClientSession() as http:
        url = await BakeActivities._metrics_url(target, version)
        return await BakeActivities._scrape(http, url)


async def _trading_state(database: Database) -> TradingState | None:
    """The trading state in force (None: a database the strategy never ran on)."""
    try:
        return (await asyncio.to_thread(get_trading_state, database)).state
    except Exception as e:
        if missing_table(e):
            return None  # a database the strategy never ran on: it starts ACTIVE
        raise ApplicationError(
            f"state database: {type(e).__name__}", type="DatabaseError"
        ) from None


async def _found_state(database: Database) -> TradingState | None:
    """The trading state to leave staging in: the one in force, or, when this check set it last
    (an attempt that did not finish), the one in force before the check's own changes."""
    try:
        record = await asyncio.to_thread(get_trading_state, database)
        if record.changed_by != WHO:
            return record.state
        history = await asyncio.to_thread(state_history, database)
    except Exception as e:
        if missing_table(e):
            return None
        raise ApplicationError(
            f"state database: {type(e).__name__}", type="DatabaseUnavailable"
        ) from None
    before = record.state
    for _, from_state, _, who, _ in reversed(history):
        if who != WHO:
            break
        before = TradingState(from_state) if from_state else before
    return before


async def _set_state(database: Database, state: TradingState, why: str) -> None:
    change = await asyncio.to_thread(set_trading_state, database, state, WHO, why)
    activity.logger.info("staging trading state: %s", change.message)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM of /proc/PID/status), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _trading_numbers(scrape: MetricsScrape) -> dict[str, float]:
    """Decision speed, order latency and reject rate over the process's life."""
    numbers: dict[str, float] = {}
    sent = scrape.counters.get(ORDERS, 0.0)
    rejected = scrape.counters.get(REJECTS, 0.0)
    numbers |= {"orders_sent": sent, "orders_rejected": rejected}
    if sent + rejected:
        numbers["reject_rate"] = round(rejected / (sent + rejected), 4)
    for name, key in ((DECISION, "decision"), (LATENCY, "order_latency")):
        hist = scrape.histograms.get(name)
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            value = histogram_quantile(q, hist) if hist is not None else None
            if value is not None:
                numbers[f"{key}_{label}_s"] = round(value, 6)
    return numbers


def _judge(runbook: Runbook, config: StrategyConfig, n: dict[str, float], s: Seen) -> list[str]:
    """The measured limits broken, each naming its measurement."""
    policy = runbook.deploy
    problems = []
    if s.unhealthy:
        problems.append(f"unhealthy in {len(s.unhealthy)} of {s.probes} probes: {s.unhealthy[0]}")
    if n["orders_sent"] + n["orders_rejected"] == 0:
        problems.append("sent no orders during the bake: nothing to measure")
    if n.get("decision_p99_s", 0.0) > policy.staging_max_decision_p99_s:
        problems.append(
            f"decision_p99_s {n['decision_p99_s']:.3f} > {policy.staging_max_decision_p99_s}"
        )
    if n["cpu_cores"] > policy.staging_max_cpu_cores:
        problems.append(f"cpu_cores {n['cpu_cores']:.2f} > {policy.staging_max_cpu_cores}")
    if n["rss_peak_mb"] > policy.staging_max_rss_mb:
        problems.append(f"rss_peak_mb {n['rss_peak_mb']:.0f} > {policy.staging_max_rss_mb:g}")
    if s.max_order > s.max_order_allowed:
        problems.append(
            f"max_order_notional {s.max_order:.0f} USDT > order_notional {config.order_notional}"
        )
    if s.max_position > config.max_position_notional * CAP_SLACK:
        problems.append(
            f"max_position_notional {s.max_position:.0f} USDT > max_position_notional "
            f"{config.max_position_notional}"
        )
    if n.get("reject_rate", 0.0) > policy.staging_max_reject_rate:
        problems.append(f"reject_rate {n['reject_rate']:.2f} > {policy.staging_max_reject_rate}")
    return problems


def _ccxt(venue: VenueSession, symbol_id: str) -> str:
    return str(venue.exchange.markets_by_id[symbol_id][0]["symbol"])


def _order_seen(venue: VenueSession, config: StrategyConfig, raw: dict[str, Any], s: Seen) -> None:
    """Count one of the release's orders (a ccxt order) toward the largest order seen."""
    symbol = str(raw["symbol"])
    s.order_ids[str(raw["clientOrderId"])] = symbol
    price = Decimal(str(raw.get("price") or raw.get("average") or 0))
    notional = Decimal(str(raw.get("amount") or 0)) * price
    if notional > s.max_order:
        rules = venue.lot_rules(symbol)
        # Never below the venue's minimum: an order may exceed a smaller configured size by that.
        least = rules.min_notional + rules.step * price
        s.max_order = notional
        s.max_order_allowed = max(config.order_notional, least) * CAP_SLACK


def _recorded(database: Database, version: str, since: float) -> dict[str, str]:
    """client id -> exchange symbol of the orders ``version`` recorded as sent since ``since``."""
    start = datetime.fromtimestamp(since - 5, UTC).isoformat()
    with database.transaction() as cur:
        rows = cur.execute(
            "SELECT client_order_id, symbol FROM orders WHERE version = ? AND created_at >= ? "
            "AND order_id IS NOT NULL",
            (version, start),
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def _fills(database: Database, cids: list[str]) -> dict[str, Decimal]:
    """Filled quantity per client id, as the database's fills table holds it."""
    wanted = set(cids)
    with database.transaction() as cur:
        rows = cur.execute("SELECT client_order_id, qty FROM fills").fetchall()
    out: dict[str, Decimal] = {}
    for cid, qty in rows:
        if cid in wanted:
            out[cid] = out.get(cid, Decimal(0)) + Decimal(qty)
    return out
