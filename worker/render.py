"""Rich renderings for the terminal (data in, tables out): kill-switch progress and reports, and a
deployment's stage tree drawn like ``kubectl argo rollouts get rollout``."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

from workflows.deployment_models import (
    DeployOutcome,
    DeployReport,
    DeployStatus,
    Stage,
    StageNode,
)
from workflows.shared import (
    AccountReport,
    AccountState,
    DeadManState,
    KillOutcome,
    KillReport,
    Position,
    Step,
    StepState,
    StepStatus,
)

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


UNKNOWN = "unknown"
"""How a count or list the venue never gave is shown: never as 0, never as flat."""

_ACCOUNT_STYLE = {
    AccountState.VERIFIED: "green",
    AccountState.UNVERIFIED: "bold red",
    AccountState.UNKNOWN: "bold red",
}
_DEAD_MAN_STYLE = {
    DeadManState.ARMED: "green",
    DeadManState.PARTIAL: "bold yellow",
    DeadManState.NOT_ARMED: "bold red",
    DeadManState.UNSUPPORTED: "dim",
    DeadManState.OFF: "dim",
}


def _step_cell(status: StepStatus | None) -> Text:
    if status is None:
        return Text("-", style="dim")
    partial = status.state is StepState.DONE and status.detail.startswith("partial")
    if partial:
        return Text("partial", style="bold yellow")
    return Text(status.state.value, style=_STATE_STYLE[status.state])


def accounts_progress(accounts: list[AccountReport]) -> Table:
    """Live per-account progress: each account's own steps (failed/partial shown as such) and
    what the venue showed so far (unknown until read)."""
    table = Table(title="accounts", title_justify="left", expand=False)
    steps = [Step.HALT, Step.CANCEL_ALL, Step.FLATTEN, Step.VERIFY]
    for column in ("account", *(s.value for s in steps), "cancelled", "positions", "state"):
        table.add_column(column)
    for a in accounts:
        own = {s.step: s for s in a.steps}
        busy = any(s.state in (StepState.RUNNING, StepState.PENDING) for s in a.steps)
        state = (
            Text("running", style="yellow")
            if busy
            else Text(a.state.value, style=_ACCOUNT_STYLE[a.state])
        )
        table.add_row(
            a.account,
            *(_step_cell(own.get(step)) for step in steps),
            _cancelled(a),
            UNKNOWN if a.positions_before is None else str(len(a.positions_before)),
            state,
        )
    return table


def _count(n: int | None) -> str:
    return UNKNOWN if n is None else str(n)


def _positions(positions: list[Position] | None) -> str:
    if positions is None:
        return UNKNOWN
    if not positions:
        return "flat"
    return ", ".join(
        f"{p.symbol}{'/' + p.position_side if p.position_side else ''} {p.quantity.normalize():f}"
        for p in positions
    )


def _cancelled(a: AccountReport) -> str:
    if a.orders_found is None and a.orders_cancelled is None:
        return UNKNOWN
    return f"{_count(a.orders_cancelled)}/{_count(a.orders_found)}"


def _after(a: AccountReport) -> str:
    if a.positions_after is None:
        return UNKNOWN
    dust_keys = {(d.symbol, d.position_side) for d in a.dust}
    return _positions(
        [p for p in a.positions_after if (p.symbol, p.position_side) not in dust_keys]
    )


def _dead_man(a: AccountReport) -> Text:
    d = a.dead_man
    if d is None:  # a report from before DeadManReport
        text = f"{a.dead_man_symbols} symbols" if a.dead_man_symbols else "-"
        return Text(text + (", released" if a.dead_man_released else ""))
    parts = [d.state.value]
    if d.armed:
        parts.append(f"{len(d.armed)} armed")
    if d.failed:
        parts.append(f"{len(d.failed)} failed")
    if d.released:
        parts.append(f"{len(d.released)} released")
    if d.release_failed:
        parts.append(f"{len(d.release_failed)} still counting down")
    style = _DEAD_MAN_STYLE[d.state]
    if d.release_failed:
        style = "bold red"
    elif d.state is DeadManState.NOT_ARMED and not d.failed:
        style = "dim"  # nothing to arm (no symbol had orders or positions), nothing refused
    return Text(" · ".join(parts), style=style)


def _step_states(a: AccountReport) -> Text | None:
    """The account's own steps, when one failed or was partial (a plain run says nothing)."""
    odd = [s for s in a.steps if s.state is StepState.FAILED or s.detail.startswith("partial")]
    if not odd:
        return None
    text = Text(f"{a.account} steps: ")
    for i, s in enumerate(a.steps):
        if i:
            text.append(" · ")
        state = (
            "partial"
            if s.state is StepState.DONE and s.detail.startswith("partial")
            else s.state.value
        )
        style = "bold yellow" if state == "partial" else _STATE_STYLE[s.state]
        text.append(f"{s.step.value} ")
        text.append(state, style=style)
        detail = s.detail.removeprefix("partial").lstrip(": ")
        if detail and s.state is not StepState.PENDING:
            text.append(f" ({detail})")
    return text


