"""Handing the single trading lease from one version to another: the fenced switch.

Per account, each step idempotent (a retried activity resumes where the lease says it is):

1. the old holder goes REDUCING (only orders that shrink a position);
2. fence: a new epoch held by nobody — from here no intent under an older epoch can be
   recorded, so nothing new is sent by anyone;
3. wait until the old version acknowledges the fenced epoch (it has nothing in flight);
4. cancel every open order on the account and verify on the venue that none is left;
5. grant: a new epoch held by the new version.

Route-back is the same call with the versions swapped. The lease contract is
``sandbox/strategy/lease.py``; the venue side is the kill switch's own cancel-all.
"""

from __future__ import annotations

import asyncio
import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.kill import KillActivities
from activities.trading_state import db_target
from activities.venues import VenueGateway
from sandbox.strategy import lease as contract
from workflows.deployment_models import HandoverRequest, HandoverResult
from workflows.shared import CancelAllRequest

ACK_TIMEOUT_S = 30.0
"""How long the old version has to acknowledge the fence (a few of its loops)."""
ACK_POLL_S = 0.05


class LeaseActivities:
    def __init__(self, gateway: VenueGateway) -> None:
        self.kill = KillActivities(gateway)

    @activity.defn(name="handover_lease")
    async def handover(self, request: HandoverRequest) -> HandoverResult:
        started = time.monotonic()
        db = db_target(request.database)
        who = f"breakglass {activity.info().workflow_id}"
        progress: dict[str, object] = {"phase": "start"}
        cancelled = 0
        epoch = 0
        async with heartbeating(progress):
            for account in request.accounts:
                lease = await asyncio.to_thread(contract.read_lease, db, account)
                if (
                    lease is not None
                    and lease.holder == request.to_version
                    and lease.mode is contract.LeaseMode.ACTIVE
                ):
                    epoch = max(epoch, lease.epoch)  # done by an earlier attempt
                    continue
                progress["phase"] = f"{account}: reducing"
                if request.from_version is not None:
                    await asyncio.to_thread(
                        contract.reduce, db, account, request.from_version, who, request.reason
                    )
                progress["phase"] = f"{account}: fencing"
                fenced = await asyncio.to_thread(contract.fence, db, account, who, request.reason)
                if request.from_version is not None:
                    progress["phase"] = f"{account}: waiting for {request.from_version}'s ack"
                    await self._acknowledged(db, account, request.from_version, fenced.epoch)
                progress["phase"] = f"{account}: cancelling"
                result = await self.kill.cancel_all(CancelAllRequest(account=account))
                if result.still_open or not result.complete:
                    unread = "; ".join(f.error for f in result.failed_books)
                    raise ApplicationError(
                        f"{account}: {len(result.still_open)} orders still open after the fence"
                        + (f" (not every book read or cancelled: {unread})" if unread else ""),
                        type="NotCancelled",
                    )
                cancelled += result.orders_cancelled
                progress["phase"] = f"{account}: granting"
                granted = await asyncio.to_thread(
                    contract.grant, db, account, request.to_version, who, request.reason
                )
                epoch = max(epoch, granted.epoch)
                activity.logger.info(
                    "lease of %s: epoch %d to %s (%s)",
                    account,
                    granted.epoch,
                    request.to_version,
                    request.reason,
                )
        return HandoverResult(
            epoch=epoch,
            holder=request.to_version,
            orders_cancelled=cancelled,
            handover_s=round(time.monotonic() - started, 4),
        )

    @staticmethod
    async def _acknowledged(db: str, account: str, version: str, epoch: int) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline:
            seen = await asyncio.to_thread(contract.acknowledged, db, account, version)
            if seen is not None and seen >= epoch:
                return
            await asyncio.sleep(ACK_POLL_S)
        # Still fenced: nobody sends. A retry waits again; the workflow's policy bounds it.
        raise ApplicationError(
            f"{account}: {version} did not acknowledge epoch {epoch} within {ACK_TIMEOUT_S:.0f}s "
            "(is it running? a stuck process may still have an order in flight)",
            type="NoAck",
        )
