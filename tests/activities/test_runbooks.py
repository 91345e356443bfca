"""Runbook model: the examples load; every cross-field rule is refused with a file:line message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from activities.accounts import ConfigError
from activities.runbooks import (
    FlattenMode,
    check_accounts,
    load_runbook,
    runbook_json_schema,
    runbook_json_schema_text,
)
from workflows.snapshot_models import DatabaseKind

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "runbooks"
ACCOUNTS = RUNBOOKS / "accounts.yaml"

BASE = """\
strategy: sample
env: staging
accounts: [alpha-futures]
target:
  kind: supervisor
  releases_root: /r
  state_dir: /s
  strategy_config: /c.json
  http_port: 8081
database:
  kind: sqlite
  path: /db.sqlite
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rb.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_runbook(path)
    return str(e.value).splitlines()


@pytest.mark.parametrize("name", ["sample-staging.yaml", "sample-prod.yaml"])
def test_examples_load_and_name_known_accounts(name: str) -> None:
    runbook = load_runbook(RUNBOOKS / name)
    assert runbook.strategy == "sample"
    assert str(runbook.ref) == f"sample/{runbook.env}"
    assert check_accounts(runbook, ACCOUNTS, RUNBOOKS / name) == []


def test_prod_example_waits_for_two_approvers() -> None:
    prod = load_runbook(RUNBOOKS / "sample-prod.yaml")
    assert prod.needs_approval and prod.quorum == 2 and len(prod.approvers) == 3
    assert prod.database.kind is DatabaseKind.POSTGRES and prod.database.password_env


def test_defaults_are_the_safe_ones(tmp_path: Path) -> None:
    runbook = load_runbook(write(tmp_path, BASE + "flatten: {mode: auto}\n"))
    assert runbook.snapshot.before_deploy is True
    assert runbook.flatten.on_timeout == "hold"
    assert runbook.health.path == "/healthz"
    # Without a flatten section the default is "ask a human": approvers are then required.
    (line,) = problems(tmp_path, BASE)
    assert line.endswith(
        "flatten: mode: approve needs at least one name in approvers "
        "(or choose mode: auto or mode: hold)"
    )


def test_approve_without_approvers_is_refused_at_the_flatten_line(tmp_path: Path) -> None:
    text = BASE + "flatten:\n  mode: approve\n"
    (line,) = problems(tmp_path, text)
    assert line.startswith(f"{tmp_path / 'rb.yaml'}:13: flatten: mode: approve needs at least one")


def test_quorum_larger_than_approvers_is_refused(tmp_path: Path) -> None:
    text = BASE + "approvers: [alice, bob]\nquorum: 3\nflatten: {mode: approve}\n"
    (line,) = problems(tmp_path, text)
    assert line == (
        f"{tmp_path / 'rb.yaml'}:14: quorum: quorum 3 is larger than the 2 approver(s): "
        "an approval could never be reached"
    )


def test_hold_with_flatten_on_timeout_is_contradictory(tmp_path: Path) -> None:
    text = BASE + "flatten:\n  mode: hold\n  on_timeout: flatten\n"
    (line,) = problems(tmp_path, text)
    assert line.startswith(f"{tmp_path / 'rb.yaml'}:15: flatten.on_timeout: on_timeout: flatten ")
    assert "contradicts mode: hold" in line


def test_hold_with_hold_on_timeout_is_fine(tmp_path: Path) -> None:
    runbook = load_runbook(write(tmp_path, BASE + "flatten: {mode: hold, on_timeout: hold}\n"))
    assert runbook.flatten.mode is FlattenMode.HOLD and not runbook.needs_approval


def test_unknown_field_is_refused_with_its_line(tmp_path: Path) -> None:
    text = BASE.replace("  http_port: 8081\n", "  http_port: 8081\n  htp_port: 1\n")
    text += "flatten: {mode: auto}\n"
    (line,) = problems(tmp_path, text)
    assert line == f"{tmp_path / 'rb.yaml'}:10: target.htp_port: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ("timeouts: {flatten_s: 0}\n", ":14: timeouts.flatten_s: Input should be greater than"),
        ("timeouts: {restore_s: 99999}\n", ":14: timeouts.restore_s: Input should be less than"),
        ("snapshot: {keep: 0}\n", ":14: snapshot.keep: Input should be greater than or equal"),
        ("health: {path: healthz}\n", ":14: health.path: String should match pattern"),
        ("approvers: [alice, alice]\n", ":14: approvers: approver 'alice' is listed twice"),
        (
            "deploy: {canary: [{capital: 0.05, bake_s: 60}]}\n",
            ":14: deploy.analysis: canary steps need an analysis policy to judge them",
        ),
        (
            "deploy: {canary: [{capital: 1.5, bake_s: 60}]}\n",
            ":14: deploy.canary.0.capital: Input should be less than or equal to 1",
        ),
        ("deploy: {checks: [feed, vibes]}\n", ":14: deploy.checks.1: Input should be"),
    ],
)
def test_bounds_and_names(tmp_path: Path, extra: str, expect: str) -> None:
    lines = problems(tmp_path, BASE + "flatten: {mode: auto}\n" + extra)
    assert any(expect in line for line in lines), lines


