"""``breakglass kill`` / ``status`` as a user runs them: a real process, its output and exit code,
against the dev server and the sandbox. Refusals must leave no workflow and send no order."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from tests.fixtures.venues import MakeRig, Rig, assert_flat, kill_worker
from tests.helpers import fresh_id
from workflows.shared import ExitCode, KillOutcome, KillReport

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str


async def breakglass(*args: str, env: dict[str, str]) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def cli_env(rig: Rig, env: WorkflowEnvironment, task_queue: str, **extra: str) -> dict[str, str]:
    return {
        **rig.worker_env(env.client.service_client.config.target_host, task_queue),
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
        run = await breakglass("kill", *names, "--reason", "reject storm", "--json", env=env)
        assert run.code == ExitCode.OK, run.err
        report = KillReport.model_validate_json(run.out)  # stdout is the JSON, nothing else
        status = await breakglass("status", report.workflow_id, "--json", env=env)
    assert report.outcome is KillOutcome.VERIFIED
    assert report.requested_by and report.reason == "reject storm"
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
    run = await breakglass(
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
    run = await breakglass(
        "kill", "--account", rig.accounts[0].futures, "--reason", "route typo", env=env
    )
    assert run.code == ExitCode.BAD_INPUT
    assert f"{broken}:{line}:" in run.err and ".route" in run.err

    broken.write_text("accounts:\n  a: [unclosed\n")
    run = await breakglass("kill", "--account", "a", "--reason", "test", env=env)
    assert run.code == ExitCode.BAD_INPUT
    assert "invalid YAML" in run.err and str(broken) in run.err


async def test_bad_arguments_are_refused(dev_env: WorkflowEnvironment, make_rig: MakeRig) -> None:
    rig = await make_rig(n=1, create=True)
    env = cli_env(rig, dev_env, fresh_id("tq"))
    run = await breakglass("kill", "--account", rig.accounts[0].futures, "--reason", "", env=env)
    assert run.code == ExitCode.BAD_INPUT
    assert "reason" in run.err
    run = await breakglass("kill", "--reason", "no account", env=env)
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
    run = await breakglass("kill", "--account", rig.accounts[0].futures, "--reason", "x y", env=env)
    assert run.code == ExitCode.UNREACHABLE
    assert f"cannot reach Temporal at {address}" in run.err
    assert len(run.err.strip().splitlines()) == 1


async def test_wrong_credentials_report_unverified_and_send_nothing(
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
        run = await breakglass(
            "kill", "--account", account.futures, "--reason", "bad keys", env=env
        )
    assert run.code == ExitCode.UNVERIFIED, run.out + run.err
    assert "AuthFailed" in run.out
    assert wrong not in run.out + run.err and account.api_key not in run.out + run.err
    state = await rig.admin.state(account.api_key)
    assert len(state.orders) == orders_before  # no order was sent
    assert state.open_orders  # and nothing was pretended


async def test_status_of_an_unknown_workflow(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    env = cli_env(rig, dev_env, fresh_id("tq"))
    run = await breakglass("status", "kill/" + fresh_id("none"), env=env)
    assert run.code == ExitCode.NOT_FOUND
    assert "no workflow" in run.err


def test_help_documents_exit_codes() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "kill", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert out.returncode == 0
    assert "--account" in out.stdout and "--reason" in out.stdout


async def test_kill_without_a_worker_warns_and_stays_queued(
    dev_env: WorkflowEnvironment, make_rig: MakeRig
) -> None:
    rig = await make_rig(n=1, create=True)
    env = cli_env(rig, dev_env, fresh_id("tq-nobody"))
    run = await breakglass(
        "kill", "--account", rig.accounts[0].futures, "--reason", "no worker", "--detach", env=env
    )
    assert run.code == ExitCode.OK
    assert "no worker is polling task queue" in run.err
    workflow_id = run.out.strip()
    status = await breakglass("status", workflow_id, env=env)
    assert status.code == ExitCode.OK and "running" in status.out
    await dev_env.client.get_workflow_handle(workflow_id).terminate("test over")
