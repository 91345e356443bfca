"""Typed inputs and results of canary analysis: metric series, the analysis policy, the verdict.

Workflows keep these in their histories, so every number is a plain finite float or int (JSON has
no NaN or infinity) and this module imports nothing but pydantic: the statistics live in
``activities/analysis.py``.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from workflows.shared import Model

MAX_ABS_VALUE = 1e15
"""Largest magnitude a metric sample may have. Nothing a trading system measures comes near it;
a larger value is a unit or overflow bug, and refusing it keeps every derived number finite."""

SampleValue = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class TradingMetric(StrEnum):
    """Names of the trading metrics sampled from a strategy's /metrics (one value per interval)."""

    FILL_RATE = "fill_rate"
    """Filled orders per accepted order (the strategy's own gauge)."""
    REJECT_RATE = "reject_rate"
    """Rejected orders per order sent, over the interval."""
    ORDER_LATENCY_P99 = "order_latency_p99_s"
    """99th percentile of decision-to-acknowledgement latency over the interval, in seconds."""
    PNL = "pnl_usdt"
    """Realised plus unrealised P&L (a level: gate it with ``Aggregate.DRAWDOWN``)."""
    FEED_STALENESS = "feed_staleness_s"
    """Age of the last price seen, in seconds."""
    ERROR_RATE = "error_rate_per_s"
    """Loop errors per second over the interval."""


# --------------------------------------------------------------------------- what is sampled


class MetricSeries(Model):
    """Samples of one version (baseline or canary) over the bake time: a list per metric name."""

    version: str = ""
    """Release version the samples came from (for reasons and reports)."""
    values: dict[str, list[SampleValue]] = Field(default_factory=dict)
    """Metric name -> samples in time order (order matters only to ``LAST`` and ``DRAWDOWN``)."""
    trades: int = Field(default=0, ge=0)
    """Fills seen over the bake time: below the policy's ``min_trades`` the analysis is NODATA."""


class HistogramSnapshot(Model):
    """One Prometheus histogram at one scrape (or its increase over an interval).

    The ``+Inf`` bucket is not stored (JSON has no infinity): its cumulative count is ``count``.
    """

    bounds: list[Finite] = Field(default_factory=list)
    """Finite upper bounds (``le``) in ascending order."""
    cumulative: list[Finite] = Field(default_factory=list)
    """Observations at or below each bound (same length as ``bounds``, non-decreasing)."""
    count: Finite = 0.0
    sum: Finite = 0.0

    @model_validator(mode="after")
    def _buckets_line_up(self) -> HistogramSnapshot:
        if len(self.bounds) != len(self.cumulative):
            raise ValueError("bounds and cumulative counts differ in length")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise ValueError("bucket bounds are not strictly ascending")
        return self


class MetricsScrape(Model):
    """One parsed Prometheus text exposition, by kind of metric.

    Keys are sample names with their labels in canonical form (``name{a="x",b="y"}``); counters
    and histograms also appear under their bare name, summed over label sets. Non-finite gauge
    values (a NaN P&L) are left out: a missing value is no data, never a number.
    """

    counters: dict[str, Finite] = Field(default_factory=dict)
    gauges: dict[str, Finite] = Field(default_factory=dict)
    histograms: dict[str, HistogramSnapshot] = Field(default_factory=dict)


class TradingSample(Model):
    """Named trading values of one version over one sampling interval."""

    values: dict[str, SampleValue] = Field(default_factory=dict)
    """``TradingMetric`` name -> value; a metric without data in the interval is absent."""
    trades: int = Field(default=0, ge=0)
    """Fill events in the interval."""


# --------------------------------------------------------------------------- the policy


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    """Between the marginal and the pass score (or evidence a critical check needs is missing):
    a human decides."""
    NODATA = "nodata"
    """Too little data to judge: bake longer; never a reason to promote."""


class Direction(StrEnum):
    HIGHER_IS_WORSE = "higher-is-worse"
    """Latency, reject rate, staleness, errors."""
    LOWER_IS_WORSE = "lower-is-worse"
    """Fill rate, P&L."""


class Comparator(StrEnum):
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="

    def holds(self, value: float, threshold: float) -> bool:
        match self:
            case Comparator.LT:
                return value < threshold
            case Comparator.LE:
                return value <= threshold
            case Comparator.GT:
                return value > threshold
            case Comparator.GE:
                return value >= threshold


class Aggregate(StrEnum):
    """How a gate reduces the canary's series to the one value it checks."""

    WORST = "worst"
    """The sample least favourable to the gate: max for ``<``/``<=``, min for ``>``/``>=``. Every
    sample must hold."""
    MEAN = "mean"
    MEDIAN = "median"
    MAX = "max"
    MIN = "min"
    LAST = "last"
    DRAWDOWN = "drawdown"
    """Largest peak-to-trough fall of the series in time order (>= 0): for P&L levels."""


