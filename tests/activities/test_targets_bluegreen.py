"""Blue/green on the supervisord deploy target, through real supervisord and strategy processes.

Every strategy here runs HALTED (trading state in its database): two versions run side by side
and the trading lease that lets only one of them send orders is not part of the target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.rollback_plan import RollbackPlanner
from activities.snapshot_catalog import SnapshotCatalog
from activities.targets import SupervisorTarget, TargetActivities, TargetError, UnknownRelease
from sandbox.strategy.config import HTTP_PORT_ENV, PORT_FILE_ENV, Fault, StrategyConfig
from sandbox.strategy.releases import build_release
from sandbox.strategy.state import TradingState, set_trading_state
from tests.activities.test_targets import REF, Poller, Rig, rig  # noqa: F401 - rig is a fixture
from tests.fixtures.sandbox import REPO
from tests.helpers import assert_eventually
from workflows.deploy_models import (
    ActivateRequest,
    CandidateRequest,
    HealthReport,
    HealthRequest,
    RetireRequest,
    TargetView,
)
from workflows.rollback_models import RollbackInput
from workflows.snapshot_models import DatabaseKind, SnapshotRecord

START_S = 180.0
"""Generous: a strategy imports ccxt and reaches the sandbox before it is healthy (seconds on a
busy machine); only a failing test waits this long."""
PROBE_S = 5.0
"""One /healthz request's timeout: the strategy answers from its event loop, which a busy
machine can hold up for more than a second."""


@pytest_asyncio.fixture
async def halted(rig: Rig) -> AsyncIterator[Rig]:  # noqa: F811 - the fixture imported above
    """The rig with the strategy's trading state HALTED before any version starts."""
    halt(rig.target.strategy_config)
    yield rig


def halt(strategy_config: Path) -> None:
    db = json.loads(strategy_config.read_text())["db"]
    set_trading_state(db, TradingState.HALTED, "test", "two versions run side by side")


def port_url(port_file: str | None) -> str:
    assert port_file is not None
    return f"http://127.0.0.1:{Path(port_file).read_text()}/healthz"


async def healthy(target: SupervisorTarget, version: str | None = None) -> HealthReport:
    """A healthy /healthz of ``version`` (default: the current one), HALTED: one probe."""
    report = await target.health(timeout_s=PROBE_S, version=version)
    assert report.healthy, report
    assert report.version == (version or await target.current()), report
    assert report.trading_state == "HALTED", report
    return report


async def comes_healthy(target: SupervisorTarget, version: str | None = None) -> HealthReport:
    """``healthy``, polled: a version just started, kept or handed over answers on its port
    once it wrote its port file and its loop thread let /healthz through, which on a busy
    machine is after the call that started it returned."""
    return await assert_eventually(lambda: healthy(target, version), timeout=START_S)


async def running(target: SupervisorTarget, *versions: str) -> TargetView:
    """Exactly ``versions`` have programs, each RUNNING (past supervisord's start window)."""
    view = await target.versions()
    assert {p.version: p.state for p in view.processes} == dict.fromkeys(versions, "RUNNING")
    return view


def pids(view: TargetView) -> dict[str, int | None]:
    return {p.version: p.pid for p in view.processes}


async def everything(target: SupervisorTarget) -> tuple[object, ...]:
    """What a refusal must leave untouched: programs, pids, record, ``current`` link, ports."""
    view = await target.versions()
    ports = sorted(p.name for p in (target.state_dir / "ports").glob("*"))
    programs = sorted(p.name for p in (target.state_dir / "programs").glob("*.conf"))
    return (
        view,
        target.record_file.read_text(),
        os.readlink(target.current_link),
        ports,
        programs,
    )


async def candidate_beside(target: SupervisorTarget, current: str, candidate: str) -> None:
    await target.activate(current, requested_by="test", reason="first deploy")
    started = await target.start_candidate(candidate, requested_by="test", reason="shadow")
    assert started.current == current and not started.already_running
    await comes_healthy(target, candidate)
    await assert_eventually(lambda: running(target, current, candidate), timeout=START_S)


