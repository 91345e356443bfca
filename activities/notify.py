"""Telling people what happened: a small notifier interface, and the console one.

Slack comes later behind the same interface. A broken channel never breaks the runbook: the
workflow treats a failed notification as a warning in the report, not a failed kill.
"""

from __future__ import annotations

import logging
import sys
from typing import Protocol, TextIO

from temporalio import activity

from activities.heartbeat import heartbeating
from workflows.shared import NotifyRequest

log = logging.getLogger(__name__)


class Notifier(Protocol):
    async def send(self, message: NotifyRequest) -> None: ...


class ConsoleNotifier:
    """Writes notifications to the worker's console (its log file under the dev stack)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def send(self, message: NotifyRequest) -> None:
        stream = self._stream or sys.stdout
        stream.write(f"[{message.severity.upper()}] {message.title}\n{message.text}\n")
        stream.flush()


class NotifyActivities:
    """Fans one notification out to every configured channel; one failing channel is logged."""

    def __init__(self, notifiers: list[Notifier]) -> None:
        self.notifiers = notifiers

    @activity.defn(name="notify")
    async def notify(self, message: NotifyRequest) -> int:
        """Returns how many channels took the message."""
        delivered = 0
        async with heartbeating({"channels": len(self.notifiers)}):
            for notifier in self.notifiers:
                try:
                    await notifier.send(message)
                    delivered += 1
                except Exception:  # a broken channel must not stop the others
                    log.exception("notifier %s failed", type(notifier).__name__)
        return delivered
