"""``breakglass``: the operator CLI. Each command lives in its own ``cli_*`` module.

Adding a command module is one import and one registration line below: a module with a sub-app
uses ``app.add_typer(module.app, name=...)``; plain command functions use
``register(app, module.fn, ...)``. Shared helpers (``abort``, ``load_settings``, consoles,
``run_async``) live in ``worker.cli_common``.
"""

from __future__ import annotations

import sys
import traceback

import typer

from worker import cli_deploy, cli_dev, cli_kill, cli_rollback, cli_runbook
from worker.cli_common import exit_codes_help, register
from worker.process import exit_now

app = typer.Typer(
    name="breakglass",
    help="Runbook automation on Temporal: kill switch, rollbacks, deployments.",
    epilog=exit_codes_help(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(cli_dev.app, name="dev")
app.add_typer(cli_runbook.app, name="runbook")
register(app, cli_kill.kill, cli_kill.status)
register(app, cli_rollback.rollback, cli_rollback.approve, cli_rollback.reject)
register(app, cli_deploy.deploy, cli_deploy.promote, cli_deploy.abort_)


def main() -> None:
    """Console-script entry point: run the app, then leave through ``os._exit``.

    The SDK can abort at interpreter exit (sdk-python #300); flushing and ``os._exit`` avoids it.
    """
    rc = 0
    try:
        app(prog_name="breakglass")
    except SystemExit as e:
        if isinstance(e.code, int):
            rc = e.code
        elif e.code is not None:
            print(e.code, file=sys.stderr)
            rc = 1
    except KeyboardInterrupt:
        rc = 130
    except Exception:
        traceback.print_exc()
        rc = 1
    exit_now(rc)


if __name__ == "__main__":
    main()
