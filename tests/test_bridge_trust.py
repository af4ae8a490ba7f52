"""The sidecar's trust policies against the real libsignal: what each policy lets through.

Each party is a :class:`BridgeWallet` (tests/conftest.py) whose changes the test commits to an
in-memory record store, as the wallet would. "Bob reinstalls" means a second wallet under the
same address name with a new identity key.
"""

from __future__ import annotations

import pytest

from conftest import BridgeWallet, BridgeWalletFactory
from tigress_signal.bridge.libsignal import EncryptResult, MessageType
from tigress_signal.bridge.records import IdentityChanged, RecordChange
from tigress_signal.errors import UntrustedIdentity


async def session(sender: BridgeWallet, receiver: BridgeWallet) -> None:
    result = await sender.bridge.process_prekey_bundle(receiver.address, receiver.bundle())
    sender.records.apply(result.changes)


async def encrypt(sender: BridgeWallet, receiver: BridgeWallet, text: bytes) -> EncryptResult:
    result = await sender.bridge.encrypt(receiver.address, text)
    sender.records.apply(result.changes)
    return result


async def deliver(sender: BridgeWallet, receiver: BridgeWallet, message: EncryptResult) -> bytes:
    result = await receiver.bridge.decrypt(
        sender.address, message.message_type, message.ciphertext
    )
    receiver.records.apply(result.changes)
    return result.plaintext


async def verify(wallet: BridgeWallet, peer: str, key: bytes) -> None:
    """What the wallet's `trust` does to the records: trusted and verified, cache evicted."""
    wallet.records.apply(
        [RecordChange("identity", peer, key), RecordChange("verified_identity", peer, key)]
    )
    await wallet.bridge.evict([("identity", peer), ("verified_identity", peer)])


async def test_verify_refuses_first_contact_until_the_key_is_verified(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", trust_policy="verify")
    bob = await bridge_wallets("bob")
    with pytest.raises(UntrustedIdentity) as caught:
        await alice.bridge.process_prekey_bundle(bob.address, bob.bundle())
    assert caught.value.peer == "bob"
    assert caught.value.identity_key == bob.identity.public_key
    assert alice.records.get("identity", "bob") is None

    # A verified key of someone else does not help; Bob's own does.
    await verify(alice, "bob", bytes(alice.identity.public_key))
    with pytest.raises(UntrustedIdentity):
        await alice.bridge.process_prekey_bundle(bob.address, bob.bundle())
    await verify(alice, "bob", bob.identity.public_key)
    await session(alice, bob)
    assert await deliver(alice, bob, await encrypt(alice, bob, b"hello")) == b"hello"


async def test_verify_receives_from_the_first_key_but_does_not_answer_until_verified(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", trust_policy="verify")
    bob = await bridge_wallets("bob")
    await session(bob, alice)
    assert await deliver(bob, alice, await encrypt(bob, alice, b"an offer")) == b"an offer"
    assert alice.records.get("identity", "bob") == bob.identity.public_key

    with pytest.raises(UntrustedIdentity) as caught:
        await alice.bridge.encrypt(bob.address, b"accepted")
    assert caught.value.identity_key == bob.identity.public_key

    await verify(alice, "bob", bob.identity.public_key)
    assert await deliver(alice, bob, await encrypt(alice, bob, b"accepted")) == b"accepted"


async def test_verify_refuses_a_changed_key_both_ways_even_after_an_earlier_verification(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", trust_policy="verify")
    bob = await bridge_wallets("bob")
    await verify(alice, "bob", bob.identity.public_key)
    await session(alice, bob)
    await deliver(alice, bob, await encrypt(alice, bob, b"hello"))

    new_bob = await bridge_wallets("bob")
    await session(new_bob, alice)
    from_new = await encrypt(new_bob, alice, b"new phone")
    with pytest.raises(UntrustedIdentity) as caught:
        await alice.bridge.decrypt(new_bob.address, MessageType.PREKEY, from_new.ciphertext)
    assert caught.value.identity_key == new_bob.identity.public_key
    with pytest.raises(UntrustedIdentity):
        await alice.bridge.process_prekey_bundle(new_bob.address, new_bob.bundle())

    await verify(alice, "bob", new_bob.identity.public_key)
    assert await deliver(new_bob, alice, from_new) == b"new phone"
    await session(alice, new_bob)
    assert await deliver(alice, new_bob, await encrypt(alice, new_bob, b"hi")) == b"hi"


async def test_tofu_trusts_the_first_key_both_ways_without_verification(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", trust_policy="tofu")
    bob = await bridge_wallets("bob")
    await session(alice, bob)
    assert await deliver(alice, bob, await encrypt(alice, bob, b"hello")) == b"hello"
    assert alice.records.get("identity", "bob") == bob.identity.public_key
    assert alice.records.get("verified_identity", "bob") is None


async def test_always_accepts_messages_from_a_changed_key_and_replaces_it(
    bridge_wallets: BridgeWalletFactory,
) -> None:
    alice = await bridge_wallets("alice", trust_policy="always")
    bob = await bridge_wallets("bob")
    await session(alice, bob)
    await deliver(alice, bob, await encrypt(alice, bob, b"hello"))

    new_bob = await bridge_wallets("bob")
    await session(new_bob, alice)
    from_new = await encrypt(new_bob, alice, b"new phone")
    result = await alice.bridge.decrypt(new_bob.address, MessageType.PREKEY, from_new.ciphertext)
    alice.records.apply(result.changes)
    assert result.plaintext == b"new phone"
    assert result.identity_changes == (IdentityChanged("bob"),)
    assert alice.records.get("identity", "bob") == new_bob.identity.public_key
    assert await deliver(alice, new_bob, await encrypt(alice, new_bob, b"hi")) == b"hi"
