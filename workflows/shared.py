"""Typed messages shared by workflows, activities and clients: one module both sides import.

Every model is frozen; new fields must get defaults so that old histories still decode.
Amounts are Decimals (serialised as strings) so that no float rounding creeps into a flatten.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from decimal import Decimal
from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASK_QUEUE = "breakglass"
"""The one task queue the worker polls; clients and workers both read it from here."""

ACCOUNT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- kill switch input


class KillScope(StrEnum):
    """What the kill switch unwinds."""

    FLATTEN = "flatten"
    """Cancel every open order, then close every position (the default)."""
    CANCEL_ONLY = "cancel-only"
    """Cancel every open order and leave positions as they are."""


MAX_KILL_ACCOUNTS = 50
"""One kill's account set is bounded: a crafted start with thousands of accounts is refused."""


class KillSwitchInput(Model):
    accounts: list[str] = Field(
        min_length=1,
        max_length=MAX_KILL_ACCOUNTS,
        description="Account references from accounts.yaml",
    )
    scope: KillScope = KillScope.FLATTEN
    reason: str = Field(min_length=3, max_length=500)
    requested_by: str = Field(min_length=1, max_length=100)
    verify_deadline_s: float = Field(default=30.0, gt=0, le=600)
    """How long cancel-all keeps re-querying the venue before it reports orders still open."""
    max_rounds: int = Field(default=3, ge=1, le=10)
    """How many cancel/flatten/verify rounds before the kill reports itself unverified."""
    dead_man: bool = True
    """Arm the venue's dead-man switch while the kill runs; a caller that already stopped the
    sender (e.g. the rollback saga) may turn it off."""

    @field_validator("accounts")
    @classmethod
    def _accounts_are_names(cls, accounts: list[str]) -> list[str]:
        for name in accounts:
            if not re.match(ACCOUNT_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not an account name ({ACCOUNT_NAME_PATTERN})")
        if len(set(accounts)) != len(accounts):
            raise ValueError("an account is named twice")
        return sorted(accounts)


def kill_workflow_id(accounts: list[str]) -> str:
    """The kill switch's workflow id, derived from the account set.

    A second kill of the same accounts therefore joins the running one instead of racing it.
    Long sets are hashed so the id stays within Temporal's limits.
    """
    names = sorted(set(accounts))
    joined = "+".join(names)
    if len(joined) > 200:
        joined = f"{len(names)}-accounts-" + hashlib.sha256(joined.encode()).hexdigest()[:16]
    return f"kill/{joined}"


# --------------------------------------------------------------------------- venue state


class PositionKind(StrEnum):
    DERIVATIVE = "derivative"
    """A futures/perpetual position (signed contracts)."""
    SPOT_BALANCE = "spot-balance"
    """A spot base-asset balance held against the account's quote asset."""


class Position(Model):
    symbol: str
    """ccxt unified symbol, e.g. ``BTC/USDT:USDT`` or ``BTC/USDT``."""
    kind: PositionKind
    quantity: Decimal
    """Signed size in base units/contracts: positive long, negative short."""
    position_side: str | None = None
    """``LONG``/``SHORT`` in hedge mode, ``None`` in one-way mode and for spot."""
    mark_price: Decimal | None = None

    @property
    def is_flat(self) -> bool:
        return self.quantity == 0


class OpenOrder(Model):
    id: str
    client_order_id: str | None = None
    symbol: str
    side: str
    type: str
    amount: Decimal
    filled: Decimal = Decimal(0)
    price: Decimal | None = None
    conditional: bool = False
    """A stop/take-profit (algo) order that lives in a separate book on the venue."""


class VenueSnapshot(Model):
    account: str
    taken_at: datetime
    open_orders: list[OpenOrder] = []
    positions: list[Position] = []
    """Positions a market order could still close (non-zero and above the lot minimum)."""
    dust: list[Position] = []
    """Non-zero remainders below one lot step or the minimum size."""
    unread_books: list[str] = []
    """Books the venue could not read this time ("orders", "conditional-orders", "positions"):
    what they hold is unknown, so the account is not verified on this snapshot."""


# --------------------------------------------------------------------------- activity messages


class AccountRequest(Model):
    account: str


class HaltRequest(Model):
    account: str
    dead_man_seconds: int | None = Field(default=None, ge=0, le=3600)
    """Venue-side countdown cancel-all armed while the kill runs: None takes the account's
    configured timer; 0 disarms."""
    symbols: list[str] | None = None
    """Symbols to arm or disarm; None: every symbol with open orders now."""


class HaltResult(Model):
    account: str
    symbols_armed: list[str] = []
    supported: bool = True
    """False where the venue has no dead-man switch (e.g. spot)."""
    symbols_failed: dict[str, str] = {}
    """Symbol -> why the venue did not arm (or disarm) its countdown. A reason starting
    "outcome unknown" (a timeout) may still have armed it: release failed symbols too
    (disarming a symbol with no countdown is harmless)."""
    symbols_released: list[str] = []
    """With ``dead_man_seconds=0``: the symbols whose countdown the venue disarmed."""


class BookFailure(Model):
    """One order book the venue refused to list or cancel (the others went ahead)."""

    symbol: str | None
    """None: the account-wide listing."""
    conditional: bool
    action: str
    """"list" or "cancel"."""
    error: str
    """Domain error class and the venue's text (never a secret)."""


class CancelAllRequest(Model):
    account: str
    verify_deadline_s: float = 30.0


class CancelAllResult(Model):
    account: str
    orders_found: int
    orders_cancelled: int
    """Orders that were open at the first look and are not open at the last."""
    still_open: list[OpenOrder] = []
    symbols: list[str] = []
    queries: int = 0
    """How many re-queries of the venue it took to see nothing open."""
    elapsed_s: float = 0.0
    failed_books: list[BookFailure] = []
    complete: bool = True
    """False when some book could not be listed or cancelled: not verified on this alone."""


class FlattenRequest(Model):
    account: str
    client_id_prefix: str = Field(pattern=r"^[A-Za-z0-9_-]{1,20}$")
    """Deterministic prefix (from the workflow id and round) for every order this flatten sends."""
    known_positions: list[Position] = Field(default=[], max_length=1000)
    """Positions the caller saw before this round (the kill's first look). A retried attempt
    looks up earlier attempts' orders on these legs even where the position is flat by now: the
    crashed attempt's last heartbeat may never have reached the server."""


class FlattenOrder(Model):
    client_order_id: str
    symbol: str
    side: str
    amount: Decimal
    filled: Decimal = Decimal(0)
    status: str = "unknown"


class FlattenResult(Model):
    account: str
    positions_before: list[Position] = []
    positions_after: list[Position] = []
    dust: list[Position] = []
    """Remainders below the venue's minimum order size: reported, not retried."""
    orders: list[FlattenOrder] = []
    passes: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = []
    """Per item that failed this attempt: "SYMBOL/side: reason"."""
    recovered_orders: list[FlattenOrder] = []
    """Orders an earlier attempt of this round sent, found on the venue by their client ids."""


class NotifyRequest(Model):
    title: str
    text: str
    severity: str = "info"


# --------------------------------------------------------------------------- progress and report


class Step(StrEnum):
    HALT = "halt"
    CANCEL_ALL = "cancel_all"
    FLATTEN = "flatten"
    VERIFY = "verify"
    NOTIFY = "notify"


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class StepStatus(Model):
    step: Step
    state: StepState = StepState.PENDING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class AccountState(StrEnum):
    """What the venue showed for one account when its chain ended."""

    VERIFIED = "verified"
    """Re-read on the venue: nothing open, every position zero or dust (per scope)."""
    UNVERIFIED = "unverified"
    """Read, but orders or positions were left (or a book could not be read)."""
    UNKNOWN = "unknown"
    """The venue could not be read: nothing is known about this account."""


class DeadManState(StrEnum):
    ARMED = "armed"
    """Every symbol the halt tried was armed."""
    PARTIAL = "partial"
    """Some symbols armed, some refused (see ``failed``)."""
    NOT_ARMED = "not-armed"
    """Nothing armed: the halt failed, or there was nothing to arm."""
    UNSUPPORTED = "unsupported"
    """The venue has no dead-man switch (e.g. spot)."""
    OFF = "off"
    """The caller turned arming off (``KillSwitchInput.dead_man``)."""


class DeadManReport(Model):
    """The venue-side countdowns of one account: what was armed, and what was released."""

    supported: bool = True
    armed: list[str] = []
    """Symbols whose countdown the venue accepted (over every attempt)."""
    failed: dict[str, str] = {}
    """Symbol (or ``*`` for the whole halt) -> why it was not armed."""
    released: list[str] = []
    """Armed symbols disarmed after the account was verified."""
    release_failed: list[str] = []
    """Armed symbols still counting down: they will cancel whatever trades there next."""
    state: DeadManState = DeadManState.NOT_ARMED


class AccountReport(Model):
    account: str
    state: AccountState = AccountState.UNKNOWN
    orders_found: int | None = None
    """None: never read (unknown), never shown as 0."""
    orders_cancelled: int | None = None
    orders_still_open: int | None = None
    positions_before: list[Position] | None = None
    """Positions as they were when the kill began (read before any flatten); None: unknown."""
    positions_after: list[Position] | None = None
    dust: list[Position] = []
    flatten_orders: list[FlattenOrder] = []
    """Every order sent under the kill's client-id prefix, earlier (crashed) attempts too."""
    dead_man_symbols: int = 0
    """Symbols whose venue-side countdown cancel-all was armed during the kill."""
    dead_man_released: bool = False
    """The countdowns were disarmed after the verified kill (so they cannot cancel the orders
    of whatever trades next)."""
    dead_man: DeadManReport | None = None
    steps: list[StepStatus] = []
    """This account's own step states (a failed halt is FAILED here, a partial one DONE with
    "partial: …")."""
    errors: list[str] = []
    """Steps that failed for this account after their retries, with the venue's reason."""
    failures: list[BookFailure] = []
    """Books the venue refused to list or cancel (the other books went ahead)."""
    gave_up: str | None = None
    """When the chain stopped without verifying: why, in words."""
    scope: KillScope | None = None
    """The widest scope this account's chain ran under."""
    rounds: int = 0


class KillOutcome(StrEnum):
    VERIFIED = "verified"
    """Nothing open, every position zero or reported dust, checked on the venue."""
    UNVERIFIED = "unverified"
    """The rounds ran out with orders or positions left: a human must look."""


class KillReport(Model):
    workflow_id: str
    reason: str
    requested_by: str
    scope: KillScope
    outcome: KillOutcome
    started_at: datetime
    finished_at: datetime
    time_to_flat_s: float | None = None
    """From the request (the workflow's start) to the verify step that saw the accounts flat."""
    rounds: int = 1
    accounts: list[AccountReport] = []
    steps: list[StepStatus] = []
    requested_at: datetime | None = None
    """When the kill was asked for (the workflow start)."""
    picked_up_at: datetime | None = None
    """When a worker ran the kill's first workflow task."""
    queue_wait_s: float | None = None
    """``picked_up_at - requested_at``: how long the request waited for a worker."""
    joins: list[KillJoin] = []
    """Later kills of the same accounts that joined this one (their reasons and scopes)."""


class KillJoin(Model):
    """A second kill of the same accounts, joining the running one (update ``join``)."""

    reason: str = Field(min_length=3, max_length=500)
    requested_by: str = Field(min_length=1, max_length=100)
    scope: KillScope


class KillJoinResult(Model):
    escalated: bool
    """The join widened the running kill's scope (cancel-only -> flatten)."""
    scope: KillScope
    """The scope the kill has now."""
    message: str


class KillStatus(Model):
    """Answer of the kill switch's status query: live step progress."""

    workflow_id: str
    round: int
    steps: list[StepStatus]
    report: KillReport | None = None
    accounts: list[AccountReport] = []
    """Live per-account progress."""
    requested_at: datetime | None = None
    picked_up_at: datetime | None = None


class ExitCode(IntEnum):
    """Exit codes of the ``breakglass`` CLI (documented in ``--help``)."""

    OK = 0
    """The command did what it was asked; for ``kill``: verified flat."""
    UNVERIFIED = 1
    """The kill finished but could not verify every account flat."""
    BAD_INPUT = 2
    """Bad arguments, unknown account or invalid configuration: nothing was started."""
    UNREACHABLE = 3
    """Temporal (or another required service) could not be reached: nothing was started; or
    contact was lost while following a started workflow, which goes on (``breakglass status``)."""
    WORKFLOW_FAILED = 4
    """The workflow failed, was cancelled or terminated."""
    NOT_FOUND = 5
    """No such workflow."""