async def test_candidate_beside_current_promote_route_back_retire(halted: Rig) -> None:
    target = halted.target
    with Poller(target) as poller:
        await target.activate("1.0", requested_by="test", reason="first deploy")
        await comes_healthy(target)

        started = time.monotonic()
        candidate = await target.start_candidate("2.0", requested_by="test", reason="shadow")
        assert candidate.version == "2.0" and candidate.current == "1.0"
        assert not candidate.already_running and candidate.running_versions == ["1.0", "2.0"]
        assert candidate.port_file == str(target.state_dir / "ports" / "2.0.port")
        green = await comes_healthy(target, "2.0")
        print(f"candidate healthy in {time.monotonic() - started:.2f}s")
        blue = await comes_healthy(target)  # the current one, on the configured port
        assert blue.version == "1.0" and blue.url != green.url
        assert green.url == port_url(candidate.port_file)
        view = await assert_eventually(lambda: running(target, "1.0", "2.0"), timeout=START_S)
        assert (view.current, view.previous, view.candidate) == ("1.0", None, "2.0")
        assert view.running == ["1.0", "2.0"]
        assert [p.port_file for p in view.processes] == [None, candidate.port_file]
        assert await target.current() == "1.0"
        assert target.current_link.resolve() == (halted.releases / "sample" / "1.0").resolve()
        both = pids(view)
        assert len(set(both.values())) == 2

        again = await target.start_candidate("2.0", requested_by="test", reason="retry")
        assert again.already_running and again.running_versions == ["1.0", "2.0"]

        promoted = await target.promote("2.0", requested_by="test", reason="handover")
        print(f"promote switched in {promoted.switch_s}s")
        assert (promoted.version, promoted.previous, promoted.action) == ("2.0", "1.0", "promote")
        assert not promoted.already_active and promoted.running_versions == ["1.0", "2.0"]
        assert await target.current() == "2.0" and await target.previous() == "1.0"
        assert target.current_link.resolve() == (halted.releases / "sample" / "2.0").resolve()
        view = await running(target, "1.0", "2.0")
        assert pids(view) == both, "promote restarted a process"
        assert (view.current, view.previous, view.candidate) == ("2.0", "1.0", None)
        # The current one now answers on its own port; the old one stays warm.
        assert (await comes_healthy(target)).url == green.url
        await comes_healthy(target, "1.0")

        repeat = await target.promote("2.0", requested_by="test", reason="retry")
        assert repeat.already_active and repeat.previous == "1.0"

        # Route-back: the same handover in reverse, while the new one stays warm.
        back = await target.promote("1.0", requested_by="test", reason="route back")
        assert (back.version, back.previous) == ("1.0", "2.0")
        assert pids(await running(target, "1.0", "2.0")) == both
        await comes_healthy(target)
        again_forward = await target.promote("2.0", requested_by="test", reason="forward again")
        assert again_forward.previous == "1.0"

        retired = await target.retire("1.0", requested_by="test", reason="delay passed")
        assert retired.stopped_versions == ["1.0"] and not retired.already_retired
        assert retired.running_versions == ["2.0"]
        view = await running(target, "2.0")
        assert pids(view) == {"2.0": both["2.0"]}
        await comes_healthy(target)
        assert not (target.state_dir / "programs" / "1.0.conf").exists()
        repeat_retire = await target.retire("1.0", requested_by="test", reason="retry")
        assert repeat_retire.already_retired and repeat_retire.stopped_versions == []
    assert poller.max_alive == 2

    record = target._record()
    assert [(h["version"], h["action"]) for h in record["history"]] == [
        ("1.0", "activate"),
        ("2.0", "promote"),
        ("1.0", "promote"),
        ("2.0", "promote"),
    ]
    assert [(e["action"], e["version"], e["reason"]) for e in record["events"]] == [
        ("start_candidate", "2.0", "shadow"),
        ("retire", "1.0", "delay passed"),
    ]


async def test_refusals_change_nothing(halted: Rig) -> None:
    target = halted.target
    await candidate_beside(target, "1.0", "2.0")
    before = await everything(target)
    refusals = [
        (lambda: target.start_candidate("9.9"), UnknownRelease, "no release '9.9'"),
        (lambda: target.start_candidate("1.0"), TargetError, "already the current version"),
        (lambda: target.start_candidate("4.0"), UnknownRelease, "no release '4.0'"),
        (lambda: target.promote("9.9"), UnknownRelease, "no release '9.9'"),
        (lambda: target.promote("3.0"), TargetError, r"3.0 is not running \(absent\)"),
        (lambda: target.retire("1.0"), TargetError, "is the current version"),
        (lambda: target.retire("../x"), UnknownRelease, "not a version name"),
    ]
    for call, error, message in refusals:
        with pytest.raises(error, match=message) as info:
            await call()
        assert not info.value.retryable
        assert await everything(target) == before, message

    build_release(halted.releases, "sample", "4.0", Fault.NONE)
    with pytest.raises(
        TargetError, match=r"one candidate at a time: 2\.0 already runs beside 1\.0"
    ):
        await target.start_candidate("4.0")
    assert await everything(target) == before
    # After a promotion the old version stays warm: still no room for a third one.
    await target.promote("2.0", requested_by="test", reason="handover")
    with pytest.raises(
        TargetError, match=r"one candidate at a time: 1\.0 already runs beside 2\.0"
    ):
        await target.start_candidate("4.0")
    assert (await target.versions()).running == ["1.0", "2.0"]


