"""The two sides of a transfer as the comparison runs them: a wallet store, a channel, shares.

A Signal party is a :class:`~tigress_signal.wallet.wallet.Wallet` (registered at the
intermediary, libsignal sessions). A relay party needs no registration: a wallet store, a
:class:`~tigress_signal.adapters.tigress_relay.TigressRelayChannel` and the same
:class:`~tigress_signal.shares.service.ShareService` the wallet uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import TracebackType

from tigress_signal.adapters.tigress_relay import TigressRelayChannel
from tigress_signal.channel import CredentialChannel
from tigress_signal.shares.service import ShareService
from tigress_signal.wallet.store import WalletStore

log = logging.getLogger(__name__)


class RelayParty:
    """One wallet that transfers over a Tigress relay, with its receive loop running.

    Args:
        folder: the wallet folder (created if missing).
        channel: the relay channel it uses; closed with the party.
    """

    def __init__(self, folder: Path, channel: TigressRelayChannel) -> None:
        self.store = WalletStore.open(folder)
        self.channel = channel
        self.shares = ShareService(self.store, channel)
        self._loop: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RelayParty:
        self._loop = start_receiving(self.shares, self.channel.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await stop_receiving(self.channel, self._loop)
        self.store.close()


def start_receiving(shares: ShareService, name: str) -> asyncio.Task[None]:
    """Run a share service's receive loop in the background."""
    return asyncio.create_task(shares.run(), name=f"receive loop ({name})")


async def stop_receiving(channel: CredentialChannel, task: asyncio.Task[None] | None) -> None:
    """Close a channel and end its receive loop; a loop that had failed is logged."""
    await channel.close()
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if not task.cancelled() and task.exception() is not None:
        log.error("a receive loop had failed: %s", task.exception())
