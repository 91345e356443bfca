"""``breakglass kill`` / ``status`` in process (typer's runner, the command in a thread with its
own event loop) against the dev server and the sandbox: output and exit codes, refusals that leave
no workflow and send no order, unknown shown as unknown, joins said out loud. What only a real
process shows (stderr noise, a dying worker or server) is in ``test_cli_kill_process.py``."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from sandbox.admin_models import FaultRule

# REPO, Run and breakglass (a real process) are imported from here by other CLI test modules.
from tests.fixtures.cli import REPO, Run, breakglass, in_process, invoke  # noqa: F401
from tests.fixtures.venues import MakeRig, Rig, assert_flat, kill_worker
from tests.helpers import fresh_id
from worker import cli_kill, cli_start
from worker.settings import Settings
from workflows.kill_switch import KillSwitchWorkflow
from workflows.shared import (
    ExitCode,
    KillOutcome,
    KillReport,
    KillScope,
    KillSwitchInput,
    kill_workflow_id,
)


def cli_env(rig: Rig, env: WorkflowEnvironment, task_queue: str, **extra: str) -> dict[str, str]:
    """The CLI's settings only: the runner sets them in this process's environment while the
    command runs, and the in-process worker must keep reading its own (e.g. wrong) secrets."""
    worker_env = rig.worker_env(env.client.service_client.config.target_host, task_queue)
    return {
        **{k: v for k, v in worker_env.items() if k.startswith("BREAKGLASS_")},
        "COLUMNS": "200",
        **extra,
    }


async def workflow_count(client: Client, query: str) -> int:
    return (await client.count_workflows(query)).count


async def test_kill_from_the_cli_prints_a_verified_report(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1)
    await rig.seed(symbols=6, open_orders=60, positions=4)
    async with kill_worker(dev_env.client, rig) as w:
        env = cli_env(rig, dev_env, w.task_queue)
        names = [arg for n in rig.names() for arg in ("--account", n)]
        run = await in_process("kill", *names, "--reason", "reject storm", "--json", env=env)
        assert run.code == ExitCode.OK, run.err
        report = run.report()  # stdout is the JSON, nothing else
        status = await in_process("status", report.workflow_id, "--json", env=env)
    assert json.loads(run.out)["joined"] is None  # a kill of its own, not a join
    assert report.outcome is KillOutcome.VERIFIED
    assert report.requested_by and report.reason == "reject storm"
    # Measured from the request, with the wait for a worker beside it.
    assert report.requested_at is not None and report.queue_wait_s is not None
    assert report.time_to_flat_s is not None and report.time_to_flat_s >= report.queue_wait_s
    assert status.code == ExitCode.OK
    assert KillReport.model_validate_json(status.out).workflow_id == report.workflow_id
    await assert_flat(rig)
    for account in rig.accounts:
        assert account.api_key not in run.out + run.err
        assert account.secret not in run.out + run.err


async def test_unknown_account_is_refused_and_nothing_starts(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    before = (await rig.admin.stats()).requests_by_endpoint
    env = cli_env(rig, dev_env, fresh_id("tq"))
    run = await in_process(
        "kill", "--account", rig.accounts[0].futures, "--account", "nobody", "--reason", "test",
        env=env,
    )  # fmt: skip
    assert run.code == ExitCode.BAD_INPUT
    assert "unknown account 'nobody'" in run.err
    assert len(run.err.strip().splitlines()) == 1
    assert await workflow_count(dev_env.client, "WorkflowId STARTS_WITH 'kill/nobody'") == 0
    assert (await rig.admin.stats()).requests_by_endpoint == before


async def test_malformed_accounts_file_names_file_line_and_field(
    dev_env: WorkflowEnvironment, make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig(n=1, create=True)
    broken = tmp_path / "accounts.yaml"
    text = rig.accounts_file.read_text().replace("route: sandbox", "route: sandbx", 1)
    broken.write_text(text)
    line = text.splitlines().index("    route: sandbx") + 1
    env = cli_env(rig, dev_env, fresh_id("tq"), BREAKGLASS_ACCOUNTS_FILE=str(broken))
    run = await in_process(
        "kill", "--account", rig.accounts[0].futures, "--reason", "route typo", env=env
    )
    assert run.code == ExitCode.BAD_INPUT
    assert f"{broken}:{line}:" in run.err and ".route" in run.err

    broken.write_text("accounts:\n  a: [unclosed\n")
    run = await in_process("kill", "--account", "a", "--reason", "test", env=env)
    assert run.code == ExitCode.BAD_INPUT
    assert "invalid YAML" in run.err and str(broken) in run.err


async def test_bad_arguments_are_refused(dev_env: WorkflowEnvironment, make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    env = cli_env(rig, dev_env, fresh_id("tq"))
    run = await in_process("kill", "--account", rig.accounts[0].futures, "--reason", "", env=env)
    assert run.code == ExitCode.BAD_INPUT
    assert "reason" in run.err
    run = await in_process("kill", "--reason", "no account", env=env)
    assert run.code == ExitCode.BAD_INPUT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_temporal_is_one_clear_line(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    address = f"127.0.0.1:{free_port()}"
    env = cli_env(rig, dev_env, fresh_id("tq"), BREAKGLASS_TEMPORAL_ADDRESS=address)
    run = await in_process("kill", "--account", rig.accounts[0].futures, "--reason", "x y", env=env)
    assert run.code == ExitCode.UNREACHABLE
    assert f"cannot reach Temporal at {address}" in run.err
    assert len(run.err.strip().splitlines()) == 1


async def test_a_server_refusing_the_start_is_one_line_and_bad_input(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    namespace = fresh_id("no-such-namespace")
    env = cli_env(rig, dev_env, fresh_id("tq"), BREAKGLASS_TEMPORAL_NAMESPACE=namespace)
    run = await in_process("kill", "--account", rig.accounts[0].futures, "--reason", "x y", env=env)
    assert run.code == ExitCode.BAD_INPUT, run.err
    assert run.err.startswith(f"error: cannot start kill/{rig.accounts[0].futures}: Temporal at")
    assert namespace in run.err and len(run.err.strip().splitlines()) == 1


async def test_unreadable_account_is_unknown_never_zero_and_sends_nothing(
    dev_env: WorkflowEnvironment, make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await make_rig(n=1)
    await rig.seed(symbols=3, open_orders=10, positions=2)
    account = rig.accounts[0]
    wrong = "0" * 64
    monkeypatch.setenv(account.secret_env, wrong)  # the worker reads this, not the right one
    orders_before = len((await rig.admin.state(account.api_key)).orders)
    async with kill_worker(dev_env.client, rig) as w:
        env = cli_env(rig, dev_env, w.task_queue)
        run = await in_process(
            "kill", "--account", account.futures, "--reason", "bad keys", env=env
        )
        as_json = await in_process(
            "kill", "--account", account.futures, "--reason", "bad keys", "--json", env=env
        )
    assert run.code == ExitCode.UNVERIFIED, run.out + run.err
    assert "AuthFailed" in run.out
    row = next(
        line for line in run.out.splitlines() if line.strip("│ ").startswith(account.futures)
    )
    # Nothing could be read: every count and list is unknown, never 0/0 or flat.
    assert row.count("unknown") >= 5, row
    assert "0/0" not in row and "flat" not in row, row
    assert as_json.code == ExitCode.UNVERIFIED, as_json.err
    [unread] = as_json.report().accounts
    assert unread.state.value == "unknown"
    assert unread.orders_found is None and unread.orders_cancelled is None
    assert unread.positions_before is None and unread.positions_after is None
    assert '"positions_before": null' in as_json.out and '"positions_before": []' not in as_json.out
    assert unread.dead_man is None or unread.dead_man.state.value == "not-armed"
    assert "dead-man" in run.out
    for text in (run.out + run.err, as_json.out + as_json.err):
        assert wrong not in text and account.api_key not in text
    state = await rig.admin.state(account.api_key)
    assert len(state.orders) == orders_before  # no order was sent
    assert state.open_orders  # and nothing was pretended


async def test_status_of_an_unknown_workflow(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    env = cli_env(rig, dev_env, fresh_id("tq"))
    run = await in_process("status", "kill/" + fresh_id("none"), env=env)
    assert run.code == ExitCode.NOT_FOUND
    assert "no workflow" in run.err


def test_help_documents_exit_codes() -> None:
    run = invoke(("kill", "--help"), {"COLUMNS": "200"})
    assert run.code == 0
    assert "--account" in run.out and "--reason" in run.out


async def test_kill_without_a_worker_warns_and_stays_queued(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    env = cli_env(rig, dev_env, fresh_id("tq-nobody"))
    run = await in_process(
        "kill", "--account", rig.accounts[0].futures, "--reason", "no worker", "--detach", env=env
    )
    assert run.code == ExitCode.OK
    assert "no worker is polling task queue" in run.err
    assert "the kill kill/" in run.err and "is queued" in run.err
    workflow_id = run.out.strip()
    status = await in_process("status", workflow_id, env=env)
    assert status.code == ExitCode.OK and "running" in status.out
    assert "no worker is polling task queue" in status.err  # status says so too
    await dev_env.client.get_workflow_handle(workflow_id).terminate("test over")


# --------------------------------------------------------------------------- joins


async def test_second_kill_joins_says_so_and_escalates_the_scope(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    """A flatten kill of accounts a cancel-only kill is working on joins it out loud: who asked
    first and why, and that the running kill now flattens too (the venue ends flat)."""
    rig = await make_rig(n=1)
    await rig.seed(symbols=3, open_orders=12, positions=3)
    account = rig.accounts[0].futures
    # The cancel-only kill is held at the venue's cancel-all long enough to be joined.
    await rig.admin.add_faults(
        [FaultRule(kind="latency", match="DELETE /fapi/v1/allOpenOrders", latency_ms=4000)]
    )
    try:
        async with kill_worker(dev_env.client, rig) as w:
            first = await dev_env.client.start_workflow(
                KillSwitchWorkflow.run,
                KillSwitchInput(
                    accounts=[account], reason="first: orders only", requested_by="alice",
                    scope=KillScope.CANCEL_ONLY,
                ),
                id=kill_workflow_id([account]), task_queue=w.task_queue, result_type=KillReport,
            )  # fmt: skip
            env = cli_env(rig, dev_env, w.task_queue)
            run = await in_process(
                "kill", "--account", account, "--reason", "second: flatten too", "--as", "bob",
                "--json", env=env,
            )  # fmt: skip
            first_report = await first.result()
    finally:
        await rig.admin.clear_faults()
    assert run.code == ExitCode.OK, run.err
    joined = json.loads(run.out)["joined"]
    assert joined["workflow_id"] == first.id and joined["confirmed"] is True
    assert joined["running_requested_by"] == "alice"
    assert joined["running_reason"] == "first: orders only"
    assert joined["running_scope"] == "cancel-only"
    assert joined["escalated"] is True and joined["scope"] == "flatten"
    assert "already running" in run.err and "joined the running kill" in run.err
    assert "alice" in run.err
    assert "escalated it to flatten" in run.err
    report = run.report()
    assert report.workflow_id == first.id and report.scope is KillScope.FLATTEN
    assert [(j.requested_by, j.scope) for j in report.joins] == [("bob", KillScope.FLATTEN)]
    assert first_report == report
    await assert_flat(rig, spot=False)


async def test_join_without_a_worker_says_it_is_unconfirmed_and_does_not_hang(
    dev_env: WorkflowEnvironment, make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0].futures
    task_queue = fresh_id("tq-nobody")
    first = await dev_env.client.start_workflow(
        KillSwitchWorkflow.run,
        KillSwitchInput(accounts=[account], reason="queued first", requested_by="alice"),
        id=kill_workflow_id([account]),
        task_queue=task_queue,
    )
    monkeypatch.setattr(cli_kill, "JOIN_TIMEOUT", timedelta(seconds=2))
    try:
        env = cli_env(rig, dev_env, task_queue)
        run = await in_process(
            "kill", "--account", account, "--reason", "second", "--detach", env=env
        )
        assert run.code == ExitCode.OK, run.err
        assert run.out.strip() == first.id
        assert "joined the running kill" in run.err and "not confirmed" in run.err
        assert "no worker" in run.err
        assert (await first.describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        await first.terminate("test over")


async def test_a_kill_that_finished_while_joining_is_started_anew(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    """The running kill ends between the refused start and the join: a new kill starts."""
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0].futures
    task_queue = fresh_id("tq-race")
    client = dev_env.client
    running = await client.start_workflow(
        KillSwitchWorkflow.run,
        KillSwitchInput(accounts=[account], reason="ends meanwhile", requested_by="alice"),
        id=kill_workflow_id([account]),
        task_queue=task_queue,
    )
    request = KillSwitchInput(accounts=[account], reason="after it", requested_by="bob")
    settings = Settings(task_queue=task_queue, accounts_file=rig.accounts_file)
    joined: list[cli_kill.Joined] = []
    spec = cli_kill._spec(request, settings, joined)
    join = spec.join
    assert join is not None

    async def finish_then_join(c: Client, handle: WorkflowHandle) -> bool:
        await running.terminate("finished meanwhile")
        return await join(c, handle)

    handle = await cli_start.start(client, settings, replace(spec, join=finish_then_join))
    try:
        assert handle.id == running.id
        assert handle.first_execution_run_id not in (None, running.first_execution_run_id)
        assert joined == []
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        await handle.terminate("test over")


# --------------------------------------------------------------------------- no worker


async def test_worker_watch_warns_again_while_nobody_works_and_clears_when_picked_up(
    dev_env: WorkflowEnvironment,
    make_rig: MakeRig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rig = await make_rig(n=1, create=True)
    account = rig.accounts[0].futures
    task_queue = fresh_id("tq-later")
    handle = await dev_env.client.start_workflow(
        KillSwitchWorkflow.run,
        KillSwitchInput(accounts=[account], reason="nobody yet", requested_by="alice"),
        id=kill_workflow_id([account]),
        task_queue=task_queue,
        result_type=KillReport,
    )
    monkeypatch.setattr(cli_start, "REMIND_S", 0.0)
    watch = cli_start.WorkerWatch(dev_env.client, handle.id, task_queue, "kill")
    try:
        await watch.check()
        await watch.check()
        warnings = capsys.readouterr().err.splitlines()
        assert len(warnings) == 2, warnings
        assert warnings[0].startswith("warning: no worker is polling task queue")
        assert warnings[1].startswith("warning: still no worker")
        async with kill_worker(dev_env.client, rig, task_queue=task_queue):
            await handle.result()
            await watch.check()
        assert capsys.readouterr().err.startswith(f"a worker picked up the kill {handle.id}")
    finally:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test over")
