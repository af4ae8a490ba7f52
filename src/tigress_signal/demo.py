"""``tigress-signal demo``: both transfers, end to end, on this machine.

It starts an intermediary (a separate ``tigress-signal serve`` process on a free loopback port,
SQLite in a temporary folder), creates two wallets, Alice's and Bob's, and runs:

1. a stateless share: Alice issues an access token and offers it; Bob accepts; the token in
   Bob's wallet verifies against Alice's issuer key;
2. a stateful share: Alice offers a digital key to her front door; Bob's device makes a key pair
   and asks for it to be signed; Alice endorses it; Bob stores it;
3. the reference lock of the front door challenges Bob's key and opens.

Each step is printed with its duration. Any failure ends the demo with one line and exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import httpx

from tigress_signal.credentials import ReferenceLock, verify_access_token
from tigress_signal.errors import TigressSignalError
from tigress_signal.shares.service import DigitalKeyTerms
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.wallet import Wallet

T = TypeVar("T")

_STEP_TIMEOUT = 30.0
_SERVER_START_TIMEOUT = 20.0


class DemoFailed(TigressSignalError):
    """A demo step did not produce what it should have."""


class _Transcript:
    def __init__(self) -> None:
        self.number = 0
        self.total = 0.0

    async def step(self, text: str, action: Awaitable[T]) -> T:
        self.number += 1
        started = time.perf_counter()
        result = await asyncio.wait_for(action, _STEP_TIMEOUT)
        elapsed = time.perf_counter() - started
        self.total += elapsed
        print(f"{self.number:>3}. {text:<66} {elapsed * 1000:8.1f} ms", flush=True)
        return result


async def run_demo() -> int:
    """Run the demo; returns 0 when every step succeeded."""
    transcript = _Transcript()
    print("tigress-signal demo: two wallets, one self-hosted intermediary, official libsignal")
    with tempfile.TemporaryDirectory(prefix="tigress-signal-demo-") as tmp:
        folder = Path(tmp)
        async with _intermediary(folder, transcript) as url:
            alice = await transcript.step(
                "create Alice's wallet (identity, prekeys, account)",
                Wallet.create(folder / "alice", url),
            )
            async with alice:
                bob = await transcript.step(
                    "create Bob's wallet (identity, prekeys, account)",
                    Wallet.create(folder / "bob", url),
                )
                async with bob, _receiving(alice), _receiving(bob):
                    await _stateless(alice, bob, transcript)
                    await _stateful(alice, bob, transcript)
    print(f"done: {transcript.number} steps in {transcript.total * 1000:.0f} ms")
    return 0


async def _stateless(alice: Wallet, bob: Wallet, transcript: _Transcript) -> None:
    share = await transcript.step(
        "stateless: Alice offers an access token (PQXDH session set up)",
        alice.shares.offer_access_token(bob.account_id, ["room:1207"], title="Hotel room 1207"),
    )
    await transcript.step(
        "stateless: Bob receives the offer",
        bob.shares.wait_for(share.share_id, [ShareState.OFFERED]),
    )
    await transcript.step(
        "stateless: Bob accepts and stores the token", bob.shares.accept(share.share_id)
    )
    await transcript.step(
        "stateless: Alice sees it accepted",
        alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED]),
    )
    stored = bob.shares.credential(share.share_id)
    offered = alice.shares.offer(share.share_id).provisioning
    if offered is None or stored.content != offered.content:
        raise DemoFailed("the token in Bob's wallet differs from the one Alice sent")
    verify_access_token(stored.content, alice.shares.access_token_issuer().public_key)
    print("     the access token in Bob's wallet verifies against Alice's issuer key")


async def _stateful(alice: Wallet, bob: Wallet, transcript: _Transcript) -> None:
    now = datetime.now(UTC)
    terms = DigitalKeyTerms(
        lock_id="front-door", rights=("unlock",), not_before=now, not_after=now + timedelta(days=7)
    )
    share = await transcript.step(
        "stateful: Alice offers a digital key to her front door",
        alice.shares.offer_digital_key(bob.account_id, terms, title="Front door"),
    )
    await transcript.step(
        "stateful: Bob receives the offer",
        bob.shares.wait_for(share.share_id, [ShareState.OFFERED]),
    )
    await transcript.step(
        "stateful: Bob's device makes a key pair and asks for a signature",
        bob.shares.accept(share.share_id),
    )
    await transcript.step(
        "stateful: Alice endorses the key; Bob stores it",
        bob.shares.wait_for(share.share_id, [ShareState.ACCEPTED]),
    )
    await transcript.step(
        "stateful: Alice sees it accepted",
        alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED]),
    )
    key = bob.shares.digital_key(share.share_id)
    lock = ReferenceLock(terms.lock_id, alice.shares.owner_key(terms.lock_id).public_key)

    async def open_lock() -> None:
        challenge = lock.challenge()
        lock.unlock(key.endorsement, key.holder.respond(challenge, terms.lock_id))

    await transcript.step("the front door lock challenges Bob's key and opens", open_lock())


@contextlib.asynccontextmanager
async def _receiving(wallet: Wallet) -> AsyncIterator[None]:
    task = asyncio.create_task(wallet.shares.run(), name=f"receive {wallet.account_id}")
    try:
        yield
    finally:
        await wallet.channel.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not task.cancelled() and task.exception() is not None:
            raise DemoFailed(f"a receive loop failed: {task.exception()}")


@contextlib.asynccontextmanager
async def _intermediary(folder: Path, transcript: _Transcript) -> AsyncIterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = (folder / "intermediary.log").open("wb")
    process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits are off-thread
        [
            sys.executable,
            "-m",
            "tigress_signal",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{folder / 'intermediary.sqlite3'}",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        await transcript.step(
            f"start the intermediary on 127.0.0.1:{port} (SQLite)", _wait_ready(url, process)
        )
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        log_file.close()


async def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _SERVER_START_TIMEOUT
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DemoFailed(f"the intermediary exited with status {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise DemoFailed("the intermediary did not start in time")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
