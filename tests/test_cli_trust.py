"""The ``trust``, ``safety-number`` and ``wallet reset-identity`` commands, as separate processes.

The intermediary runs in the test's process; each command is its own process (an asyncio
subprocess, so the server keeps serving while it runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tigress_signal.credentials import ProvisioningInformation
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.wallet import Wallet

WAIT = 20.0
SRC = str(Path(__file__).resolve().parents[1] / "src")


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tigress_signal",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert b"Traceback" not in err, err.decode()
    return int(process.returncode or 0), out.decode(), err.decode()


@contextlib.asynccontextmanager
async def running(wallet: Wallet) -> AsyncIterator[None]:
    task = asyncio.create_task(wallet.shares.run())
    try:
        yield
    finally:
        await wallet.channel.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def wallets(tmp_path: Path) -> AsyncIterator[tuple[Path, str, Path, str]]:
    """Alice and Bob who completed one share, closed again: (alice folder, id, bob folder, id)."""
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob, running(alice), running(bob):
            info = ProvisioningInformation(media_type="text/plain", content=b"first")
            share = await alice.shares.offer_provisioning(bob.account_id, info, title="t")
            await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            await bob.shares.accept(share.share_id)
            await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
            ids = (alice.account_id, bob.account_id)
        yield tmp_path / "alice", ids[0], tmp_path / "bob", ids[1]


async def test_reset_identity_then_compare_and_trust_from_the_command_line(wallets):
    alice, alice_id, bob, bob_id = wallets
    status, out, _ = await cli("wallet", "reset-identity", str(bob))
    assert (status, out.strip()) == (0, bob_id)

    # Alice's send stops, with a hint that names both commands.
    status, out, err = await cli(
        "share", "--wallet", str(alice), "--to", bob_id, "--access-token", "a", "--title", "t"
    )
    assert status == 1
    # The offer is stored and waits: its id is printed and the user is told not to share again.
    (stored_share,) = out.split()
    assert "stored but not sent yet" in err and "do not share again" in err
    assert f"identity key of {bob_id} is not trusted" in err
    assert f"tigress-signal safety-number --wallet {alice} {bob_id}" in err
    assert f"tigress-signal trust --wallet {alice} {bob_id} --safety-number DIGITS" in err

    # The safety number is the new key's, and says so.
    status, out, err = await cli("safety-number", "--wallet", str(alice), bob_id, "--no-qr")
    assert status == 0
    assert "CHANGED and is not trusted yet" in err
    spaced = out  # as printed: groups of five over three lines
    digits = out.replace(" ", "").replace("\n", "")
    assert len(digits) == 60
    status, bobs, _ = await cli("safety-number", "--wallet", str(bob), alice_id, "--no-qr")
    assert bobs.replace(" ", "").replace("\n", "") == digits

    # Wrong digits store nothing; the right ones trust, and the stored offer then goes out.
    wrong = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    status, _, err = await cli("trust", "--wallet", str(alice), bob_id, "--safety-number", wrong)
    assert status == 1 and "nothing was trusted" in err
    status, _, err = await cli("safety-number", "--wallet", str(alice), bob_id, "--no-qr")
    assert "CHANGED" in err
    status, out, _ = await cli("trust", "--wallet", str(alice), bob_id, "--safety-number", spaced)
    assert status == 0
    assert f"trusted the new identity key of {bob_id}" in out
    status, _, err = await cli("safety-number", "--wallet", str(alice), bob_id, "--no-qr")
    assert f"the identity key of {bob_id} is verified" in err

    status, out, _ = await cli("inbox", "--wallet", str(bob), "--idle", "2")
    assert status == 0
    assert "offered" in out and stored_share in out


async def test_trust_refuses_bad_digits_and_unknown_peers(wallets):
    alice, _, _, bob_id = wallets
    status, _, err = await cli("trust", "--wallet", str(alice), bob_id, "--safety-number", "12")
    assert status == 1 and "60 digits" in err
    unknown = "00000000-0000-4000-8000-000000000000"
    status, _, err = await cli("trust", "--wallet", str(alice), unknown, "--without-comparing")
    assert status == 1 and f"no identity key for {unknown}" in err
    # Neither digits nor an explicit --without-comparing: refused before anything is opened.
    status, _, err = await cli("trust", "--wallet", str(alice), bob_id)
    assert status == 2 and "--safety-number" in err and "--without-comparing" in err
