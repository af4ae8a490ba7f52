"""The share service over the real stack, in one process: intermediary, libsignal, wallets.

Peers that misbehave are played by a real wallet whose channel sends hand-made transfer
messages, so every message still travels encrypted through the intermediary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tigress_signal.credentials import (
    Accepted,
    Cancelled,
    DigitalKeyHolder,
    ProvisioningInformation,
    TransferEnvelope,
    TransferMessage,
    encode_transfer,
)
from tigress_signal.errors import InvalidTransition, NoSession, ShareExpired, UnknownPeer
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.service import DigitalKeyTerms
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.wallet import Wallet

WAIT = 20.0


@contextlib.asynccontextmanager
async def receiving(wallet: Wallet) -> AsyncIterator[None]:
    task = asyncio.create_task(wallet.shares.run())
    try:
        yield
    finally:
        await wallet.channel.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def people(tmp_path: Path) -> AsyncIterator[tuple[Wallet, Wallet, Wallet]]:
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        carol = await Wallet.create(tmp_path / "carol", server.url)
        async with (
            alice,
            bob,
            carol,
            receiving(alice),
            receiving(bob),
            receiving(carol),
        ):
            yield alice, bob, carol


def token(text: bytes = b"opaque hotel key") -> ProvisioningInformation:
    return ProvisioningInformation(media_type="application/octet-stream", content=text)


async def send_raw(sender: Wallet, receiver: Wallet, message: TransferMessage) -> uuid.UUID:
    """Send a hand-made transfer message; returns its message id."""
    envelope = TransferEnvelope(message_id=uuid.uuid4(), sent_at=datetime.now(UTC), body=message)
    await sender.channel.send(receiver.account_id, encode_transfer(envelope))
    return envelope.message_id


async def settle(wallet: Wallet) -> None:
    await wallet.shares.wait_idle(0.5)


async def test_stateless_share_delivers_the_bytes_once(people):
    alice, bob, _ = people
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    received = await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    assert received.role == "receiver"
    assert received.title == "Room 12"
    assert bob.shares.credentials() == []  # nothing is stored before the user accepts

    await bob.shares.accept(share.share_id)
    await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    assert [c.content for c in bob.shares.credentials()] == [b"opaque hotel key"]
    with pytest.raises(InvalidTransition):
        await bob.shares.accept(share.share_id)
    assert len(bob.shares.credentials()) == 1


async def test_a_message_that_does_not_fit_is_refused_and_the_loop_goes_on(people, caplog):
    alice, bob, _ = people
    caplog.set_level(logging.WARNING, logger="tigress_signal.shares.service")
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)

    # A key signing request has no place in a stateless share.
    request = DigitalKeyHolder.generate().signing_request(uuid.UUID(share.share_id))
    await send_raw(bob, alice, request)
    await settle(alice)
    assert alice.shares.share(share.share_id).state is ShareState.OFFERED
    assert any(
        "refused key_signing_request" in r.getMessage() and "does not accept" in r.getMessage()
        for r in caplog.records
    )

    # The same receive loop still handles the genuine answer.
    await bob.shares.accept(share.share_id)
    await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)


async def test_only_the_share_peer_can_move_it(people, caplog):
    alice, bob, carol = people
    caplog.set_level(logging.WARNING, logger="tigress_signal.shares.service")
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)

    # Carol learned the share id somehow and tries to accept and to cancel it.
    await send_raw(carol, alice, Accepted(share_id=uuid.UUID(share.share_id)))
    await send_raw(carol, alice, Cancelled(share_id=uuid.UUID(share.share_id)))
    await settle(alice)
    assert alice.shares.share(share.share_id).state is ShareState.OFFERED
    assert sum("refused" in r.getMessage() for r in caplog.records) == 2


async def test_a_copy_of_a_message_is_dropped(people, caplog):
    alice, bob, _ = people
    caplog.set_level(logging.INFO, logger="tigress_signal.shares.service")
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)

    # The same transfer message (same message id) sent twice, as a resend after a crash would.
    envelope = TransferEnvelope(
        message_id=uuid.uuid4(),
        sent_at=datetime.now(UTC),
        body=Cancelled(share_id=uuid.UUID(share.share_id)),
    )
    payload = encode_transfer(envelope)
    await bob.channel.send(alice.account_id, payload)
    await bob.channel.send(alice.account_id, payload)
    await settle(alice)
    assert alice.shares.share(share.share_id).state is ShareState.CANCELLED
    copies = [r for r in caplog.records if "dropped a copy" in r.getMessage()]
    assert len(copies) == 1
    assert str(envelope.message_id) in copies[0].getMessage()


async def test_garbage_payload_is_refused_without_stopping_the_loop(people, caplog):
    alice, bob, _ = people
    caplog.set_level(logging.WARNING, logger="tigress_signal.shares.service")
    await bob.channel.send(alice.account_id, b"\x00not a transfer message")
    await bob.channel.send(alice.account_id, b'{"version": 1, "body": {"type": "offer"}}')
    share = await bob.shares.offer_provisioning(alice.account_id, token(), title="After junk")
    await alice.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    assert sum("refused a message" in r.getMessage() for r in caplog.records) == 2


async def test_decline_and_cancel_reach_the_other_side(people):
    alice, bob, _ = people
    first = await alice.shares.offer_provisioning(bob.account_id, token(), title="Declined")
    await bob.shares.wait_for(first.share_id, [ShareState.OFFERED], WAIT)
    await bob.shares.decline(first.share_id, reason="not mine")
    await alice.shares.wait_for(first.share_id, [ShareState.DECLINED], WAIT)

    second = await alice.shares.offer_provisioning(bob.account_id, token(), title="Cancelled")
    await bob.shares.wait_for(second.share_id, [ShareState.OFFERED], WAIT)
    await alice.shares.cancel(second.share_id)
    await bob.shares.wait_for(second.share_id, [ShareState.CANCELLED], WAIT)
    with pytest.raises(InvalidTransition):
        await bob.shares.accept(second.share_id)
    assert bob.shares.credentials() == []


async def test_an_expired_offer_cannot_be_accepted(people):
    alice, bob, _ = people
    share = await alice.shares.offer_provisioning(
        bob.account_id, token(), title="Short", lifetime=timedelta(seconds=1)
    )
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await asyncio.sleep(1.2)
    with pytest.raises(ShareExpired):
        await bob.shares.accept(share.share_id)
    assert bob.shares.share(share.share_id).state is ShareState.EXPIRED
    assert bob.shares.credentials() == []


async def test_a_digital_key_is_endorsed_once(people, caplog):
    alice, bob, _ = people
    caplog.set_level(logging.WARNING, logger="tigress_signal.shares.service")
    now = datetime.now(UTC)
    terms = DigitalKeyTerms("car-1", ("unlock",), now, now + timedelta(days=1))
    share = await alice.shares.offer_digital_key(bob.account_id, terms, title="Car")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await bob.shares.accept(share.share_id)
    await bob.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)

    # A second key signing request for the same share (another key) is refused.
    second = DigitalKeyHolder.generate().signing_request(uuid.UUID(share.share_id))
    await send_raw(bob, alice, second)
    await settle(alice)
    assert any("refused key_signing_request" in r.getMessage() for r in caplog.records)
    key = bob.shares.digital_key(share.share_id)
    assert key.endorsement.public_key == key.holder.public_key_der
    assert key.endorsement.public_key != second.public_key


async def test_offer_to_an_unknown_account_fails_and_stores_nothing(people):
    alice, _, _ = people
    with pytest.raises(UnknownPeer):
        await alice.shares.offer_provisioning(str(uuid.uuid4()), token(), title="Nobody")
    assert alice.shares.shares() == []
    pending = alice.store.connection.execute("SELECT count(*) FROM outbox").fetchone()
    assert pending[0] == 0


async def test_both_sides_compute_the_same_safety_number(people):
    alice, bob, carol = people
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    seen_by_alice = await alice.safety_number(bob.account_id)
    seen_by_bob = await bob.safety_number(alice.account_id)
    assert len(seen_by_alice.digits) == 60
    assert seen_by_alice.digits.isdigit()
    assert seen_by_alice.digits == seen_by_bob.digits
    # Carol never talked to Alice: there is no key to compare yet.
    with pytest.raises(NoSession, match="no identity key"):
        await carol.safety_number(alice.account_id)
