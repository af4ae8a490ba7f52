"""Starting a wallet's identity over: what reinstalling a wallet does, without losing the folder.

The wallet makes a new identity key pair and registration id, a signed prekey and a last-resort
Kyber key signed by the new key, and registers its account again with them at the intermediary
(``PUT /v1/accounts/identity``). The server removes the account's other devices, its one-time
prekeys and the messages waiting for it, and issues a new device password. The wallet then
replaces its own identity, password and prekeys and drops its sessions (they belong to the old
identity) in one transaction, and uploads fresh one-time prekeys.

Peers notice at their next send: the server answers 410 (the registration id changed), their
wallet fetches the new bundle and meets the new identity key, which their trust policy then
accepts (``always``) or refuses until their user trusts it (``tofu``, ``verify``).

What is kept: shares, received credentials and the keys this wallet trusts for its peers (a
reinstall would lose them; keeping them spares the user trusting everyone again). The outbox
must be empty: its messages are sealed with sessions of the old identity.

Warning:
    The server shows the new password once. If the process dies after the server accepted and
    before the wallet committed, the account is locked out (the old password no longer works)
    and a new wallet has to be made. Nothing else can take the server's messages meanwhile: the
    old password stops working at once and the waiting messages were deleted.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from tigress_signal.bridge.libsignal import LibsignalBridge, ProtocolAddress
from tigress_signal.bridge.records import RecordChange
from tigress_signal.errors import ConfigError
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.wallet.config import WalletConfig
from tigress_signal.wallet.rotation import record_registered_keys
from tigress_signal.wallet.store import Account, WalletStore

log = logging.getLogger(__name__)

#: Record kinds bound to this wallet's own identity, dropped when it starts over.
_OWN_IDENTITY_KINDS = ("session", "prekey", "signed_prekey", "kyber_prekey", "kyber_used")


async def reset_identity(
    store: WalletStore,
    bridge: LibsignalBridge,
    client: IntermediaryClient,
    account: Account,
    config: WalletConfig,
    *,
    signed_prekey_id: int,
    last_resort_kyber_id: int,
) -> Account:
    """Register the wallet's account again with a new identity; returns the new account.

    Args:
        store: the wallet store.
        bridge: the wallet's sidecar, opened with the current identity.
        client: a client authenticated as the wallet's primary device.
        account: the current account.
        config: the wallet's configuration (its trust policy).
        signed_prekey_id: the id of the new signed prekey.
        last_resort_kyber_id: the id of the new last-resort Kyber key.

    Raises:
        ConfigError: sealed messages still wait in the outbox; nothing changed.
        ServerApiError: the intermediary refused (403 from a linked device, for instance);
            nothing changed in the wallet then.
        BridgeError: the sidecar failed.
    """
    # Messages in the outbox were sealed with the old identity's sessions; once delivered, a
    # peer that has trusted the new key would keep them unread, in front of everything newer.
    waiting = int(store.connection.execute("SELECT count(*) FROM outbox").fetchone()[0])
    if waiting:
        raise ConfigError(
            f"{waiting} message(s) sealed with the current identity wait in the outbox",
            hint="deliver them first (tigress-signal sync), then register again",
        )
    started = time.perf_counter()
    address = ProtocolAddress(account.account_id, account.device_id)
    identity = await bridge.generate_identity()

    # The sidecar signs with the opened identity: open the new one to make its keys.
    await bridge.open(
        identity.identity_key_pair,
        identity.registration_id,
        address,
        trust_policy=config.trust_policy,
        last_resort_kyber_ids=[last_resort_kyber_id],
    )
    try:
        now_ms = int(time.time() * 1000)
        signed = await bridge.generate_signed_prekey(signed_prekey_id, now_ms)
        (last_resort,) = await bridge.generate_kyber_prekeys(last_resort_kyber_id, 1, now_ms)
        created = await client.replace_identity(
            identity_key=identity.public_key,
            registration_id=identity.registration_id,
            signed_prekey=signed.public(),
            pq_last_resort_prekey=last_resort.public(),
        )
    except BaseException:
        # Nothing was stored: the wallet goes on with the identity it had.
        await bridge.open(
            account.identity_key_pair,
            account.registration_id,
            address,
            trust_policy=config.trust_policy,
            last_resort_kyber_ids=[last_resort_kyber_id],
        )
        raise

    # The new identity, password and keys replace the old ones in one transaction.
    new_account = Account(
        account_id=account.account_id,
        device_id=account.device_id,
        password=created.password,
        identity_key_pair=identity.identity_key_pair,
        identity_public_key=identity.public_key,
        registration_id=identity.registration_id,
    )
    with store.transaction() as conn:
        conn.execute(
            "UPDATE account SET password = ?, identity_key_pair = ?, identity_public_key = ?,"
            " registration_id = ? WHERE id = 1",
            (
                new_account.password,
                new_account.identity_key_pair,
                new_account.identity_public_key,
                new_account.registration_id,
            ),
        )
        conn.executemany(
            "DELETE FROM records WHERE kind = ?", [(kind,) for kind in _OWN_IDENTITY_KINDS]
        )
        conn.execute("DELETE FROM peer_devices")
        # The old identity's rotating keys went with its records; rotation starts over.
        conn.execute("DELETE FROM rotating_prekeys")
        record_registered_keys(
            conn,
            signed_prekey_id=signed.key_id,
            last_resort_kyber_id=last_resort.key_id,
            now=datetime.now(UTC),
        )
        store.apply_changes(
            conn,
            [
                RecordChange("signed_prekey", str(signed.key_id), signed.record),
                RecordChange("kyber_prekey", str(last_resort.key_id), last_resort.record),
            ],
        )
    # Re-opening with the same key pair keeps the cache: drop what belonged to the old identity.
    await bridge.open(
        new_account.identity_key_pair,
        new_account.registration_id,
        address,
        trust_policy=config.trust_policy,
        last_resort_kyber_ids=[last_resort_kyber_id],
    )
    client.authenticate(new_account.account_id, new_account.device_id, new_account.password)
    log.info(
        "account %s registered again with a new identity (%.0f ms)",
        account.account_id,
        (time.perf_counter() - started) * 1000,
    )
    return new_account
