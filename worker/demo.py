"""``make demo``: the embedded stack, a realistic book on the sandbox, and the kill switch run
through Temporal exactly as an on-call engineer would run it, checked against the venue's own view.

The stack is left running so the run can be inspected in the Temporal UI; ``breakglass dev down``
stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from sandbox.admin_client import AdminError, SandboxAdmin
from sandbox.seed import BookSpec, SeedAccount, seed_book
from worker import devstack
from worker.cli_common import console, err_console
from worker.demo_deploy import run_deploy
from worker.demo_rollback import run_rollback
from worker.process import exit_now
from worker.settings import Settings
from workflows.shared import kill_workflow_id

# The demo's sandbox accounts and the breakglass accounts (runbooks/accounts.yaml) on each: one
# venue account holds a spot wallet and a futures wallet, as a real Binance account does.
DEMO_ACCOUNTS: dict[str, list[tuple[str, str]]] = {
    "alpha": [
        ("BG_ALPHA_FUTURES_KEY", "BG_ALPHA_FUTURES_SECRET"),
        ("BG_ALPHA_SPOT_KEY", "BG_ALPHA_SPOT_SECRET"),
    ],
    "beta": [
        ("BG_BETA_FUTURES_KEY", "BG_BETA_FUTURES_SECRET"),
        ("BG_BETA_SPOT_KEY", "BG_BETA_SPOT_SECRET"),
    ],
}
KILL_ACCOUNTS = ["alpha-futures", "alpha-spot", "beta-futures", "beta-spot"]


def demo_credentials(settings: Settings) -> dict[str, tuple[str, str]]:
    """Sandbox key pairs, made once and kept (0600) so a running worker's environment stays
    valid across demo runs. They only open the local sandbox."""
    path = devstack.sandbox_state_dir(settings) / "demo-credentials.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return {name: (pair[0], pair[1]) for name, pair in stored.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    made = {name: (secrets.token_hex(16), secrets.token_hex(32)) for name in DEMO_ACCOUNTS}
    path.touch(mode=0o600)
    path.write_text(json.dumps(made))
    return made


def export_credentials(credentials: dict[str, tuple[str, str]]) -> None:
    for name, env_pairs in DEMO_ACCOUNTS.items():
        key, secret = credentials[name]
        for key_env, secret_env in env_pairs:
            os.environ[key_env] = key
            os.environ[secret_env] = secret


async def seed(settings: Settings, credentials: dict[str, tuple[str, str]]) -> SandboxAdmin:
    token = devstack.admin_token_file(settings).read_text().strip()
    admin = SandboxAdmin(f"http://127.0.0.1:{settings.dev_sandbox_admin_port}", token)
    accounts = [SeedAccount(api_key=k, secret=s) for k, s in credentials.values()]
    try:
        await admin.state(accounts[0].api_key)
        exists = True
    except AdminError:
        exists = False
    await seed_book(
        admin,
        BookSpec(
            accounts=accounts,
            symbols=25,
            open_orders=600,
            positions=16,
            seed=secrets.randbelow(1_000_000),
            create_accounts=not exists,
        ),
    )
    return admin


async def venue_view(admin: SandboxAdmin, credentials: dict[str, tuple[str, str]]) -> Table:
    """What the sandbox itself says is left: not our code's opinion. (alpha-spot keeps BNB on
    purpose: ``keep_assets`` in runbooks/accounts.yaml.)"""
    table = Table(title="the venue's own view (sandbox admin API)", title_justify="left")
    columns = ("venue account", "open orders", "stop orders", "positions", "spot assets", "flipped")
    for column in columns:
        table.add_column(column)
    for name, (key, _) in credentials.items():
        state = await admin.state(key)
        table.add_row(
            name,
            str(len(state.open_orders)),
            str(len(state.open_conditional_orders)),
            str(sum(1 for p in state.positions if p.qty != 0)),
            ", ".join(
                a for a, b in state.spot_balances.items() if a != "USDT" and b.free + b.locked
            )
            or "-",
            str(sum(1 for p in state.positions if p.flipped)),
        )
    return table


async def run(settings: Settings) -> int:
    credentials = demo_credentials(settings)
    export_credentials(credentials)
    console.print("[bold]1. embedded stack[/bold] (Temporal dev server, sandbox exchange, worker)")
    stack = await devstack.up(settings)
    if not stack.component("worker").started:
        # A worker started earlier may lack the demo's credentials in its environment.
        await devstack.restart_component(settings, "worker")
    for c in stack.components:
        console.print(f"   {c.name:8} {c.state.value:8} pid {c.pid}  log {c.log_file}")

    console.print("[bold]2. seeding the sandbox[/bold] with a realistic book")
    admin = await seed(settings, credentials)
    try:
        console.print(await venue_view(admin, credentials))
        console.print("[bold]3. the kill switch[/bold], through Temporal, as on-call runs it:")
        argv = [sys.executable, "-m", "worker.cli", "kill", "--reason", "demo: reject storm"]
        for account in KILL_ACCOUNTS:
            argv += ["--account", account]
        console.print("   $ breakglass kill " + " ".join(f"--account {a}" for a in KILL_ACCOUNTS))
        code = await asyncio.to_thread(subprocess.call, argv)
        console.print("[bold]4. checked on the venue[/bold]")
        console.print(await venue_view(admin, credentials))
        rollback_code = await run_rollback(settings, admin)
        deploy_code = await run_deploy(settings) if not rollback_code else 0
    finally:
        await admin.close()
    console.print(
        f"Temporal UI: {settings.ui_url_for(kill_workflow_id(KILL_ACCOUNTS))}\n"
        "The stack keeps running for inspection; stop it with: breakglass dev down"
    )
    return code or rollback_code or deploy_code


def main() -> None:
    settings = Settings(accounts_file=Path("runbooks/accounts.yaml").resolve())
    try:
        code = asyncio.run(run(settings))
    except devstack.DevStackError as e:
        err_console.print(f"error: {e}", markup=False)
        code = 3
    exit_now(code)


if __name__ == "__main__":
    main()
