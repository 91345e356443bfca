"""Run the sandbox exchange: ``python -m sandbox --port 9443 --admin-port 9444 --state-dir DIR``.

Writes ``<state-dir>/ca.pem`` (trust anchor for the trading port) and, once both ports listen,
``<state-dir>/ready.json``. Exit codes: 0 clean shutdown (SIGTERM/SIGINT), 2 port in use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from sandbox.admin import build_admin_app
from sandbox.server import Sandbox, start_sites

EXIT_PORT_IN_USE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9443, help="TLS trading port")
    p.add_argument("--admin-port", type=int, default=9444, help="plain-HTTP admin port")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="price walk, ids and fault RNG")
    p.add_argument(
        "--admin-token", default=None, help="default: generated, in <state-dir>/admin_token"
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help="read the admin token from this file (keeps it out of the process list)",
    )
    p.add_argument("--fapi-weight-limit", type=int, default=2400)
    p.add_argument("--spot-weight-limit", type=int, default=6000)
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before serving anything
    token = args.admin_token
    if args.admin_token_file is not None:
        token = args.admin_token_file.read_text().strip()
    token = token or secrets.token_urlsafe(24)
    token_file = state_dir / "admin_token"
    token_file.write_text(token)
    token_file.chmod(0o600)

    sb = Sandbox(args.seed, args.spot_weight_limit, args.fapi_weight_limit)
    try:
        runners = await start_sites(
            sb, build_admin_app(sb, token), args.host, args.port, args.admin_port, state_dir
        )
    except OSError as e:
        print(
            f"sandbox: cannot listen on {args.host}:{args.port}/{args.admin_port}: {e.strerror}",
            file=sys.stderr,
        )
        return EXIT_PORT_IN_USE

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(sb.ticker())
    ready = {"port": args.port, "admin_port": args.admin_port, "pid": os.getpid()}
    tmp = state_dir / "ready.json.tmp"
    tmp.write_text(json.dumps(ready))
    tmp.replace(state_dir / "ready.json")  # atomic: a watcher never reads half a file
    await stop.wait()
    ticker.cancel()
    for r in runners:
        await r.cleanup()
    (state_dir / "ready.json").unlink(missing_ok=True)
    return 0


def main() -> None:
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
