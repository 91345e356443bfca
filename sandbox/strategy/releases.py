"""Immutable release directories: ``<root>/<strategy>/<version>/`` with release.json and run.sh."""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

from sandbox.strategy.config import Fault, Release
from sandbox.strategy.state import utcnow

RUN_SH = """#!/bin/sh
# Launcher of release {version} ({fault}); pass --config FILE. PYTHON selects the interpreter.
exec "${{PYTHON:-python3}}" {entry} --release "$(dirname "$0")" "$@"
"""


class ReleaseConflict(Exception):
    """A different release already exists under that version: releases are immutable."""


def release_dir(root: Path, strategy: str, version: str) -> Path:
    for part in (strategy, version):
        if not part or "/" in part or part.startswith(".") or part == "current":
            raise ValueError(f"not a usable strategy/version name: {part!r}")
    return root / strategy / version


def build_release(root: Path, strategy: str, version: str, fault: Fault | str) -> Path:
    """Write the release directory once; the same call again is a no-op.

    Raises ``ReleaseConflict`` if the version exists with a different fault or strategy. The
    directory is written under a temporary name and renamed, so it is either whole or absent.
    """
    fault = Fault(fault)
    target = release_dir(root, strategy, version)
    if target.exists():
        existing = Release.load(target)
        if (existing.strategy, existing.version, existing.fault) != (strategy, version, fault):
            raise ReleaseConflict(
                f"{target} already holds {existing.strategy} {existing.version} "
                f"({existing.fault.value}); refusing to overwrite it with {fault.value}"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    release = Release(strategy=strategy, version=version, fault=fault, created=utcnow())
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
    (staging / "release.json").write_text(release.model_dump_json(indent=2) + "\n")
    run = staging / "run.sh"
    run.write_text(
        RUN_SH.format(version=version, fault=fault.value, entry=shlex.join(release.entrypoint))
    )
    run.chmod(0o555)
    (staging / "release.json").chmod(0o444)
    staging.chmod(0o555)
    try:
        os.rename(staging, target)
    except OSError:
        # Lost a race with an identical build: keep theirs if it matches.
        staging.chmod(0o755)
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
        return build_release(root, strategy, version, fault)
    return target
