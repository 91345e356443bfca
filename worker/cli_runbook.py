"""``breakglass runbook validate | schema``: check runbook files, export their JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from activities.accounts import ConfigError
from activities.runbooks import check_accounts, load_runbook, runbook_json_schema_text
from worker.cli_common import console, err_console, register
from workflows.shared import ExitCode

app = typer.Typer(
    help="Runbooks: one YAML file per strategy × environment under runbooks/.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def validate(
    files: Annotated[list[Path], typer.Argument(help="Runbook YAML files.", show_default=False)],
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
    "file:line: field: message" line per problem on stderr and exit 2 (BAD_INPUT)."""
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
