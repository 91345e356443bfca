"""The cancel-all sweep: every order book of an account cancelled on its own, per symbol.

A book the venue cannot list (say the conditional-order listing answers 400) blocks nothing
else: the other book's cancel-alls go out as soon as its listing answers, and the failing book is
cancelled blindly on every symbol known from the other book and from the positions (cancelling
nothing is success). What could not be listed or cancelled is reported per book, never hidden.
Only the re-query decides what is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from activities.errors import AuthFailed, VenueError, VenueUnavailable
from activities.venues import VenueSession
from workflows.shared import BookFailure, OpenOrder

log = logging.getLogger(__name__)

REQUERY_INTERVAL_S = 0.2
UNREAD_TRIES = 4
"""Consecutive failed listings of a book after which the sweep stops waiting for it (once the
books it can read are empty) and reports it unread; likewise consecutive failed cancel-alls of
a symbol's book: the sweep returns (the flatten must not wait for the deadline) and reports it."""

Book = bool
"""False: the plain order book; True: the conditional (algo) book."""


def _error(error: BaseException) -> str:
    return str(error) if isinstance(error, VenueError) else f"{type(error).__name__}: {error}"


@dataclass
class SweepOutcome:
    seen: dict[str, OpenOrder]
    still_open: list[OpenOrder]
    failures: list[BookFailure]
    queries: int


