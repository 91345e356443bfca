"""Deploy targets: where strategy versions run. Kinds register in :mod:`.registry`."""

from activities.targets.activities import TargetActivities
from activities.targets.base import DeployTarget, TargetError, UnknownRelease
from activities.targets.registry import TARGET_KINDS, build_target, register_target_kind
from activities.targets.supervisor import SupervisorTarget

__all__ = [
    "TARGET_KINDS",
    "DeployTarget",
    "SupervisorTarget",
    "TargetActivities",
    "TargetError",
    "UnknownRelease",
    "build_target",
    "register_target_kind",
]
