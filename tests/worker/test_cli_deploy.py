"""``breakglass deploy | status | promote | abort | approve`` as a user runs them, against the dev
server, DeployWorkflow on a worker with test_deployment_logic's fake release (the rollback child
is the real saga on its fakes). Refusals must leave nothing started. The commands run in process
(typer's runner): nothing here is about the process; a ``deploy`` that follows its workflow while
other commands run is a real process (the runner takes this process's stdout, one at a time)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from tests.fixtures.cli import REPO, Run, in_process
from tests.helpers import assert_eventually, fresh_id, new_worker
from tests.worker.test_cli_rollback import env_for
from tests.workflows.test_deployment_logic import NEW, OLD, FakeRelease, deploy_plan
from workflows.analysis_models import Verdict
from workflows.deploy_models import StrategyRef
from workflows.deployment import DeployWorkflow
from workflows.deployment_models import (
    DeployOutcome,
    DeployReport,
    DeployStatus,
    Stage,
    deploy_workflow_id,
)
from workflows.kill_switch import KillSwitchWorkflow
from workflows.rollback import RollbackWorkflow
from workflows.shared import ExitCode


@dataclass
class System:
    """One strategy/env with its own runbook, so tests never share a deploy/... id."""

    dev_env: WorkflowEnvironment
    name: str
    env: dict[str, str]
    release: FakeRelease | None = None
    one_at_a_time: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def workflow_id(self) -> str:
        return deploy_workflow_id("sample", self.name)

    def handle(self) -> WorkflowHandle:
        return self.dev_env.client.get_workflow_handle(self.workflow_id, result_type=DeployReport)

    async def cli(self, *args: str) -> Run:
        """The command in process; concurrent calls take turns."""
        async with self.one_at_a_time:
            return await in_process(*args, env=self.env)

    def deploy_args(self, *args: str) -> tuple[str, ...]:
        return (
            "deploy", "sample", "--env", self.name, "--version", NEW,
            "--reason", "release 1.4.0", "--as", "alice", "--yes", *args,
        )  # fmt: skip

    def deploy(self, *args: str) -> Awaitable[Run]:
        return self.cli(*self.deploy_args(*args))

    def follow_deploy(self, *args: str) -> Awaitable[Following]:
        """The deploy as its own process: it follows its workflow while other commands run."""
        return Following.start(*self.deploy_args(*args), env=self.env)

    async def until(self, condition: Callable[[DeployStatus], bool]) -> DeployStatus:
        async def check() -> DeployStatus:
            try:
                status: DeployStatus = await self.handle().query(DeployWorkflow.status)
            except RPCError as e:  # not started yet
                raise AssertionError(e.message) from None
            assert condition(status), status
            return status

        return await assert_eventually(check)


@dataclass
class Following:
    """A ``breakglass`` process whose output is read as it comes, so a test can wait for what
    it printed (the process starts slowly on a busy machine: never assume it already looks)."""

    proc: asyncio.subprocess.Process
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> Following:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", *args,
            cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        following = cls(proc)
        for stream, into in ((proc.stdout, following.out), (proc.stderr, following.err)):
            assert stream is not None
            following.pumps.append(asyncio.create_task(cls._pump(stream, into)))
        return following

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, into: bytearray) -> None:
        while chunk := await stream.read(4096):
            into.extend(chunk)

    async def printed(self, text: str) -> None:
        def shown() -> None:
            printed = self.out.decode(errors="replace")
            assert text in printed, printed

        await assert_eventually(shown, timeout=120)

    async def result(self) -> Run:
        code = await asyncio.wait_for(self.proc.wait(), timeout=120)
        await asyncio.gather(*self.pumps)
        return Run(code, self.out.decode(), self.err.decode())


def system_env(dev_env: WorkflowEnvironment, tmp_path: Path, task_queue: str) -> System:
    name = fresh_id("e")
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir(exist_ok=True)
    text = (REPO / "runbooks" / "sample-prod.yaml").read_text()
    (runbooks / f"sample-{name}.yaml").write_text(re.sub(r"(?m)^env: prod$", f"env: {name}", text))
    env = {**env_for(dev_env, task_queue), "BREAKGLASS_RUNBOOKS_DIR": str(runbooks)}
    return System(dev_env, name, env)


@asynccontextmanager
async def deployable(
    dev_env: WorkflowEnvironment, tmp_path: Path, verdicts: list[Verdict] | None = None
) -> AsyncIterator[System]:
    """A system with a worker running DeployWorkflow on the fake release (no waiting after
    the handover: monitoring and the warm delay are zero)."""
    task_queue = fresh_id("tq")
    system = system_env(dev_env, tmp_path, task_queue)
    ref = StrategyRef(strategy="sample", env=system.name)
    plan = deploy_plan(ref=ref, monitor_s=0, retire_delay_s=0)
    system.release = FakeRelease(plan, verdicts=verdicts or [Verdict.PASS, Verdict.PASS])
    workflows = (DeployWorkflow, RollbackWorkflow, KillSwitchWorkflow)
    activities = system.release.activities()
    async with new_worker(dev_env.client, *workflows, activities=activities, task_queue=task_queue):
        yield system


def tree_row(out: str, name: str) -> str:
    """The tree's line of one stage (or step)."""
    rows = [line for line in out.splitlines() if re.search(rf"── {re.escape(name)}\b", line)]
    assert len(rows) == 1, (name, out)
    return rows[0]