@dataclass
class CancelSweep:
    """One cancel_all attempt's state: what was seen, what failed, per book."""

    venue: VenueSession
    deadline: float
    progress: dict[str, object] = field(default_factory=dict)
    seen: dict[str, OpenOrder] = field(default_factory=dict)
    last: dict[Book, list[OpenOrder]] = field(default_factory=dict)
    """Each book's orders at its last successful listing."""
    read_ok_last: dict[Book, bool] = field(default_factory=dict)
    unread_streak: dict[Book, int] = field(default_factory=dict)
    failures: dict[tuple[str | None, Book, str], BookFailure] = field(default_factory=dict)
    cancel_streak: dict[tuple[str, Book], int] = field(default_factory=dict)
    blind_done: set[tuple[str, Book]] = field(default_factory=set)
    position_symbols: set[str] | None = None
    ever_read: bool = False
    queries: int = 0

    @property
    def books(self) -> tuple[Book, ...]:
        return (False,) if self.venue.is_spot else (False, True)

    async def run(self) -> SweepOutcome:
        while True:
            self.queries += 1
            self.progress.update(queries=self.queries)
            await self._query_and_cancel(first=self.queries == 1)
            open_now = [o for b in self.books if self.read_ok_last.get(b) for o in self.last[b]]
            self.progress.update(open=len(open_now))
            unread = [b for b in self.books if not self.read_ok_last.get(b)]
            stuck = all(
                self.cancel_streak.get((o.symbol, o.conditional), 0) >= UNREAD_TRIES
                for o in open_now
            )
            if stuck and all(self.unread_streak.get(b, 0) >= UNREAD_TRIES for b in unread):
                break  # nothing left that another try could change soon
            if time.monotonic() >= self.deadline:
                break
            if self.queries > 1 or unread:
                await asyncio.sleep(REQUERY_INTERVAL_S)
        if not self.ever_read:
            # Nothing could be listed at all: the blind cancels went out, but nothing is known.
            # A retry (Temporal's) does it again; the failures say why.
            reasons = "; ".join(f.error for f in self.failures.values())
            raise VenueUnavailable(f"no order book could be read: {reasons}")
        return SweepOutcome(self.seen, self._still_open(), self._final_failures(), self.queries)

    # ------------------------------------------------------------------ one query

    async def _query_and_cancel(self, first: bool) -> None:
        """List every book at once; each book's cancel-alls go out the moment its listing
        answers (the plain book's first cancel never waits for the conditional listing)."""
        cancels: list[asyncio.Task[None]] = []

        async def read(book: Book) -> bool:
            try:
                # The first look may share the halt's read, started at the same moment.
                rows = await self.venue.open_order_rows(book, join_in_flight=first and not book)
                listed = self.venue.symbols_of(rows)
                # The cancels leave before the CPU goes into parsing the orders.
                fired = [self._cancel(symbol, book) for symbol in sorted(listed)]
                cancels.extend(fired)
                await asyncio.gather(*fired)
                orders = self.venue.parse_open_orders(rows, conditional=book)
            except VenueError as e:
                if isinstance(e, AuthFailed):
                    raise
                self.read_ok_last[book] = False
                self.unread_streak[book] = self.unread_streak.get(book, 0) + 1
                self.failures[(None, book, "list")] = BookFailure(
                    symbol=None, conditional=book, action="list", error=_error(e)
                )
                return False
            self.ever_read = True
            self.read_ok_last[book] = True
            self.unread_streak[book] = 0
            self.failures.pop((None, book, "list"), None)
            self.last[book] = orders
            self.seen.update((o.id, o) for o in orders)
            # A listing that shows a symbol empty settles any earlier failure on it.
            for key in [k for k in self.failures if k[1] == book and k[0] not in listed]:
                if key[0] is not None:
                    del self.failures[key]
            return True

        # A book already seen empty is not listed again (a symbol-less listing weighs 40): the
        # verify step looks at every book afresh.
        books = [b for b in self.books if not self.read_ok_last.get(b) or self.last[b]]
        results = await asyncio.gather(*(read(b) for b in books))
        failed = [b for b, ok in zip(books, results, strict=True) if not ok]
        if failed:
            for symbol, book in await self._blind_targets(failed):
                cancels.append(self._cancel(symbol, book))
        if cancels:
            await asyncio.gather(*cancels)

    async def _blind_targets(self, failed: list[Book]) -> list[tuple[str, Book]]:
        """Symbols a book that could not be listed may hold: every symbol seen in any book and
        every symbol with a position. Each is cancelled blindly once per attempt."""
        if self.position_symbols is None:
            try:
                self.position_symbols = {p.symbol for p in await self.venue.positions()}
            except VenueError as e:
                if isinstance(e, AuthFailed):
                    raise
                log.info("cancel-all %s: positions unreadable: %s", self.venue.name, e)
        known = {o.symbol for o in self.seen.values()} | (self.position_symbols or set())
        targets = [(s, b) for b in failed for s in sorted(known) if (s, b) not in self.blind_done]
        self.blind_done.update(targets)
        return targets

    def _cancel(self, symbol: str, book: Book) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            self._cancel_book(symbol, book, self.venue.cancel_all_in(symbol, book))
        )

    async def _cancel_book(self, symbol: str, book: Book, call: Awaitable[None]) -> None:
        try:
            await call
        except AuthFailed:
            raise
        except VenueError as e:
            # Unknown outcome or a passing failure: the re-query decides, not this answer.
            log.info("cancel-all %s %s: %s (re-querying)", self.venue.name, symbol, e)
            self.failures[(symbol, book, "cancel")] = BookFailure(
                symbol=symbol, conditional=book, action="cancel", error=_error(e)
            )
            self.cancel_streak[(symbol, book)] = self.cancel_streak.get((symbol, book), 0) + 1
        else:
            self.failures.pop((symbol, book, "cancel"), None)
            self.cancel_streak.pop((symbol, book), None)

    # ------------------------------------------------------------------ result

    def _still_open(self) -> list[OpenOrder]:
        """Open at each book's last listing. A book unread at the end keeps the orders it last
        showed: not seen cancelled is not cancelled."""
        return [o for b in self.books for o in self.last.get(b, [])]

    def _final_failures(self) -> list[BookFailure]:
        return sorted(
            self.failures.values(),
            key=lambda f: (f.symbol or "", f.conditional, f.action),
        )
