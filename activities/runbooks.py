"""A runbook: how breakglass operates one strategy in one environment, read from YAML.

One file per strategy × env under ``runbooks/`` (e.g. ``runbooks/sample-prod.yaml``). It names the
accounts the system trades on, where it is deployed, its state database, and the policies of the
rollback saga (snapshots, flattening, approvals, step timeouts, health check). Every field has a
safe default; cross-field rules are checked here so that a bad runbook is refused by
``breakglass runbook validate`` long before an incident. Errors read ``file:line: field: message``.

Secrets are never written in a runbook: databases name the environment variable of their password.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from activities.accounts import ConfigError, _line_of, load_accounts, parse_yaml_model
from workflows.analysis_models import AnalysisPolicy
from workflows.deploy_models import StrategyRef
from workflows.deployment_models import CanaryStep
from workflows.rollback_models import FlattenMode, StepTimeouts
from workflows.shared import ACCOUNT_NAME_PATTERN
from workflows.snapshot_models import NAME_PATTERN, DatabaseRef

APPROVER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$"
"""Approver names: a user handle or e-mail address."""


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def _refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is (no ``Value error,`` prefix)."""
    return PydanticCustomError("runbook", message)


class SupervisorTarget(_Config):
    """The strategy runs under a supervisord owned by breakglass, one release folder per version."""

    kind: Literal["supervisor"] = "supervisor"
    """Deploy target kind; only ``supervisor`` exists today."""
    releases_root: Path
    """Folder holding ``<strategy>/<version>/`` release folders (required)."""
    state_dir: Path
    """The target's own folder: supervisord config and socket, ``current`` link, deploy record
    (required; keep the path short, it holds a unix socket)."""
    strategy_config: Path
    """The strategy's config file passed to every release (required)."""
    http_port: int = Field(default=0, ge=0, le=65535)
    """Port of the strategy's /healthz; 0 (default): the strategy picks one and writes it to
    ``port_file``."""
    port_file: Path | None = Field(default=None, validate_default=True)
    """Where the strategy writes its HTTP port (required when ``http_port`` is 0)."""
    start_secs: int = Field(default=2, ge=0, le=300)
    """Seconds a program must stay up before supervisord calls it started (default 2)."""

    @field_validator("port_file")
    @classmethod
    def _port_known(cls, port_file: Path | None, info: ValidationInfo) -> Path | None:
        if port_file is None and info.data.get("http_port") == 0:
            raise _refuse("http_port is 0 (the strategy picks a port): name the port_file")
        return port_file


class SnapshotPolicy(_Config):
    before_deploy: bool = True
    """Snapshot the state database before every deploy and rollback (default: yes)."""
    keep: int = Field(default=20, ge=1, le=1000)
    """Snapshots kept per strategy × env; older ones are pruned (default 20, at least 1)."""


class TimeoutAction(StrEnum):
    FLATTEN = "flatten"
    """No answer in time: flatten anyway."""
    HOLD = "hold"
    """No answer in time: keep positions and page a human (the default)."""


class FlattenPolicy(_Config):
    mode: FlattenMode = FlattenMode.APPROVE
    """``auto``, ``approve`` (default: a human decides) or ``hold``."""
    approval_timeout_s: int = Field(default=600, ge=30, le=86_400)
    """How long an approval is waited for (default 600 s; 30 s to 24 h)."""
    on_timeout: TimeoutAction = TimeoutAction.HOLD
    """What happens when nobody approves in time (default ``hold``: no unapproved trades)."""

    @field_validator("on_timeout")
    @classmethod
    def _consistent(cls, on_timeout: TimeoutAction, info: ValidationInfo) -> TimeoutAction:
        if on_timeout is TimeoutAction.FLATTEN and info.data.get("mode") is FlattenMode.HOLD:
            raise _refuse(
                "on_timeout: flatten contradicts mode: hold (hold never flattens); "
                "use mode: approve or on_timeout: hold"
            )
        return on_timeout


class HealthCheck(_Config):
    path: str = Field(default="/healthz", pattern=r"^/[\x21-\x7e]{0,200}$")
    """HTTP path of the strategy's health endpoint (default ``/healthz``)."""
    timeout_s: int = Field(default=60, ge=1, le=1800)
    """How long a new version has to report healthy before the step fails (default 60)."""
    interval_s: float = Field(default=1.0, gt=0, le=60)
    """Pause between health probes (default 1 s)."""


class StagingCheck(StrEnum):
    """The staging checks that exist (``activities/staging_checks.py``): a runbook naming any
    other is refused when it is read, not half-way through a deployment."""

    FEED = "feed"
    """Market-data connectivity, fetch-and-parse latency and age of prices."""
    BROKER = "broker"
    """Integration battery against the staging venue: routing, cancels, position updates."""
    KILL_SWITCH = "kill-switch"
    """The kill switch triggered and verified on the staging account."""
    RELEASE = "release"
    """The release itself trades on staging for ``staging_bake_s``: health, decision speed,
    resources, risk caps and reject rate, then reconciliation and persistence after its stop."""


