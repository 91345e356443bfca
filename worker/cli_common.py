"""Helpers every ``breakglass`` command module shares: consoles, ``abort``, settings, asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from temporalio.client import Client

from worker.settings import Settings
from worker.temporal_client import TemporalUnreachable, connect, quiet_runtime
from workflows.shared import ExitCode

T = TypeVar("T")

console = Console(highlight=False, soft_wrap=True)
"""Normal output (stdout)."""
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
"""Errors and warnings (stderr); soft_wrap keeps an error on one line whatever the width."""


def abort(msg: str, code: ExitCode) -> NoReturn:
    """The one way a command fails: one line on stderr, then exit with ``code``."""
    err_console.print(f"error: {' '.join(msg.split())}", markup=False)
    raise typer.Exit(int(code))


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment plus CLI overrides; invalid values abort (BAD_INPUT)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        env = f"BREAKGLASS_{field.upper()}" if field else "BREAKGLASS_*"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        abort(f"invalid setting {env}: {first['msg']}{more}", ExitCode.BAD_INPUT)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; Ctrl-C aborts with the usual 130 instead of a traceback."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        raise typer.Exit(130) from None


def register(app: typer.Typer, *commands: Callable[..., Any]) -> None:
    """Add plain command functions (help from their docstrings) to ``app``."""
    for command in commands:
        app.command(name=command.__name__.strip("_").replace("_", "-"))(command)


def exit_codes_help() -> str:
    """The exit-code table for ``--help``, generated from ``ExitCode``'s docstrings."""
    import ast
    import inspect
    import itertools

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(ExitCode))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.Assign)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[node.targets[0].id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError):
        pass
    lines = [f"{int(c)} {c.name}: {docs.get(c.name, '')}".rstrip(": ") for c in ExitCode]
    return "Exit codes:\n\n" + "\n\n".join(lines)


async def connect_or_abort(settings: Settings) -> Client:
    """A Temporal client, or one clear line and UNREACHABLE (BAD_INPUT for unusable TLS).

    On the quiet runtime: the SDK's own retry warnings never reach the operator's terminal."""
    try:
        return await connect(settings, runtime=quiet_runtime())
    except TemporalUnreachable as e:
        abort(str(e), ExitCode.UNREACHABLE)
    except ValueError as e:  # unusable TLS settings
        abort(str(e), ExitCode.BAD_INPUT)
