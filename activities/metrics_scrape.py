"""Prometheus text exposition -> typed values, and a strategy's trading values per interval.

Pure functions (text in, models out): the activity that scrapes both versions' /metrics over the
bake time feeds consecutive scrapes to ``trading_sample`` and the samples to ``to_series``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from workflows.analysis_models import (
    HistogramSnapshot,
    MetricSeries,
    MetricsScrape,
    TradingMetric,
    TradingSample,
)

# The sample strategy's names (sandbox/strategy/app.py), as they appear in the exposition.
ORDERS = "strategy_orders_placed_total"
FILLS = "strategy_fills_total"
REJECTS = "strategy_order_rejects_total"
ERRORS = "strategy_errors_total"
LATENCY = "strategy_order_latency_seconds"
FILL_RATE = "strategy_fill_rate"
PNL = "strategy_pnl_usdt"
FEED_STALENESS = "strategy_feed_staleness_seconds"

_COUNTER_LIKE = {"counter", "histogram", "summary"}


def parse_exposition(text: str) -> MetricsScrape:
    """Parse one /metrics body. Raises ``ValueError`` on text that is not an exposition."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise ValueError(f"not a Prometheus text exposition: {e}") from e
    with_created = {f.name for f in families if f.type in _COUNTER_LIKE}
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    histograms: dict[str, HistogramSnapshot] = {}
    for family in families:
        if family.name.endswith("_created") and family.name[: -len("_created")] in with_created:
            continue  # the creation timestamp the text format lists beside each counter
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if family.type == "counter":
            total = family.name + "_total"
            counters[total] = 0.0  # a labelled counter with no children yet has counted nothing
            for s in samples:
                counters[_key(s.name, s.labels)] = s.value
                if s.labels:
                    counters[s.name] = counters.get(s.name, 0.0) + s.value
                else:
                    counters[s.name] = s.value
        elif family.type == "histogram":
            histograms |= _histograms(family.name, samples)
        else:
            for s in samples:
                if family.type == "summary" and s.name != family.name:
                    counters[_key(s.name, s.labels)] = s.value  # _count and _sum
                elif math.isfinite(s.value):
                    gauges[_key(s.name, s.labels)] = s.value
    return MetricsScrape(
        counters={k: v for k, v in counters.items() if math.isfinite(v)},
        gauges=gauges,
        histograms=histograms,
    )


