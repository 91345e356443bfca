"""Deploy target kinds by the runbook's ``target.kind``: add systemd or Kubernetes here, not in
workflows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from activities.targets.base import DeployTarget
from workflows.deploy_models import StrategyRef

if TYPE_CHECKING:
    from activities.runbooks import Runbook

TargetFactory = Callable[[StrategyRef, Mapping[str, Any]], DeployTarget]
TARGET_KINDS: dict[str, TargetFactory] = {}


def register_target_kind(kind: str) -> Callable[[TargetFactory], TargetFactory]:
    def add(factory: TargetFactory) -> TargetFactory:
        if kind in TARGET_KINDS and TARGET_KINDS[kind] is not factory:
            raise ValueError(f"target kind {kind!r} is already registered")
        TARGET_KINDS[kind] = factory
        return factory

    return add


def build_target(kind: str, ref: StrategyRef, options: Mapping[str, Any]) -> DeployTarget:
    """The target for one runbook's ``target:`` block (``kind`` plus its options)."""
    try:
        factory = TARGET_KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(TARGET_KINDS)) or "none"
        raise ValueError(f"unknown target kind {kind!r} (known: {known})") from None
    return factory(ref, options)


def runbook_target(runbook: Runbook) -> DeployTarget:
    """The deploy target a runbook describes (the one place runbook fields become options)."""
    options = runbook.target.model_dump(exclude={"kind", "http_port"})
    if runbook.target.http_port:
        options["health_url"] = f"http://127.0.0.1:{runbook.target.http_port}{runbook.health.path}"
    return build_target(runbook.target.kind, runbook.ref, options)
