"""The kill report as the operator reads it (fast tier: no servers): unknown is shown as unknown,
never as zero or flat; the dead-man's state, each account's failed or partial steps, the books
the venue refused and why a chain gave up are all on screen; time-to-flat is from the request,
with the queue wait beside it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from rich.console import Console

from worker.render import accounts_progress, report_view
from workflows.shared import (
    AccountReport,
    AccountState,
    BookFailure,
    DeadManReport,
    DeadManState,
    KillJoin,
    KillOutcome,
    KillReport,
    KillScope,
    Position,
    PositionKind,
    Step,
    StepState,
    StepStatus,
)

T0 = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)


def text_of(report: KillReport) -> str:
    console = Console(width=240, record=True, color_system=None)
    console.print(report_view(report))
    return console.export_text()


def row(text: str, account: str) -> str:
    return next(line for line in text.splitlines() if line.strip("│┃ ").startswith(account))


def report(*accounts: AccountReport, **fields: object) -> KillReport:
    base: dict[str, object] = {
        "workflow_id": "kill/a+b",
        "reason": "reject storm",
        "requested_by": "alice",
        "scope": KillScope.FLATTEN,
        "outcome": KillOutcome.UNVERIFIED,
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=5),
        "accounts": list(accounts),
    }
    return KillReport.model_validate({**base, **fields})


def test_an_unread_account_is_unknown_never_zero_or_flat() -> None:
    unread = AccountReport(
        account="beta-futures",
        state=AccountState.UNKNOWN,
        errors=["cancel_all: AuthFailed: invalid signature"],
        gave_up="the venue refused our credentials (AuthFailed): nothing could be read",
        dead_man=DeadManReport(state=DeadManState.NOT_ARMED, failed={"*": "AuthFailed"}),
    )
    text = text_of(report(unread))
    line = row(text, "beta-futures")
    assert line.count("unknown") == 5, line  # state, cancelled, open, positions, after
    assert "0/0" not in line and "flat" not in line and " 0 " not in line, line
    assert "not-armed" in line
    assert "beta-futures: gave up: the venue refused our credentials" in text
    assert "beta-futures: dead-man not armed on *: AuthFailed" in text
    assert "AuthFailed: invalid signature" in text


def test_partial_steps_refused_books_and_dead_man_left_armed_are_shown() -> None:
    position = Position(symbol="BTCUSDT", kind=PositionKind.DERIVATIVE, quantity=Decimal("0.5"))
    partial = AccountReport(
        account="alpha-futures",
        state=AccountState.UNVERIFIED,
        orders_found=12,
        orders_cancelled=11,
        orders_still_open=1,
        positions_before=[position],
        positions_after=[],
        steps=[
            StepStatus(step=Step.HALT, state=StepState.DONE, detail="partial: 1 of 3 refused"),
            StepStatus(step=Step.CANCEL_ALL, state=StepState.FAILED, detail="openAlgoOrders: 400"),
            StepStatus(step=Step.FLATTEN, state=StepState.DONE),
        ],
        failures=[
            BookFailure(symbol=None, conditional=True, action="list", error="VenueError: HTTP 400")
        ],
        dead_man=DeadManReport(
            armed=["BTCUSDT", "ETHUSDT"],
            failed={"SOLUSDT": "RateLimited: weight"},
            release_failed=["ETHUSDT"],
            state=DeadManState.PARTIAL,
        ),
    )
    text = text_of(report(partial))
    line = row(text, "alpha-futures")
    assert "unverified" in line and "11/12" in line and "flat" in line, line
    assert "partial" in line and "2 armed" in line and "1 failed" in line, line
    steps = row(text, "alpha-futures steps:")
    assert "halt partial (1 of 3 refused)" in steps
    assert "cancel_all failed (openAlgoOrders: 400)" in steps
    assert "could not list conditional orders of the account: VenueError: HTTP 400" in text
    assert "dead-man not armed on SOLUSDT: RateLimited: weight" in text
    assert "dead-man still counting down on ETHUSDT" in text


def test_time_to_flat_is_from_the_request_with_the_queue_wait_and_joins() -> None:
    done = AccountReport(
        account="alpha-futures",
        state=AccountState.VERIFIED,
        orders_found=3,
        orders_cancelled=3,
        orders_still_open=0,
        positions_before=[],
        positions_after=[],
        dead_man=DeadManReport(armed=["BTCUSDT"], released=["BTCUSDT"], state=DeadManState.ARMED),
    )
    text = text_of(
        report(
            done,
            outcome=KillOutcome.VERIFIED,
            requested_at=T0,
            picked_up_at=T0 + timedelta(seconds=96),
            queue_wait_s=96.0,
            time_to_flat_s=96.8,
            joins=[KillJoin(reason="also me", requested_by="bob", scope=KillScope.FLATTEN)],
        )
    )
    assert "time to flat 96.800s from the request" in text
    assert "queued 96.000s before a worker picked it up" in text
    assert "joined by bob (scope flatten): also me" in text
    line = row(text, "alpha-futures")
    assert "verified" in line and "3/3" in line and "1 released" in line, line


def test_live_progress_shows_each_accounts_steps_and_unknown_until_read() -> None:
    running = AccountReport(
        account="alpha-futures",
        steps=[
            StepStatus(step=Step.HALT, state=StepState.DONE, detail="partial: 1 refused"),
            StepStatus(step=Step.CANCEL_ALL, state=StepState.RUNNING),
            StepStatus(step=Step.FLATTEN, state=StepState.PENDING),
        ],
    )
    failed = AccountReport(
        account="beta-futures",
        state=AccountState.UNKNOWN,
        steps=[StepStatus(step=Step.HALT, state=StepState.FAILED)],
    )
    console = Console(width=240, record=True, color_system=None)
    console.print(accounts_progress([running, failed]))
    text = console.export_text()
    alpha = [c.strip() for c in row(text, "alpha-futures").strip("│ ").split("│")]
    beta = [c.strip() for c in row(text, "beta-futures").strip("│ ").split("│")]
    # account, halt, cancel_all, flatten, verify, cancelled, positions, state
    assert alpha == ["alpha-futures", "partial", "running", "pending", "-", "unknown", "unknown",
                     "running"]  # fmt: skip
    assert beta == ["beta-futures", "failed", "-", "-", "-", "unknown", "unknown", "unknown"]
