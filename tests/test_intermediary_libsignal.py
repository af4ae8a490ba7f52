"""The intermediary with the real libsignal: signature checks by the sidecar, and a session.

No verifier is passed to the server here, so its lifespan starts its own
:class:`LibsignalBridge`; the wallets' keys come from their own sidecars. The last test runs a
whole PQXDH session through the server: bundle fetch, PreKey message pushed over the WebSocket,
and a Whisper answer listed over REST.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from intermediary_fixtures import (
    config_for,
    database_url,  # noqa: F401 - autouse, both dialects
    raw_client,
    signed_json,
)
from tigress_signal.bridge.libsignal import (
    KyberPreKey,
    LibsignalBridge,
    MessageType,
    PreKey,
    ProtocolAddress,
    SignedPreKey,
)
from tigress_signal.bridge.records import RecordChange, RecordKind
from tigress_signal.errors import ServerApiError
from tigress_signal.intermediary.client import IntermediaryClient, OutgoingMessage
from tigress_signal.intermediary.server import IntermediaryServer

LAST_RESORT_ID = 900
WAIT = 10.0


class MemoryRecords:
    """The wallet's durable records, in memory."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}

    def load_record(self, kind: RecordKind, key: str) -> bytes | None:
        return self.records.get((kind, key))

    def apply(self, changes: tuple[RecordChange, ...] | list[RecordChange]) -> None:
        for change in changes:
            if change.value is None:
                self.records.pop((change.kind, change.key), None)
            else:
                self.records[(change.kind, change.key)] = change.value