async def test_crash_looping_candidate_cannot_be_promoted(halted: Rig) -> None:
    target = halted.target
    await target.activate("1.0", requested_by="test", reason="first deploy")
    await target.start_candidate("3.0", requested_by="test", reason="shadow")

    async def crashed() -> None:
        report = await target.health(timeout_s=PROBE_S, version="3.0")
        assert not report.healthy and report.process_state == "FATAL", report

    await assert_eventually(crashed, timeout=START_S)
    with pytest.raises(TargetError, match=r"3.0 is not running \(FATAL\)") as info:
        await target.promote("3.0", requested_by="test", reason="handover")
    assert not info.value.retryable
    assert await target.current() == "1.0"
    await comes_healthy(target)
    # A dead candidate holds no place: another one may start (its program replaces nothing).
    await target.start_candidate("2.0", requested_by="test", reason="second try")
    await comes_healthy(target, "2.0")
    assert (await target.retire("3.0", reason="crashed")).stopped_versions == []
    assert (await target.versions()).candidate == "2.0"


async def test_activate_leaves_one_version_even_beside_a_candidate(halted: Rig) -> None:
    target = halted.target
    build_release(halted.releases, "sample", "4.0", Fault.NONE)
    await candidate_beside(target, "1.0", "2.0")

    # A third version: both are stopped before it starts.
    with Poller(target) as poller:
        record = await target.activate("4.0", requested_by="test", reason="plain deploy")
    assert record.running_versions == ["4.0"] and record.previous == "1.0"
    assert poller.max_alive == 2 and (await target.versions()).candidate is None
    await comes_healthy(target, "4.0")

    # The current one again: the candidate is stopped, the current one restarted on its own.
    await target.start_candidate("2.0", requested_by="test", reason="shadow")
    await assert_eventually(lambda: running(target, "2.0", "4.0"), timeout=START_S)
    record = await target.activate("4.0", requested_by="test", reason="start")
    assert record.running_versions == ["4.0"]
    await comes_healthy(target)

    # The candidate itself: kept as it runs (same process, own port), everything else stopped.
    await target.start_candidate("2.0", requested_by="test", reason="shadow")
    view = await assert_eventually(lambda: running(target, "2.0", "4.0"), timeout=START_S)
    record = await target.activate("2.0", requested_by="test", reason="activate the candidate")
    assert record.running_versions == ["2.0"] and record.previous == "4.0"
    after = await running(target, "2.0")
    assert pids(after)["2.0"] == pids(view)["2.0"]
    assert after.processes[0].port_file is not None
    await comes_healthy(target)
    assert await target.stop() == ["2.0"] and await target.start() == ["2.0"]
    await comes_healthy(target)
    assert (await target.versions()).processes[0].port_file is None  # restarted as activate does


async def test_candidate_outlives_the_worker_that_started_it(halted: Rig) -> None:
    await halted.target.activate("1.0", requested_by="test", reason="first deploy")
    script = (
        "import asyncio, time\n"
        "from activities.targets import build_target\n"
        "from workflows.deploy_models import StrategyRef\n"
        f"t = build_target('supervisor', StrategyRef(strategy='sample', env='sandbox'), "
        f"{halted.options!r})\n"
        "asyncio.run(t.start_candidate('2.0', requested_by='worker', reason='shadow'))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the test kills it
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, **halted.env},
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A new worker: a fresh target object over the same state dir finds the candidate running.
    fresh = SupervisorTarget(
        REF,
        state_dir=halted.target.state_dir,
        releases_root=halted.releases,
        strategy_config=Path(str(halted.options["strategy_config"])),
        port_file=Path(str(halted.options["port_file"])),
    )
    await comes_healthy(fresh, "2.0")
    view = await assert_eventually(lambda: running(fresh, "1.0", "2.0"), timeout=START_S)
    assert (view.current, view.candidate) == ("1.0", "2.0")
    assert (await fresh.start_candidate("2.0")).already_running
    await fresh.promote("2.0", requested_by="worker-2", reason="handover")
    assert pids(await running(fresh, "1.0", "2.0")) == pids(view)
    await comes_healthy(fresh)


