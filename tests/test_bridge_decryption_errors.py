"""Decryption-error messages in the libsignal bridge, against the real sidecar and libsignal.

A wallet that cannot decrypt a message makes a DecryptionErrorMessage (in a PlaintextContent)
for its sender; the sender reads it and learns whether its current session is the broken one.
"""

from __future__ import annotations

import pytest

from conftest import BridgeWallet, BridgeWalletFactory
from tigress_signal.bridge.libsignal import MessageType, PreKeyBundle
from tigress_signal.bridge.records import RecordChange
from tigress_signal.errors import InvalidMessage, NoSession, SignalProtocolError


async def start_session(sender: BridgeWallet, bundle: PreKeyBundle, to: BridgeWallet) -> None:
    sender.records.apply((await sender.bridge.process_prekey_bundle(to.address, bundle)).changes)


async def exchange(sender: BridgeWallet, receiver: BridgeWallet, plaintext: bytes) -> None:
    encrypted = await sender.bridge.encrypt(receiver.address, plaintext)
    sender.records.apply(encrypted.changes)
    decrypted = await receiver.bridge.decrypt(
        sender.address, encrypted.message_type, encrypted.ciphertext
    )
    receiver.records.apply(decrypted.changes)


async def lose_session(wallet: BridgeWallet, peer: BridgeWallet) -> None:
    """The wallet forgets its session with ``peer`` (as after restoring an old backup)."""
    key = f"{peer.name}.1"
    wallet.records.apply([RecordChange("session", key, None)])
    await wallet.bridge.evict([("session", key)])


async def test_an_error_about_the_current_session_says_so_and_changes_nothing(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    await exchange(alice, bob, b"offer")
    await exchange(bob, alice, b"answer")
    await lose_session(bob, alice)

    whisper = await alice.bridge.encrypt(bob.address, b"lost")
    alice.records.apply(whisper.changes)
    assert whisper.message_type is MessageType.WHISPER
    with pytest.raises(NoSession):
        await bob.bridge.decrypt(alice.address, whisper.message_type, whisper.ciphertext)
    content = await bob.bridge.decryption_error(
        whisper.ciphertext, whisper.message_type, 1_700_000_000_123, 1
    )

    before = dict(alice.records.records)
    report = await alice.bridge.read_decryption_error(bob.address, content)
    assert report.timestamp == 1_700_000_000_123
    assert report.device_id == 1
    assert report.ratchet_key is not None and len(report.ratchet_key) == 33
    assert report.current_session_broken is True
    assert alice.records.records == before

    # Once Alice has a new session, the same report is about an older one.
    await start_session(alice, bob.bundle(), bob)
    again = await alice.bridge.read_decryption_error(bob.address, content)
    assert again.current_session_broken is False
    assert again.ratchet_key == report.ratchet_key


async def test_an_error_about_a_prekey_message(bridge_wallets: BridgeWalletFactory) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    await start_session(alice, bob.bundle(), bob)
    first = await alice.bridge.encrypt(bob.address, b"first")
    alice.records.apply(first.changes)
    assert first.message_type is MessageType.PREKEY
    content = await bob.bridge.decryption_error(first.ciphertext, MessageType.PREKEY, 5, 1)
    report = await alice.bridge.read_decryption_error(bob.address, content)
    assert (report.timestamp, report.device_id) == (5, 1)
    assert report.current_session_broken is True


async def test_without_any_session_the_current_session_counts_as_broken(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    carol = await bridge_wallets("carol")
    await start_session(alice, bob.bundle(), bob)
    first = await alice.bridge.encrypt(bob.address, b"first")
    content = await bob.bridge.decryption_error(first.ciphertext, MessageType.PREKEY, 9, 1)
    # Carol never spoke with Bob: a report from him finds no session of hers.
    report = await carol.bridge.read_decryption_error(bob.address, content)
    assert report.current_session_broken is True


async def test_bad_input_is_refused(bridge_wallets: BridgeWalletFactory) -> None:
    alice = await bridge_wallets("alice")
    bob = await bridge_wallets("bob")
    with pytest.raises(InvalidMessage):
        await bob.bridge.decryption_error(b"\x33not a signal message", MessageType.WHISPER, 1, 1)
    with pytest.raises(SignalProtocolError):
        await bob.bridge.decryption_error(b"whatever", 8, 1, 1)  # plaintext is not encrypted
    with pytest.raises(SignalProtocolError):
        await bob.bridge.decryption_error(b"whatever", MessageType.WHISPER, 1, 0)
    for garbage in (b"", b"\x00", b"\xc0" + bytes(40), b"not plaintext content at all"):
        with pytest.raises(InvalidMessage):
            await alice.bridge.read_decryption_error(bob.address, garbage)
    # The sidecar is still fine afterwards.
    await start_session(alice, bob.bundle(), bob)
    await exchange(alice, bob, b"still works")
