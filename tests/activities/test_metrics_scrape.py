"""The /metrics parser on the sample strategy's own exposition: counters, gauges, histograms,
p99 by bucket interpolation, increases between scrapes, and trading values the judge accepts."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise

import pytest
from prometheus_client import generate_latest

from activities.analysis import judge
from activities.metrics_scrape import (
    histogram_quantile,
    increase,
    parse_exposition,
    to_series,
    trading_sample,
)
from sandbox.strategy.app import Metrics
from sandbox.strategy.config import Fault, Release
from workflows.analysis_models import (
    AnalysisPolicy,
    Comparator,
    Direction,
    HardGate,
    HistogramSnapshot,
    MetricPolicy,
    MetricSeries,
    MetricsScrape,
    TradingMetric,
    Verdict,
)

LATENCY = "strategy_order_latency_seconds"


def strategy_metrics(fault: Fault = Fault.NONE) -> Metrics:
    return Metrics(
        Release(strategy="sample", version="1.0.0", fault=fault, created=datetime.now(UTC))
    )


def scrape(m: Metrics) -> MetricsScrape:
    return parse_exposition(generate_latest(m.registry).decode())


def test_the_strategys_exposition() -> None:
    m = strategy_metrics()
    m.orders.labels("BTCUSDT").inc(3)
    m.orders.labels("ETHUSDT").inc(2)
    m.rejects.labels("InvalidOrder").inc()
    m.pnl.set(float("nan"))  # no P&L yet: left out, never a number
    m.feed_staleness.set(0.25)
    m.latency.observe(0.03)
    s = scrape(m)
    assert s.counters['strategy_orders_placed_total{symbol="BTCUSDT"}'] == 3
    assert s.counters["strategy_orders_placed_total"] == 5  # summed over symbols
    assert s.counters["strategy_order_rejects_total"] == 1
    assert s.counters["strategy_fills_total"] == 0  # labelled, no child yet: counted nothing
    assert not [k for k in (*s.counters, *s.gauges) if "_created" in k]  # timestamps dropped
    assert "strategy_pnl_usdt" not in s.gauges
    assert s.gauges["strategy_feed_staleness_seconds"] == 0.25
    assert s.gauges['strategy_release_info{fault="none",version="1.0.0"}'] == 1
    h = s.histograms[LATENCY]
    assert h.bounds == [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5]
    assert h.cumulative == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert (h.count, h.sum) == (1, 0.03)


def test_p99_interpolates_inside_its_bucket() -> None:
    m = strategy_metrics()
    for value, times in [(0.005, 50), (0.03, 49), (3.0, 1)]:
        for _ in range(times):
            m.latency.observe(value)
    h = scrape(m).histograms[LATENCY]
    # Rank 99 of 100 falls in (0.025, 0.05], which holds observations 51..99: its top.
    assert histogram_quantile(0.99, h) == pytest.approx(0.05)
    # Rank 75: 25 of that bucket's 49 observations in.
    assert histogram_quantile(0.75, h) == pytest.approx(0.025 + 0.025 * 25 / 49)
    # Rank 50 fills the first bucket exactly; it starts at 0.
    assert histogram_quantile(0.5, h) == pytest.approx(0.01)
    assert histogram_quantile(1.0, h) == pytest.approx(5.0)  # the last finite bound holds rank 100


def test_quantiles_past_the_last_bound_and_without_data() -> None:
    m = strategy_metrics()
    assert histogram_quantile(0.99, scrape(m).histograms[LATENCY]) is None
    m.latency.observe(30.0)
    assert histogram_quantile(0.99, scrape(m).histograms[LATENCY]) == 5.0  # all it can say
    with pytest.raises(ValueError, match="not in"):
        histogram_quantile(0.0, scrape(m).histograms[LATENCY])


def test_a_histogram_with_labels_is_also_summed() -> None:
    text = "\n".join(
        [
            "# TYPE rt histogram",
            *(
                f'rt_bucket{{route="{r}",le="{le}"}} {n}'
                for r, counts in (("a", (1, 2, 2)), ("b", (0, 3, 4)))
                for le, n in zip(("0.1", "1", "+Inf"), counts, strict=True)
            ),
            'rt_count{route="a"} 2',
            'rt_sum{route="a"} 1.1',
            'rt_count{route="b"} 4',
            'rt_sum{route="b"} 6.0',
            "",
        ]
    )
    s = parse_exposition(text)
    assert s.histograms['rt{route="b"}'].cumulative == [0, 3]
    total = s.histograms["rt"]
    assert (total.bounds, total.cumulative, total.count) == ([0.1, 1.0], [1, 5], 6)


def test_not_an_exposition() -> None:
    with pytest.raises(ValueError, match="not a Prometheus text exposition"):
        parse_exposition("hello world")


def test_increase_between_scrapes_and_after_a_restart() -> None:
    m = strategy_metrics()
    for _ in range(2000):
        m.latency.observe(0.005)  # a fast start
    m.orders.labels("BTCUSDT").inc(10)
    first = scrape(m)
    for _ in range(10):
        m.latency.observe(0.7)  # then slow
    m.orders.labels("BTCUSDT").inc(4)
    m.rejects.labels("InvalidOrder").inc(2)  # a series born in the interval
    second = scrape(m)
    inc = increase(first, second)
    assert inc.counters["strategy_orders_placed_total"] == 4
    assert inc.counters["strategy_order_rejects_total"] == 2
    # Over the interval only the slow orders count; since the start they are a tail below p99.
    assert histogram_quantile(0.99, inc.histograms[LATENCY]) == pytest.approx(0.5 + 0.5 * 0.99)
    assert histogram_quantile(0.99, second.histograms[LATENCY]) < 0.01
    restarted = scrape(strategy_metrics())  # a new process: every counter back at zero
    after = increase(second, restarted)
    assert after.counters["strategy_orders_placed_total"] == 0
    assert after.histograms[LATENCY].count == 0


def test_trading_sample_names_the_values_the_judge_reads() -> None:
    m = strategy_metrics()
    empty = scrape(m)
    nothing = trading_sample(empty, empty, elapsed_s=5.0)
    assert nothing.trades == 0
    # No order sent: no fill rate, reject rate or latency (absent, not zero).
    assert set(nothing.values) == {
        TradingMetric.PNL,
        TradingMetric.FEED_STALENESS,
        TradingMetric.ERROR_RATE,
    }
    m.orders.labels("BTCUSDT").inc(8)
    m.rejects.labels("InvalidOrder").inc(2)
    m.fills.labels("BTCUSDT").inc(3)
    m.errors.labels("venue").inc(1)
    m.fill_rate.set(0.375)
    m.pnl.set(-12.5)
    for _ in range(8):
        m.latency.observe(0.04)
    s = trading_sample(empty, scrape(m), elapsed_s=5.0)
    assert s.trades == 3
    assert s.values == {
        TradingMetric.FILL_RATE: 0.375,
        TradingMetric.REJECT_RATE: 0.2,
        TradingMetric.ORDER_LATENCY_P99: pytest.approx(0.025 + 0.025 * (0.99 * 8) / 8),
        TradingMetric.PNL: -12.5,
        TradingMetric.FEED_STALENESS: 0.0,
        TradingMetric.ERROR_RATE: 0.2,
    }
    with pytest.raises(ValueError, match="elapsed_s"):
        trading_sample(empty, empty, elapsed_s=0)


def bake(fault: Fault, intervals: int = 30) -> list[MetricsScrape]:
    """Scrapes of a strategy over a bake: every interval two orders, one fill."""
    m = strategy_metrics(fault)
    scrapes = [scrape(m)]
    for i in range(intervals):
        m.orders.labels("BTCUSDT").inc(2)
        m.fills.labels("BTCUSDT").inc()
        m.fill_rate.set(0.5)
        for k in range(2):
            fast = 0.01 + 0.002 * ((i + k) % 7)
            m.latency.observe(fast + (0.4 if fault == Fault.LATENCY else 0.0))
        scrapes.append(scrape(m))
    return scrapes


def test_scrapes_to_a_verdict() -> None:
    def series(fault: Fault, version: str) -> MetricSeries:
        s = bake(fault)
        return to_series([trading_sample(a, b, elapsed_s=5.0) for a, b in pairwise(s)], version)

    baseline, slow = series(Fault.NONE, "1.0.0"), series(Fault.LATENCY, "1.1.0")
    assert baseline.trades == 30 and baseline.version == "1.0.0"
    assert len(baseline.values[TradingMetric.ORDER_LATENCY_P99]) == 30
    policy = AnalysisPolicy(
        gates=[
            HardGate(metric=TradingMetric.REJECT_RATE, comparator=Comparator.LE, threshold=0.05)
        ],
        metrics=[
            MetricPolicy(
                name=TradingMetric.ORDER_LATENCY_P99,
                direction=Direction.HIGHER_IS_WORSE,
                critical=True,
            ),
            MetricPolicy(name=TradingMetric.FILL_RATE, direction=Direction.LOWER_IS_WORSE),
        ],
    )
    same = judge(policy, baseline, series(Fault.NONE, "1.0.1"))
    assert same.verdict == Verdict.PASS, same.summary
    slow_result = judge(policy, baseline, slow)
    assert slow_result.verdict == Verdict.FAIL, slow_result.summary
    assert [m.verdict for m in slow_result.metrics] == [Verdict.FAIL, Verdict.PASS]
    assert slow_result.metrics[0].relative_effect is not None
    assert slow_result.metrics[0].relative_effect > 5  # 0.4 s on top of ~20 ms


def test_histogram_snapshots_are_validated() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        HistogramSnapshot(bounds=[0.1, 1.0], cumulative=[1.0])
    with pytest.raises(ValueError, match="ascending"):
        HistogramSnapshot(bounds=[1.0, 0.1], cumulative=[1.0, 2.0])
