"""The background work of a server process: heartbeat and the retention sweep.

Every ``HEARTBEAT_SECONDS`` the process proves it is alive (see
:mod:`tigress_signal.intermediary.delivery`); every ``sweep_interval_seconds`` it deletes:

* messages whose ``expires_at`` has passed (stored more than ``message_retention_seconds``
  ago and never acknowledged), in batches so a SQLite writer is never held for long;
* link codes past their expiry;
* key ids of the prekey ledger released (handed out or replaced) more than the retention time
  ago: a message that could still name such a key would have expired by then, so the id may be
  used again;
* the presence and heartbeat rows of processes that stopped without cleaning up (killed).

Every process sweeps; the deletes are idempotent, so several processes sweeping one database
only repeat a little work. A failed round is logged and tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tigress_signal.errors import StoreError
from tigress_signal.intermediary.context import ServerContext
from tigress_signal.intermediary.delivery import HEARTBEAT_SECONDS, STALE_AFTER_SECONDS

logger = logging.getLogger(__name__)

#: Expired messages deleted per transaction.
_SWEEP_BATCH = 5000


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep deleted.

    Attributes:
        messages: expired messages.
        link_codes: expired link codes.
        key_ids: released key ids past the retention time.
        processes: processes found dead.
    """

    messages: int
    link_codes: int
    key_ids: int
    processes: int


async def sweep(context: ServerContext, now_ms: int | None = None) -> SweepResult:
    """Delete what has expired (see the module docstring).

    Args:
        context: the running server.
        now_ms: the time to sweep at (tests); default now.

    Raises:
        StoreError: the database refused a delete.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    db = context.db
    messages = 0
    while True:
        deleted = await db.execute(
            "DELETE FROM messages WHERE seq IN"
            " (SELECT seq FROM messages WHERE expires_at <= $1 LIMIT $2)",
            now,
            _SWEEP_BATCH,
        )
        messages += deleted
        if deleted < _SWEEP_BATCH:
            break
    link_codes = await db.execute("DELETE FROM link_codes WHERE expires_at <= $1", now)
    key_ids = await db.execute(
        "DELETE FROM prekey_ids WHERE released_at IS NOT NULL AND released_at <= $1",
        now - context.config.message_retention_seconds * 1000,
    )
    stale = now - int(STALE_AFTER_SECONDS * 1000)
    async with db.transaction() as conn:
        processes = await conn.execute(
            "DELETE FROM server_processes WHERE heartbeat_at < $1 AND server_id <> $2",
            stale,
            context.switchboard.server_id,
        )
        await conn.execute(
            "DELETE FROM presence WHERE server_id NOT IN (SELECT server_id FROM server_processes)"
        )
    if messages:
        context.metrics.messages_expired.inc(messages)
        logger.info("deleted %d expired undelivered messages", messages)
    return SweepResult(messages, link_codes, key_ids, processes)


async def run_maintenance(context: ServerContext) -> None:
    """Heartbeat and sweep until cancelled."""
    interval = context.config.sweep_interval_seconds
    loop = asyncio.get_running_loop()
    next_sweep = loop.time()
    next_heartbeat = loop.time() + HEARTBEAT_SECONDS
    while True:
        now = loop.time()
        if now >= next_heartbeat:
            next_heartbeat = now + HEARTBEAT_SECONDS
            try:
                await context.switchboard.heartbeat()
            except StoreError as exc:
                logger.warning("heartbeat failed: %s", exc)
        if now >= next_sweep:
            next_sweep = now + interval
            try:
                await sweep(context)
            except StoreError as exc:
                logger.warning("the retention sweep failed; it runs again later: %s", exc)
        await asyncio.sleep(max(0.0, min(next_sweep, next_heartbeat) - loop.time()))