def _account_lines(a: AccountReport) -> list[Text]:
    """What went wrong for one account, each its own line: step states, refused books, the
    dead-man's symbols that did not arm or are still counting down, why the chain gave up."""
    lines: list[Text] = []
    steps = _step_states(a)
    if steps is not None:
        lines.append(steps)
    for f in a.failures:
        book = (
            f"{'conditional' if f.conditional else 'plain'} orders of {f.symbol or 'the account'}"
        )
        lines.append(Text(f"{a.account}: could not {f.action} {book}: {f.error}", style="red"))
    if a.dead_man is not None:
        for symbol, why in sorted(a.dead_man.failed.items()):
            lines.append(Text(f"{a.account}: dead-man not armed on {symbol}: {why}", style="red"))
        if a.dead_man.release_failed:
            lines.append(
                Text(
                    f"{a.account}: dead-man still counting down on "
                    f"{', '.join(a.dead_man.release_failed)}: it will cancel whatever trades "
                    "there next unless disarmed",
                    style="bold red",
                )
            )
    if a.gave_up:
        lines.append(Text(f"{a.account}: gave up: {a.gave_up}", style="bold red"))
    lines += [Text(f"{a.account}: {e}", style="red") for e in a.errors]
    return lines


def _timing(report: KillReport) -> str:
    parts = []
    if report.time_to_flat_s is not None:
        since = "the request" if report.requested_at is not None else "the start"
        parts.append(f"time to flat {report.time_to_flat_s:.3f}s from {since}")
    if report.queue_wait_s is not None:
        parts.append(f"queued {report.queue_wait_s:.3f}s before a worker picked it up")
    return "".join(f" · {p}" for p in parts)


def report_view(report: KillReport) -> Group:
    verified = report.outcome is KillOutcome.VERIFIED
    headline = Text(
        f"kill {report.outcome.value}: {report.workflow_id}",
        style="bold green" if verified else "bold red",
    )
    facts = Text(
        f"reason: {report.reason} · requested by {report.requested_by} · scope {report.scope.value}"
        f" · rounds {report.rounds}" + _timing(report)
    )
    joins = [
        Text(f"joined by {j.requested_by} (scope {j.scope.value}): {j.reason}")
        for j in report.joins
    ]
    accounts = Table(title="accounts", title_justify="left")
    for column in (
        "account", "state", "cancelled", "open", "positions", "after", "dust", "dead-man"
    ):  # fmt: skip
        accounts.add_column(column)
    for a in report.accounts:
        accounts.add_row(
            a.account,
            Text(a.state.value, style=_ACCOUNT_STYLE[a.state]),
            _cancelled(a),
            _count(a.orders_still_open),
            UNKNOWN if a.positions_before is None else str(len(a.positions_before)),
            _after(a),
            _positions(a.dust) if a.dust else "none",
            _dead_man(a),
        )
    details = [line for a in report.accounts for line in _account_lines(a)]
    return Group(headline, facts, *joins, accounts, *details, steps_table(report.steps))


# --------------------------------------------------------------------------- deployments

DEPLOY_SYMBOL = {
    "done": ("✔", "green"),
    "running": ("◌", "yellow"),
    "failed": ("✖", "bold red"),
    "paused": ("॥", "bold yellow"),
    "awaiting": ("॥", "bold yellow"),
    "pending": ("·", "dim"),
    "skipped": ("⊘", "dim"),
}
"""Stage symbols, as ``kubectl argo rollouts get rollout`` draws them."""

_OUTCOME_STYLE = {
    DeployOutcome.PROMOTED: ("✔", "bold green"),
    DeployOutcome.REJECTED: ("✖", "bold red"),
    DeployOutcome.ROLLED_BACK: ("✖", "bold red"),
    DeployOutcome.ROLLBACK_FAILED: ("✖", "bold red"),
}


def _mark(state: str) -> Text:
    symbol, style = DEPLOY_SYMBOL[state]
    return Text(f"{symbol} {state}", style=style)


def _took(node: StageNode, now: datetime) -> str:
    if node.started_at is None:
        return ""
    seconds = ((node.finished_at or now) - node.started_at).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _shown_state(node: StageNode, waiting: str | None, child: bool) -> str:
    """A running node that waits for a human shows as paused/awaiting instead."""
    paused = not child or node.detail.startswith("paused")
    if node.state is StepState.RUNNING and waiting is not None and paused:
        return waiting
    return node.state.value


