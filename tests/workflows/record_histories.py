"""Record the histories the replay test replays: ``python -m tests.workflows.record_histories``.

Run it when the workflow changes *on purpose* (and version the change with ``workflow.patched``
if old runs may still be open); the replay test then guards the new shape.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from tests.fixtures.kill import FakeVenue, long, request
from tests.helpers import new_worker
from tests.workflows.test_deployment_logic import NEW, REF, FakeRelease, approve, deploy_plan
from tests.workflows.test_rollback_logic import FakeSystem, plan
from worker.devstack import find_executable
from worker.settings import Settings
from worker.temporal_client import data_converter
from workflows.analysis_models import Verdict
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import DeployInput
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow
from workflows.rollback_models import RollbackInput

HISTORIES = Path(__file__).parent / "histories"

KILL_SCENARIOS = {
    "kill_switch_verified": (FakeVenue(), request("a", "b")),
    "kill_switch_two_rounds_one_account_failing": (
        FakeVenue(
            positions={"a": [[long("ETH/USDT:USDT", "2")], []]},
            fail={("cancel_all", "b"): "b: AuthFailed: Invalid API-key"},
        ),
        request("a", "b"),
    ),
}
ROLLBACK_SCENARIOS = {
    "rollback_auto_flatten": FakeSystem(plan()),
    "rollback_safe_stop_at_activate": FakeSystem(plan(), fail_activate=True),
    "rollback_safe_stop_at_reconcile": FakeSystem(
        plan(), disagree=["position BTCUSDT: database 0.004, venue 0"]
    ),
    "rollback_safe_stop_at_plan": FakeSystem(
        plan(), fail_plan="no snapshot of momentum/prod at version 1.3.0"
    ),
}
DEPLOY_SCENARIOS = {
    # name: (the system, who approves the promotion; None: nobody is asked)
    "deploy_promoted": (FakeRelease(deploy_plan()), "bob"),
    "deploy_rejected_at_validate": (FakeRelease(deploy_plan(), failing_check="feed"), None),
    "deploy_rolled_back_at_canary": (
        FakeRelease(deploy_plan(), verdicts=[Verdict.PASS, Verdict.FAIL]),
        None,
    ),
}
WORKFLOWS = [KillSwitchWorkflow, RollbackWorkflow, DeployWorkflow]


async def save(handle: WorkflowHandle, name: str) -> None:
    await handle.result()
    (HISTORIES / f"{name}.json").write_text((await handle.fetch_history()).to_json())
    print(f"recorded {name}")


async def record() -> None:
    settings = Settings(payload_key=None)  # histories are stored unencrypted, for replay in CI
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(find_executable("temporal-test-server")),
        data_converter=data_converter(settings),
    )
    async with env:
        for name, (venue, kill) in KILL_SCENARIOS.items():
            async with new_worker(env.client, *WORKFLOWS, activities=venue.activities()) as w:
                handle = await env.client.start_workflow(
                    KillSwitchWorkflow.run, kill, id=f"record-{name}", task_queue=w.task_queue
                )
                await save(handle, name)
        for name, system in ROLLBACK_SCENARIOS.items():
            activities = system.activities() + FakeVenue().activities()
            async with new_worker(env.client, *WORKFLOWS, activities=activities) as w:
                handle = await env.client.start_workflow(
                    RollbackWorkflow.run,
                    RollbackInput(
                        strategy="momentum", env="prod", reason="recorded", requested_by="alice"
                    ),
                    id=f"record-{name}",
                    task_queue=w.task_queue,
                )
                await save(handle, name)
        for name, (release, approver) in DEPLOY_SCENARIOS.items():
            async with new_worker(env.client, *WORKFLOWS, activities=release.activities()) as w:
                handle = await env.client.start_workflow(
                    DeployWorkflow.run,
                    DeployInput(
                        strategy=REF.strategy,
                        env=REF.env,
                        version=NEW,
                        reason="recorded",
                        requested_by="alice",
                    ),
                    id=f"record-{name}",
                    task_queue=w.task_queue,
                )
                if approver is not None:
                    await approve(handle, approver)
                await save(handle, name)


if __name__ == "__main__":
    os.environ.pop("BREAKGLASS_PAYLOAD_KEY", None)
    asyncio.run(record())
