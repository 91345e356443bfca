"""The canary judge: hard gates on the canary plus a Mann-Whitney comparison with the baseline.

``judge`` is pure and deterministic (same inputs, same result, no I/O, no clock); the activity
that samples both versions' /metrics calls it and returns its ``AnalysisResult`` to the workflow.
With a gates-only policy (no metrics, ``min_trades`` 0) and an empty baseline it judges the hard
gates alone: post-promotion monitoring, when the old version no longer trades.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from workflows.analysis_models import (
    Aggregate,
    AnalysisPolicy,
    AnalysisResult,
    Comparator,
    Direction,
    GateResult,
    HardGate,
    MetricPolicy,
    MetricResult,
    MetricSeries,
    Verdict,
)

HL_EXACT_PAIRS = 4_000_000
"""Above this many (canary, baseline) pairs the Hodges-Lehmann shift is computed on evenly spaced
order statistics of each side instead of every pair (32 MB of differences at most)."""
HL_POINTS = 2000


def judge(policy: AnalysisPolicy, baseline: MetricSeries, canary: MetricSeries) -> AnalysisResult:
    """Judge the canary against the baseline under ``policy``.

    Precedence: a violated gate or a failed critical metric is FAIL (even with too few trades:
    a reject storm has no fills, and that must not read as "no data"); then too few trades, or no
    metric with data, is NODATA; then the score decides (>= pass_score PASS, < marginal_score
    FAIL, else INCONCLUSIVE), and a PASS is held at INCONCLUSIVE while a gate or a critical
    metric had no data. Raises ``ValueError`` on a non-finite sample.
    """
    _check_finite(baseline, "baseline")
    _check_finite(canary, "canary")
    gates = [_check_gate(g, canary) for g in policy.gates]
    metrics = [_compare(m, baseline, canary, policy.alpha) for m in policy.metrics]
    verdict, score, summary = _decide(policy, gates, metrics, baseline.trades, canary.trades)
    return AnalysisResult(
        verdict=verdict,
        summary=summary,
        score=score,
        metrics=metrics,
        gates=gates,
        baseline_trades=baseline.trades,
        canary_trades=canary.trades,
        baseline_version=baseline.version,
        canary_version=canary.version,
    )


def max_drawdown(levels: Sequence[float]) -> float:
    """Largest fall from a running peak to a later value (0 for a series that never falls)."""
    peak, worst = -math.inf, 0.0
    for v in levels:
        peak = max(peak, v)
        worst = max(worst, peak - v)
    return worst


# --------------------------------------------------------------------------- gates


def _aggregate(gate: HardGate, values: list[float]) -> float:
    match gate.aggregate:
        case Aggregate.WORST:
            below = gate.comparator in (Comparator.LT, Comparator.LE)
            return max(values) if below else min(values)
        case Aggregate.MEAN:
            return statistics.fmean(values)
        case Aggregate.MEDIAN:
            return statistics.median(values)
        case Aggregate.MAX:
            return max(values)
        case Aggregate.MIN:
            return min(values)
        case Aggregate.LAST:
            return values[-1]
        case Aggregate.DRAWDOWN:
            return max_drawdown(values)


def _check_gate(gate: HardGate, canary: MetricSeries) -> GateResult:
    values = canary.values.get(gate.metric, [])
    # Named by version: monitoring after promotion judges the same gates on a version that is
    # no longer a canary.
    who = canary.version or "canary"
    common = {
        "metric": gate.metric,
        "comparator": gate.comparator,
        "threshold": gate.threshold,
        "aggregate": gate.aggregate,
        "n_canary": len(values),
    }
    if len(values) < gate.min_samples:
        return GateResult(
            **common,
            verdict=Verdict.NODATA,
            reason=f"gate {gate}: {len(values)} samples of {who}, {gate.min_samples} needed",
        )
    value = float(_aggregate(gate, values))
    if gate.comparator.holds(value, gate.threshold):
        return GateResult(
            **common, verdict=Verdict.PASS, value=value, reason=f"gate {gate} holds ({value:.4g})"
        )
    return GateResult(
        **common,
        verdict=Verdict.FAIL,
        value=value,
        reason=f"gate {gate} violated: {who} {gate.aggregate.value} is {value:.4g}",
    )


# --------------------------------------------------------------------------- comparisons


def _compare(
    policy: MetricPolicy, baseline: MetricSeries, canary: MetricSeries, alpha: float
) -> MetricResult:
    b = baseline.values.get(policy.name, [])
    c = canary.values.get(policy.name, [])
    common = {
        "name": policy.name,
        "critical": policy.critical,
        "direction": policy.direction,
        "n_baseline": len(b),
        "n_canary": len(c),
    }
    if len(b) < policy.min_samples or len(c) < policy.min_samples:
        return MetricResult(
            **common,
            verdict=Verdict.NODATA,
            reason=f"{policy.name}: {len(b)} baseline and {len(c)} canary samples, "
            f"{policy.min_samples} needed on each side",
        )
    b_med, c_med = float(statistics.median(b)), float(statistics.median(c))
    allowed = max(policy.tolerance * abs(b_med), policy.abs_tolerance)
    common |= {"baseline_median": b_med, "canary_median": c_med, "allowed_shift": allowed}
    if min(b) == max(b) == min(c) == max(c):
        # Every sample equal: nothing to rank (older scipy answers NaN with a warning here).
        return MetricResult(
            **common,
            verdict=Verdict.PASS,
            p_value=1.0,
            band_p_value=1.0,
            u_statistic=len(b) * len(c) / 2,
            effect=0.0,
            relative_effect=0.0 if b_med != 0 else None,
            reason=f"{policy.name}: every sample is {b_med:.4g} on both versions",
        )

    # Both tests are one-sided, in the worse direction. The judge acts only on regressions: a
    # two-sided test would spend half of alpha on improvements (which pass anyway), so it would
    # claim a false-failure rate it does not have and lose power against real regressions.
    #
    # p_value: is the canary worse at all (H0: no shift)? band_p_value: is it worse by more than
    # the band (H0: shift <= allowed, tested by moving the canary back by the band)? FAIL needs
    # the second below alpha: "significantly outside the band", not "significant, and a noisy
    # point estimate happens to land outside it" (which fails equal versions whenever the band
    # is narrower than the estimate's noise). A FAIL also needs p_value below alpha and the
    # Hodges-Lehmann shift outside the band, so it always reads as a significant regression.
    higher_is_worse = policy.direction == Direction.HIGHER_IS_WORSE
    alternative = "greater" if higher_is_worse else "less"
    moved_back = [v - allowed for v in c] if higher_is_worse else [v + allowed for v in c]
    # method="auto": exact for small samples without ties, else normal with tie correction.
    test = mannwhitneyu(c, b, alternative=alternative, method="auto", nan_policy="raise")
    band_test = mannwhitneyu(moved_back, b, alternative=alternative, method="auto")
    p, u, p_band = float(test.pvalue), float(test.statistic), float(band_test.pvalue)
    shift = _hodges_lehmann(b, c)
    relative = shift / abs(b_med) if b_med != 0 else None
    if relative is not None and not math.isfinite(relative):
        relative = None
    common |= {
        "p_value": p,
        "band_p_value": p_band,
        "u_statistic": u,
        "effect": shift,
        "relative_effect": relative,
    }

    worse_by = shift if higher_is_worse else -shift
    change = _describe_change(shift, relative)
    band = _describe_band(policy, allowed)
    if p < alpha and p_band < alpha and worse_by > allowed:
        word = "higher" if higher_is_worse else "lower"
        return MetricResult(
            **common,
            verdict=Verdict.FAIL,
            reason=f"{policy.name} {word} on the canary: {change}, outside {band} "
            f"(p={p:.2g}, beyond the band p={p_band:.2g})",
        )
    if p < alpha and worse_by > 0:
        reason = f"{policy.name} worse by {change}, not significantly beyond {band} (p={p:.2g})"
    elif worse_by < 0:
        reason = f"{policy.name} better on the canary: {change}"
    else:
        reason = f"{policy.name}: no significant regression ({change}, p={p:.2g})"
    return MetricResult(**common, verdict=Verdict.PASS, reason=reason)


def _hodges_lehmann(baseline: list[float], canary: list[float]) -> float:
    """Median of every canary-minus-baseline difference: the shift the rank test is about."""
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(canary, dtype=np.float64)
    if b.size * c.size > HL_EXACT_PAIRS:
        # Deterministic compression: order statistics at evenly spaced ranks keep the shape of
        # each distribution, so the median of the differences moves by far less than the band.
        grid = np.linspace(0.0, 1.0, HL_POINTS)
        b, c = np.quantile(b, grid), np.quantile(c, grid)
    return float(np.median(np.subtract.outer(c, b)))


def _describe_change(shift: float, relative: float | None) -> str:
    if relative is None:
        return f"{shift:+.4g}"
    return f"{shift:+.4g} ({relative:+.1%})"


def _describe_band(policy: MetricPolicy, allowed: float) -> str:
    if allowed == policy.abs_tolerance:
        return f"the band of {allowed:.4g}"
    return f"the {policy.tolerance:.0%} band ({allowed:.4g})"


# --------------------------------------------------------------------------- the verdict


def _decide(
    policy: AnalysisPolicy,
    gates: list[GateResult],
    metrics: list[MetricResult],
    baseline_trades: int,
    canary_trades: int,
) -> tuple[Verdict, float | None, str]:
    failed_gates = [g for g in gates if g.verdict == Verdict.FAIL]
    failed_critical = [m for m in metrics if m.critical and m.verdict == Verdict.FAIL]
    scored = [m for m in metrics if m.verdict != Verdict.NODATA]
    weights = {m.name: m.weight for m in policy.metrics}
    total = sum(weights[m.name] for m in scored)
    passed = sum(weights[m.name] for m in scored if m.verdict == Verdict.PASS)
    score = round(100 * passed / total, 2) if scored else None
    score_text = "" if score is None else f" (score {score:g})"

    if failed_gates or failed_critical:
        why = [g.reason for g in failed_gates] + [f"critical {m.reason}" for m in failed_critical]
        return Verdict.FAIL, score, f"FAIL{score_text}: " + "; ".join(why)

    fewest = min(baseline_trades, canary_trades)
    if fewest < policy.min_trades:
        return (
            Verdict.NODATA,
            score,
            f"NODATA: {baseline_trades} baseline and {canary_trades} canary trades, "
            f"{policy.min_trades} needed on each",
        )
    gates_without_data = [g for g in gates if g.verdict == Verdict.NODATA]
    if policy.metrics and not scored:
        return Verdict.NODATA, None, "NODATA: no metric has enough samples on both versions"
    if not policy.metrics and len(gates_without_data) == len(gates):
        return Verdict.NODATA, None, "NODATA: no gate has samples"

    failed = [m for m in metrics if m.verdict == Verdict.FAIL]
    failed_text = "; ".join(m.reason for m in failed)
    if score is not None and score < policy.marginal_score:
        return (
            Verdict.FAIL,
            score,
            f"FAIL{score_text} below {policy.marginal_score:g}: {failed_text}",
        )
    if score is not None and score < policy.pass_score:
        return (
            Verdict.INCONCLUSIVE,
            score,
            f"INCONCLUSIVE{score_text} between {policy.marginal_score:g} and "
            f"{policy.pass_score:g}: {failed_text}",
        )
    missing = [f"gate {g.metric}" for g in gates_without_data] + [
        f"critical metric {m.name}" for m in metrics if m.critical and m.verdict == Verdict.NODATA
    ]
    if missing:
        return (
            Verdict.INCONCLUSIVE,
            score,
            f"INCONCLUSIVE{score_text}: no data for {', '.join(missing)}",
        )
    held = f"{sum(1 for g in gates if g.verdict == Verdict.PASS)} gates hold"
    if not policy.metrics:  # gates alone (post-promotion monitoring)
        return Verdict.PASS, score, f"PASS: {held}"
    counted = f"{sum(1 for m in scored if m.verdict == Verdict.PASS)}/{len(scored)} metrics pass"
    tail = f"; {failed_text}" if failed_text else ""
    return Verdict.PASS, score, f"PASS{score_text}: {counted}, {held}{tail}"


def _check_finite(series: MetricSeries, role: str) -> None:
    # The model refuses NaN and infinity already; this catches a series built without
    # validation (model_construct) before scipy turns it into a silent NaN p-value.
    for name, values in series.values.items():
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise ValueError(f"{role} metric {name!r} has a non-finite sample {v} at {i}")
