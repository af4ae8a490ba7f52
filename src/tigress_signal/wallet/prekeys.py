"""Keeping a wallet's one-time prekeys stocked at the intermediary.

Every first contact takes one one-time EC prekey and one one-time Kyber prekey from the server.
When a pool runs low the wallet makes a new batch, stores the private halves, and only then
uploads the public halves (which replace that kind's remaining one-time keys on the server).
Private halves of keys the server no longer lists are kept: a peer may have fetched one just
before the replacement, and its first message still has to decrypt.

The signed prekey and the last-resort Kyber key are replaced on a schedule by
:mod:`tigress_signal.wallet.rotation`, which runs right after the refill.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tigress_signal.bridge.libsignal import LibsignalBridge
from tigress_signal.bridge.records import RecordChange
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.wallet.store import WalletStore

log = logging.getLogger(__name__)

#: Refill a pool when fewer one-time keys than this are left on the server.
REFILL_BELOW = 25
#: How many one-time keys of a kind a refill uploads (the server's per-request maximum).
REFILL_BATCH = 100


@dataclass(frozen=True, slots=True)
class Refill:
    """What a refill uploaded.

    Attributes:
        ec: one-time EC prekeys uploaded.
        kyber: one-time Kyber prekeys uploaded.
    """

    ec: int
    kyber: int


async def refill_prekeys(
    store: WalletStore, bridge: LibsignalBridge, client: IntermediaryClient
) -> Refill:
    """Top up whichever one-time prekey pool is below :data:`REFILL_BELOW` on the server.

    Raises:
        ServerApiError: the server refused the count or the upload.
        ChannelError: the server cannot be reached.
        BridgeError: the sidecar could not make the keys.
    """
    counts = await client.prekey_counts()
    ec = kyber = 0
    if counts.count < REFILL_BELOW:
        with store.transaction() as conn:
            first = store.next_ids(conn, "prekey", REFILL_BATCH)
        keys = await bridge.generate_prekeys(first, REFILL_BATCH)
        with store.transaction() as conn:
            store.apply_changes(
                conn, [RecordChange("prekey", str(k.key_id), k.record) for k in keys]
            )
        await client.upload_keys(pre_keys=[k.public() for k in keys])
        ec = len(keys)
    if counts.pq_count < REFILL_BELOW:
        with store.transaction() as conn:
            first = store.next_ids(conn, "kyber_prekey", REFILL_BATCH)
        pq_keys = await bridge.generate_kyber_prekeys(first, REFILL_BATCH, int(time.time() * 1000))
        with store.transaction() as conn:
            store.apply_changes(
                conn, [RecordChange("kyber_prekey", str(k.key_id), k.record) for k in pq_keys]
            )
        await client.upload_keys(pq_pre_keys=[k.public() for k in pq_keys])
        kyber = len(pq_keys)
    if ec or kyber:
        log.info(
            "refilled one-time prekeys: %d EC (had %d), %d Kyber (had %d)",
            ec,
            counts.count,
            kyber,
            counts.pq_count,
        )
    return Refill(ec, kyber)