async def test_blue_green_activities(halted: Rig) -> None:
    activities = TargetActivities({REF: halted.target})
    env = ActivityEnvironment()
    await env.run(activities.activate_version, ActivateRequest(ref=REF, version="1.0"))
    started = await env.run(
        activities.start_candidate, CandidateRequest(ref=REF, version="2.0", reason="shadow")
    )
    assert started.current == "1.0" and started.running_versions == ["1.0", "2.0"]

    async def candidate_healthy() -> HealthReport:
        request = HealthRequest(ref=REF, timeout_s=PROBE_S, version="2.0")
        report = await env.run(activities.check_health, request)
        assert report.healthy and report.version == "2.0", report
        return report

    await assert_eventually(candidate_healthy, timeout=START_S)
    view = await env.run(activities.target_view, REF)
    assert (view.current, view.candidate, view.running) == ("1.0", "2.0", ["1.0", "2.0"])
    with pytest.raises(ApplicationError) as info:
        await env.run(
            activities.start_candidate, CandidateRequest(ref=REF, version="3.0", reason="x")
        )
    assert info.value.non_retryable and info.value.type == "TargetError"
    assert "one candidate at a time" in str(info.value)

    await assert_eventually(lambda: running(halted.target, "1.0", "2.0"), timeout=START_S)
    promoted = await env.run(
        activities.promote_version, ActivateRequest(ref=REF, version="2.0", reason="handover")
    )
    assert promoted.previous == "1.0" and promoted.running_versions == ["1.0", "2.0"]
    with pytest.raises(ApplicationError) as info:
        await env.run(activities.retire_version, RetireRequest(ref=REF, version="2.0"))
    assert info.value.non_retryable and "is the current version" in str(info.value)
    retired = await env.run(
        activities.retire_version, RetireRequest(ref=REF, version="1.0", reason="delay passed")
    )
    assert retired.stopped_versions == ["1.0"] and retired.running_versions == ["2.0"]
    forced = await env.run(
        activities.retire_version,
        RetireRequest(ref=REF, version="2.0", reason="drill", force=True),
    )
    assert forced.stopped_versions == ["2.0"] and forced.running_versions == []
    current = await env.run(activities.current_version, REF)
    assert (current.current, current.previous, current.running) == ("2.0", "1.0", [])
    with pytest.raises(ApplicationError) as info:
        await env.run(activities.promote_version, ActivateRequest(ref=REF, version="nope"))
    assert info.value.non_retryable and info.value.type == "UnknownRelease"


def test_strategy_config_port_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "strategy.json"
    path.write_text(
        json.dumps(
            {
                "exchange_address": "127.0.0.1:1",
                "feed_url": "http://127.0.0.1:1",
                "ca_file": "ca.pem",
                "db": "s.sqlite",
                "http_port": 8080,
                "port_file": "shared.port",
            }
        )
    )
    monkeypatch.delenv(HTTP_PORT_ENV, raising=False)
    monkeypatch.delenv(PORT_FILE_ENV, raising=False)
    plain = StrategyConfig.load(path)
    assert (plain.http_port, plain.port_file) == (8080, Path("shared.port"))
    monkeypatch.setenv(HTTP_PORT_ENV, "0")
    monkeypatch.setenv(PORT_FILE_ENV, str(tmp_path / "2.0.port"))
    own = StrategyConfig.load(path)
    assert (own.http_port, own.port_file) == (0, tmp_path / "2.0.port")


async def test_a_rollback_to_the_current_version_is_planned_only_while_a_candidate_runs(
    halted: Rig, tmp_path: Path
) -> None:
    """A deployment that fails during its canary rolls back to the version that is still
    current: the plan allows it exactly when a candidate runs beside (to clear it)."""
    target = halted.target
    catalog = SnapshotCatalog(tmp_path / "catalog.sqlite")
    catalog.add(
        SnapshotRecord(
            id="snap-" + "b" * 24,
            strategy=REF.strategy,
            env=REF.env,
            version="1.0",
            db_kind=DatabaseKind.SQLITE,
            size_bytes=1,
            checksum="c" * 64,
            content_checksum="d" * 64,
            created_at=datetime.now(UTC),
            path=tmp_path / "artifact",
        )
    )
    runbooks = tmp_path / "rb"
    runbooks.mkdir()
    (runbooks / "rb.yaml").write_text(
        f"strategy: {REF.strategy}\nenv: {REF.env}\naccounts: [alpha-futures]\n"
        f"target: {{kind: supervisor, releases_root: {halted.releases}, state_dir: /s, "
        f"strategy_config: /c.json, http_port: 8081}}\n"
        f"database: {{kind: sqlite, path: {tmp_path}/db.sqlite}}\nflatten: {{mode: auto}}\n"
    )
    planner = RollbackPlanner(runbooks, lambda ref: target, catalog)
    request = RollbackInput(
        strategy=REF.strategy, env=REF.env, target_version="1.0", reason="canary", requested_by="a"
    )
    await target.activate("1.0", requested_by="test", reason="live")
    with pytest.raises(ApplicationError, match="already the current version"):
        await ActivityEnvironment().run(planner.plan, request)
    await target.start_candidate("2.0", requested_by="test", reason="canary")
    plan = await ActivityEnvironment().run(planner.plan, request)
    assert (plan.version_from, plan.version_to) == ("1.0", "1.0")
