"""``breakglass rollback | approve`` refusals as a user meets them: a real process, its message
and exit code, and nothing started."""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from tests.helpers import fresh_id
from tests.worker.test_cli_kill import REPO, breakglass
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import RollbackInput, rollback_workflow_id
from workflows.shared import ExitCode


def env_for(dev_env: WorkflowEnvironment, task_queue: str) -> dict[str, str]:
    return {
        **os.environ,
        "BREAKGLASS_TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "BREAKGLASS_TASK_QUEUE": task_queue,
        "BREAKGLASS_RUNBOOKS_DIR": str(REPO / "runbooks"),
        "COLUMNS": "200",
    }


async def test_unknown_system_is_refused(dev_env: WorkflowEnvironment) -> None:
    env = env_for(dev_env, fresh_id("tq"))
    run = await breakglass(
        "rollback", "nosuch", "--env", "prod", "--reason", "x y z", "--yes", env=env
    )
    assert run.code == ExitCode.BAD_INPUT
    assert "no runbook for nosuch/prod" in run.err
    count = await dev_env.client.count_workflows("WorkflowId = 'rollback/nosuch/prod'")
    assert count.count == 0


async def test_without_a_terminal_it_needs_yes(dev_env: WorkflowEnvironment) -> None:
    env = env_for(dev_env, fresh_id("tq"))
    run = await breakglass("rollback", "sample", "--env", "staging", "--reason", "x y z", env=env)
    assert run.code == ExitCode.BAD_INPUT
    assert "--yes" in run.err


async def test_a_second_rollback_of_the_same_system_is_refused(
    dev_env: WorkflowEnvironment,
) -> None:
    task_queue = fresh_id("tq-no-worker")  # the first rollback stays running: nobody serves it
    handle = await dev_env.client.start_workflow(
        RollbackWorkflow.run,
        RollbackInput(strategy="sample", env="staging", reason="first one", requested_by="bob"),
        id=rollback_workflow_id("sample", "staging"),
        task_queue=task_queue,
    )
    try:
        env = env_for(dev_env, task_queue)
        run = await breakglass(
            "rollback", "sample", "--env", "staging", "--reason", "second", "--yes", env=env
        )
        assert run.code == ExitCode.BAD_INPUT
        assert "already running" in run.err and "rollback/sample/staging" in run.err
    finally:
        await handle.terminate("test over")


async def test_approving_a_workflow_that_does_not_exist(dev_env: WorkflowEnvironment) -> None:
    env = env_for(dev_env, fresh_id("tq"))
    run = await breakglass("approve", "rollback/nosuch/" + fresh_id("x"), "--as", "bob", env=env)
    assert run.code == ExitCode.NOT_FOUND
    assert "no running workflow" in run.err


async def test_status_of_a_running_rollback(dev_env: WorkflowEnvironment) -> None:
    task_queue = fresh_id("tq-no-worker")
    workflow_id = rollback_workflow_id("sample", fresh_id("env"))
    handle = await dev_env.client.start_workflow(
        RollbackWorkflow.run,
        RollbackInput(strategy="sample", env="staging", reason="watch me", requested_by="bob"),
        id=workflow_id,
        task_queue=task_queue,
    )
    try:
        run = await breakglass("status", workflow_id, "--json", env=env_for(dev_env, task_queue))
    finally:
        await handle.terminate("test over")
    assert run.code == ExitCode.OK
    assert '"status": "RUNNING"' in run.out


async def test_a_broken_runbook_of_another_strategy_does_not_block_a_rollback(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """The issue's case: an invalid YAML of another strategy in the directory stopped
    ``rollback sample --env demo``. It is reported by ``runbook validate`` only."""
    env_name = fresh_id("e").replace("-", "")[:20].lower()
    runbooks = tmp_path / "rb"
    runbooks.mkdir()
    text = (REPO / "runbooks" / "sample-staging.yaml").read_text()
    (runbooks / f"sample-{env_name}.yaml").write_text(
        text.replace("env: staging", f"env: {env_name}")
    )
    (runbooks / "momentum-prod.yaml").write_text("strategy: momentum\nenv: prod\naccounts: [\n")
    (runbooks / "meanrev-prod.yaml").write_text(
        text.replace("strategy: sample", "strategy: meanrev").replace(
            "env: staging", "env: prod\nenv: staging"
        )
    )
    task_queue = fresh_id("tq-no-worker")  # started, not served: this test is about the start
    env = {**env_for(dev_env, task_queue), "BREAKGLASS_RUNBOOKS_DIR": str(runbooks)}
    run = await breakglass(
        "rollback", "sample", "--env", env_name, "--reason", "x y z", "--yes", "--detach", env=env
    )
    handle = dev_env.client.get_workflow_handle(rollback_workflow_id("sample", env_name))
    try:
        assert run.code == ExitCode.OK, run.err
        assert "momentum" not in run.out + run.err and "meanrev" not in run.out + run.err
        assert (await handle.describe()).status is not None
    finally:
        if run.code == ExitCode.OK:
            await handle.terminate("test over")

    validate = await breakglass(
        "runbook", "validate", *map(str, sorted(runbooks.iterdir())), env=env
    )
    assert validate.code == ExitCode.BAD_INPUT
    errors = validate.err.splitlines()
    assert any(
        e.startswith(f"{runbooks / 'meanrev-prod.yaml'}:") and "duplicate key" in e for e in errors
    ), errors
    assert any(e.startswith(f"{runbooks / 'momentum-prod.yaml'}:") for e in errors), errors