class HardGate(Model):
    """An absolute limit on the canary alone: the gate holds when ``value <comparator> threshold``.

    Any violated gate fails the analysis, whatever the score.
    """

    metric: str = Field(min_length=1)
    comparator: Comparator
    threshold: Finite
    aggregate: Aggregate = Aggregate.WORST
    min_samples: int = Field(default=1, ge=1)
    """Fewer canary samples than this: the gate is NODATA (the analysis cannot PASS on it)."""

    def __str__(self) -> str:
        agg = "" if self.aggregate == Aggregate.WORST else f"{self.aggregate.value} "
        return f"{agg}{self.metric} {self.comparator.value} {self.threshold:g}"


class MetricPolicy(Model):
    """How one metric of the canary is compared with the baseline."""

    name: str = Field(min_length=1)
    direction: Direction
    tolerance: float = Field(default=0.10, ge=0, le=100)
    """Relative change allowed in the worse direction (0.10: 10 % of the baseline's median)
    before a significant difference fails the metric."""
    abs_tolerance: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Absolute change always allowed (metric units): the band where the baseline's median is
    zero or tiny. The band is the larger of the two."""
    critical: bool = False
    """A failing critical metric fails the whole analysis; a critical metric without data keeps
    it from passing."""
    min_samples: int = Field(default=20, ge=1)
    """Fewer samples than this on either side: the metric is NODATA."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of the score (weights of the metrics with data are normalised to 100)."""


class AnalysisPolicy(Model):
    """Gates, metric comparisons and score thresholds (Kayenta-like: >= pass passes, < marginal
    fails, in between is inconclusive)."""

    gates: list[HardGate] = Field(default_factory=list)
    metrics: list[MetricPolicy] = Field(default_factory=list)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    """Significance level of each one-sided Mann-Whitney U test."""
    pass_score: float = Field(default=75.0, ge=0, le=100)
    marginal_score: float = Field(default=50.0, ge=0, le=100)
    min_trades: int = Field(default=1, ge=0)
    """Fewer fills than this on either version: NODATA (unless a gate or critical metric fails)."""

    @field_validator("metrics")
    @classmethod
    def _names_unique(cls, metrics: list[MetricPolicy]) -> list[MetricPolicy]:
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise ValueError("a metric is named twice")
        return metrics

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisPolicy:
        if not self.gates and not self.metrics:
            raise ValueError("a policy needs at least one gate or metric")
        if self.marginal_score > self.pass_score:
            raise ValueError(
                f"marginal_score {self.marginal_score:g} is above pass_score {self.pass_score:g}"
            )
        for m in self.metrics:
            # With n samples a side, the smallest one-sided p-value a rank test can give is
            # 1 / C(2n, n): below that no regression could ever be detected.
            if 1 / math.comb(2 * m.min_samples, m.min_samples) > self.alpha:
                raise ValueError(
                    f"metric {m.name!r}: min_samples {m.min_samples} can never reach "
                    f"significance at alpha {self.alpha:g}"
                )
        return self


# --------------------------------------------------------------------------- the result


class MetricResult(Model):
    name: str
    verdict: Verdict
    """PASS, FAIL or NODATA."""
    critical: bool = False
    direction: Direction
    reason: str = ""
    n_baseline: int = 0
    n_canary: int = 0
    p_value: float | None = None
    """One-sided, in the worse direction: is the canary worse at all? (None: not tested)."""
    band_p_value: float | None = None
    """One-sided: is the canary worse by more than the tolerance band? FAIL needs this below
    alpha (and the shift outside the band)."""
    u_statistic: float | None = None
    """Mann-Whitney U of the canary: pairs where the canary sample is higher (ties count half)."""
    effect: float | None = None
    """Hodges-Lehmann shift, canary minus baseline, in metric units."""
    relative_effect: float | None = None
    """``effect`` over the baseline's median (None where that median is zero)."""
    allowed_shift: float | None = None
    """Half-width of the tolerance band in metric units."""
    baseline_median: float | None = None
    canary_median: float | None = None


class GateResult(Model):
    metric: str
    comparator: Comparator
    threshold: float
    aggregate: Aggregate
    verdict: Verdict
    """PASS, FAIL or NODATA."""
    value: float | None = None
    """The canary's aggregated value that was checked."""
    n_canary: int = 0
    reason: str = ""


class AnalysisResult(Model):
    verdict: Verdict
    summary: str
    """One line for humans: the verdict and what decided it."""
    score: float | None = None
    """0-100 over the metrics with data (None: no metric had data)."""
    metrics: list[MetricResult] = Field(default_factory=list)
    gates: list[GateResult] = Field(default_factory=list)
    baseline_trades: int = 0
    canary_trades: int = 0
    baseline_version: str = ""
    canary_version: str = ""
