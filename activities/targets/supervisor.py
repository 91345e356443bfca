"""The embedded deploy target: strategy processes under a detached supervisord (XML-RPC).

supervisord runs in its own session from the target's state dir, so strategies outlive the worker
that activated them. One program per version; activating stops every other version of the
strategy before the new one starts, swaps the ``current`` symlink and records the previous
version in ``deploy.json`` (each written to a temporary name, then ``os.replace``).

Blue/green: ``start_candidate`` runs a second version beside the current one, on its own HTTP
port (``ports/<version>.port``, handed to it in its environment); ``promote`` makes it current
without stopping the old one, which stays warm for a route-back until ``retire``. At most two
versions run at once. Which of them may send orders is not decided here: the trading lease in the
strategy's database fences that.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from supervisor.xmlrpc import SupervisorTransport

from activities.targets.base import TargetError, UnknownRelease
from activities.targets.registry import register_target_kind
from sandbox.strategy.config import HTTP_PORT_ENV, PORT_FILE_ENV
from workflows.deploy_models import (
    ActivationRecord,
    CandidateRecord,
    HealthReport,
    RetireResult,
    StrategyRef,
    TargetView,
    VersionProcess,
)

REPO = Path(__file__).resolve().parents[2]
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIVE = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}
"""States in which supervisor may have (or soon have) a live process for the program."""
START_TIMEOUT_S = 10.0
HEALTH_PATH = "/healthz"
KEEP_RECORDS = 50
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes


def _now() -> datetime:
    return datetime.now(UTC)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_name(version: str) -> None:
    if not NAME_OK.match(version) or version == "current":
        raise UnknownRelease(f"not a version name: {version!r}")


class SupervisorTarget:
    """``SupervisorTarget(ref, state_dir=..., releases_root=..., strategy_config=...)``.

    ``health_url`` (or ``port_file``, where the strategy writes its HTTP port) locates /healthz.
    The strategy reads its credentials from supervisord's environment, which it inherits from
    the process that first starts supervisord: secrets never land in a config file.
    """

    def __init__(
        self,
        ref: StrategyRef,
        *,
        state_dir: Path,
        releases_root: Path,
        strategy_config: Path,
        health_url: str | None = None,
        port_file: Path | None = None,
        python: str = sys.executable,
        workdir: Path = REPO,
        start_secs: int = 2,
    ) -> None:
        for part in (ref.strategy, ref.env):
            if not NAME_OK.match(part):
                raise ValueError(f"unusable strategy/env name {part!r}")
        self.ref = ref
        self.state_dir = Path(state_dir).resolve()
        self.releases_root = Path(releases_root).resolve()
        self.strategy_config = Path(strategy_config).resolve()
        self.health_url = health_url
        self.port_file = port_file
        self.python = python
        self.workdir = workdir
        self.start_secs = start_secs
        self.socket = self.state_dir / "supervisor.sock"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise ValueError(f"state dir path too long for a unix socket: {self.socket}")
        self.prefix = f"{ref.strategy}.{ref.env}--"

    # ------------------------------------------------------------------ paths and records

    @property
    def current_link(self) -> Path:
        return self.state_dir / "current"

    @property
    def record_file(self) -> Path:
        return self.state_dir / "deploy.json"

    def release_dir(self, version: str) -> Path:
        _check_name(version)
        path = self.releases_root / self.ref.strategy / version
        if not (path / "release.json").is_file():
            raise UnknownRelease(f"no release {version!r} of {self.ref.strategy} under {path}")
        return path

    def _record(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.record_file.read_text()))
        except FileNotFoundError:
            return {"current": None, "previous": None, "history": []}

    def _save(self, record: dict[str, Any]) -> None:
        _write_atomic(self.record_file, json.dumps(record, indent=2))

    def _event(self, record: dict[str, Any], action: str, version: str, who: str, why: str) -> None:
        """Who started or retired which version, when and why (activations go to history)."""
        event = {"action": action, "version": version, "at": _now().isoformat()}
        event |= {"requested_by": who, "reason": why}
        record["events"] = [*record.get("events", []), event][-KEEP_RECORDS:]

    def _point_current(self, release: Path) -> None:
        """Swap the ``current`` symlink atomically (nothing to do when it points there)."""
        if self.current_link.is_symlink() and Path(os.readlink(self.current_link)) == release:
            return
        link_tmp = self.state_dir / ".current.tmp"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(release)
        os.replace(link_tmp, self.current_link)

    def own_port_file(self, version: str) -> Path:
        """Where a version started beside another writes its HTTP port (one file per version:
        two processes cannot share one port or one port file)."""
        return self.state_dir / "ports" / f"{version}.port"

    def _conf(self, version: str) -> Path:
        return self.state_dir / "programs" / f"{version}.conf"

    def _has_own_port(self, version: str) -> bool:
        """True when the version's program runs with its own port file (started as a candidate);
        the program file is what supervisord (re)starts the process with."""
        try:
            return f"{PORT_FILE_ENV}=" in self._conf(version).read_text()
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ supervisord

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _config_text(self) -> str:
        s = self.state_dir
        return f"""; generated by breakglass for {self.ref}
