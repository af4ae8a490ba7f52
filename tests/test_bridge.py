"""The libsignal bridge against the real sidecar and the real libsignal: no mocks.

Each party is a :class:`BridgeWallet` (tests/conftest.py) with its own sidecar and an in-memory
record store that the test commits every call's changes to, as the wallet would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import uuid
from typing import Any

import pytest

from conftest import (
    BRIDGE_LAST_RESORT_KYBER_ID,
    BridgeMemoryRecords,
    BridgeWallet,
    BridgeWalletFactory,
)
from tigress_signal.bridge.libsignal import (
    DecryptResult,
    EncryptResult,
    LibsignalBridge,
    MessageType,
    PreKeyBundle,
    ProtocolAddress,
    locate_sidecar,
)
from tigress_signal.bridge.records import IdentityChanged, RecordChange
from tigress_signal.errors import (
    BridgeError,
    BridgeUnavailable,
    DuplicateMessage,
    InvalidMessage,
    InvalidSignature,
    NoSession,
    SignalProtocolError,
    UnknownPreKey,
    UntrustedIdentity,
)


async def start_session(sender: BridgeWallet, bundle: PreKeyBundle, to: BridgeWallet) -> None:
    result = await sender.bridge.process_prekey_bundle(to.address, bundle)
    sender.records.apply(result.changes)


async def send(
    sender: BridgeWallet, receiver: BridgeWallet, plaintext: bytes
) -> tuple[EncryptResult, DecryptResult]:
    encrypted = await sender.bridge.encrypt(receiver.address, plaintext)
    sender.records.apply(encrypted.changes)
    decrypted = await receiver.bridge.decrypt(
        sender.address, encrypted.message_type, encrypted.ciphertext
    )
    receiver.records.apply(decrypted.changes)
    assert decrypted.plaintext == plaintext
    return encrypted, decrypted


def flip(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


def changed(result: Any) -> dict[tuple[str, str], bytes | None]:
    return {(c.kind, c.key): c.value for c in result.changes}


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_for(condition: Any) -> None:
    """Poll a condition the bridge exposes no event for (process exit, cleanup)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# -- the happy path -------------------------------------------------------------------------------


