"""The canary judge on synthetic series with planted differences: regressions are found, equal
versions pass, small shifts inside the band pass, improvements pass, too little data is NODATA,
critical metrics and gates fail the run, a middling score is inconclusive."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.analysis import HL_EXACT_PAIRS, _hodges_lehmann, judge, max_drawdown
from workflows.analysis_models import (
    Aggregate,
    AnalysisPolicy,
    AnalysisResult,
    Comparator,
    Direction,
    HardGate,
    MetricPolicy,
    MetricSeries,
    TradingMetric,
    Verdict,
)

HIGHER = Direction.HIGHER_IS_WORSE
LOWER = Direction.LOWER_IS_WORSE
LATENCY = TradingMetric.ORDER_LATENCY_P99.value
FILL_RATE = TradingMetric.FILL_RATE.value
SEEDS = range(50)


def latencies(rng: np.random.Generator, n: int = 100, scale: float = 1.0) -> list[float]:
    """Order latencies around 50 ms with a long right tail (log-normal, sigma 0.5)."""
    return [float(v) for v in rng.lognormal(np.log(0.05), 0.5, n) * scale]


def fill_rates(rng: np.random.Generator, n: int = 100, scale: float = 1.0) -> list[float]:
    return [float(v) for v in np.clip(rng.normal(0.6, 0.05, n) * scale, 0, 1)]


def series(trades: int = 100, **values: list[float]) -> MetricSeries:
    return MetricSeries(values=values, trades=trades)


def one_metric(
    direction: Direction = HIGHER, name: str = LATENCY, **kw: float | int | bool
) -> AnalysisPolicy:
    return AnalysisPolicy(metrics=[MetricPolicy(name=name, direction=direction, **kw)])  # type: ignore[arg-type]


def verdicts(
    policy: AnalysisPolicy, make: Callable[[np.random.Generator], tuple[MetricSeries, MetricSeries]]
) -> list[Verdict]:
    out = []
    for seed in SEEDS:
        baseline, canary = make(np.random.default_rng(seed))
        out.append(judge(policy, baseline, canary).verdict)
    return out


# --------------------------------------------------------------------------- planted differences


def test_latency_up_40_percent_fails() -> None:
    results = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        b, c = latencies(rng), latencies(rng, scale=1.4)
        results.append(judge(one_metric(), series(**{LATENCY: b}), series(**{LATENCY: c})))
    failed = [r for r in results if r.verdict == Verdict.FAIL]
    assert len(failed) >= 45, f"found the +40 % regression in only {len(failed)} of 50 runs"
    for r in failed:
        m = r.metrics[0]
        assert m.verdict == Verdict.FAIL
        assert m.band_p_value is not None and m.band_p_value < 0.05
        assert m.relative_effect is not None and 0.1 < m.relative_effect < 1.0
        assert "higher on the canary" in r.summary
    # The Hodges-Lehmann shift over the baseline's median estimates the planted +40 %.
    typical = float(np.median([r.metrics[0].relative_effect for r in failed]))
    assert 0.3 < typical < 0.5


def test_equal_versions_pass_and_rarely_fail() -> None:
    def make(rng: np.random.Generator) -> tuple[MetricSeries, MetricSeries]:
        return (
            series(**{LATENCY: latencies(rng), FILL_RATE: fill_rates(rng)}),
            series(**{LATENCY: latencies(rng), FILL_RATE: fill_rates(rng)}),
        )

    policy = AnalysisPolicy(
        metrics=[
            MetricPolicy(name=LATENCY, direction=HIGHER),
            MetricPolicy(name=FILL_RATE, direction=LOWER),
        ]
    )
    got = verdicts(policy, make)
    assert got.count(Verdict.FAIL) <= 5
    assert got.count(Verdict.PASS) >= 45


def test_without_a_band_false_failures_happen_at_about_alpha() -> None:
    # The calibration check: with no band, FAIL is the one-sided test alone, so equal versions
    # fail about alpha of the time. Not never (that judge would be blind), not much more.
    fails = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        b, c = latencies(rng), latencies(rng)
        r = judge(one_metric(tolerance=0.0), series(**{LATENCY: b}), series(**{LATENCY: c}))
        fails += r.verdict == Verdict.FAIL
    assert 3 <= fails <= 20, f"{fails} of 200 equal pairs failed at alpha 0.05"


def test_a_small_shift_inside_the_band_passes() -> None:
    def make(rng: np.random.Generator) -> tuple[MetricSeries, MetricSeries]:
        return series(**{LATENCY: latencies(rng)}), series(**{LATENCY: latencies(rng, scale=1.03)})

    assert set(verdicts(one_metric(tolerance=0.10), make)) == {Verdict.PASS}
    # The same shift without a band is caught now and then: the band is what lets it through.
    assert verdicts(one_metric(tolerance=0.0), make).count(Verdict.FAIL) >= 3


def test_improvements_pass() -> None:
    policy = AnalysisPolicy(
        metrics=[
            MetricPolicy(name=LATENCY, direction=HIGHER),
            MetricPolicy(name=FILL_RATE, direction=LOWER),
        ]
    )
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        baseline = series(**{LATENCY: latencies(rng), FILL_RATE: fill_rates(rng)})
        canary = series(
            **{LATENCY: latencies(rng, scale=0.6), FILL_RATE: fill_rates(rng, scale=1.3)}
        )
        r = judge(policy, baseline, canary)
        assert r.verdict == Verdict.PASS and r.score == 100
        assert all("better on the canary" in m.reason for m in r.metrics)
        assert all(m.p_value is not None and m.p_value > 0.5 for m in r.metrics)


def test_a_lower_is_worse_metric_fails_when_it_drops() -> None:
    def make(rng: np.random.Generator) -> tuple[MetricSeries, MetricSeries]:
        b, c = fill_rates(rng), fill_rates(rng, scale=0.7)
        return series(**{FILL_RATE: b}), series(**{FILL_RATE: c})

    assert set(verdicts(one_metric(LOWER, name=FILL_RATE), make)) == {Verdict.FAIL}
    # Judged as higher-is-worse, the same drop is an improvement.
    assert set(verdicts(one_metric(HIGHER, name=FILL_RATE), make)) == {Verdict.PASS}


# --------------------------------------------------------------------------- too little data


def test_below_min_samples_is_nodata() -> None:
    rng = np.random.default_rng(7)
    policy = one_metric(min_samples=20)
    for n_baseline, n_canary in [(19, 100), (100, 19), (0, 0)]:
        baseline = series(**{LATENCY: latencies(rng, n_baseline)})
        canary = series(**{LATENCY: latencies(rng, n_canary, scale=3.0)})  # even a regression
        r = judge(policy, baseline, canary)
        assert r.verdict == Verdict.NODATA and r.score is None
        m = r.metrics[0]
        assert m.verdict == Verdict.NODATA and m.p_value is None
        assert (m.n_baseline, m.n_canary) == (n_baseline, n_canary)
        assert "20 needed" in m.reason
    # Exactly min_samples is enough.
    r = judge(
        policy, series(**{LATENCY: latencies(rng, 20)}), series(**{LATENCY: latencies(rng, 20)})
    )
    assert r.metrics[0].verdict == Verdict.PASS


def test_a_metric_missing_from_a_version_is_nodata() -> None:
    rng = np.random.default_rng(1)
    r = judge(one_metric(), series(**{LATENCY: latencies(rng)}), series())
    assert r.verdict == Verdict.NODATA
    assert r.metrics[0].n_canary == 0


def test_too_few_trades_is_nodata_even_when_metrics_look_fine() -> None:
    rng = np.random.default_rng(2)
    policy = AnalysisPolicy(metrics=[MetricPolicy(name=LATENCY, direction=HIGHER)], min_trades=10)
    baseline = series(trades=50, **{LATENCY: latencies(rng)})
    canary = series(trades=9, **{LATENCY: latencies(rng)})
    r = judge(policy, baseline, canary)
    assert r.verdict == Verdict.NODATA
    assert "9 canary trades, 10 needed" in r.summary
    r = judge(policy, baseline, canary.model_copy(update={"trades": 10}))
    assert r.verdict == Verdict.PASS


def test_nodata_metrics_do_not_count_toward_the_score() -> None:
    rng = np.random.default_rng(3)
    policy = AnalysisPolicy(
        metrics=[
            MetricPolicy(name=LATENCY, direction=HIGHER),
            MetricPolicy(name=FILL_RATE, direction=LOWER),
        ]
    )
    r = judge(policy, series(**{LATENCY: latencies(rng)}), series(**{LATENCY: latencies(rng)}))
    assert [m.verdict for m in r.metrics] == [Verdict.PASS, Verdict.NODATA]
    assert r.verdict == Verdict.PASS and r.score == 100


# --------------------------------------------------------------------------- critical, gates, score


def five_metrics(critical: bool) -> AnalysisPolicy:
    return AnalysisPolicy(
        metrics=[
            MetricPolicy(name=LATENCY, direction=HIGHER, critical=critical),
            *(MetricPolicy(name=f"m{i}", direction=HIGHER) for i in range(4)),
        ]
    )


def five_series(rng: np.random.Generator, latency_scale: float) -> MetricSeries:
    others = {f"m{i}": latencies(rng) for i in range(4)}
    return series(**{LATENCY: latencies(rng, scale=latency_scale)}, **others)


def test_a_failing_critical_metric_fails_the_run_whatever_the_score() -> None:
    rng = np.random.default_rng(11)
    baseline, canary = five_series(rng, 1.0), five_series(rng, 2.0)
    r = judge(five_metrics(critical=True), baseline, canary)
    assert r.verdict == Verdict.FAIL
    assert r.score == 80  # four of five pass: the score alone would have passed
    assert [m.verdict for m in r.metrics] == [Verdict.FAIL] + [Verdict.PASS] * 4
    assert r.summary.startswith("FAIL") and f"critical {LATENCY}" in r.summary
    # The same failure on a metric that is not critical leaves the score in charge.
    r = judge(five_metrics(critical=False), baseline, canary)
    assert r.verdict == Verdict.PASS and r.score == 80


def test_a_critical_metric_without_data_keeps_a_pass_inconclusive() -> None:
    rng = np.random.default_rng(12)
    baseline, canary = five_series(rng, 1.0), five_series(rng, 1.0)
    without = canary.model_copy(
        update={"values": {k: v for k, v in canary.values.items() if k != LATENCY}}
    )
    r = judge(five_metrics(critical=True), baseline, without)
    assert r.verdict == Verdict.INCONCLUSIVE and r.score == 100
    assert f"critical metric {LATENCY}" in r.summary
    assert judge(five_metrics(critical=False), baseline, without).verdict == Verdict.PASS


REJECT_GATE = HardGate(metric="reject_rate", comparator=Comparator.LE, threshold=0.05)


def test_a_violated_gate_fails_while_every_metric_passes() -> None:
    rng = np.random.default_rng(13)
    policy = AnalysisPolicy(
        gates=[REJECT_GATE], metrics=[MetricPolicy(name=LATENCY, direction=HIGHER)]
    )
    rejects = [0.01] * 30
    baseline = series(**{LATENCY: latencies(rng), "reject_rate": rejects})
    spiked = series(**{LATENCY: latencies(rng), "reject_rate": [*rejects[:-1], 0.3]})
    r = judge(policy, baseline, spiked)
    assert r.verdict == Verdict.FAIL and r.score == 100
    assert r.gates[0].verdict == Verdict.FAIL and r.gates[0].value == 0.3
    assert "gate reject_rate <= 0.05 violated" in r.summary
    held = judge(policy, baseline, series(**{LATENCY: latencies(rng), "reject_rate": rejects}))
    assert held.verdict == Verdict.PASS and held.gates[0].verdict == Verdict.PASS


def test_a_reject_storm_fails_on_its_gate_not_nodata() -> None:
    # Every order rejected: no fills and no latency samples, but the gate sees the rejects.
    rng = np.random.default_rng(14)
    policy = AnalysisPolicy(
        gates=[REJECT_GATE], metrics=[MetricPolicy(name=LATENCY, direction=HIGHER)], min_trades=5
    )
    baseline = series(trades=40, **{LATENCY: latencies(rng), "reject_rate": [0.0] * 30})
    canary = series(trades=0, reject_rate=[1.0] * 30)
    r = judge(policy, baseline, canary)
    assert r.verdict == Verdict.FAIL
    assert r.metrics[0].verdict == Verdict.NODATA


def test_a_gate_without_canary_data_keeps_a_pass_inconclusive() -> None:
    rng = np.random.default_rng(15)
    policy = AnalysisPolicy(
        gates=[REJECT_GATE], metrics=[MetricPolicy(name=LATENCY, direction=HIGHER)]
    )
    r = judge(policy, series(**{LATENCY: latencies(rng)}), series(**{LATENCY: latencies(rng)}))
    assert r.gates[0].verdict == Verdict.NODATA
    assert r.verdict == Verdict.INCONCLUSIVE and "gate reject_rate" in r.summary


def test_gates_only_policy() -> None:
    policy = AnalysisPolicy(gates=[REJECT_GATE])
    assert judge(policy, series(), series(reject_rate=[0.01])).verdict == Verdict.PASS
    assert judge(policy, series(), series(reject_rate=[0.06])).verdict == Verdict.FAIL
    assert judge(policy, series(), series()).verdict == Verdict.NODATA


@pytest.mark.parametrize(
    ("comparator", "aggregate", "threshold", "verdict", "value"),
    [
        (Comparator.LE, Aggregate.WORST, 0.5, Verdict.FAIL, 0.9),  # worst of "<=" is the max
        (Comparator.GE, Aggregate.WORST, 0.2, Verdict.FAIL, 0.1),  # worst of ">=" is the min
        (Comparator.LE, Aggregate.MEDIAN, 0.5, Verdict.PASS, 0.4),
        (Comparator.LT, Aggregate.MEAN, 0.45, Verdict.FAIL, 0.46),
        (Comparator.GT, Aggregate.LAST, 0.3, Verdict.PASS, 0.4),
        (Comparator.LE, Aggregate.MIN, 0.1, Verdict.PASS, 0.1),
        (Comparator.LE, Aggregate.MAX, 0.9, Verdict.PASS, 0.9),
        (Comparator.LE, Aggregate.DRAWDOWN, 0.4, Verdict.FAIL, 0.5),  # 0.9 down to 0.4,
    ],
)
def test_gate_aggregates(
    comparator: Comparator, aggregate: Aggregate, threshold: float, verdict: Verdict, value: float
) -> None:
    gate = HardGate(metric="x", comparator=comparator, threshold=threshold, aggregate=aggregate)
    r = judge(AnalysisPolicy(gates=[gate]), series(), series(x=[0.1, 0.9, 0.4, 0.5, 0.4]))
    assert r.gates[0].verdict == verdict
    assert r.gates[0].value == pytest.approx(value)


def test_max_drawdown() -> None:
    assert max_drawdown([]) == 0.0
    assert max_drawdown([1, 2, 3]) == 0.0
    assert max_drawdown([10, 4, 12, 9, 3, 11]) == 9.0  # the fall from 12 to 3
    assert max_drawdown([-5, -8, -2, -7]) == 5.0


def four_metrics() -> AnalysisPolicy:
    return AnalysisPolicy(
        metrics=[MetricPolicy(name=n, direction=HIGHER) for n in ("a", "b", "c", "d")]
    )


@pytest.mark.parametrize(
    ("regressed", "verdict", "score"),
    [
        (0, Verdict.PASS, 100.0),
        (1, Verdict.PASS, 75.0),  # exactly the pass score passes
        (2, Verdict.INCONCLUSIVE, 50.0),  # exactly the marginal score is not yet a failure
        (3, Verdict.FAIL, 25.0),
        (4, Verdict.FAIL, 0.0),
    ],
)
def test_the_score_decides_between_the_thresholds(
    regressed: int, verdict: Verdict, score: float
) -> None:
    rng = np.random.default_rng(21)
    names = ("a", "b", "c", "d")
    baseline = series(**{n: latencies(rng) for n in names})
    canary = series(
        **{n: latencies(rng, scale=2.0 if i < regressed else 1.0) for i, n in enumerate(names)}
    )
    r = judge(four_metrics(), baseline, canary)
    assert (r.verdict, r.score) == (verdict, score)
    assert sum(m.verdict == Verdict.FAIL for m in r.metrics) == regressed


def test_a_mid_score_is_inconclusive() -> None:
    rng = np.random.default_rng(22)
    policy = AnalysisPolicy(
        metrics=[MetricPolicy(name=n, direction=HIGHER) for n in ("a", "b", "c")]
    )
    baseline = series(a=latencies(rng), b=latencies(rng), c=latencies(rng))
    canary = series(a=latencies(rng, scale=2.0), b=latencies(rng), c=latencies(rng))
    r = judge(policy, baseline, canary)
    assert r.verdict == Verdict.INCONCLUSIVE and r.score == pytest.approx(66.67)
    assert r.summary.startswith("INCONCLUSIVE (score 66.67) between 50 and 75: a higher")


def test_weights_share_the_score() -> None:
    rng = np.random.default_rng(23)
    policy = AnalysisPolicy(
        metrics=[
            MetricPolicy(name="a", direction=HIGHER, weight=3),
            MetricPolicy(name="b", direction=HIGHER, weight=1),
        ]
    )
    baseline = series(a=latencies(rng), b=latencies(rng))
    r = judge(policy, baseline, series(a=latencies(rng), b=latencies(rng, scale=2.0)))
    assert (r.verdict, r.score) == (Verdict.PASS, 75.0)
    r = judge(policy, baseline, series(a=latencies(rng, scale=2.0), b=latencies(rng)))
    assert (r.verdict, r.score) == (Verdict.FAIL, 25.0)


# --------------------------------------------------------------------------- awkward input


@pytest.mark.filterwarnings("error")  # no scipy or numpy warning may escape
def test_constant_and_identical_series() -> None:
    same = judge(one_metric(), series(**{LATENCY: [0.05] * 30}), series(**{LATENCY: [0.05] * 30}))
    assert same.verdict == Verdict.PASS
    assert (same.metrics[0].p_value, same.metrics[0].effect) == (1.0, 0.0)
    # Errors: none on the baseline, five a sample on the canary. The baseline's median is 0, so
    # the relative band is empty: only abs_tolerance could let this through.
    zero, five = series(errors=[0.0] * 30), series(errors=[5.0] * 30)
    r = judge(one_metric(name="errors"), zero, five)
    assert r.verdict == Verdict.FAIL
    assert r.metrics[0].relative_effect is None and r.metrics[0].effect == 5.0
    assert judge(one_metric(name="errors", abs_tolerance=10), zero, five).verdict == Verdict.PASS
    assert judge(one_metric(name="errors"), five, zero).verdict == Verdict.PASS


@pytest.mark.filterwarnings("error")
def test_heavily_tied_counts() -> None:
    fails = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        b, c = rng.poisson(0.3, 60).tolist(), rng.poisson(0.3, 60).tolist()
        r = judge(one_metric(name="errors"), series(errors=b), series(errors=c))
        assert r.metrics[0].p_value is not None and 0 <= r.metrics[0].p_value <= 1
        fails += r.verdict == Verdict.FAIL
    assert fails <= 5


def test_small_samples_use_the_exact_test() -> None:
    # Five a side, every canary sample above every baseline one: the exact one-sided p is
    # 1 / C(10, 5) = 1/252.
    r = judge(
        one_metric(name="x", min_samples=5),
        series(x=[1.0, 2, 3, 4, 5]),
        series(x=[11.0, 12, 13, 14, 15]),
    )
    m = r.metrics[0]
    assert m.p_value == pytest.approx(1 / 252)
    assert m.u_statistic == 25.0 and m.effect == 10.0
    assert r.verdict == Verdict.FAIL


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e16])
def test_non_finite_samples_are_refused(bad: float) -> None:
    with pytest.raises(ValidationError, match=LATENCY):
        MetricSeries(values={LATENCY: [0.1, bad]})


def test_the_judge_refuses_unvalidated_nan() -> None:
    smuggled = MetricSeries.model_construct(values={LATENCY: [0.1] * 30 + [float("nan")]})
    with pytest.raises(ValueError, match=r"canary metric 'order_latency_p99_s' has a non-finite"):
        judge(one_metric(), series(**{LATENCY: [0.1] * 31}), smuggled)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one gate or metric"),
        (
            {"metrics": [{"name": "a", "direction": HIGHER}, {"name": "a", "direction": LOWER}]},
            "named twice",
        ),
        (
            {"metrics": [{"name": "a", "direction": HIGHER}], "pass_score": 40},
            "marginal_score 50 is above pass_score 40",
        ),
        (
            {"metrics": [{"name": "a", "direction": HIGHER, "min_samples": 2}]},
            "can never reach significance",
        ),
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AnalysisPolicy.model_validate(kwargs)


def test_large_samples_use_a_close_hodges_lehmann_estimate() -> None:
    rng = np.random.default_rng(31)
    b, c = latencies(rng, 2500), latencies(rng, 2500, scale=1.2)
    assert len(b) * len(c) > HL_EXACT_PAIRS  # the compressed path
    exact = float(np.median(np.subtract.outer(np.array(c), np.array(b))))
    approx = _hodges_lehmann(b, c)
    assert approx == pytest.approx(exact, rel=0.01)
    r = judge(one_metric(), series(**{LATENCY: b}), series(**{LATENCY: c}))
    assert r.verdict == Verdict.FAIL


# --------------------------------------------------------------------------- histories


def test_the_result_round_trips_through_temporal_and_is_deterministic() -> None:
    rng = np.random.default_rng(41)
    policy = AnalysisPolicy(
        gates=[REJECT_GATE],
        metrics=[
            MetricPolicy(name=LATENCY, direction=HIGHER, critical=True),
            MetricPolicy(name=FILL_RATE, direction=LOWER),
            MetricPolicy(name="errors", direction=HIGHER),
        ],
    )
    baseline = series(**{LATENCY: latencies(rng), FILL_RATE: fill_rates(rng), "errors": [0.0]})
    canary = series(
        **{LATENCY: latencies(rng, scale=1.5), FILL_RATE: fill_rates(rng), "reject_rate": [0.0]}
    )
    result = judge(policy, baseline, canary)
    assert result == judge(policy, baseline, canary)
    converter = pydantic_data_converter.payload_converter
    for value, kind in [(result, AnalysisResult), (policy, AnalysisPolicy), (canary, MetricSeries)]:
        payloads = converter.to_payloads([value])
        raw = payloads[0].data.decode()
        # JSON has no NaN or infinity: pydantic would write null, which decodes differently.
        assert "NaN" not in raw and "Infinity" not in raw
        assert converter.from_payloads(payloads, [kind]) == [value]


@pytest.mark.servers  # a fresh interpreter: a process
def test_the_models_import_without_scipy_or_numpy() -> None:
    # workflows/ runs inside Temporal's sandbox: its models must not drag the statistics in.
    code = (
        "import sys, workflows.analysis_models; "
        "assert not {'scipy', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# --------------------------------------------------------------------------- properties

samples = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=5, max_size=40
)


@settings(max_examples=150, deadline=None, database=None)
@given(x=samples, direction=st.sampled_from(list(Direction)), tolerance=st.sampled_from([0, 0.1]))
def test_a_version_judged_against_itself_never_fails(
    x: list[float], direction: Direction, tolerance: float
) -> None:
    policy = one_metric(direction, name="x", tolerance=tolerance, min_samples=5)
    r = judge(policy, series(x=x), series(x=x))
    assert r.verdict == Verdict.PASS


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.data(), direction=st.sampled_from(list(Direction)))
def test_the_verdict_does_not_depend_on_sample_order(
    data: st.DataObject, direction: Direction
) -> None:
    b, c = data.draw(samples), data.draw(samples)
    policy = one_metric(direction, name="x", min_samples=5, tolerance=0)
    before = judge(policy, series(x=b), series(x=c))
    b2, c2 = data.draw(st.permutations(b)), data.draw(st.permutations(c))
    after = judge(policy, series(x=b2), series(x=c2))
    assert after.verdict == before.verdict
    assert after.metrics[0].p_value == before.metrics[0].p_value
    assert after.metrics[0].effect == before.metrics[0].effect


@settings(max_examples=100, deadline=None, database=None)
@given(x=samples, tolerance=st.sampled_from([0, 0.1, 0.5]))
def test_a_canary_wholly_beyond_the_band_fails(x: list[float], tolerance: float) -> None:
    median = float(np.median(x))
    beyond = (max(x) - min(x)) + tolerance * abs(median) + 1.0
    policy = one_metric(name="x", tolerance=tolerance, min_samples=5)
    r = judge(policy, series(x=x), series(x=[v + beyond for v in x]))
    assert r.verdict == Verdict.FAIL, r.summary
    # Mirrored for a metric where lower is worse.
    policy = one_metric(LOWER, name="x", tolerance=tolerance, min_samples=5)
    assert judge(policy, series(x=x), series(x=[v - beyond for v in x])).verdict == Verdict.FAIL