[unix_http_server]
file={s}/supervisor.sock
chmod=0700

[supervisord]
logfile={s}/supervisord.log
pidfile={s}/supervisord.pid
childlogdir={s}/logs
directory={s}
nodaemon=false

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{s}/supervisor.sock

[include]
files = {s}/programs/*.conf
"""

    def _program_text(self, version: str, *, own_port: bool = False) -> str:
        release = self.release_dir(version)
        # The strategy reads these over its config file's http_port/port_file.
        env = (
            f'environment={HTTP_PORT_ENV}="0",{PORT_FILE_ENV}="{self.own_port_file(version)}"\n'
            if own_port
            else ""
        )
        return f"""[program:{self.prefix}{version}]
command={self.python} -m sandbox.strategy --release {release} --config {self.strategy_config}
{env}directory={self.workdir}
autostart=true
autorestart=true
startsecs={self.start_secs}
startretries=2
stopsignal=TERM
stopwaitsecs=10
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={self.state_dir}/logs/{version}.log
"""

    def _is_up(self) -> bool:
        try:
            return bool(self._rpc().supervisor.getState()["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Error):
            return False

    def ensure_supervisord(self) -> None:
        """Start supervisord (detached, own session) unless it already answers."""
        if self._is_up():
            return
        (self.state_dir / "programs").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        conf = self.state_dir / "supervisord.conf"
        _write_atomic(conf, self._config_text())
        # supervisord forks into the background itself; start_new_session detaches it from our
        # terminal and process group, so killing the worker leaves it (and strategies) running.
        subprocess.run(
            [self.python, "-m", "supervisor.supervisord", "-c", str(conf)],
            cwd=self.state_dir,
            start_new_session=True,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=START_TIMEOUT_S,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._is_up():
            if time.monotonic() > deadline:
                raise TargetError(f"supervisord did not start in {self.state_dir}")
            time.sleep(0.05)

    def shutdown_supervisord(self) -> None:
        """Stop supervisord and every strategy under it (tests and teardown)."""
        pid_file = self.state_dir / "supervisord.pid"
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            self._rpc().supervisor.shutdown()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One activation per state dir at a time, across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "deploy.lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _infos(self) -> dict[str, dict[str, Any]]:
        """version -> supervisor's process info, for this strategy's programs."""
        if not self._is_up():
            return {}
        infos = self._rpc().supervisor.getAllProcessInfo()
        return {
            i["name"][len(self.prefix) :]: i for i in infos if i["name"].startswith(self.prefix)
        }

    def processes(self) -> dict[str, str]:
        """version -> supervisor state name, for this strategy's programs."""
        return {v: str(i["statename"]) for v, i in self._infos().items()}

    def _running(self) -> list[str]:
        return sorted(v for v, state in self.processes().items() if state in ALIVE)

    def _remove(self, version: str, state: str | None) -> bool:
        """Stop one version's program (waiting for it to exit) and forget it; True if it ran."""
        rpc = self._rpc()
        name = self.prefix + version
        alive = state in ALIVE
        if alive:
            with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING: raced an exit
                rpc.supervisor.stopProcessGroup(name, True)
        if state is not None:
            rpc.supervisor.removeProcessGroup(name)
        self._conf(version).unlink(missing_ok=True)
        return alive

    def _stop_all(self, keep: str | None = None) -> list[str]:
        return [
            version
            for version, state in sorted(self.processes().items())
            if version != keep and self._remove(version, state)
        ]

    def _install(self, version: str, text: str) -> None:
        """Write the version's program file and have supervisord start it."""
        _write_atomic(self._conf(version), text)
        rpc = self._rpc()
        added, _changed, removed = rpc.supervisor.reloadConfig()[0]
        for name in removed:
            rpc.supervisor.removeProcessGroup(name)
        name = self.prefix + version
        if name in added:
            rpc.supervisor.addProcessGroup(name)  # autostart=true starts it
        elif self.processes().get(version) not in ALIVE:
            rpc.supervisor.startProcessGroup(name, False)

    # ------------------------------------------------------------------ the switch

    def _activate(self, version: str, requested_by: str, reason: str) -> ActivationRecord:
        release = self.release_dir(version)
        with self._lock():
            self.ensure_supervisord()
            record = self._record()
            current = record.get("current")
            states = self.processes()
            running = sorted(v for v, state in states.items() if state in ALIVE)
            if current == version and running == [version]:
                return ActivationRecord(
                    ref=self.ref,
                    version=version,
                    previous=record.get("previous"),
                    activated_at=_now(),
                    requested_by=requested_by,
                    reason=reason,
                    already_active=True,
                    running_versions=running,
                )
            started = time.monotonic()
            # Old first, new second: never two versions trading at once. A new version that
            # already runs (a candidate, or the warm old one) is kept as it runs.
            keep = version if current != version and states.get(version) in ALIVE else None
            self._stop_all(keep=keep)
            previous = current if current != version else record.get("previous")
            activated = ActivationRecord(
                ref=self.ref,
                version=version,
                previous=previous,
                activated_at=_now(),
                requested_by=requested_by,
                reason=reason,
            )
            history = [*record.get("history", []), activated.model_dump(mode="json")]
            record |= {"current": version, "previous": previous, "candidate": None}
            self._save(record | {"history": history[-KEEP_RECORDS:]})
            self._point_current(release)
            if keep is None:
                self.own_port_file(version).unlink(missing_ok=True)
                self._install(version, self._program_text(version))
            return activated.model_copy(
                update={
                    "switch_s": round(time.monotonic() - started, 4),
                    "running_versions": self._running(),
                }
            )

    # ------------------------------------------------------------------ blue/green

    def _start_candidate(self, version: str, requested_by: str, reason: str) -> CandidateRecord:
        self.release_dir(version)
        with self._lock():
            record = self._record()
            current = record.get("current")
            if version == current:
                raise TargetError(
                    f"{version} is already the current version of {self.ref}: "
                    "a candidate runs beside the current one",
                    retryable=False,
                )
            self.ensure_supervisord()
            states = self.processes()
            beside = sorted(
                v for v, state in states.items() if state in ALIVE and v not in (current, version)
            )
            if beside:
                raise TargetError(
                    f"one candidate at a time: {', '.join(beside)} already runs beside "
                    f"{current or 'no current version'}; retire it first",
                    retryable=False,
                )
            already = states.get(version) in ALIVE
            if not already:
                if version in states:  # an earlier attempt's program, exited or FATAL
                    self._remove(version, states[version])
                port_file = self.own_port_file(version)
                port_file.parent.mkdir(exist_ok=True)
                port_file.unlink(missing_ok=True)  # health never reads a dead process's port
                self._install(version, self._program_text(version, own_port=True))
            if not already or record.get("candidate") != version:
                record["candidate"] = version
                self._event(record, "start_candidate", version, requested_by, reason)
                self._save(record)
            return CandidateRecord(
                ref=self.ref,
                version=version,
                current=current,
                started_at=_now(),
                requested_by=requested_by,
                reason=reason,
                already_running=already,
                process_state=self.processes().get(version),
                port_file=(
                    str(self.own_port_file(version)) if self._has_own_port(version) else None
                ),
                running_versions=self._running(),
            )

    def _promote(self, version: str, requested_by: str, reason: str) -> ActivationRecord:
        release = self.release_dir(version)
        with self._lock():
            record = self._record()
            current = record.get("current")
            if current == version:
                self._point_current(release)  # heals a switch interrupted between its two writes
                return ActivationRecord(
                    ref=self.ref,
                    version=version,
                    previous=record.get("previous"),
                    activated_at=_now(),
                    requested_by=requested_by,
                    reason=reason,
                    already_active=True,
                    running_versions=self._running(),
                    action="promote",
                )
            state = self.processes().get(version)
            if state != "RUNNING":
                raise TargetError(
                    f"{version} is not running ({state or 'absent'}): start it as a candidate "
                    "and wait until it is healthy before promoting it",
                    retryable=state == "STARTING",
                )
            started = time.monotonic()
            promoted = ActivationRecord(
                ref=self.ref,
                version=version,
                previous=current,
                activated_at=_now(),
                requested_by=requested_by,
                reason=reason,
                action="promote",
            )
            history = [*record.get("history", []), promoted.model_dump(mode="json")]
            record |= {"current": version, "previous": current}
            if record.get("candidate") == version:
                record["candidate"] = None
            self._save(record | {"history": history[-KEEP_RECORDS:]})
            self._point_current(release)
            return promoted.model_copy(
                update={
                    "switch_s": round(time.monotonic() - started, 4),
                    "running_versions": self._running(),
                }
            )

    def _retire(self, version: str, requested_by: str, reason: str, force: bool) -> RetireResult:
        _check_name(version)  # not release_dir: a release deleted from disk can still be retired
        with self._lock():
            record = self._record()
            if version == record.get("current") and not force:
                raise TargetError(
                    f"{version} is the current version of {self.ref}: retiring it stops trading "
                    "(stop_strategy does that; force=True to retire it anyway)",
                    retryable=False,
                )
            state = self.processes().get(version)
            known = state is not None or self._conf(version).exists()
            stopped = self._remove(version, state) if known else False
            self.own_port_file(version).unlink(missing_ok=True)
            if known or record.get("candidate") == version:
                if record.get("candidate") == version:
                    record["candidate"] = None
                self._event(record, "retire", version, requested_by, reason)
                self._save(record)
            return RetireResult(
                ref=self.ref,
                version=version,
                stopped_versions=[version] if stopped else [],
                already_retired=not known,
                running_versions=self._running(),
            )

    def _view(self) -> TargetView:
        record = self._record()
        infos = self._infos()
        return TargetView(
            ref=self.ref,
            current=record.get("current"),
            previous=record.get("previous"),
            candidate=record.get("candidate"),
            running=sorted(v for v, i in infos.items() if i["statename"] in ALIVE),
            processes=[
                VersionProcess(
                    version=v,
                    state=str(i["statename"]),
                    pid=int(i["pid"]) or None,
                    port_file=str(self.own_port_file(v)) if self._has_own_port(v) else None,
                )
                for v, i in sorted(infos.items())
            ],
        )

    async def start_candidate(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> CandidateRecord:
        return await asyncio.to_thread(self._start_candidate, version, requested_by, reason)

    async def promote(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> ActivationRecord:
        return await asyncio.to_thread(self._promote, version, requested_by, reason)

    async def retire(
        self,
        version: str,
        *,
        requested_by: str = "breakglass",
        reason: str = "",
        force: bool = False,
    ) -> RetireResult:
        return await asyncio.to_thread(self._retire, version, requested_by, reason, force)

    async def versions(self) -> TargetView:
        return await asyncio.to_thread(self._view)

    # ------------------------------------------------------------------ DeployTarget

    async def activate(
        self, version: str, *, requested_by: str = "breakglass", reason: str = ""
    ) -> ActivationRecord:
        return await asyncio.to_thread(self._activate, version, requested_by, reason)

    async def current(self) -> str | None:
        return (await asyncio.to_thread(self._record)).get("current")

    async def previous(self) -> str | None:
        return (await asyncio.to_thread(self._record)).get("previous")

    async def stop(self) -> list[str]:
        def stop() -> list[str]:
            with self._lock():
                if not self._is_up():
                    return []
                rpc = self._rpc()
                stopped = []
                for version, state in self.processes().items():
                    if state in ALIVE:
                        with contextlib.suppress(xmlrpc.client.Fault):
                            rpc.supervisor.stopProcessGroup(self.prefix + version, True)
                        stopped.append(version)
                return sorted(stopped)

        return await asyncio.to_thread(stop)

    async def start(self) -> list[str]:
        current = await self.current()
        if current is None:
            raise TargetError(f"{self.ref} has no current version to start", retryable=False)
        return list((await self.activate(current, reason="start")).running_versions)

    async def running_versions(self) -> list[str]:
        return await asyncio.to_thread(self._running)

    def _url(self, version: str | None) -> str | None:
        """/healthz of one version: its own port file if it has one, else the configured port."""
        if version is not None and self._has_own_port(version):
            path = urlsplit(self.health_url).path if self.health_url else HEALTH_PATH
            return self._port_url(self.own_port_file(version), path)
        if self.health_url:
            return self.health_url
        if self.port_file is not None:
            return self._port_url(self.port_file, HEALTH_PATH)
        return None

    @staticmethod
    def _port_url(port_file: Path, path: str) -> str | None:
        try:
            port = port_file.read_text().strip()
        except FileNotFoundError:
            return None  # not written yet: the process is still starting
        return f"http://127.0.0.1:{port}{path or HEALTH_PATH}"

    async def health(self, timeout_s: float = 2.0, version: str | None = None) -> HealthReport:
        """One /healthz look at ``version`` (default: the current one)."""
        started = time.monotonic()
        states = await asyncio.to_thread(self.processes)
        wanted = version if version is not None else await self.current()
        process_state = states.get(wanted) if wanted else None
        url = await asyncio.to_thread(self._url, wanted)

        def report(healthy: bool, **fields: Any) -> HealthReport:
            return HealthReport(
                ref=self.ref,
                healthy=healthy,
                checked_at=_now(),
                process_state=process_state,
                elapsed_s=round(time.monotonic() - started, 4),
                url=url,
                **fields,
            )

        if process_state not in ("STARTING", "RUNNING") or url is None:
            return report(False, detail=f"process {process_state or 'absent'}")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
                s.get(url) as r,
            ):
                body = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return report(False, detail=f"/healthz: {type(e).__name__}: {e}")
        healthy = status == 200 and body.get("version") == wanted
        return report(
            healthy,
            status_code=status,
            version=body.get("version"),
            trading_state=body.get("trading_state"),
            detail="" if healthy else f"/healthz answered {status}: {body}",
        )


@register_target_kind("supervisor")
def supervisor_target(ref: StrategyRef, options: Mapping[str, Any]) -> SupervisorTarget:
    """``target: {kind: supervisor, state_dir, releases_root, strategy_config, port_file}``."""
    paths = {"state_dir", "releases_root", "strategy_config", "port_file", "workdir"}
    kwargs: dict[str, Any] = {
        k: Path(v) if k in paths and v is not None else v for k, v in options.items()
    }
    return SupervisorTarget(ref, **kwargs)
