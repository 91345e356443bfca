"""Rich renderings of kill-switch progress and reports for the terminal (data in, tables out)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from workflows.shared import KillOutcome, KillReport, Position, StepState, StepStatus

_STATE_STYLE = {
    StepState.PENDING: "dim",
    StepState.RUNNING: "yellow",
    StepState.DONE: "green",
    StepState.FAILED: "bold red",
    StepState.SKIPPED: "dim",
}


def steps_table(steps: list[StepStatus], title: str = "steps") -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("step")
    table.add_column("state")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    for s in steps:
        seconds = f"{s.seconds:.3f}" if s.seconds is not None else ""
        table.add_row(
            s.step.value, Text(s.state.value, style=_STATE_STYLE[s.state]), seconds, s.detail
        )
    return table


def _positions(positions: list[Position]) -> str:
    if not positions:
        return "flat"
    return ", ".join(
        f"{p.symbol}{'/' + p.position_side if p.position_side else ''} {p.quantity.normalize():f}"
        for p in positions
    )


def report_view(report: KillReport) -> Group:
    verified = report.outcome is KillOutcome.VERIFIED
    headline = Text(
        f"kill {report.outcome.value}: {report.workflow_id}",
        style="bold green" if verified else "bold red",
    )
    facts = Text(
        f"reason: {report.reason} · requested by {report.requested_by} · scope {report.scope.value}"
        f" · rounds {report.rounds}"
        + (f" · time to flat {report.time_to_flat_s:.3f}s" if report.time_to_flat_s else "")
    )
    accounts = Table(title="accounts", title_justify="left")
    for column in ("account", "cancelled", "open", "positions", "after", "dust", "dead-man"):
        accounts.add_column(column)
    for a in report.accounts:
        dust_keys = {(d.symbol, d.position_side) for d in a.dust}
        after = [p for p in a.positions_after if (p.symbol, p.position_side) not in dust_keys]
        dead_man = f"{a.dead_man_symbols} symbols" if a.dead_man_symbols else "-"
        if a.dead_man_released:
            dead_man += ", released"
        accounts.add_row(
            a.account,
            f"{a.orders_cancelled}/{a.orders_found}",
            str(a.orders_still_open),
            str(len(a.positions_before)),
            _positions(after),
            _positions(a.dust) if a.dust else "none",
            dead_man,
        )
    errors = [Text(f"{a.account}: {e}", style="red") for a in report.accounts for e in a.errors]
    return Group(headline, facts, accounts, *errors, steps_table(report.steps))