def test_port_file_required_when_the_port_is_picked(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, BASE.replace("8081", "0") + "flatten: {mode: auto}\n")
    assert ":4: target.port_file: http_port is 0" in line


def test_database_password_in_dsn_is_refused(tmp_path: Path) -> None:
    text = BASE.replace(
        "  kind: sqlite\n  path: /db.sqlite\n",
        "  kind: postgres\n  dsn: postgresql://u:secret@db/x\n",
    )
    (line,) = problems(tmp_path, text + "flatten: {mode: auto}\n")
    assert ":12: database.dsn:" in line and "carries a password" in line
    assert "secret" not in line.replace("carries", "")


def test_unknown_accounts_are_reported_with_their_line(tmp_path: Path) -> None:
    text = BASE.replace("accounts: [alpha-futures]\n", "accounts:\n  - alpha-futures\n  - gamma\n")
    path = write(tmp_path, text + "flatten: {mode: auto}\n")
    (line,) = check_accounts(load_runbook(path), ACCOUNTS, path)
    assert line.startswith(f"{path}:5: accounts.1: unknown account 'gamma' in {ACCOUNTS}")


def test_committed_schema_is_current() -> None:
    committed = (RUNBOOKS / "runbook.schema.json").read_text()
    assert committed == runbook_json_schema_text(), (
        "runbooks/runbook.schema.json is stale: run "
        "`breakglass runbook schema -o runbooks/runbook.schema.json`"
    )
    schema = json.loads(committed)
    assert schema == runbook_json_schema()
    assert schema["additionalProperties"] is False
    assert "quorum" in schema["properties"]


# --------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        # The case: the second `env` silently won.
        (BASE.replace("env: staging\n", "env: prod\nenv: staging\n"), 3, "env"),
        # Nested, in the target: which port would the strategy get?
        (
            BASE.replace("  http_port: 8081\n", "  http_port: 8081\n  http_port: 9090\n"),
            10,
            "target",
        ),
    ],
)
def test_duplicate_keys_are_refused_with_file_and_line(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    (problem,) = problems(tmp_path, text + "flatten: {mode: auto}\n")
    assert problem.startswith(f"{tmp_path / 'rb.yaml'}:{line}: "), problem
    assert "duplicate key" in problem and key in problem.split(": ", 1)[1], problem


# --------------------------------------------------------------------------- finding a runbook


def test_a_broken_runbook_of_another_system_does_not_hide_the_one_asked_for(
    tmp_path: Path,
) -> None:
    from activities.rollback_plan import find_runbook

    (tmp_path / "sample-staging.yaml").write_text(BASE + "flatten: {mode: auto}\n")
    (tmp_path / "other-prod.yaml").write_text("strategy: other\nenv: prod\naccounts: [\n")  # YAML
    (tmp_path / "dup-prod.yaml").write_text(
        BASE.replace("strategy: sample\nenv: staging\n", "strategy: dup\nenv: prod\nenv: x\n")
    )
    runbook = find_runbook(tmp_path, "sample", "staging")
    assert str(runbook.ref) == "sample/staging"


def test_a_broken_runbook_of_the_system_asked_for_is_named(tmp_path: Path) -> None:
    from activities.rollback_plan import find_runbook

    (tmp_path / "other-prod.yaml").write_text(
        BASE.replace("strategy: sample", "strategy: other") + "flatten: {mode: auto}\n"
    )
    broken = tmp_path / "sample-staging.yaml"
    broken.write_text(BASE + "flatten: {mode: auto}\nquorum: 0\n")
    with pytest.raises(ConfigError) as e:
        find_runbook(tmp_path, "sample", "staging")
    assert f"{broken}:14: quorum:" in str(e.value), e.value
    with pytest.raises(ConfigError) as missing:
        find_runbook(tmp_path, "nosuch", "prod")
    assert str(missing.value).startswith(f"no runbook for nosuch/prod in {tmp_path}")
