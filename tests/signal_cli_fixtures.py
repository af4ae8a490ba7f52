"""What the signal-cli tests share: a private dbus-daemon, short socket paths, receive loops.

Every bus is a ``dbus-daemon`` this module starts on a UNIX socket in a temporary folder, never
the machine's session or system bus. A missing ``dbus-daemon`` fails the test (it is installed
by the setup script); nothing here skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from tigress_signal.wallet.wallet import Wallet

ALICE = "+15555550100"
BOB = "+15555550123"
WAIT = 20.0

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    """A fresh folder with a short path: UNIX socket paths must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="tsig-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def private_bus(folder: Path) -> AsyncIterator[str]:
    """Run a dbus-daemon of our own on ``folder/bus.sock``; yields its address."""
    socket = folder / "bus.sock"
    config = folder / "bus.conf"
    config.write_text(_BUS_CONFIG.format(socket=socket), encoding="utf-8")
    daemon = await asyncio.create_subprocess_exec(
        "dbus-daemon",
        f"--config-file={config}",
        "--nofork",
        "--print-address",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert daemon.stdout is not None
        line = await asyncio.wait_for(daemon.stdout.readline(), 10)
        address = line.decode().strip()
        assert address.startswith("unix:path="), address
        yield f"unix:path={socket}"
    finally:
        daemon.terminate()
        await daemon.wait()


@contextlib.asynccontextmanager
async def receiving(*wallets: Wallet) -> AsyncIterator[None]:
    """Run the wallets' receive loops for the duration."""
    tasks = [asyncio.create_task(w.shares.run()) for w in wallets]
    try:
        yield
    finally:
        for wallet in wallets:
            await wallet.channel.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