def histogram_quantile(q: float, hist: HistogramSnapshot) -> float | None:
    """The q-quantile by linear interpolation inside its bucket, as Prometheus computes it.

    None without observations. A quantile that falls in the ``+Inf`` bucket answers the highest
    finite bound (the histogram cannot say more); the lowest bucket starts at 0 when its bound is
    positive.
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} is not in (0, 1]")
    if hist.count <= 0:
        return None
    rank = q * hist.count
    below = 0.0
    running = 0.0
    for i, (bound, cumulative) in enumerate(zip(hist.bounds, hist.cumulative, strict=True)):
        running = max(running, cumulative)  # tolerate scrapes that are not quite monotonic
        if running >= rank:
            if i == 0:
                if bound <= 0:
                    return bound
                start = 0.0
            else:
                start = hist.bounds[i - 1]
            return start + (bound - start) * (rank - below) / (running - below)
        below = running
    return hist.bounds[-1] if hist.bounds else None


def increase(prev: MetricsScrape, cur: MetricsScrape) -> MetricsScrape:
    """Counters and histograms as their increase from ``prev`` to ``cur``; gauges as in ``cur``.

    A value that went down was reset (the process restarted): its increase is all of ``cur``, as
    Prometheus's ``increase()`` assumes. A series new in ``cur`` counts from zero.
    """
    counters = {}
    for key, now in cur.counters.items():
        before = prev.counters.get(key)
        counters[key] = now if before is None or now < before else now - before
    histograms = {}
    for key, h in cur.histograms.items():
        p = prev.histograms.get(key)
        if (
            p is None
            or p.bounds != h.bounds
            or h.count < p.count
            or any(n < b for n, b in zip(h.cumulative, p.cumulative, strict=True))
        ):
            histograms[key] = h
        else:
            histograms[key] = HistogramSnapshot(
                bounds=h.bounds,
                cumulative=[n - b for n, b in zip(h.cumulative, p.cumulative, strict=True)],
                count=h.count - p.count,
                sum=h.sum - p.sum,
            )
    return MetricsScrape(counters=counters, gauges=cur.gauges, histograms=histograms)


def trading_sample(prev: MetricsScrape, cur: MetricsScrape, elapsed_s: float) -> TradingSample:
    """The sample strategy's trading values over the interval between two scrapes.

    A value without data in the interval (no order sent, no latency observed) is left out, so it
    counts toward NODATA instead of a made-up zero.
    """
    if not elapsed_s > 0:
        raise ValueError(f"elapsed_s must be positive, not {elapsed_s}")
    inc = increase(prev, cur)
    values: dict[str, float] = {}
    if cur.counters.get(ORDERS, 0.0) > 0 and FILL_RATE in cur.gauges:
        # The gauge stays at its initial 0 until the first order is accepted.
        values[TradingMetric.FILL_RATE] = cur.gauges[FILL_RATE]
    sent = inc.counters.get(ORDERS, 0.0) + inc.counters.get(REJECTS, 0.0)
    if sent > 0:
        values[TradingMetric.REJECT_RATE] = inc.counters.get(REJECTS, 0.0) / sent
    if LATENCY in inc.histograms:
        p99 = histogram_quantile(0.99, inc.histograms[LATENCY])
        if p99 is not None:
            values[TradingMetric.ORDER_LATENCY_P99] = p99
    for metric, gauge in ((TradingMetric.PNL, PNL), (TradingMetric.FEED_STALENESS, FEED_STALENESS)):
        if gauge in cur.gauges:
            values[metric] = cur.gauges[gauge]
    if ERRORS in inc.counters:
        values[TradingMetric.ERROR_RATE] = inc.counters[ERRORS] / elapsed_s
    return TradingSample(values=values, trades=int(inc.counters.get(FILLS, 0.0)))


def to_series(samples: Sequence[TradingSample], version: str = "") -> MetricSeries:
    """One version's samples over the bake time, in order, as the judge's input."""
    values: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        for name, value in sample.values.items():
            values[name].append(value)
    return MetricSeries(version=version, values=dict(values), trades=sum(s.trades for s in samples))


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class _Buckets:
    buckets: dict[float, float] = field(default_factory=dict)
    count: float | None = None
    sum: float = 0.0


def _histograms(name: str, samples: Sequence[Sample]) -> dict[str, HistogramSnapshot]:
    """One snapshot per label set (``le`` aside), and the bucket-wise sum under the bare name."""
    groups: dict[str, _Buckets] = {}
    for s in samples:
        labels = dict(s.labels)
        le = labels.pop("le", None)
        group = groups.setdefault(_key(name, labels), _Buckets())
        if s.name.endswith("_bucket") and le is not None:
            group.buckets[float(le)] = s.value
        elif s.name.endswith("_count"):
            group.count = s.value
        elif s.name.endswith("_sum"):
            group.sum = s.value
    out: dict[str, HistogramSnapshot] = {}
    for key, g in groups.items():
        finite = sorted(b for b in g.buckets if math.isfinite(b))
        count = g.count if g.count is not None else g.buckets.get(math.inf, 0.0)
        if not all(math.isfinite(n) for n in [*g.buckets.values(), count, g.sum]):
            continue  # a NaN sum (a NaN was observed): no usable histogram
        out[key] = HistogramSnapshot(
            bounds=finite, cumulative=[g.buckets[b] for b in finite], count=count, sum=g.sum
        )
    if name not in out and out:
        first = next(iter(out.values()))
        if all(h.bounds == first.bounds for h in out.values()):
            out[name] = HistogramSnapshot(
                bounds=first.bounds,
                cumulative=[
                    sum(cs) for cs in zip(*(h.cumulative for h in out.values()), strict=True)
                ],
                count=sum(h.count for h in out.values()),
                sum=sum(h.sum for h in out.values()),
            )
    return out
