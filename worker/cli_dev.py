"""``breakglass dev up | down | status``: the embedded stack (Temporal, sandbox, worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker import devstack
from worker.cli_common import abort, console, err_console, load_settings, run_async
from worker.devstack import ComponentState, StackStatus
from workflows.shared import ExitCode

app = typer.Typer(
    help="Run the embedded stack locally: Temporal dev server, sandbox exchange and worker.",
    no_args_is_help=True,
)

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="BREAKGLASS_STATE_DIR",
        show_envvar=True,
        help="Where the stack keeps its SQLite file, logs and pids.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the stack status as JSON.")]
Only = Annotated[
    list[str] | None,
    typer.Option(
        "--component",
        "-c",
        help="Only this component (temporal, sandbox, worker), repeatable; `up` adds requirements.",
    ),
]


def _show(stack: StackStatus, as_json: bool) -> None:
    if as_json:
        typer.echo(stack.model_dump_json(indent=2))
        return
    for c in stack.components:
        if c.state is ComponentState.UNAVAILABLE:
            line = f"{c.name:<9} {c.state.value:<11} {c.detail}"
        else:
            pid = f"pid {c.pid}" if c.pid else "-"
            ports = ",".join(str(p) for p in c.ports) or "-"
            note = "started" if c.started else c.detail
            line = f"{c.name:<9} {c.state.value:<11} {pid:<10} ports {ports:<11} log {c.log_file}"
            if note:
                line += f"  ({note})"
        console.print(line, markup=False)
    console.print(f"Temporal: {stack.temporal_address} · UI: {stack.ui_url}", markup=False)


def _settings(state_dir: Path | None) -> devstack.Settings:
    return load_settings(state_dir=state_dir)


@app.command()
def up(state_dir: StateDir = None, as_json: Json = False, only: Only = None) -> None:
    """Start the stack (what already runs is left alone) and wait until it is ready."""
    settings = _settings(state_dir)
    try:
        stack = run_async(devstack.up(settings, only=only))
    except devstack.DevStackConfigError as e:
        abort(f"{e}; nothing was started", ExitCode.BAD_INPUT)
    except devstack.ComponentFailed as e:
        abort(str(e), ExitCode.UNREACHABLE)
    for c in stack.components:
        if c.state is ComponentState.UNAVAILABLE and not as_json and not only:
            err_console.print(f"warning: {c.name} skipped: {c.detail}", markup=False)
    _show(stack, as_json)


@app.command()
def down(state_dir: StateDir = None, as_json: Json = False, only: Only = None) -> None:
    """Stop the stack's processes (SIGTERM, then SIGKILL after 10 s)."""
    settings = _settings(state_dir)
    try:
        stack = run_async(devstack.down(settings, only=only))
    except devstack.DevStackConfigError as e:
        abort(str(e), ExitCode.BAD_INPUT)
    _show(stack, as_json)


@app.command()
def status(state_dir: StateDir = None, as_json: Json = False) -> None:
    """Show each component: running or stopped, pid, ports, log file; and the UI address."""
    _show(devstack.status(_settings(state_dir)), as_json)