async def test_a_deploy_approved_from_the_cli_is_promoted(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with deployable(dev_env, tmp_path) as system:
        deploying = await system.follow_deploy()
        await system.until(lambda s: s.awaiting_approval)
        # The hint, while it waits: approved before it looked, it would never show it.
        await deploying.printed("awaiting approval: breakglass approve")
        status = await system.cli("status", system.workflow_id)
        approved = await system.cli("approve", system.workflow_id, "--as", "bob")
        run = await deploying.result()
        after = await system.cli("status", system.workflow_id, "--json")
    assert status.code == ExitCode.OK, status.err
    assert "॥ awaiting" in tree_row(status.out, "approval")
    assert "✔ done" in tree_row(status.out, "step 2: 25% of capital")
    assert f"awaiting approval: breakglass approve {system.workflow_id} --as NAME" in status.out
    assert approved.code == ExitCode.OK and "approved by bob" in approved.out

    assert run.code == ExitCode.OK, run.out + run.err
    assert "awaiting approval: breakglass approve" in run.out  # the hint, while it waited
    assert "✔ promoted" in run.out and f"{OLD} -> {NEW}" in run.out
    for stage in Stage:
        if stage is not Stage.ROLLBACK:
            assert "✔ done" in tree_row(run.out, stage.value), stage
    assert "· pending" in tree_row(run.out, "rollback")
    assert "✔ done" in tree_row(run.out, "step 1: 5% of capital")
    assert re.search(r"Approvals:\s+bob", run.out)
    assert system.release is not None and system.release.calls[-1] == f"retire:{OLD}"

    assert after.code == ExitCode.OK
    final = DeployStatus.model_validate_json(after.out)
    assert final.report is not None and final.report.outcome is DeployOutcome.PROMOTED


async def test_a_second_deploy_of_a_running_system_is_refused(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    system = system_env(dev_env, tmp_path, fresh_id("tq-no-worker"))  # the first one stays running
    first = await system.deploy("--detach")
    assert first.code == ExitCode.OK and first.out.strip() == system.workflow_id
    assert "no worker is polling" in first.err
    run_id = (await system.handle().describe()).run_id
    try:
        second = await system.deploy()
        assert second.code == ExitCode.BAD_INPUT
        assert second.err.strip() == (
            f"error: a deployment of sample/{system.name} is already running: "
            f"breakglass status {system.workflow_id}"
        )
        assert (await system.handle().describe()).run_id == run_id  # nothing else started
        status = await system.cli("status", system.workflow_id, "--json")
        assert status.code == ExitCode.OK  # running, though no worker answers its query
        assert json.loads(status.out) == {"workflow_id": system.workflow_id, "status": "RUNNING"}
    finally:
        await system.handle().terminate("test over")


async def test_bad_input_is_refused_and_nothing_starts(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    system = system_env(dev_env, tmp_path, fresh_id("tq"))
    base = ("deploy", "sample", "--reason", "release", "--as", "alice")
    runs = await asyncio.gather(
        system.cli(*base, "--env", system.name, "--version", "", "--yes"),
        system.cli(*base, "--env", system.name, "--version", "1.4 beta", "--yes"),
        system.cli(*base, "--env", "nosuch", "--version", NEW, "--yes"),
        system.cli(*base, "--env", system.name, "--version", NEW),  # no terminal, no --yes
        system.cli("promote", deploy_workflow_id("sample", fresh_id("none")), "--as", "bob"),
        system.cli("approve", "kill/alpha-futures", "--as", "bob"),
    )
    empty, spaced, unknown, unconfirmed, nobody, not_approvable = runs
    assert "invalid deploy request: version: String should match pattern" in empty.err
    assert "invalid deploy request: version: String should match pattern" in spaced.err
    assert "no runbook for sample/nosuch" in unknown.err
    assert "pass --yes" in unconfirmed.err
    assert "nothing to approve in 'kill/alpha-futures'" in not_approvable.err
    for run in (empty, spaced, unknown, unconfirmed, not_approvable):
        assert run.code == ExitCode.BAD_INPUT, run.err
        assert len(run.err.strip().splitlines()) == 1 and not run.out
    assert nobody.code == ExitCode.NOT_FOUND and "no running workflow" in nobody.err
    for workflow_id in (system.workflow_id, deploy_workflow_id("sample", "nosuch")):
        try:
            await dev_env.client.get_workflow_handle(workflow_id).describe()
            raise AssertionError(f"{workflow_id} was started")
        except RPCError as e:
            assert e.status == RPCStatusCode.NOT_FOUND


async def test_a_paused_canary_shows_in_the_tree_and_promote_continues_it(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with deployable(dev_env, tmp_path, [Verdict.INCONCLUSIVE, Verdict.PASS]) as system:
        started = await system.deploy("--detach")
        assert started.code == ExitCode.OK and started.out.strip() == system.workflow_id
        await system.until(lambda s: s.paused is not None)
        status = await system.cli("status", system.workflow_id)
        own, stranger = await asyncio.gather(
            system.cli("promote", system.workflow_id, "--as", "alice"),
            system.cli("promote", system.workflow_id, "--as", "mallory"),
        )
        promoted = await system.cli("promote", system.workflow_id, "--as", "carol", "--note", "ok")
        await system.until(lambda s: s.awaiting_approval)
        self_approval = await system.cli("approve", system.workflow_id, "--as", "alice")
        approved = await system.cli("approve", system.workflow_id, "--as", "bob")
        report = await system.handle().result()
    assert status.code == ExitCode.OK, status.err
    assert "॥ paused" in tree_row(status.out, "canary")
    step = tree_row(status.out, "step 1: 5% of capital")
    assert "॥ paused" in step and "inconclusive" in step
    assert "· pending" in tree_row(status.out, "approval")
    assert re.search(r"Status:\s+॥ paused", status.out)
    assert (
        f"paused: canary step 1: 5% of capital inconclusive: inconclusive: p99 latency judged — "
        f"breakglass promote|abort {system.workflow_id} --as NAME"
    ) in status.out

    assert own.code == ExitCode.BAD_INPUT
    assert own.err.strip() == (
        "error: refused: the requester cannot overrule the analysis of their own deployment"
    )
    assert stranger.code == ExitCode.BAD_INPUT and "'mallory' is not an approver" in stranger.err
    assert promoted.code == ExitCode.OK, promoted.err
    assert f"promoted by carol: {system.workflow_id} is proceeding" in promoted.out
    assert self_approval.code == ExitCode.BAD_INPUT
    assert "the requester cannot approve their own deployment" in self_approval.err
    assert approved.code == ExitCode.OK, approved.err

    assert report.outcome is DeployOutcome.PROMOTED and report.approvals == ["bob"]
    canary = next(n for n in report.tree if n.name == Stage.CANARY.value)
    assert "continued by carol" in canary.children[0].detail


async def test_abort_while_paused_rolls_back_and_the_deploy_exits_1(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with deployable(dev_env, tmp_path, [Verdict.NODATA]) as system:
        deploying = await system.follow_deploy("--json")
        await system.until(lambda s: s.paused is not None)
        aborted = await system.cli("abort", system.workflow_id, "--as", "alice", "--note", "no")
        run = await deploying.result()
        status = await system.cli("status", system.workflow_id)
    assert aborted.code == ExitCode.OK, aborted.err
    assert f"aborted by alice: {system.workflow_id} is aborting" in aborted.out
    assert run.code == ExitCode.UNVERIFIED, run.err
    report = DeployReport.model_validate_json(run.out)  # stdout is the JSON, nothing else
    rollback_id = f"rollback/sample/{system.name}"
    assert report.outcome is DeployOutcome.ROLLED_BACK and report.failed_stage is Stage.CANARY
    assert "aborted by alice: no" in report.error
    assert report.rollback_workflow_id == rollback_id
    assert system.release is not None and f"activate:{OLD}" in system.release.calls

    assert status.code == ExitCode.UNVERIFIED
    assert "✖ rolled-back" in status.out
    assert f"breakglass status {rollback_id}" in status.out
    assert "✖ failed" in tree_row(status.out, "canary")
    assert "✔ done" in tree_row(status.out, "rollback")
