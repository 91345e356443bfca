"""``python -m sandbox.strategy --release DIR --config FILE``: run one release of the strategy.

Credentials come from the environment variables the config names, never from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

CRASH_AFTER_S = 0.5


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.strategy", description=__doc__)
    p.add_argument(
        "--release",
        "--release-dir",
        dest="release",
        type=Path,
        required=True,
        help="release directory holding release.json",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("STRATEGY_CONFIG"),
        help="strategy config JSON (env STRATEGY_CONFIG)",
    )
    args = p.parse_args(argv)
    if args.config is None:
        p.error("--config (or STRATEGY_CONFIG) is required")
    release = json.loads((args.release / "release.json").read_text())
    if release.get("fault") == "crash-loop":
        # Before the heavy imports: crashes well inside any supervisor's start window.
        time.sleep(CRASH_AFTER_S)
        print("crash-loop release: exiting on purpose", file=sys.stderr, flush=True)
        return 3
    from sandbox.strategy.app import main  # ccxt takes a second to import

    # supervisord stops programs with SIGTERM. Until the strategy's event loop takes the signal
    # over (Strategy.stop: finish the orders in flight, then exit), leave through main's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return main(args.release.resolve(), args.config)


if __name__ == "__main__":
    sys.exit(cli())