class DeployPolicy(_Config):
    """How a new version is released (``breakglass deploy``)."""

    staging_env: str | None = Field(default=None, pattern=NAME_PATTERN)
    """Environment whose runbook (same strategy) validates the release first; None: no staging."""
    checks: list[StagingCheck] = Field(default_factory=lambda: list(StagingCheck))
    """Staging checks, in order (default: all four: feed, broker, kill-switch, release)."""
    check_symbols: list[str] = Field(default_factory=lambda: ["BTCUSDT"], min_length=1)
    """Venue symbols (exchange ids) the staging checks trade (default ``BTCUSDT``)."""
    staging_bake_s: float = Field(default=20, gt=0, le=3600)
    """How long the ``release`` check lets the release trade on staging (default 20 s). This and
    the ``staging_max_*`` limits are read from the staging env's runbook, where the check runs."""
    staging_max_decision_p99_s: float = Field(default=0.5, gt=0, le=60)
    """``release`` check: the release's p99 time to decide an order (its own
    ``strategy_decision_seconds``, the venue's round trip excluded) must stay below (default
    0.5 s)."""
    staging_max_reject_rate: float = Field(default=0.05, ge=0, le=1)
    """``release`` check: share of its orders the venue may reject (default 0.05)."""
    staging_max_cpu_cores: float = Field(default=0.5, gt=0, le=64)
    """``release`` check: CPU seconds per second of the bake the process may use, start-up
    excluded (default 0.5 of a core)."""
    staging_max_rss_mb: float = Field(default=512, gt=0, le=1_048_576)
    """``release`` check: the process's peak resident memory (default 512 MiB)."""
    shadow_bake_s: int = Field(default=30, ge=0, le=86_400)
    """How long the new version decides beside the live one without sending (default 30)."""
    min_shadow_agreement: float = Field(default=0.9, ge=0, le=1)
    """Share of the live version's decisions the new one must make too (default 0.9)."""
    canary: list[CanaryStep] = []
    """Capital steps: the new version holds the lease of the live accounts and trades this share
    of the capital (notional and position caps) while the old one shadows, e.g.
    ``[{capital: 0.05, bake_s: 300}, {capital: 0.25, bake_s: 600}]``; none (default):
    promotion follows the shadow."""
    analysis: AnalysisPolicy | None = Field(default=None, validate_default=True)
    """Gates and metric comparisons judging each canary step (required with canary steps)."""
    pause_timeout_s: int = Field(default=1800, ge=30, le=86_400)
    """An inconclusive analysis waits this long for a human, then aborts (default 1800)."""
    approval_timeout_s: int = Field(default=3600, ge=30, le=86_400)
    """Promotion approval wait; no answer means deny and roll back (default 3600)."""
    monitor_s: int = Field(default=60, ge=0, le=86_400)
    """Post-promotion monitoring of the new version alone (default 60)."""
    monitor_window_s: int = Field(default=10, ge=1, le=3600)
    """Monitoring is judged per window of this length: the analysis' hard gates on the new
    version's metrics of that window, and its health every second (default 10)."""
    retire_delay_s: int = Field(default=300, ge=0, le=86_400)
    """The old version stays warm this long after the handover (default 300)."""

    @field_validator("analysis")
    @classmethod
    def _canary_is_judged(
        cls, analysis: AnalysisPolicy | None, info: ValidationInfo
    ) -> AnalysisPolicy | None:
        if info.data.get("canary") and analysis is None:
            raise _refuse("canary steps need an analysis policy to judge them")
        return analysis


