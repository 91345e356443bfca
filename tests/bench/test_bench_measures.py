"""The benchmarks' own arithmetic (fast tier: no servers): what counts as the first cancel, how
overlapping venue time is counted, idle time per kill, the RTT-bound floor."""

from __future__ import annotations

from bench.first_cancel import _covered, first_cancels_per_key
from bench.fleet import book_for, per_kill_steps
from bench.kill_switch import PROTOCOL_RTTS, rtt_floor_s
from sandbox.admin_models import RequestRecord


def record(
    method: str, path: str, arrived: float, answered: float, key: str, status: int = 200
) -> RequestRecord:
    return RequestRecord(
        arrived=arrived, answered=answered, method=method, path=path, status=status, api_key=key
    )


def test_first_cancel_per_account_is_the_earliest_applied_cancel_not_a_read_or_a_refusal() -> None:
    go = 100.0
    journal = [
        record("GET", "/fapi/v1/openOrders", 100.01, 100.03, "a"),
        record("POST", "/fapi/v1/countdownCancelAll", 100.02, 100.04, "a"),
        record("DELETE", "/fapi/v1/allOpenOrders", 100.05, 100.07, "a", status=503),
        record("DELETE", "/fapi/v1/allOpenOrders", 100.06, 100.09, "a"),
        record("DELETE", "/fapi/v1/allOpenOrders", 100.06, 100.08, "a"),
        record("DELETE", "/fapi/v1/algoOpenOrders", 100.10, 100.12, "b"),
    ]
    firsts = first_cancels_per_key(journal, go)
    assert round(firsts["a"]) == 80 and round(firsts["b"]) == 120


def test_concurrent_venue_time_is_counted_once() -> None:
    assert _covered([(0.0, 1.0), (0.5, 1.5), (3.0, 4.0)]) == 2.5
    assert _covered([]) == 0


def test_idle_is_the_time_none_of_a_kills_activities_ran() -> None:
    go = 10.0
    marks = [
        ("cancel_all", "x", 10.1, 10.3),
        ("halt_account", "x", 10.2, 10.6),  # beside the cancel: no idle between them
        ("flatten", "x", 10.7, 10.8),
        ("cancel_all", "y", 10.0, 10.5),
    ]
    steps = per_kill_steps(marks, go)
    # x: idle 0.1 (go -> cancel) + 0.1 (halt end -> flatten) = 0.2; y: 0; median 0.1
    assert round(steps["idle"], 6) == 0.1
    assert round(steps["cancel_all"], 6) == 0.35


def test_rtt_bound_floor_counts_the_sequential_round_trips() -> None:
    assert sum(n for _, n in PROTOCOL_RTTS) == 5
    assert rtt_floor_s() == 0.1


def test_fleet_book_is_per_account() -> None:
    assert book_for(100)["open_orders"] == 2000 and book_for(100)["symbols"] == 5
