"""Several devices per account, over the real stack in one process: linking a second device from
the wallet side, and a share redeemed by the first device that answers and by no other.

Bob has two devices (the second linked with a link request and answer); Alice offers to Bob's
account, so both devices get the offer. Alice's receive loop is held back while both devices
answer, so both answers are really on their way before she sees either one.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tigress_signal.credentials import DigitalKeyHolder, ReferenceLock, verify_access_token
from tigress_signal.errors import (
    ConfigError,
    EndorsementRejected,
    InvalidLinkAnswer,
    InvalidLinkRequest,
    InvalidTransition,
    StoreError,
)
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.service import DigitalKeyTerms
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.linking import LinkSecrets, parse_link_request, seal_link_answer
from tigress_signal.wallet.wallet import Wallet
from wallet_helpers import receiving

WAIT = 30.0


@dataclass
class Parties:
    server: IntermediaryServer
    alice: Wallet
    phone: Wallet  # Bob's first device
    tablet: Wallet  # Bob's second device, linked from the phone


async def link_tablet(phone: Wallet, folder: Path) -> Wallet:
    request = await Wallet.link_request(folder)
    answer = await phone.answer_link(request.line)
    assert answer.check_code == request.check_code
    return await Wallet.finish_link(folder, answer.line)


@pytest.fixture
async def parties(tmp_path: Path) -> AsyncIterator[Parties]:
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        phone = await Wallet.create(tmp_path / "bob-phone", server.url)
        tablet = await link_tablet(phone, tmp_path / "bob-tablet")
        async with alice, phone, tablet, receiving(phone), receiving(tablet):
            yield Parties(server, alice, phone, tablet)


def by_device(parties: Parties, device_id: int) -> Wallet:
    return parties.phone if parties.phone.account.device_id == device_id else parties.tablet


# -- linking -------------------------------------------------------------------------------


async def test_a_linked_device_joins_the_account_with_its_identity(parties):
    phone, tablet = parties.phone, parties.tablet
    assert tablet.account_id == phone.account_id
    assert (phone.account.device_id, tablet.account.device_id) == (1, 2)
    assert tablet.account.identity_public_key == phone.account.identity_public_key
    assert tablet.account.identity_key_pair == phone.account.identity_key_pair
    # Its own install: registration id and device password are not the phone's.
    assert tablet.account.password != phone.account.password
    assert [d.id for d in await phone.devices()] == [1, 2]
    assert [d.id for d in await tablet.devices()] == [1, 2]
    # The link request's key is gone, and the tablet published one-time prekeys.
    assert tablet.store.pending_link() is None
    counts = await tablet._require_client().prekey_counts()
    assert counts.count > 0 and counts.pq_count > 0
    # Its signed and last-resort keys are on the rotation schedule like a registered wallet's.
    rotating = tablet.store.connection.execute(
        "SELECT kind, key_id FROM rotating_prekeys WHERE published_at IS NOT NULL ORDER BY kind"
    ).fetchall()
    assert [kind for kind, _ in rotating] == ["last_resort_kyber", "signed_prekey"]
    assert all(
        tablet.store.has_record(
            "kyber_prekey" if kind == "last_resort_kyber" else "signed_prekey", str(key_id)
        )
        for kind, key_id in rotating
    )


async def test_the_intermediary_never_sees_the_identity_private_key(parties, tmp_path):
    private = parties.phone.account.identity_key_pair
    server_db = (tmp_path / "server.db").read_bytes()
    assert private not in server_db
    # The identity key pair's private half is its last 32 bytes (after the public key).
    assert private[-32:] not in server_db


async def test_removing_the_linked_device(parties):
    await parties.phone.remove_device(2)
    assert [d.id for d in await parties.phone.devices()] == [1]


# -- the first device that answers wins ------------------------------------------------------


async def test_both_devices_get_the_offer_and_one_digital_key_is_endorsed(parties, caplog):
    caplog.set_level(logging.INFO, logger="tigress_signal.shares.service")
    alice, phone, tablet = parties.alice, parties.phone, parties.tablet
    now = datetime.now(UTC)
    terms = DigitalKeyTerms("garage-7", ("unlock",), now, now + timedelta(days=1))
    share = await alice.shares.offer_digital_key(phone.account_id, terms, title="Garage")
    share_id = share.share_id
    for device in (phone, tablet):
        await device.shares.wait_for(share_id, [ShareState.OFFERED], WAIT)

    # Both users accept at once, while Alice is not processing anything yet.
    await asyncio.gather(phone.shares.accept(share_id), tablet.shares.accept(share_id))
    held_keys = {}
    for device in (phone, tablet):
        assert device.shares.share(share_id).state is ShareState.KEY_REQUESTED
        pem = device.store.connection.execute(
            "SELECT private FROM shares WHERE share_id = ?", (share_id,)
        ).fetchone()[0]
        held_keys[device.account.device_id] = DigitalKeyHolder.from_private_key_pem(bytes(pem))

    async with receiving(alice):
        sent = await alice.shares.wait_for(share_id, [ShareState.ACCEPTED], WAIT)
        winner_id = sent.answered_by_device
        assert winner_id in (1, 2)
        loser_id = 3 - winner_id
        winner, loser = by_device(parties, winner_id), by_device(parties, loser_id)
        await winner.shares.wait_for(share_id, [ShareState.ACCEPTED], WAIT)
        await loser.shares.wait_for(share_id, [ShareState.TAKEN], WAIT)
        await alice.shares.wait_idle(0.5)

    # Exactly one key in Bob's account: the winner's; the loser kept nothing.
    assert len(winner.shares.credentials()) == 1
    assert loser.shares.credentials() == []
    leftover = loser.store.connection.execute(
        "SELECT private FROM shares WHERE share_id = ?", (share_id,)
    ).fetchone()[0]
    assert bytes(leftover) == b""
    assert alice.shares.share(share_id).state is ShareState.ACCEPTED
    assert alice.shares.share(share_id).answered_by_device == winner_id
    # The late request was answered with "taken", as information, never endorsed.
    taken_lines = [
        r
        for r in caplog.records
        if f"from device {loser_id}, taken by device {winner_id}" in r.getMessage()
    ]
    assert taken_lines and all(r.levelno == logging.INFO for r in taken_lines)

    # The lock opens for the winner's key and not for the key the loser had made.
    key = winner.shares.digital_key(share_id)
    assert key.holder.public_key_der == held_keys[winner_id].public_key_der
    lock = ReferenceLock("garage-7", alice.shares.existing_owner_key("garage-7").public_key_der)
    challenge = lock.challenge()
    lock.unlock(key.endorsement, key.holder.respond(challenge, "garage-7"))
    other = lock.challenge()
    with pytest.raises(EndorsementRejected):
        lock.unlock(key.endorsement, held_keys[loser_id].respond(other, "garage-7"))


async def test_both_devices_accept_a_stateless_token_and_the_account_keeps_one(parties):
    alice, phone, tablet = parties.alice, parties.phone, parties.tablet
    share = await alice.shares.offer_access_token(phone.account_id, ["room:12"], title="Room 12")
    share_id = share.share_id
    for device in (phone, tablet):
        await device.shares.wait_for(share_id, [ShareState.OFFERED], WAIT)

    await asyncio.gather(phone.shares.accept(share_id), tablet.shares.accept(share_id))
    # Each device stored the token locally before the sender could say who was first.
    assert len(phone.shares.credentials()) == 1 and len(tablet.shares.credentials()) == 1

    async with receiving(alice):
        sent = await alice.shares.wait_for(share_id, [ShareState.ACCEPTED], WAIT)
        winner_id = sent.answered_by_device
        assert winner_id in (1, 2)
        winner, loser = by_device(parties, winner_id), by_device(parties, 3 - winner_id)
        await loser.shares.wait_for(share_id, [ShareState.TAKEN], WAIT)
        # The winner got the same notice, naming itself, and stays accepted.
        await alice.shares.wait_idle(0.5)
        await winner.shares.wait_idle(0.5)

    assert winner.shares.share(share_id).state is ShareState.ACCEPTED
    assert loser.shares.credentials() == []
    (kept,) = winner.shares.credentials()
    issuer_key = alice.shares.access_token_issuer().public_key_der
    assert verify_access_token(kept.content, issuer_key).scope == ("room:12",)
    assert alice.shares.share(share_id).state is ShareState.ACCEPTED


async def test_a_device_that_did_not_answer_stops_offering_the_share(parties):
    alice, phone, tablet = parties.alice, parties.phone, parties.tablet
    async with receiving(alice):
        share = await alice.shares.offer_access_token(phone.account_id, ["door"], title="Door")
        await tablet.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
        await phone.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
        await tablet.shares.decline(share.share_id, "not on this device")
        await alice.shares.wait_for(share.share_id, [ShareState.DECLINED], WAIT)
        await phone.shares.wait_for(share.share_id, [ShareState.TAKEN], WAIT)
    with pytest.raises(InvalidTransition, match="another device of this account answered"):
        await phone.shares.accept(share.share_id)
    assert phone.shares.credentials() == [] and tablet.shares.credentials() == []
    assert tablet.shares.share(share.share_id).state is ShareState.DECLINED


# -- bad link input --------------------------------------------------------------------------


def assert_still_waiting(folder: Path, request_line: str) -> None:
    assert Wallet.pending_link_request(folder).line == request_line
    assert not (folder / "wallet.toml").exists()


async def test_bad_link_requests_are_refused_before_any_code_is_issued(tmp_path):
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as server:
        async with await Wallet.create(tmp_path / "phone", server.url) as phone:
            request = await Wallet.link_request(tmp_path / "tablet")
            for bad, words in [
                ("hello", "not a link request"),
                (request.line[:-10], "cut short"),
                (request.line[:-1] + "*", "not base64url"),
                (request.line[:-3], "63 bytes instead of 65"),
                ("tslink1-ans.AAAA", "a link answer, not a link request"),
                ("tslink1-req." + "A" * 87, "not a P-256 point"),
                ("tslink1-req." + "A" * 5000, "longer than 256 characters"),
            ]:
                with pytest.raises(InvalidLinkRequest, match=words):
                    await phone.answer_link(bad)
        rows = sqlite3.connect(tmp_path / "server.db").execute("SELECT count(*) FROM link_codes")
        assert rows.fetchone()[0] == 0


async def test_bad_link_answers_leave_the_new_device_waiting(tmp_path):
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with (
        IntermediaryServer(config) as server,
        await Wallet.create(tmp_path / "phone", server.url) as phone,
    ):
        tablet = tmp_path / "tablet"
        request = await Wallet.link_request(tablet)
        other = await Wallet.link_request(tmp_path / "other")
        answer = (await phone.answer_link(request.line)).line
        for_other = (await phone.answer_link(other.line)).line
        body = answer.removeprefix("tslink1-ans.")
        middle = len(body) // 2
        flipped = "B" if body[middle] != "B" else "C"
        tampered = "tslink1-ans." + body[:middle] + flipped + body[middle + 1 :]
        for bad, words in [
            ("tslink1-xyz." + body, "not a link answer"),
            (request.line, "a link request, not a link answer"),
            (answer[:40], "cut short"),
            (answer[:-32], "does not decrypt"),
            (answer[:-31], "cut short"),
            (tampered, "does not decrypt"),
            (for_other, "made for another link request"),
        ]:
            with pytest.raises(InvalidLinkAnswer, match=words):
                await Wallet.finish_link(tablet, bad)
            assert_still_waiting(tablet, request.line)
        with pytest.raises(StoreError, match="waiting to be linked"):
            await Wallet.open(tablet)

        # An expired code is refused by the device itself.
        expired = seal_link_answer(
            parse_link_request(request.line),
            LinkSecrets(
                server_url=server.url,
                account_id=phone.account_id,
                identity_key_pair=phone.account.identity_key_pair,
                identity_public_key=phone.account.identity_public_key,
                link_code="unused",
                code_expires_at=1,
                trust_policy="tofu",
            ),
        )
        with pytest.raises(InvalidLinkAnswer, match="expired"):
            await Wallet.finish_link(tablet, expired)
        assert_still_waiting(tablet, request.line)

        # A code already used (taken at the server meanwhile) is refused by the server.
        sqlite3.connect(tmp_path / "server.db", isolation_level=None).execute(
            "DELETE FROM link_codes"
        )
        with pytest.raises(InvalidLinkAnswer, match="used or expired"):
            await Wallet.finish_link(tablet, answer)
        assert_still_waiting(tablet, request.line)
        assert [d.id for d in await phone.devices()] == [1]

        # The waiting folder still links with a fresh answer, once.
        fresh = (await phone.answer_link(request.line)).line
        async with await Wallet.finish_link(tablet, fresh) as linked:
            assert linked.account.device_id == 2
        with pytest.raises(StoreError, match="already linked"):
            await Wallet.finish_link(tablet, fresh)
        assert [d.id for d in await phone.devices()] == [1, 2]


async def test_a_link_request_needs_a_new_folder(tmp_path):
    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        await Wallet.link_request(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    waiting = tmp_path / "waiting"
    request = await Wallet.link_request(waiting)
    with pytest.raises(ConfigError, match="already holds a wallet or a link request"):
        await Wallet.link_request(waiting)
    assert Wallet.pending_link_request(waiting) == request
