"""DeployWorkflow's staging validation end to end: a release that orders twenty times its cap, one
whose every order is rejected and one that crash-loops are each stopped by the staging
``release`` check before anything reaches production. The real parts as in
``test_deployment_sandbox``: the Temporal dev server, an in-process worker wired like
``worker.main``, supervisord targets for prod and for staging, the sandbox exchange."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.runbooks import load_runbook
from activities.targets.registry import runbook_target
from sandbox.admin_client import SandboxAdmin
from sandbox.strategy.app import version_tag
from sandbox.strategy.config import Fault
from sandbox.strategy.releases import build_release
from tests.fixtures.rollback import GOOD, SYMBOL, RollbackScenario, Scenarios, healthy
from tests.fixtures.sandbox import SandboxHandle
from tests.fixtures.venues import SandboxAccount, accounts_yaml
from tests.helpers import assert_eventually
from tests.sandbox.test_strategy import strategy_config
from tests.workflows.test_deployment_sandbox import DEPLOY, deploy, prefix_of, quoting, stages
from workflows.deployment_models import DeployOutcome, DeployReport, Stage
from workflows.shared import StepState

pytestmark = pytest.mark.timeout(300)  # a hang detector: a busy machine takes its time

BIG = "2.2.0"


async def add_staging(
    s: RollbackScenario, sandbox: SandboxHandle, env: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[SandboxAccount, Path]:
    """A staging env beside the scenario's: its own account (added to the worker's accounts
    file), state database, strategy config and supervisord; the same releases. Returns the
    account and the staging runbook."""
    account = SandboxAccount.fresh(f"stg{secrets.token_hex(3)}", "BG_TEST")
    await s.rig.admin.create_account(account.api_key, account.secret)
    monkeypatch.setenv(account.key_env, account.api_key)
    monkeypatch.setenv(account.secret_env, account.secret)
    with s.rig.accounts_file.open("a") as f:
        f.write(accounts_yaml([account]).removeprefix("accounts:\n"))
    base = Path(tempfile.mkdtemp(prefix="bgs", dir=s.base))
    config = strategy_config(
        sandbox,
        base,
        db=str(base / "state.sqlite"),
        symbols=[SYMBOL],
        api_key_env=account.key_env,
        secret_env=account.secret_env,
        account=account.futures,
    )
    (base / "strategy.json").write_text(config.model_dump_json())
    runbook = s.runbooks / f"sample-{env}.yaml"
    runbook.write_text(
        f"""strategy: sample
env: {env}
accounts: [{account.futures}]
target:
  kind: supervisor
  releases_root: {s.base / "r"}
  state_dir: {base / "t"}
  strategy_config: {base / "strategy.json"}
  port_file: {config.port_file}
  start_secs: 1
database: {{kind: sqlite, path: {base / "state.sqlite"}}}
flatten: {{mode: auto}}
health: {{timeout_s: 30, interval_s: 0.5}}
deploy: {{check_symbols: [{SYMBOL}], staging_bake_s: 3}}
"""
    )
    return account, runbook


@pytest.mark.parametrize(
    ("fault", "reason", "measured"),
    [
        (Fault.OVERSIZED, "max_order_notional", ("max_order_notional", 1000.0)),
        (Fault.REJECT_STORM, "reject_rate", ("reject_rate", 0.5)),
        (Fault.CRASH_LOOP, "exited", None),
    ],
    ids=lambda v: v.value if isinstance(v, Fault) else None,
)
async def test_a_faulty_release_is_rejected_in_staging_before_prod(
    fault: Fault,
    reason: str,
    measured: tuple[str, float] | None,
    client: Client,
    sandbox: SandboxHandle,
    sandbox_admin: SandboxAdmin,
    rollback_scenario: Scenarios,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = f"stg{secrets.token_hex(3)}"
    validated = f"  staging_env: {env}\n  checks: [release]\n{DEPLOY}"
    async with rollback_scenario(deploy=validated) as s:
        account, staging_runbook = await add_staging(s, sandbox, env, monkeypatch)
        staging_target = runbook_target(load_runbook(staging_runbook))
        build_release(s.base / "r", "sample", BIG, fault)
        try:
            async with s.worker(client) as worker:
                handle = await deploy(client, worker.task_queue, s, BIG)
                report: DeployReport = await handle.result()
            tree = "\n".join(f"{n.name} {n.state.value} {n.detail}" for n in report.tree)
            assert report.outcome is DeployOutcome.REJECTED, f"{report.error}\n{tree}"
            assert report.failed_stage is Stage.VALIDATE, tree
            assert f"staging check release failed: {reason}" in report.error, tree
            (check,) = report.checks
            assert not check.passed, check
            if measured is not None:  # the number that failed it is in the report
                name, above = measured
                assert check.measurements[name] > above, check
            assert stages(report)[Stage.SHADOW.value] is not StepState.DONE, tree

            # Nothing reached prod: 1.0.0 runs alone, current, and alone trades the account.
            view = await s.target.versions()
            assert (view.current, view.running, view.candidate) == (GOOD, [GOOD], None), view
            await assert_eventually(lambda: healthy(s.target, GOOD))
            await assert_eventually(lambda: quoting(sandbox_admin, s, GOOD))
            big = f"{prefix_of(s)}-{version_tag(BIG)}-"
            prod = await sandbox_admin.state(s.api_key)
            assert not [o for o in prod.orders if o.client_order_id.startswith(big)]

            # Staging as it was found: the release stopped and gone, the account flat.
            staged = await sandbox_admin.state(account.api_key)
            if fault is Fault.OVERSIZED:
                assert staged.orders  # the release traded there
            assert staged.open_orders == [] and all(p.qty == 0 for p in staged.positions)
            assert (await staging_target.versions()).running == []
            print(f"\n{tree}")
        finally:
            staging_target.shutdown_supervisord()