async def test_pqxdh_session_and_messages_in_both_directions(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    health = await alice.bridge.ping()
    assert health.libsignal_version == "0.103.0"
    assert health.pid == alice.bridge.pid

    # Alice starts the session from Bob's bundle: a new session and Bob's identity, trusted.
    bundle = bob.bundle()
    started = await alice.bridge.process_prekey_bundle(bob.address, bundle)
    alice.records.apply(started.changes)
    assert changed(started).keys() == {("session", "bob.1"), ("identity", "bob")}
    assert changed(started)[("identity", "bob")] == bob.identity.public_key
    assert started.identity_changes == ()

    # The first message is a PreKey message; decrypting it consumes Bob's one-time prekeys.
    first, received = await send(alice, bob, b"offer #1")
    assert first.message_type is MessageType.PREKEY
    bob_changes = changed(received)
    assert bob_changes[("prekey", str(bundle.prekey.key_id))] is None  # type: ignore[union-attr]
    assert bob_changes[("kyber_prekey", str(bundle.pq_prekey.key_id))] is None
    assert bob_changes[("identity", "alice")] == alice.identity.public_key
    assert bob_changes[("session", "alice.1")]
    assert bob.records.get("prekey", "1") is None
    assert bob.records.get("kyber_prekey", "1") is None
    assert bob.records.get("kyber_prekey", str(BRIDGE_LAST_RESORT_KYBER_ID)) is not None

    # Whisper messages both ways, the ratchet turning each time.
    reply, _ = await send(bob, alice, b"accept #1")
    assert reply.message_type is MessageType.WHISPER
    for n in range(3):
        sent, got = await send(alice, bob, f"credential part {n}".encode() * 30)
        assert sent.message_type is MessageType.WHISPER
        assert changed(sent).keys() == {("session", "bob.1")}
        assert changed(got).keys() == {("session", "alice.1")}
        await send(bob, alice, f"ack {n}".encode())

    # Both sides compute the same safety number; a different key gives another one.
    ours = await alice.bridge.safety_number(
        "alice", alice.identity.public_key, "bob", bob.identity.public_key
    )
    theirs = await bob.bridge.safety_number(
        "bob", bob.identity.public_key, "alice", alice.identity.public_key
    )
    assert ours.digits == theirs.digits
    assert len(ours.digits) == 60 and ours.digits.isdigit()
    assert ours.scannable and ours.scannable != theirs.scannable
    other = await alice.bridge.generate_identity()
    forged = await alice.bridge.safety_number(
        "alice", alice.identity.public_key, "bob", other.public_key
    )
    assert forged.digits != ours.digits


async def test_large_messages_cross_the_pipes_in_pieces(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    # Payloads and records travel as binary blobs after their JSON line. Messages far larger
    # than a pipe's buffer make both sides write in several pieces and read a line and its
    # blobs across many reads, with several calls in flight at once.
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    carol = await bridge_wallets("carol")
    await start_session(alice, bob.bundle(), bob)
    await start_session(alice, carol.bundle(), carol)
    await send(alice, bob, b"hello")
    await send(alice, carol, b"hello")
    big = os.urandom(3 * 1024 * 1024)
    to_bob, to_carol = await asyncio.gather(
        alice.bridge.encrypt(bob.address, big),
        alice.bridge.encrypt(carol.address, big[::-1]),
    )
    assert len(to_bob.ciphertext) > len(big)
    for encrypted, peer, expected in ((to_bob, bob, big), (to_carol, carol, big[::-1])):
        alice.records.apply(encrypted.changes)
        received = await peer.bridge.decrypt(
            alice.address, encrypted.message_type, encrypted.ciphertext
        )
        peer.records.apply(received.changes)
        assert received.plaintext == expected
    # The streams are still in step: small and empty messages both ways afterwards.
    await send(bob, alice, b"")
    await send(alice, bob, b"after the big one")


async def test_safety_numbers_match_for_uuid_account_ids(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", prekeys=1)
    a_id, b_id = str(uuid.uuid4()), str(uuid.uuid4())
    a_key, b_key = alice.identity.public_key, (await alice.bridge.generate_identity()).public_key
    ours = await alice.bridge.safety_number(a_id, a_key, b_id, b_key)
    theirs = await alice.bridge.safety_number(b_id, b_key, a_id, a_key)
    assert ours.digits == theirs.digits
    assert ours.digits != (await alice.bridge.safety_number("x", a_key, "y", b_key)).digits


async def test_verify_signature(bridge_wallets: BridgeWalletFactory) -> None:
    bob = await bridge_wallets("bob", prekeys=1)
    key, signed = bob.identity.public_key, bob.signed_prekey
    assert await bob.bridge.verify_signature(key, signed.public_key, signed.signature)
    assert await bob.bridge.verify_signature(
        key, bob.last_resort.public_key, bob.last_resort.signature
    )
    assert not await bob.bridge.verify_signature(key, signed.public_key, flip(signed.signature, 3))
    assert not await bob.bridge.verify_signature(key, flip(signed.public_key, 9), signed.signature)
    stranger = (await bob.bridge.generate_identity()).public_key
    assert not await bob.bridge.verify_signature(stranger, signed.public_key, signed.signature)
    with pytest.raises(SignalProtocolError):
        await bob.bridge.verify_signature(b"\x07" + key[1:], signed.public_key, signed.signature)


# -- each typed error from a realistic trigger ----------------------------------------------------


@pytest.mark.parametrize("part", ["signed_prekey", "pq_prekey"])
async def test_tampered_bundle_is_refused_with_invalid_signature(
    bridge_wallets: BridgeWalletFactory, part: str
) -> None:
    alice = await bridge_wallets("alice", prekeys=1)
    bob = await bridge_wallets("bob")
    bundle = bob.bundle()
    genuine = getattr(bundle, part)
    tampered = dataclasses.replace(
        bundle, **{part: dataclasses.replace(genuine, signature=flip(genuine.signature, 7))}
    )
    with pytest.raises(InvalidSignature) as caught:
        await alice.bridge.process_prekey_bundle(bob.address, tampered)
    assert caught.value.operation == "processPreKeyBundle"

    # Nothing was kept from the refused bundle: encrypting still finds no session.
    with pytest.raises(NoSession):
        await alice.bridge.encrypt(bob.address, b"x")
    await start_session(alice, bundle, bob)
    await send(alice, bob, b"after the genuine bundle")


async def test_untrusted_identity_when_the_peer_reinstalls_under_tofu(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")

    # Bob reinstalls: a new identity under the same account id.
    new_bob = await bridge_wallets("bob")
    with pytest.raises(UntrustedIdentity) as caught:
        await alice.bridge.process_prekey_bundle(new_bob.address, new_bob.bundle())
    assert caught.value.peer == "bob"
    assert caught.value.identity_key == new_bob.identity.public_key
    assert alice.records.get("identity", "bob") == bob.identity.public_key

    # The old session still works and the old key is still the trusted one.
    await send(alice, bob, b"still to the old key")

    # A message from the new key is refused too, naming the key, and changes nothing.
    await start_session(new_bob, alice.bundle(), alice)
    from_new = await new_bob.bridge.encrypt(alice.address, b"it's me, new phone")
    new_bob.records.apply(from_new.changes)
    with pytest.raises(UntrustedIdentity) as caught:
        await alice.bridge.decrypt(new_bob.address, from_new.message_type, from_new.ciphertext)
    assert caught.value.peer == "bob"
    assert caught.value.identity_key == new_bob.identity.public_key
    assert alice.records.get("identity", "bob") == bob.identity.public_key

    # After comparing safety numbers the wallet trusts the new key: store it, evict the cache.
    # The refused message then decrypts, once.
    alice.records.apply([RecordChange("identity", "bob", new_bob.identity.public_key)])
    await alice.bridge.evict([("identity", "bob")])
    kept = await alice.bridge.decrypt(new_bob.address, from_new.message_type, from_new.ciphertext)
    alice.records.apply(kept.changes)
    assert kept.plaintext == b"it's me, new phone"
    await send(alice, new_bob, b"now trusted")


async def test_always_policy_trusts_a_new_key_but_still_reports_it(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", trust_policy="always")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")

    new_bob = await bridge_wallets("bob")
    result = await alice.bridge.process_prekey_bundle(new_bob.address, new_bob.bundle())
    alice.records.apply(result.changes)
    assert result.identity_changes == (IdentityChanged("bob"),)
    assert changed(result)[("identity", "bob")] == new_bob.identity.public_key
    await send(alice, new_bob, b"to the new key")


async def test_replayed_messages_are_duplicates(bridge_wallets: BridgeWalletFactory) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    prekey_message, _ = await send(alice, bob, b"first")
    with pytest.raises(DuplicateMessage):
        await bob.bridge.decrypt(alice.address, MessageType.PREKEY, prekey_message.ciphertext)
    await send(bob, alice, b"reply")
    whisper, _ = await send(alice, bob, b"second")
    with pytest.raises(DuplicateMessage) as caught:
        await bob.bridge.decrypt(alice.address, MessageType.WHISPER, whisper.ciphertext)
    assert caught.value.libsignal_code == 1


async def test_a_flipped_byte_is_invalid_and_the_genuine_message_still_decrypts(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)

    # A forged PreKey message changes nothing: the one-time prekey survives it.
    first = await alice.bridge.encrypt(bob.address, b"first")
    alice.records.apply(first.changes)
    with pytest.raises(InvalidMessage):
        await bob.bridge.decrypt(alice.address, first.message_type, flip(first.ciphertext, -20))
    received = await bob.bridge.decrypt(alice.address, first.message_type, first.ciphertext)
    assert received.plaintext == b"first"
    bob.records.apply(received.changes)

    # The same for a Whisper message.
    await send(bob, alice, b"reply")
    later = await alice.bridge.encrypt(bob.address, b"later")
    alice.records.apply(later.changes)
    for index in (-3, -12, len(later.ciphertext) // 2):
        with pytest.raises(InvalidMessage):
            await bob.bridge.decrypt(
                alice.address, later.message_type, flip(later.ciphertext, index)
            )
    with pytest.raises(InvalidMessage):
        await bob.bridge.decrypt(alice.address, later.message_type, later.ciphertext[:10])
    received = await bob.bridge.decrypt(alice.address, later.message_type, later.ciphertext)
    assert received.plaintext == b"later"


async def test_no_session(bridge_wallets: BridgeWalletFactory) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    carol = await bridge_wallets("carol", prekeys=1)
    with pytest.raises(NoSession):
        await alice.bridge.encrypt(bob.address, b"hello")

    # Carol receives a Whisper message meant for Bob's session: she has no session with Alice.
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")
    whisper = await alice.bridge.encrypt(bob.address, b"for bob")
    with pytest.raises(NoSession):
        await carol.bridge.decrypt(alice.address, whisper.message_type, whisper.ciphertext)


@pytest.mark.parametrize(
    ("kind", "key"),
    [("prekey", "1"), ("kyber_prekey", "1"), ("signed_prekey", "1")],
)
async def test_unknown_prekey_when_the_wallet_lost_the_record(
    bridge_wallets: BridgeWalletFactory, kind: str, key: str
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    first = await alice.bridge.encrypt(bob.address, b"first")
    del bob.records.records[(kind, key)]
    with pytest.raises(UnknownPreKey):
        await bob.bridge.decrypt(alice.address, first.message_type, first.ciphertext)
    assert (kind, key) in bob.records.loads


# -- records --------------------------------------------------------------------------------------


async def test_records_are_loaded_on_demand_by_a_new_sidecar(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")

    # A new bridge over Alice's records: it holds nothing and asks for what it needs.
    alice.records.loads.clear()
    async with LibsignalBridge(alice.records) as fresh:
        await fresh.open(
            alice.identity.identity_key_pair, alice.identity.registration_id, alice.address
        )
        encrypted = await fresh.encrypt(bob.address, b"from the new sidecar")
        assert encrypted.message_type is MessageType.WHISPER
        assert ("session", "bob.1") in alice.records.loads
        assert ("identity", "bob") in alice.records.loads
        alice.records.apply(encrypted.changes)
        received = await bob.bridge.decrypt(
            alice.address, encrypted.message_type, encrypted.ciphertext
        )
        assert received.plaintext == b"from the new sidecar"

        # Each record is loaded once; later calls use the sidecar's copy.
        loads = len(alice.records.loads)
        alice.records.apply((await fresh.encrypt(bob.address, b"again")).changes)
        assert len(alice.records.loads) == loads


async def test_evicting_uncommitted_changes_lets_the_message_decrypt_again(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")
    message = await alice.bridge.encrypt(bob.address, b"credential")
    alice.records.apply(message.changes)

    # Bob decrypts but his commit fails: the sidecar's copy is ahead of his records.
    received = await bob.bridge.decrypt(alice.address, message.message_type, message.ciphertext)
    with pytest.raises(DuplicateMessage):
        await bob.bridge.decrypt(alice.address, message.message_type, message.ciphertext)
    await bob.bridge.evict(received.changes)

    # The redelivered message decrypts from the durable copy.
    again = await bob.bridge.decrypt(alice.address, message.message_type, message.ciphertext)
    assert again.plaintext == b"credential"
    assert again.changes == received.changes or changed(again).keys() == changed(received).keys()


async def test_last_resort_kyber_key_is_kept_and_its_replay_refused(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    bob = await bridge_wallets("bob", prekeys=1)
    alice = await bridge_wallets("alice", prekeys=1)
    carol = await bridge_wallets("carol", prekeys=1)

    # Two initiators use the last-resort Kyber key (no one-time keys left): both get through.
    firsts = {}
    for sender in (alice, carol):
        await start_session(sender, bob.bundle(one_time=False, one_time_kyber=False), bob)
        encrypted, received = await send(sender, bob, b"hello via last resort")
        firsts[sender.name] = encrypted
        used = [k for (kind, k) in changed(received) if kind == "kyber_used"]
        assert len(used) == 1 and used[0].startswith(f"{BRIDGE_LAST_RESORT_KYBER_ID}:1:")
        assert changed(received)[("kyber_used", used[0])] == b""
        assert ("kyber_prekey", str(BRIDGE_LAST_RESORT_KYBER_ID)) not in changed(received)
    assert bob.records.get("kyber_prekey", str(BRIDGE_LAST_RESORT_KYBER_ID)) is not None

    # Bob loses his session with Alice; her first message replayed must not open a new one.
    del bob.records.records[("session", "alice.1")]
    await bob.bridge.evict([("session", "alice.1")])
    with pytest.raises(DuplicateMessage):
        await bob.bridge.decrypt(alice.address, MessageType.PREKEY, firsts["alice"].ciphertext)


# -- concurrency ----------------------------------------------------------------------------------


def track_calls(bridge: LibsignalBridge) -> tuple[dict[str, int], dict[str, int]]:
    """Count, per peer, the calls in flight now and the most ever in flight at once."""
    now: dict[str, int] = {}
    most: dict[str, int] = {}
    original = bridge._request

    async def tracked(sidecar: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
        peer = params.get("address", {}).get("name", "-")
        now[peer] = now.get(peer, 0) + 1
        most[peer] = max(most.get(peer, 0), now[peer])
        most["*"] = max(most.get("*", 0), sum(now.values()))
        try:
            return await original(sidecar, method, params)
        finally:
            now[peer] -= 1

    bridge._request = tracked  # type: ignore[method-assign]
    return now, most


async def test_calls_for_different_peers_are_in_flight_together(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    carol = await bridge_wallets("carol")
    await start_session(alice, bob.bundle(), bob)
    await start_session(alice, carol.bundle(), carol)
    _, most = track_calls(alice.bridge)

    to_bob, to_carol = await asyncio.gather(
        alice.bridge.encrypt(bob.address, b"for bob"),
        alice.bridge.encrypt(carol.address, b"for carol"),
    )
    assert most["*"] == 2
    for encrypted, peer in ((to_bob, bob), (to_carol, carol)):
        alice.records.apply(encrypted.changes)
        received = await peer.bridge.decrypt(
            alice.address, encrypted.message_type, encrypted.ciphertext
        )
        assert received.plaintext == f"for {peer.name}".encode()


async def test_calls_for_one_peer_are_serialized(bridge_wallets: BridgeWalletFactory) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")
    _, most = track_calls(alice.bridge)

    # Ten encrypts at once: one after the other, each on the previous one's chain.
    results = await asyncio.gather(
        *(alice.bridge.encrypt(bob.address, f"part {n}".encode()) for n in range(10))
    )
    assert most["bob"] == 1
    for n, encrypted in enumerate(results):
        alice.records.apply(encrypted.changes)
        received = await bob.bridge.decrypt(
            alice.address, encrypted.message_type, encrypted.ciphertext
        )
        bob.records.apply(received.changes)
        assert received.plaintext == f"part {n}".encode()


async def test_the_sidecar_serializes_one_peer_even_without_the_client_lock(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")

    # Straight to the protocol, bypassing the per-peer lock: every counter must still differ.
    params = [{"address": bob.address.to_json(), "plaintext": "cGFydA=="} for _ in range(6)]
    answers = await asyncio.gather(*(alice.bridge._call("encrypt", p) for p in params))
    for answer in answers:
        ciphertext = __import__("base64").b64decode(answer["ciphertext"])
        received = await bob.bridge.decrypt(alice.address, answer["type"], ciphertext)
        assert received.plaintext == b"part"


# -- lifecycle ------------------------------------------------------------------------------------


class KillOnLoad(BridgeMemoryRecords):
    """Records whose next load of a chosen record SIGKILLs the sidecar asking for it."""

    def __init__(self, records: BridgeMemoryRecords) -> None:
        super().__init__()
        self.records = records.records
        self.kill: tuple[str, str] | None = None
        self.bridge: LibsignalBridge | None = None

    def load_record(self, kind: Any, key: str) -> bytes | None:
        if (kind, key) == self.kill and self.bridge is not None and self.bridge.pid:
            self.kill = None
            os.kill(self.bridge.pid, signal.SIGKILL)
        return super().load_record(kind, key)


async def test_a_killed_sidecar_fails_the_call_in_flight_and_restarts(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    bob = await bridge_wallets("bob")
    records = KillOnLoad(BridgeMemoryRecords())
    alice = await bridge_wallets("alice", records=records)
    records.bridge = alice.bridge
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")

    # Start over with an empty cache, and kill the sidecar while an encrypt waits for a load.
    await alice.bridge.aclose()
    await alice.bridge.start()
    await alice.bridge.open(
        alice.identity.identity_key_pair,
        alice.identity.registration_id,
        alice.address,
        last_resort_kyber_ids=[BRIDGE_LAST_RESORT_KYBER_ID],
    )
    first_pid = alice.bridge.pid
    assert first_pid is not None
    records.kill = ("session", "bob.1")
    with pytest.raises(BridgeUnavailable):
        await alice.bridge.encrypt(bob.address, b"lost in the crash")
    assert records.kill is None

    # The next call starts a new sidecar, opens it again and reloads the session.
    encrypted, _ = await send(alice, bob, b"after the restart")
    assert alice.bridge.pid not in (None, first_pid)
    assert alice.bridge.starts == 3
    assert process_gone(first_pid)
    assert encrypted.message_type is MessageType.WHISPER


async def test_a_sidecar_killed_while_idle_is_replaced_by_the_next_call(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    pid = alice.bridge.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: alice.bridge.pid is None)
    await send(alice, bob, b"after the restart")
    assert alice.bridge.pid not in (None, pid)


async def test_a_wedged_sidecar_times_out_and_is_replaced(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    async with LibsignalBridge(call_timeout=0.5) as bridge:
        pid = bridge.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(BridgeUnavailable, match="did not answer"):
            await bridge.ping()
        health = await bridge.ping()
        assert health.pid != pid
        await wait_for(lambda: process_gone(pid))


async def test_aclose_leaves_no_process_behind() -> None:
    bridge = LibsignalBridge()
    await bridge.start()
    pid = bridge.pid
    assert pid is not None and not process_gone(pid)
    await bridge.aclose()
    assert bridge.pid is None
    assert process_gone(pid)
    with pytest.raises(BridgeUnavailable):
        await bridge.ping()
    await bridge.aclose()


async def test_aclose_kills_a_sidecar_that_does_not_exit() -> None:
    bridge = LibsignalBridge(close_timeout=0.3)
    await bridge.start()
    pid = bridge.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it can no longer see its input close
    await bridge.aclose()
    assert process_gone(pid)


async def test_a_call_cancelled_in_flight_has_its_changes_evicted(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob_records = BridgeMemoryRecords()
    bob = await bridge_wallets("bob", records=bob_records)
    await start_session(alice, bob.bundle(), bob)
    await send(alice, bob, b"hello")
    await send(bob, alice, b"hi")
    message = await alice.bridge.encrypt(bob.address, b"credential")

    # Bob's fresh sidecar must load the session; the caller gives up while it does.
    async with LibsignalBridge(bob_records) as fresh:
        await fresh.open(bob.identity.identity_key_pair, bob.identity.registration_id, bob.address)
        task = asyncio.create_task(
            fresh.decrypt(alice.address, message.message_type, message.ciphertext)
        )
        original = bob_records.load_record

        def cancel_on_load(kind: Any, key: str) -> bytes | None:
            task.cancel()
            return original(kind, key)

        bob_records.load_record = cancel_on_load  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await task
        bob_records.load_record = original  # type: ignore[method-assign]
        await wait_for(lambda: not fresh._abandoned and not fresh._unanswered)

        received = await fresh.decrypt(alice.address, message.message_type, message.ciphertext)
        assert received.plaintext == b"credential"


async def test_missing_node_or_packages_is_bridge_unavailable(tmp_path: Any) -> None:
    with pytest.raises(BridgeUnavailable, match="make setup"):
        await LibsignalBridge(node=str(tmp_path / "no-node")).start()
    script = tmp_path / "sidecar.mjs"
    shutil.copy(locate_sidecar(), script)
    with pytest.raises(BridgeUnavailable, match="make setup"):
        await LibsignalBridge(sidecar=script).start()
    with pytest.raises(BridgeUnavailable, match="not found"):
        await LibsignalBridge(sidecar=tmp_path / "missing.mjs").start()


async def test_sidecar_path_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("TIGRESS_SIGNAL_SIDECAR", str(tmp_path / "elsewhere.mjs"))
    with pytest.raises(BridgeUnavailable, match=r"elsewhere\.mjs"):
        await LibsignalBridge().start()


async def test_calls_before_open_are_refused() -> None:
    async with LibsignalBridge() as bridge:
        with pytest.raises(SignalProtocolError, match="open"):
            await bridge.encrypt(ProtocolAddress("bob"), b"x")
        with pytest.raises(SignalProtocolError, match="open"):
            await bridge.generate_prekeys(1, 1)


class FailingRecords(BridgeMemoryRecords):
    """A wallet store that cannot read (a broken disk, a locked database)."""

    def load_record(self, kind: Any, key: str) -> bytes | None:
        raise OSError("disk unreadable")


async def test_a_record_source_that_fails_makes_the_call_fail_not_the_bridge(
    bridge_wallets: BridgeWalletFactory, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    async with LibsignalBridge(FailingRecords()) as broken:
        await broken.open(
            alice.identity.identity_key_pair, alice.identity.registration_id, alice.address
        )
        with pytest.raises(BridgeError) as caught:
            await broken.encrypt(bob.address, b"x")
        assert not isinstance(caught.value, (SignalProtocolError, BridgeUnavailable))
        assert "disk unreadable" in caplog.text
        assert (await broken.ping()).pid == broken.pid


def test_bundle_from_the_servers_json() -> None:
    device = {
        "deviceId": 2,
        "registrationId": 77,
        "signedPreKey": {"keyId": 1, "publicKey": "BQ==", "signature": "AQI="},
        "preKey": None,
        "pqPreKey": {"keyId": 9, "publicKey": "CA==", "signature": "AwQ="},
    }
    bundle = PreKeyBundle.from_server("BQE=", device)
    assert bundle.device_id == 2 and bundle.registration_id == 77
    assert bundle.identity_key == b"\x05\x01"
    assert bundle.prekey is None
    assert bundle.pq_prekey.key_id == 9 and bundle.pq_prekey.signature == b"\x03\x04"
    assert bundle.to_json()["pqPreKey"] == device["pqPreKey"]
    with pytest.raises(InvalidMessage):
        PreKeyBundle.from_server("not base64!", device)
    with pytest.raises(InvalidMessage):
        PreKeyBundle.from_server("BQE=", {"deviceId": 1})