@dataclass
class Wallet:
    """A wallet's sidecar, records, keys and (once registered) client."""

    bridge: LibsignalBridge
    records: MemoryRecords
    identity_key_pair: bytes
    public_key: bytes
    registration_id: int
    signed: SignedPreKey
    last_resort: KyberPreKey
    prekeys: list[PreKey] = field(default_factory=list)
    pq_prekeys: list[KyberPreKey] = field(default_factory=list)
    client: IntermediaryClient | None = None
    uuid: str = ""

    async def open_as(self, name: str) -> None:
        await self.bridge.open(
            self.identity_key_pair,
            self.registration_id,
            ProtocolAddress(name, 1),
            last_resort_kyber_ids=[LAST_RESORT_ID],
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    # No verifier: the app starts and stops its own libsignal sidecar.
    async with IntermediaryServer(config_for(tmp_path)) as running:
        yield running


@pytest.fixture
async def make_wallet() -> AsyncIterator[Callable[..., Awaitable[Wallet]]]:
    made: list[Wallet] = []

    async def make() -> Wallet:
        records = MemoryRecords()
        bridge = LibsignalBridge(records)
        await bridge.start()
        identity = await bridge.generate_identity()
        wallet = Wallet(
            bridge,
            records,
            identity.identity_key_pair,
            identity.public_key,
            identity.registration_id,
            signed=None,  # type: ignore[arg-type]
            last_resort=None,  # type: ignore[arg-type]
        )
        made.append(wallet)
        await wallet.open_as("unregistered")
        wallet.signed = await bridge.generate_signed_prekey(1)
        (wallet.last_resort,) = await bridge.generate_kyber_prekeys(LAST_RESORT_ID, 1)
        wallet.prekeys = list(await bridge.generate_prekeys(1, 3))
        wallet.pq_prekeys = list(await bridge.generate_kyber_prekeys(1, 3))
        records.apply(
            [RecordChange("signed_prekey", "1", wallet.signed.record)]
            + [RecordChange("kyber_prekey", str(LAST_RESORT_ID), wallet.last_resort.record)]
            + [RecordChange("prekey", str(k.key_id), k.record) for k in wallet.prekeys]
            + [RecordChange("kyber_prekey", str(k.key_id), k.record) for k in wallet.pq_prekeys]
        )
        return wallet

    yield make
    for wallet in made:
        if wallet.client is not None:
            await wallet.client.aclose()
        await wallet.bridge.aclose()


async def registered(wallet: Wallet, server: IntermediaryServer) -> Wallet:
    client = IntermediaryClient(server.url)
    created = await client.create_account(
        identity_key=wallet.public_key,
        registration_id=wallet.registration_id,
        signed_prekey=wallet.signed.public(),
        pq_last_resort_prekey=wallet.last_resort.public(),
    )
    client.authenticate(created.uuid, created.device_id, created.password)
    await client.upload_keys(
        pre_keys=[k.public() for k in wallet.prekeys],
        pq_pre_keys=[k.public() for k in wallet.pq_prekeys],
    )
    wallet.client = client
    wallet.uuid = created.uuid
    await wallet.open_as(created.uuid)
    return wallet


def tampered(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


async def test_real_keys_are_accepted(make_wallet, server):
    wallet = await registered(await make_wallet(), server)
    assert wallet.client is not None
    counts = await wallet.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (3, 3)


@pytest.mark.parametrize("part", ["signedPreKey", "pqLastResortPreKey"])
async def test_a_tampered_signature_at_creation_is_422(make_wallet, server, part):
    wallet = await make_wallet()
    signed = wallet.signed.public()
    last_resort = wallet.last_resort.public()
    if part == "signedPreKey":
        signed = dataclasses.replace(signed, signature=tampered(signed.signature))
    else:
        last_resort = dataclasses.replace(last_resort, signature=tampered(last_resort.signature))
    client = IntermediaryClient(server.url)
    with pytest.raises(ServerApiError) as caught:
        await client.create_account(
            identity_key=wallet.public_key,
            registration_id=wallet.registration_id,
            signed_prekey=signed,
            pq_last_resort_prekey=last_resort,
        )
    await client.aclose()
    assert caught.value.status == 422
    assert caught.value.body["error"] == "invalid_signature"
    assert part in str(caught.value.body["message"])


async def test_keys_signed_by_another_identity_are_422(make_wallet, server):
    wallet = await registered(await make_wallet(), server)
    stranger = await make_wallet()
    assert wallet.client is not None
    with pytest.raises(ServerApiError) as caught:
        await wallet.client.upload_keys(pq_pre_keys=[k.public() for k in stranger.pq_prekeys])
    assert caught.value.status == 422
    with pytest.raises(ServerApiError):
        await wallet.client.upload_keys(signed_prekey=stranger.signed.public())
    # A signature over a different key of the same identity does not verify either.
    own = wallet.pq_prekeys[0].public()
    swapped = dataclasses.replace(own, public_key=wallet.pq_prekeys[1].public_key)
    async with raw_client(server.url) as http:
        response = await http.put(
            "/v2/keys",
            auth=(f"{wallet.uuid}.1", wallet.client.credentials.password),  # type: ignore[union-attr]
            json={"pqPreKeys": [signed_json(swapped)]},
        )
    assert response.status_code == 422
    counts = await wallet.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (3, 3)


async def test_a_pqxdh_session_through_the_intermediary(make_wallet, server):
    alice = await registered(await make_wallet(), server)
    bob = await registered(await make_wallet(), server)
    assert alice.client is not None and bob.client is not None

    # Alice takes Bob's bundle and starts a session.
    bundle = await alice.client.fetch_bundle(bob.uuid)
    (device,) = bundle.devices
    assert device.prekey is not None and device.prekey.key_id == 1
    bob_address = ProtocolAddress(bob.uuid, 1)
    session = await alice.bridge.process_prekey_bundle(bob_address, device)
    alice.records.apply(session.changes)

    async with bob.client.connect_websocket() as stream:
        # Her first message is a PreKey message, pushed to Bob's open WebSocket.
        sent = await alice.bridge.encrypt(bob_address, b"hello bob")
        alice.records.apply(sent.changes)
        assert sent.message_type == MessageType.PREKEY
        await alice.client.send_message(
            bob.uuid,
            OutgoingMessage(
                type=3,
                destination_device_id=1,
                destination_registration_id=device.registration_id,
                content=sent.ciphertext,
            ),
        )
        delivery = await asyncio.wait_for(stream.receive(), WAIT)
        assert delivery is not None and delivery.envelope.type == 3
        alice_address = ProtocolAddress(delivery.envelope.source_uuid, 1)
        opened = await bob.bridge.decrypt(alice_address, 3, delivery.envelope.content)
        bob.records.apply(opened.changes)
        assert opened.plaintext == b"hello bob"
        await delivery.acknowledge()

    # Bob answers on the session (a Whisper message); Alice lists it over REST.
    reply = await bob.bridge.encrypt(alice_address, b"hello alice")
    bob.records.apply(reply.changes)
    assert reply.message_type == MessageType.WHISPER
    await bob.client.send_message(
        alice.uuid,
        OutgoingMessage(
            type=1,
            destination_device_id=1,
            destination_registration_id=alice.registration_id,
            content=reply.ciphertext,
        ),
    )
    (envelope,) = (await alice.client.list_messages()).messages
    answer = await alice.bridge.decrypt(bob_address, 2, envelope.content)
    assert answer.plaintext == b"hello alice"
    await alice.client.acknowledge(envelope.guid)
    assert (await bob.client.list_messages()).messages == []
    assert (await alice.client.list_messages()).messages == []
