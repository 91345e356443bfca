"""The supervisord deploy target through the real parts: supervisord, strategy, sandbox."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.targets import (
    SupervisorTarget,
    TargetActivities,
    UnknownRelease,
    build_target,
)
from sandbox.strategy.config import Fault
from sandbox.strategy.releases import build_release
from tests.fixtures.sandbox import REPO, NewAccount, SandboxHandle
from tests.helpers import assert_eventually
from tests.sandbox.test_strategy import strategy_config, strategy_env
from workflows.deploy_models import (
    ActivateRequest,
    HealthRequest,
    StopRequest,
    StrategyRef,
)

REF = StrategyRef(strategy="sample", env="sandbox")


@dataclass
class Rig:
    target: SupervisorTarget
    options: dict[str, object]
    env: dict[str, str]
    releases: Path


@pytest_asyncio.fixture
async def rig(
    sandbox: SandboxHandle, new_account: NewAccount, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    """Releases 1.0/2.0 (good) and 3.0 (crash-loop), a config, and a target whose supervisord
    is shut down (with every strategy under it) when the test ends."""
    # A short base: the supervisord unix socket path must stay under ~100 bytes.
    base = Path(tempfile.mkdtemp(prefix="bg-target-"))
    releases = base / "releases"
    for version, fault in (("1.0", Fault.NONE), ("2.0", Fault.NONE), ("3.0", Fault.CRASH_LOOP)):
        build_release(releases, "sample", version, fault)
    account = await new_account()
    config = strategy_config(sandbox, base, symbols=["ETHUSDT"], loop_interval_s=0.5)
    (base / "strategy.json").write_text(config.model_dump_json())
    env = strategy_env(sandbox, account)
    for key in ("STRATEGY_API_KEY", "STRATEGY_API_SECRET"):
        monkeypatch.setenv(key, env[key])  # supervisord passes its environment on
    options: dict[str, object] = {
        "state_dir": str(base / "target"),
        "releases_root": str(releases),
        "strategy_config": str(base / "strategy.json"),
        "port_file": str(config.port_file),
    }
    target = build_target("supervisor", REF, options)
    assert isinstance(target, SupervisorTarget)
    try:
        yield Rig(target, options, env, releases)
    finally:
        target.shutdown_supervisord()
        if not os.environ.get("BG_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


PROBE_S = 5.0
"""One /healthz request's timeout: the strategy answers from its event loop, which a busy
machine can hold up for more than a second (callers poll with ``assert_eventually``)."""
START_S = 180.0
"""Until a started strategy answers healthy: seconds on a busy machine; only a failure waits."""


async def healthy(target: SupervisorTarget, version: str) -> None:
    report = await target.health(timeout_s=PROBE_S)
    assert report.healthy and report.version == version, report


class Poller:
    """Watches supervisor from another thread; remembers the most versions ever alive at once."""

    def __init__(self, target: SupervisorTarget) -> None:
        self.target = target
        self.max_alive = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            alive = self.target._running()
            self.max_alive = max(self.max_alive, len(alive))
            self.samples += 1
            time.sleep(0.01)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_activate_v1_v2_then_previous_one_version_at_a_time(rig: Rig) -> None:
    target = rig.target
    first = await target.activate("1.0", requested_by="test", reason="first deploy")
    assert first.previous is None and first.running_versions == ["1.0"]
    await assert_eventually(lambda: healthy(target, "1.0"), timeout=START_S)

    again = await target.activate("1.0")
    assert again.already_active and again.running_versions == ["1.0"]

    with Poller(target) as poller:
        second = await target.activate("2.0", requested_by="test", reason="upgrade")
        await assert_eventually(lambda: healthy(target, "2.0"), timeout=START_S)
        back = await target.activate((await target.previous()) or "", reason="rollback")
        await assert_eventually(lambda: healthy(target, "1.0"), timeout=START_S)
    print(f"switch 1.0->2.0 {second.switch_s}s, 2.0->1.0 {back.switch_s}s")
    assert poller.samples > 20 and poller.max_alive == 1
    assert second.previous == "1.0" and second.running_versions == ["2.0"]
    assert back.version == "1.0" and back.previous == "2.0"
    assert await target.current() == "1.0" and await target.previous() == "2.0"
    assert target.current_link.resolve() == (rig.releases / "sample" / "1.0").resolve()
    record = target._record()
    assert (record["current"], record["previous"]) == ("1.0", "2.0")
    assert [h["version"] for h in record["history"]] == ["1.0", "2.0", "1.0"]

    with pytest.raises(UnknownRelease):
        await target.activate("9.9")
    assert await target.running_versions() == ["1.0"]

    assert await target.stop() == ["1.0"]
    assert await target.running_versions() == []
    assert not (await target.health()).healthy
    assert await target.stop() == []
    assert await target.start() == ["1.0"]


async def test_crash_loop_release_shows_in_supervisor_and_health(rig: Rig) -> None:
    target = rig.target
    await target.activate("3.0", reason="bad release")

    async def crashing() -> None:
        report = await target.health(timeout_s=PROBE_S)
        assert not report.healthy
        assert report.process_state in ("BACKOFF", "FATAL", "EXITED"), report

    await assert_eventually(crashing, timeout=START_S)
    log = (target.state_dir / "logs" / "3.0.log").read_text()
    assert "exiting on purpose" in log


async def test_strategy_outlives_the_process_that_activated_it(rig: Rig) -> None:
    script = (
        "import asyncio, sys, time\n"
        "from activities.targets import build_target\n"
        "from workflows.deploy_models import StrategyRef\n"
        f"t = build_target('supervisor', StrategyRef(strategy='sample', env='sandbox'), "
        f"{rig.options!r})\n"
        "asyncio.run(t.activate('2.0'))\n"
        "print('activated', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the test kills it
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, **rig.env},
        stdout=subprocess.PIPE,
        start_new_session=False,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"activated"
        await assert_eventually(lambda: healthy(rig.target, "2.0"), timeout=START_S)
        before = {p.version: p.pid for p in (await rig.target.versions()).processes}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Polled, not slept on: the same process still serves, never restarted.
        await assert_eventually(lambda: healthy(rig.target, "2.0"), timeout=START_S)
        after = {p.version: p.pid for p in (await rig.target.versions()).processes}
        assert after == before and before["2.0"] is not None
        assert await rig.target.running_versions() == ["2.0"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_target_activities(rig: Rig) -> None:
    activities = TargetActivities({REF: rig.target})
    env = ActivityEnvironment()
    record = await env.run(activities.activate_version, ActivateRequest(ref=REF, version="2.0"))
    assert record.version == "2.0" and record.running_versions == ["2.0"]
    started = time.monotonic()
    report = await assert_eventually(lambda: _healthy_report(env, activities), timeout=START_S)
    assert report.version == "2.0" and report.trading_state == "ACTIVE"
    print(f"health reached in {time.monotonic() - started:.2f}s; one check {report.elapsed_s}s")
    current = await env.run(activities.current_version, REF)
    assert (current.current, current.running) == ("2.0", ["2.0"])
    stopped = await env.run(activities.stop_strategy, StopRequest(ref=REF, reason="test"))
    assert stopped.stopped_versions == ["2.0"]
    other = StrategyRef(strategy="other", env="sandbox")
    with pytest.raises(ApplicationError, match="no deploy target"):
        await env.run(activities.current_version, other)
    with pytest.raises(ApplicationError) as info:
        await env.run(activities.activate_version, ActivateRequest(ref=REF, version="nope"))
    assert info.value.non_retryable and info.value.type == "UnknownRelease"


async def _healthy_report(env: ActivityEnvironment, activities: TargetActivities) -> object:
    report = await env.run(activities.check_health, HealthRequest(ref=REF, timeout_s=PROBE_S))
    assert report.healthy, report
    return report


def test_unknown_target_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown target kind 'k8s'"):
        build_target("k8s", REF, {})
