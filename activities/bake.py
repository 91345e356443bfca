"""Baking a candidate beside the live version: the measurements a deployment judges.

- ``bake_shadow``: while the candidate runs without the lease (it decides, sends nothing), wait
  the bake time, then compare its logged decisions with the live version's;
- ``sample_metrics``: scrape one version's Prometheus /metrics every few seconds for the bake
  time and turn consecutive scrapes into per-interval trading samples;
- ``judge_canary``: the statistical judge over a baseline and a canary series;
- ``set_allocation``: the share of capital a version trades.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.analysis import judge
from activities.heartbeat import heartbeating
from activities.metrics_scrape import parse_exposition, to_series, trading_sample
from activities.targets.base import DeployTarget
from activities.trading_state import db_target
from sandbox.strategy.allocation import set_capital
from sandbox.strategy.decisions import agreement
from workflows.analysis_models import AnalysisResult, MetricSeries, MetricsScrape, TradingSample
from workflows.deploy_models import StrategyRef
from workflows.deployment_models import (
    AllocationRequest,
    CandidateBake,
    JudgeRequest,
    SampleRequest,
    ShadowReport,
)


class BakeActivities:
    def __init__(self, target_for: Callable[[StrategyRef], DeployTarget]) -> None:
        self.target_for = target_for

    @activity.defn(name="bake_shadow")
    async def bake_shadow(self, request: CandidateBake) -> ShadowReport:
        if request.database is None or request.baseline is None:
            return ShadowReport(decisions_compared=0, agreement=1.0, detail="nothing to compare")
        since = datetime.now(UTC)
        async with heartbeating({"phase": "shadow", "bake_s": request.bake_s}):
            await asyncio.sleep(request.bake_s)
            compared, share = await asyncio.to_thread(
                agreement, db_target(request.database), request.baseline, request.candidate, since
            )
        return ShadowReport(
            decisions_compared=compared,
            agreement=share if compared else 1.0,
            detail="" if compared else f"{request.baseline} decided nothing in the window",
        )

    @activity.defn(name="sample_metrics")
    async def sample_metrics(self, request: SampleRequest) -> MetricSeries:
        target = self.target_for(request.ref)
        samples: list[TradingSample] = []
        progress: dict[str, object] = {"samples": 0}
        async with heartbeating(progress), aiohttp.ClientSession() as http:
            url = await self._metrics_url(target, request.version)
            previous, at = await self._scrape(http, url), time.monotonic()
            deadline = at + request.bake_s
            while time.monotonic() < deadline:
                await asyncio.sleep(min(request.interval_s, max(0.0, deadline - time.monotonic())))
                current, now = await self._scrape(http, url), time.monotonic()
                samples.append(trading_sample(previous, current, now - at))
                previous, at = current, now
                progress["samples"] = len(samples)
        return to_series(samples, request.version)

    @staticmethod
    async def _metrics_url(target: DeployTarget, version: str) -> str:
        health = await target.health(version=version)
        if health.url is None:
            raise ApplicationError(
                f"{target.ref} {version}: no HTTP endpoint known", type="NoEndpoint"
            )
        parts = urlsplit(health.url)
        return urlunsplit((parts.scheme, parts.netloc, "/metrics", "", ""))

    @staticmethod
    async def _scrape(http: aiohttp.ClientSession, url: str) -> MetricsScrape:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                response.raise_for_status()
                return parse_exposition(await response.text())
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ApplicationError(f"{url}: {e}", type="ScrapeFailed") from None

    @activity.defn(name="judge_canary")
    async def judge_canary(self, request: JudgeRequest) -> AnalysisResult:
        return await asyncio.to_thread(judge, request.policy, request.baseline, request.canary)

    @activity.defn(name="set_allocation")
    async def set_allocation(self, request: AllocationRequest) -> float:
        await asyncio.to_thread(
            set_capital,
            db_target(request.database),
            request.version,
            request.capital,
            request.who,
            request.why,
        )
        activity.logger.info(
            "%s trades %.0f%% of capital (%s)", request.version, request.capital * 100, request.why
        )
        return request.capital
