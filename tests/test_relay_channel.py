"""The TigressRelayChannel: both transfers through ShareService, and the client-side checklist.

Covers checklist items 2 (the fragment never reaches the relay), 5 (a tampered payload is
refused), 16 (one recipient device only), 20 (nothing shared between two shares of one
wallet), 27 (links to untrusted relays are refused), 28-29 (store and forward, several round
trips), and the replay and reflection attacks that only the hardened mode detects.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay_fixtures import running_relay
from tigress_signal.adapters.tigress_relay import (
    TigressRelayChannel,
    hardened_associated_data,
    open_sealed,
    seal,
)
from tigress_signal.channel import IncomingMessage
from tigress_signal.credentials import ProvisioningInformation
from tigress_signal.errors import (
    ClaimRejected,
    InvalidShareLink,
    MailboxNotFound,
    PayloadRejected,
    UnknownPeer,
)
from tigress_signal.evaluation.parties import RelayParty
from tigress_signal.relay.client import ShareLink
from tigress_signal.relay.server import RelayServer
from tigress_signal.shares.service import DigitalKeyTerms
from tigress_signal.shares.states import ShareState

WAIT = 20.0


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real network transport, keeping a copy of every request that went out."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append(
            (request.method, str(request.url), dict(request.headers), bytes(body))
        )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def everything_sent(self) -> str:
        return "\n".join(
            f"{m} {u} {json.dumps(h)} {b.decode('latin-1')}" for m, u, h, b in self.requests
        )


class MaliciousRelay(RecordingTransport):
    """A relay that, once armed, answers the next read with a payload of its choosing."""

    def __init__(self) -> None:
        super().__init__()
        self.read_payloads: list[dict[str, Any]] = []
        self.written_payloads: list[dict[str, Any]] = []
        self.armed: dict[str, Any] | None = None
        self.version = 1000

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        is_read = request.method == "POST" and request.url.path.startswith("/v1/m/")
        if request.method in ("PUT", "POST") and body and not is_read:
            self.written_payloads.append(json.loads(body)["payload"])
        if is_read and self.armed is not None:
            forged, self.armed = self.armed, None
            self.version += 1
            content = {
                "displayInformation": {"title": "t", "description": "d", "imageURL": ""},
                "payload": forged,
                "expiration": "2099-01-01T00:00:00Z",
            }
            return httpx.Response(
                200, json=content, headers={"Mailbox-Version": str(self.version)}
            )
        response = await super().handle_async_request(request)
        if is_read and response.status_code == 200:
            await response.aread()
            self.read_payloads.append(response.json()["payload"])
        return response


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    async with running_relay(tmp_path, time.time) as server:
        yield server


async def next_message(
    channel: TigressRelayChannel, it: AsyncIterator[IncomingMessage]
) -> IncomingMessage:
    message = await asyncio.wait_for(it.__anext__(), WAIT)
    await channel.acknowledge(message)
    return message


async def wait_until(condition, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls counters that have no event
            await asyncio.sleep(0.02)


# -- both transfers through ShareService ------------------------------------------------------


@pytest.mark.parametrize("hardened", [False, True])
async def test_stateless_and_stateful_transfers_complete(
    relay: RelayServer, tmp_path: Path, hardened: bool
):
    sender_channel = TigressRelayChannel(relay.url, hardened=hardened, wait_seconds=5)
    receiver_channel = TigressRelayChannel(relay.url, hardened=hardened, wait_seconds=5)
    async with (
        RelayParty(tmp_path / "alice", sender_channel) as alice,
        RelayParty(tmp_path / "bob", receiver_channel) as bob,
    ):
        # Stateless: the offer carries the token; Bob accepts; Alice sees it accepted.
        peer = alice.channel.new_peer(title="Room 1207")
        offered = await alice.shares.offer_provisioning(
            peer,
            ProvisioningInformation(media_type="application/octet-stream", content=b"hotel key"),
            title="Room 1207",
        )
        handle = await bob.channel.open_link(alice.channel.share_link(peer))
        received = await bob.shares.wait_for(offered.share_id, [ShareState.OFFERED], WAIT)
        assert received.peer == handle
        await bob.shares.accept(offered.share_id)
        await alice.shares.wait_for(offered.share_id, [ShareState.ACCEPTED], WAIT)
        assert bob.shares.credential(offered.share_id).content == b"hotel key"
        await alice.channel.finish(peer)
        await bob.channel.finish(handle, delete=False)

        # Stateful: offer, key signing request, endorsement, accepted: four payloads.
        now = datetime.now(UTC)
        terms = DigitalKeyTerms("front-door", ("unlock",), now, now + timedelta(days=1))
        peer = alice.channel.new_peer(title="Front door")
        share = await alice.shares.offer_digital_key(peer, terms, title="Front door")
        handle = await bob.channel.open_link(alice.channel.share_link(peer))
        await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
        await bob.shares.accept(share.share_id)
        await bob.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
        await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
        key = bob.shares.digital_key(share.share_id)
        assert key.endorsement.lock_id == "front-door"
        await alice.channel.finish(peer)
        assert alice.channel.stats.payloads_sent == 3  # offer, offer, endorsement
        assert bob.channel.stats.payloads_sent == 3  # accepted, request, accepted
        assert alice.channel.stats.payloads_rejected == bob.channel.stats.payloads_rejected == 0
    rows = sqlite3.connect(relay.config.database_url.removeprefix("sqlite:///")).execute(
        "SELECT COUNT(*) FROM mailboxes"
    )
    assert rows.fetchone() == (0,)  # the reader of the last message deleted each mailbox


# -- 2. the fragment never reaches the relay ----------------------------------------------------


async def test_2_the_secret_never_reaches_the_relay(relay: RelayServer):
    sender_wire, receiver_wire = RecordingTransport(), RecordingTransport()
    sender = TigressRelayChannel(relay.url, transport=sender_wire, wait_seconds=0.2)
    receiver = TigressRelayChannel(relay.url, transport=receiver_wire, wait_seconds=0.2)
    try:
        peer = sender.new_peer(title="Room")
        await sender.send(peer, b"offer")
        link = sender.share_link(peer)
        parsed = ShareLink.parse(link)
        handle = await receiver.open_link(link)
        it = receiver.receive().__aiter__()
        assert (await next_message(receiver, it)).payload == b"offer"
        await receiver.send(handle, b"reply")
        await asyncio.sleep(0.3)
    finally:
        await sender.close()
        await receiver.close()
    fragment = link.partition("#")[2]
    encodings = {
        fragment,
        base64.b64encode(parsed.secret).decode(),
        base64.b64encode(parsed.secret).decode().rstrip("="),
        parsed.secret.hex(),
        parsed.secret.decode("latin-1"),
    }
    for wire in (sender_wire, receiver_wire):
        sent = wire.everything_sent()
        assert wire.requests
        for form in encodings:
            assert form not in sent
        assert all("#" not in url and "?" not in url for _, url, _, _ in wire.requests)


# -- 5. tampering --------------------------------------------------------------------------------


async def test_5_a_tampered_payload_is_refused(relay: RelayServer):
    sender = TigressRelayChannel(relay.url)
    receiver = TigressRelayChannel(relay.url)
    try:
        peer = sender.new_peer(title="Room")
        await sender.send(peer, b"offer")
        link = sender.share_link(peer)
        db = sqlite3.connect(relay.config.database_url.removeprefix("sqlite:///"))
        (stored,) = db.execute("SELECT payload FROM mailboxes").fetchone()
        flipped = bytearray(stored)
        flipped[20] ^= 0x01
        db.execute("UPDATE mailboxes SET payload = ?", (bytes(flipped),))
        db.commit()
        with pytest.raises(PayloadRejected):
            await receiver.open_link(link)
        assert receiver.stats.payloads_rejected == 1
        # The receiver let go of the mailbox, so it is free for the rightful device.
        assert db.execute("SELECT recipient_claim FROM mailboxes").fetchone() == (None,)
    finally:
        await sender.close()
        await receiver.close()


def test_5_sealing_uses_fresh_nonces_and_binds_associated_data():
    key = bytes(32)
    one, two = seal(key, b"same"), seal(key, b"same")
    assert one.data[:12] != two.data[:12]
    assert one.type == "AEAD_AES_256_GCM"
    bound = seal(key, b"x", hardened_associated_data("initiator", 0))
    assert open_sealed(key, bound, hardened_associated_data("initiator", 0)) == b"x"
    for wrong in (
        None,
        hardened_associated_data("recipient", 0),
        hardened_associated_data("initiator", 1),
    ):
        with pytest.raises(PayloadRejected):
            open_sealed(key, bound, wrong)


# -- 16. one recipient device ---------------------------------------------------------------------


async def test_16_a_second_device_cannot_claim_an_opened_share(relay: RelayServer):
    sender = TigressRelayChannel(relay.url)
    first, second = TigressRelayChannel(relay.url), TigressRelayChannel(relay.url)
    try:
        peer = sender.new_peer(title="Room")
        await sender.send(peer, b"offer")
        link = sender.share_link(peer)
        await first.open_link(link)
        with pytest.raises(ClaimRejected):
            await second.open_link(link)
        await sender.finish(peer)
        with pytest.raises(MailboxNotFound):
            await second.open_link(link)
        with pytest.raises(UnknownPeer):
            await sender.send(peer, b"late")
    finally:
        for channel in (sender, first, second):
            await channel.close()


# -- 20. nothing links two shares of one wallet ---------------------------------------------------


async def test_20_two_shares_from_one_wallet_share_no_value(relay: RelayServer):
    wire = RecordingTransport()
    sender = TigressRelayChannel(relay.url, transport=wire, wait_seconds=0.2)
    try:
        links = []
        for _ in range(2):
            peer = sender.new_peer(title="Room")
            await sender.send(peer, b"offer")
            links.append(ShareLink.parse(sender.share_link(peer)))
    finally:
        await sender.close()
    assert links[0].secret != links[1].secret
    assert links[0].mailbox_id != links[1].mailbox_id
    creates = [h for m, u, h, _ in wire.requests if m == "POST" and u.endswith("/v1/m")]
    claims = {h["mailbox-device-claim"] for h in creates}
    assert len(creates) == 2 and len(claims) == 2
    db = sqlite3.connect(relay.config.database_url.removeprefix("sqlite:///"))
    stored = db.execute("SELECT initiator_claim FROM mailboxes").fetchall()
    assert len({row[0] for row in stored}) == 2


# -- 27. relay trust ----------------------------------------------------------------------------


async def test_27_links_to_untrusted_relays_are_refused_before_any_request(relay: RelayServer):
    wire = RecordingTransport()
    receiver = TigressRelayChannel(relay.url, transport=wire)
    key = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    try:
        with pytest.raises(InvalidShareLink, match="does not trust"):
            await receiver.open_link(f"https://relay.invalid/v1/m/{uuid.uuid4()}#{key}")
        with pytest.raises(InvalidShareLink, match="no secret"):
            await receiver.open_link(f"{relay.url}/v1/m/{uuid.uuid4()}")
        with pytest.raises(InvalidShareLink):
            await receiver.open_link(f"{relay.url}/v1/m/not-a-mailbox#{key}")
    finally:
        await receiver.close()
    assert wire.requests == []


# -- replay and reflection: only the hardened mode notices ----------------------------------------


async def _exchange(
    relay: RelayServer, hardened: bool, attack: str
) -> tuple[TigressRelayChannel, list[bytes]]:
    """Four payloads back and forth, then the relay serves the receiver an old payload.

    Returns the receiver's channel and what it yielded after the attack.
    """
    evil = MaliciousRelay()
    sender = TigressRelayChannel(relay.url, hardened=hardened, wait_seconds=0.2)
    receiver = TigressRelayChannel(relay.url, hardened=hardened, transport=evil, wait_seconds=0.2)
    yielded: list[bytes] = []
    try:
        s_it, r_it = sender.receive().__aiter__(), receiver.receive().__aiter__()
        peer = sender.new_peer(title="Front door")
        await sender.send(peer, b"m1 offer")
        handle = await receiver.open_link(sender.share_link(peer))
        assert (await next_message(receiver, r_it)).payload == b"m1 offer"
        await receiver.send(handle, b"m2 key signing request")
        assert (await next_message(sender, s_it)).payload == b"m2 key signing request"
        await sender.send(peer, b"m3 endorsement")
        assert (await next_message(receiver, r_it)).payload == b"m3 endorsement"
        await receiver.send(handle, b"m4 accepted")
        assert (await next_message(sender, s_it)).payload == b"m4 accepted"

        m1 = evil.read_payloads[0]  # the sender's offer, read earlier
        m2 = evil.written_payloads[0]  # the receiver's own request
        before = receiver.stats.payloads_received
        evil.armed = m1 if attack == "replay" else m2
        await wait_until(lambda: evil.armed is None)
        await wait_until(
            lambda: (
                receiver.stats.payloads_received > before or receiver.stats.payloads_rejected > 0
            )
        )
        if receiver.stats.payloads_received > before:
            yielded.append((await next_message(receiver, r_it)).payload)
    finally:
        await sender.close()
        await receiver.close()
    return receiver, yielded


@pytest.mark.parametrize("attack", ["replay", "reflection"])
async def test_as_drafted_a_replayed_or_reflected_payload_is_accepted(
    relay: RelayServer, attack: str
):
    receiver, yielded = await _exchange(relay, hardened=False, attack=attack)
    # The old payload opens under the share's one key, and the channel hands it over as news.
    expected = b"m1 offer" if attack == "replay" else b"m2 key signing request"
    assert yielded == [expected]
    assert receiver.stats.payloads_rejected == 0


@pytest.mark.parametrize("attack", ["replay", "reflection"])
async def test_hardened_mode_detects_a_replayed_or_reflected_payload(
    relay: RelayServer, attack: str
):
    receiver, yielded = await _exchange(relay, hardened=True, attack=attack)
    assert yielded == []
    assert receiver.stats.payloads_rejected == 1