class Runbook(_Config):
    """How breakglass operates one strategy in one environment."""

    strategy: str = Field(pattern=NAME_PATTERN)
    """Strategy name, e.g. ``sample`` (required; lowercase, digits, ``_.-``)."""
    env: str = Field(pattern=NAME_PATTERN)
    """Environment, e.g. ``staging`` or ``prod`` (required)."""
    accounts: list[str] = Field(min_length=1)
    """Accounts the strategy trades on, by name in the accounts file (required, at least one)."""
    target: SupervisorTarget
    """Where and how the strategy is deployed (required)."""
    database: DatabaseRef
    """The strategy's state database: sqlite ``path``, or postgres ``dsn`` without a password plus
    ``password_env`` (required)."""
    snapshot: SnapshotPolicy = Field(default_factory=SnapshotPolicy)
    """Snapshot policy (default: before every deploy, keep 20)."""
    approvers: list[str] = []
    """Who may approve (default none); at least one when any policy needs approval."""
    quorum: int = Field(default=1, ge=1, le=20)
    """Distinct approvals needed (default 1); at most the number of approvers."""
    flatten: FlattenPolicy = Field(default_factory=FlattenPolicy, validate_default=True)
    """Flatten policy (default: ask the approvers, hold on timeout)."""
    timeouts: StepTimeouts = Field(default_factory=StepTimeouts)
    """Per step timeouts (defaults as documented on each step)."""
    health: HealthCheck = Field(default_factory=HealthCheck)
    """Health check of a freshly activated version (default ``/healthz`` within 60 s)."""
    deploy: DeployPolicy = Field(default_factory=DeployPolicy, validate_default=True)
    """Release policy: staging checks, shadow, canary steps and their analysis, approval."""

    @property
    def ref(self) -> StrategyRef:
        return StrategyRef(strategy=self.strategy, env=self.env)

    @property
    def needs_approval(self) -> bool:
        """True when some policy waits for a human decision."""
        return self.flatten.mode is FlattenMode.APPROVE

    @field_validator("accounts")
    @classmethod
    def _account_names(cls, accounts: list[str]) -> list[str]:
        import re

        for name in accounts:
            if not re.match(ACCOUNT_NAME_PATTERN, name):
                raise _refuse(f"account name {name!r} must match {ACCOUNT_NAME_PATTERN}")
        _unique(accounts, "account")
        return accounts

    @field_validator("approvers")
    @classmethod
    def _approver_names(cls, approvers: list[str]) -> list[str]:
        import re

        for name in approvers:
            if not re.match(APPROVER_PATTERN, name):
                raise _refuse(f"approver name {name!r} must match {APPROVER_PATTERN}")
        _unique(approvers, "approver")
        return approvers

    @field_validator("quorum")
    @classmethod
    def _quorum_fits(cls, quorum: int, info: ValidationInfo) -> int:
        approvers = info.data.get("approvers")
        if approvers and quorum > len(approvers):
            raise _refuse(
                f"quorum {quorum} is larger than the {len(approvers)} approver(s): "
                "an approval could never be reached"
            )
        return quorum

    @field_validator("flatten")
    @classmethod
    def _approvers_exist(cls, flatten: FlattenPolicy, info: ValidationInfo) -> FlattenPolicy:
        approvers = info.data.get("approvers")
        if flatten.mode is FlattenMode.APPROVE and approvers is not None and not approvers:
            raise _refuse(
                "mode: approve needs at least one name in approvers "
                "(or choose mode: auto or mode: hold)"
            )
        return flatten


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _refuse(f"{what} {name!r} is listed twice")
        seen.add(name)


def load_runbook(path: Path) -> Runbook:
    """Parse and validate a runbook file; any error names the file, line and field."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    refuse_duplicate_keys(text, path)
    return parse_yaml_model(Runbook, text, path)


def refuse_duplicate_keys(text: str, path: Path) -> None:
    """``ConfigError`` (``file:line: field: duplicate key …``) for a key a mapping of the file
    names twice, at any depth. Plain YAML keeps the last one silently (``env: prod`` then ``env:
    staging`` is a staging runbook): in a runbook that is a mistake to show, not a choice to make
    for the operator. Other YAML errors are left to the parser that follows."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    todo: list[tuple[Any, list[str]]] = [(root, [])]
    while todo:
        node, where = todo.pop(0)
        if isinstance(node, yaml.SequenceNode):
            todo += [(v, [*where, str(i)]) for i, v in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in first:
                    raise ConfigError(
                        f"{path}:{line}: {'.'.join([*where, key.value])}: duplicate key "
                        f"{key.value!r} (first on line {first[key.value]})"
                    )
                first[key.value] = line
            todo.append((value, [*where, str(key.value)]))


def check_accounts(runbook: Runbook, accounts_file: Path, runbook_path: Path) -> list[str]:
    """Problems (``file:line: accounts.N: message``) for account names the accounts file lacks.

    Raises ``ConfigError`` when the accounts file itself cannot be read or is invalid.
    """
    known = load_accounts(accounts_file).accounts
    unknown = [(i, name) for i, name in enumerate(runbook.accounts) if name not in known]
    if not unknown:
        return []
    try:
        node = yaml.compose(runbook_path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        node = None
    names = ", ".join(sorted(known)) or "none"
    return [
        f"{runbook_path}:{_line_of(node, ['accounts', str(i)])}: accounts.{i}: "
        f"unknown account {name!r} in {accounts_file} (known: {names})"
        for i, name in unknown
    ]


def runbook_json_schema() -> dict[str, Any]:
    """JSON Schema of a runbook file, for editors (``breakglass runbook schema``)."""
    schema = Runbook.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "breakglass runbook"
    return schema


def runbook_json_schema_text() -> str:
    """The schema as the committed ``runbooks/runbook.schema.json`` holds it."""
    return json.dumps(runbook_json_schema(), indent=2, sort_keys=True) + "\n"
