"""``breakglass runbook validate | schema``: check runbook files, export their JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from activities.accounts import ConfigError
from activities.rollback_plan import NOT_RUNBOOKS
from activities.runbooks import check_accounts, load_runbook, runbook_json_schema_text
from worker.cli_common import console, err_console, load_settings, register
from workflows.shared import ExitCode

app = typer.Typer(
    help="Runbooks: one YAML file per strategy × environment under runbooks/.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Runbook YAML files (default: every runbook in BREAKGLASS_RUNBOOKS_DIR).",
            show_default=False,
        ),
    ] = None,
    accounts_file: Annotated[
        Path,
        typer.Option(
            "--accounts-file",
            envvar="BREAKGLASS_ACCOUNTS_FILE",
            help="Accounts file the runbooks' account names must exist in "
            "(env: BREAKGLASS_ACCOUNTS_FILE).",
        ),
    ] = Path("runbooks/accounts.yaml"),
) -> None:
    """Validate runbook files: prints "ok: FILE (strategy/env)" per valid file; otherwise one
    "file:line: field: message" line per problem on stderr and exit 2 (BAD_INPUT). Without
    files, every runbook of the runbooks directory: a rollback or deploy skips another
    system's broken runbook, this is where it is reported."""
    if not files:
        runbooks_dir = load_settings().runbooks_dir
        files = [p for p in sorted(runbooks_dir.glob("*.yaml")) if p.name not in NOT_RUNBOOKS]
        if not files:
            err_console.print(f"no runbooks in {runbooks_dir}", markup=False)
            raise typer.Exit(int(ExitCode.BAD_INPUT))
    problems: list[str] = []
    for path in files:
        try:
            runbook = load_runbook(path)
            unknown = check_accounts(runbook, accounts_file, path)
        except ConfigError as e:
            problems.extend(str(e).splitlines())
            continue
        if unknown:
            problems.extend(unknown)
            continue
        console.print(f"ok: {path} ({runbook.ref})", markup=False)
    for line in problems:
        err_console.print(line, markup=False)
    if problems:
        raise typer.Exit(int(ExitCode.BAD_INPUT))


def schema(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the schema here instead of stdout."),
    ] = None,
) -> None:
    """Print the JSON Schema of runbook files (for editors; see runbooks/runbook.schema.json)."""
    text = runbook_json_schema_text()
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text)
    err_console.print(f"wrote {output}", markup=False)


register(app, validate, schema)
