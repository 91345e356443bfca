"""``breakglass runbook validate | schema`` as a user runs them (in process: the behaviour under
test is the command's, not the process's)."""

from __future__ import annotations

import json
from pathlib import Path

from activities.runbooks import runbook_json_schema
from tests.fixtures.cli import REPO, Run, invoke
from workflows.shared import ExitCode

STAGING = "runbooks/sample-staging.yaml"
PROD = "runbooks/sample-prod.yaml"


def breakglass(*args: str, **extra_env: str) -> Run:
    # Unset: the accounts file then comes from the runbook's own directory default.
    env: dict[str, str | None] = {"COLUMNS": "80", "BREAKGLASS_ACCOUNTS_FILE": None, **extra_env}
    return invoke(("runbook", *args), env)  # type: ignore[arg-type]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_validate_ok() -> None:
    run = breakglass("validate", STAGING, PROD)
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines() == [f"ok: {STAGING} (sample/staging)", f"ok: {PROD} (sample/prod)"]
    assert run.err == ""


def test_validate_reports_every_problem_as_file_line_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (REPO / PROD).read_text()
    text = text.replace("quorum: 2", "quorum: 5")
    text = text.replace("  keep: 30\n", "  keep: 30\n  kept: 1\n")
    bad.write_text(text)
    run = breakglass("validate", STAGING, str(bad))
    assert run.code == ExitCode.BAD_INPUT
    assert run.out.splitlines() == [f"ok: {STAGING} (sample/staging)"]
    lines = run.err.splitlines()
    assert len(lines) == 2, run.err
    assert lines[0].startswith(
        f"{bad}:{line_of(text, 'kept:')}: snapshot.kept: Extra inputs are not permitted"
    )
    assert lines[1].startswith(
        f"{bad}:{line_of(text, 'quorum:')}: quorum: quorum 5 is larger than the 3 approver(s)"
    )


def test_validate_reports_unknown_accounts_and_a_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (REPO / STAGING).read_text().replace("[alpha-futures]", "[alpha-futures, zz]")
    bad.write_text(text)
    run = breakglass("validate", str(bad), str(tmp_path / "missing.yaml"))
    assert run.code == ExitCode.BAD_INPUT
    assert run.out == ""
    unknown, missing = run.err.splitlines()
    assert unknown.startswith(f"{bad}:{line_of(text, 'zz]')}: accounts.1: unknown account 'zz'")
    assert missing.startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


def test_schema_prints_json_and_writes_the_file(tmp_path: Path) -> None:
    run = breakglass("schema")
    assert run.code == ExitCode.OK, run.err
    assert json.loads(run.out) == runbook_json_schema()
    out = tmp_path / "schema.json"
    run = breakglass("schema", "--output", str(out))
    assert run.code == ExitCode.OK, run.err
    assert out.read_text() == (REPO / "runbooks/runbook.schema.json").read_text()


def test_validate_without_files_checks_every_runbook_of_the_directory(tmp_path: Path) -> None:
    """Where a broken runbook of another system is reported (a rollback skips it): every file
    of BREAKGLASS_RUNBOOKS_DIR, duplicate keys included (``env: prod`` then ``env: staging``)."""
    (tmp_path / "sample-staging.yaml").write_text((REPO / STAGING).read_text())
    dup = tmp_path / "other-prod.yaml"
    text = (REPO / STAGING).read_text().replace("env: staging", "env: prod\nenv: staging")
    dup.write_text(text)
    (tmp_path / "accounts.yaml").write_text("accounts: {}\n")  # not a runbook
    run = breakglass("validate", BREAKGLASS_RUNBOOKS_DIR=str(tmp_path))
    assert run.code == ExitCode.BAD_INPUT
    assert run.out.splitlines() == [f"ok: {tmp_path / 'sample-staging.yaml'} (sample/staging)"]
    (line,) = run.err.splitlines()
    second = line_of(text, "env: staging")
    assert line.startswith(f"{dup}:{second}: env: duplicate key 'env' (first on line "), line
