"""Helpers the wallet-level tests share: a sample credential, a running receive loop, a port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tigress_signal.credentials import ProvisioningInformation
from tigress_signal.storage.throwaway import free_loopback_port
from tigress_signal.wallet.wallet import Wallet

__all__ = ["free_port", "receiving", "token"]

#: A free TCP port on 127.0.0.1 for a test server.
free_port = free_loopback_port


def token(text: str) -> ProvisioningInformation:
    """A small plain-text credential to share."""
    return ProvisioningInformation(media_type="text/plain", content=text.encode())


@contextlib.asynccontextmanager
async def receiving(wallet: Wallet) -> AsyncIterator[None]:
    """Run the wallet's share service (its receive loop) for the duration of the block."""
    task = asyncio.create_task(wallet.shares.run())
    try:
        yield
    finally:
        # Cancelling stops the loop but leaves the channel usable for the rest of the test.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