def deploy_tree(
    workflow_id: str,
    headline: Text,
    tree: list[StageNode],
    *,
    paused: bool = False,
    awaiting_approval: bool = False,
    now: datetime | None = None,
) -> Table:
    """The stage tree: one row per stage, canary steps and staging checks as children.

    While the deployment is paused, its running stage (and the step that paused) show as
    paused; the status's ``stage`` is not used for that: it names the last stage that started,
    which a stage run inside another (the handover in the first canary step) overwrites."""
    now = now or datetime.now(UTC)
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in ("NAME", "STATUS", "TIME", "INFO"):
        table.add_column(column, no_wrap=column != "INFO")
    table.add_row(f"⟳ {workflow_id}", headline, "", "")
    for i, node in enumerate(tree):
        last = i == len(tree) - 1
        waiting = None
        if node.name == Stage.APPROVAL.value and awaiting_approval:
            waiting = "awaiting"
        elif paused:
            waiting = "paused"
        state = _shown_state(node, waiting, child=False)
        dim = "dim" if state in ("pending", "skipped") else ""
        table.add_row(
            Text(f"{'└──' if last else '├──'} {node.name}", style=dim),
            _mark(state),
            _took(node, now),
            Text(node.detail, style=dim),
        )
        for j, leaf in enumerate(node.children):
            guide = ("   " if last else "│  ") + ("└──" if j == len(node.children) - 1 else "├──")
            table.add_row(
                f"{guide} {leaf.name}",
                _mark(_shown_state(leaf, waiting, child=True)),
                _took(leaf, now),
                leaf.detail,
            )
    return table


def _fields(rows: list[tuple[str, str | Text]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(f"{key}:", value)
    return grid


def deploy_hint(status: DeployStatus) -> str | None:
    """What the deployment waits for, and the command that answers it."""
    if status.paused:
        return f"paused: {status.paused} — breakglass promote|abort {status.workflow_id} --as NAME"
    if status.awaiting_approval:
        return f"awaiting approval: breakglass approve {status.workflow_id} --as NAME"
    rollback = next((n for n in status.tree if n.name == Stage.ROLLBACK.value), None)
    if rollback is not None and rollback.state is StepState.RUNNING:
        # The saga may wait for its own flatten approval: it is answered there, not here.
        return f"rolling back: breakglass status {rollback.detail}"
    return None


def deploy_status_view(status: DeployStatus, now: datetime | None = None) -> Group:
    """A running deployment: where it is, what it waits for, and how to answer."""
    if status.report is not None:
        return deploy_report_view(status.report, now)
    waiting = "paused" if status.paused else "awaiting" if status.awaiting_approval else None
    state = waiting or "running"
    running = [n.name for n in status.tree if n.state is StepState.RUNNING]
    rows: list[tuple[str, str | Text]] = [
        ("Name", status.workflow_id),
        ("Status", _mark(state)),
        ("Stage", ", ".join(running) or (status.stage.value if status.stage else "starting")),
    ]
    if status.paused:
        rows.append(("Message", status.paused))
    if status.last_verdict is not None:
        rows.append(("Last verdict", status.last_verdict.value))
    rows.append(("Approvals", ", ".join(status.approvals) or "none yet"))
    hint = deploy_hint(status)
    hints = [Text(hint, style="yellow")] if hint else []
    tree = deploy_tree(
        status.workflow_id,
        _mark(state),
        status.tree,
        paused=status.paused is not None,
        awaiting_approval=status.awaiting_approval,
        now=now,
    )
    return Group(_fields(rows), Text(""), tree, *hints)


def deploy_report_view(report: DeployReport, now: datetime | None = None) -> Group:
    """A finished deployment: outcome, versions, what failed, who approved, the rollback."""
    symbol, style = _OUTCOME_STYLE[report.outcome]
    outcome = Text(f"{symbol} {report.outcome.value}", style=style)
    rows: list[tuple[str, str | Text]] = [
        ("Name", report.workflow_id),
        ("Status", outcome),
        ("Versions", f"{report.version_from or 'none'} -> {report.version_to}"),
        ("Requested", f"{report.requested_by}: {report.reason}"),
    ]
    if report.failed_stage is not None or report.error:
        stage = report.failed_stage.value if report.failed_stage else "?"
        rows.append(("Failed", Text(f"{stage}: {report.error}", style="red")))
    rows.append(("Approvals", ", ".join(report.approvals) or "none"))
    if report.snapshot_id:
        rows.append(("Snapshot", report.snapshot_id))
    if report.rollback_workflow_id:
        rows.append(
            (
                "Rollback",
                f"{report.rollback_workflow_id} (breakglass status {report.rollback_workflow_id})",
            )
        )
    tree = deploy_tree(report.workflow_id, outcome, report.tree, now=now)
    return Group(_fields(rows), Text(""), tree)
