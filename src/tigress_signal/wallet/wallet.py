"""A wallet folder brought to life: its store, its libsignal sidecar, its channel, its shares.

:meth:`Wallet.create` registers a new wallet with an intermediary (identity, prekeys, account);
:meth:`Wallet.open` opens an existing one. Either way the wallet holds the folder's process lock
until :meth:`Wallet.aclose`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType

from tigress_signal.adapters.selfhosted import SelfHostedChannel
from tigress_signal.bridge.libsignal import LibsignalBridge, ProtocolAddress
from tigress_signal.bridge.records import RecordChange
from tigress_signal.channel import CredentialChannel
from tigress_signal.errors import StoreError
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.shares.service import ShareService
from tigress_signal.wallet.config import (
    SelfHostedSettings,
    TrustPolicy,
    WalletConfig,
    load_wallet_config,
    save_wallet_config,
)
from tigress_signal.wallet.store import Account, WalletStore

log = logging.getLogger(__name__)

#: One-time prekeys of each kind (EC and Kyber) a new wallet publishes.
INITIAL_PREKEYS = 100
#: The id of the signed prekey and of the last-resort Kyber key a new wallet publishes.
FIRST_SIGNED_PREKEY_ID = 1
LAST_RESORT_KYBER_ID = 1
#: The address name a wallet uses before the server has assigned its account id.
_UNREGISTERED = "unregistered"


class Wallet:
    """An open wallet. Use :meth:`create` or :meth:`open`, and close it with :meth:`aclose`.

    Attributes:
        folder: the wallet folder.
        store: its SQLite store.
        config: its configuration.
        account: its account at the intermediary.
        channel: the channel its transfers travel over.
        shares: its shares.
    """

    def __init__(
        self,
        folder: Path,
        store: WalletStore,
        config: WalletConfig,
        account: Account,
        bridge: LibsignalBridge,
        client: IntermediaryClient,
    ) -> None:
        self.folder = folder
        self.store = store
        self.config = config
        self.account = account
        self._bridge = bridge
        self._client = client
        self.channel: CredentialChannel = SelfHostedChannel(store, bridge, client, account)
        self.shares = ShareService(store, self.channel)

    @property
    def account_id(self) -> str:
        """This wallet's account id: what other wallets send to."""
        return self.account.account_id

    @classmethod
    async def create(
        cls, folder: Path | str, server_url: str, *, trust_policy: TrustPolicy = "tofu"
    ) -> Wallet:
        """Make a new wallet in ``folder`` and register it with the intermediary.

        The private halves of every key are stored before any public half is uploaded, so the
        server never hands out a key this wallet cannot use.

        Raises:
            StoreError: ``folder`` already holds a registered wallet.
            ServerApiError: the intermediary refused the registration.
            BridgeError: the libsignal sidecar failed.
        """
        path = Path(folder)
        started = time.perf_counter()
        config = WalletConfig(
            trust_policy=trust_policy,
            selfhosted=SelfHostedSettings.model_validate({"server_url": server_url}),
        )
        store = WalletStore.open(path)
        bridge = LibsignalBridge(record_source=store)
        client: IntermediaryClient | None = None
        try:
            if store.account() is not None:
                raise StoreError(f"{path} already holds a registered wallet")
            await bridge.start()
            identity = await bridge.generate_identity()
            await bridge.open(
                identity_key_pair=identity.identity_key_pair,
                registration_id=identity.registration_id,
                address=ProtocolAddress(_UNREGISTERED, 1),
                trust_policy=trust_policy,
                last_resort_kyber_ids=[LAST_RESORT_KYBER_ID],
            )

            # Every private key goes to the store before its public half leaves the wallet.
            now_ms = int(time.time() * 1000)
            signed = await bridge.generate_signed_prekey(FIRST_SIGNED_PREKEY_ID, now_ms)
            (last_resort,) = await bridge.generate_kyber_prekeys(LAST_RESORT_KYBER_ID, 1, now_ms)
            with store.transaction() as conn:
                first_ec = store.next_ids(conn, "prekey", INITIAL_PREKEYS)
                first_kyber = store.next_ids(conn, "kyber_prekey", INITIAL_PREKEYS) + 1
            prekeys = await bridge.generate_prekeys(first_ec, INITIAL_PREKEYS)
            pq_prekeys = await bridge.generate_kyber_prekeys(first_kyber, INITIAL_PREKEYS, now_ms)
            with store.transaction() as conn:
                store.apply_changes(
                    conn,
                    [RecordChange("signed_prekey", str(signed.key_id), signed.record)]
                    + [RecordChange("kyber_prekey", str(k.key_id), k.record) for k in pq_prekeys]
                    + [RecordChange("kyber_prekey", str(LAST_RESORT_KYBER_ID), last_resort.record)]
                    + [RecordChange("prekey", str(k.key_id), k.record) for k in prekeys],
                )

            # Register, then publish the one-time keys with the new account's credentials.
            client = IntermediaryClient(config.server_url())
            registered = await client.create_account(
                identity_key=identity.public_key,
                registration_id=identity.registration_id,
                signed_prekey=signed.public(),
                pq_last_resort_prekey=last_resort.public(),
            )
            account = Account(
                account_id=registered.uuid,
                device_id=registered.device_id,
                password=registered.password,
                identity_key_pair=identity.identity_key_pair,
                identity_public_key=identity.public_key,
                registration_id=identity.registration_id,
            )
            with store.transaction() as conn:
                store.save_account(conn, account)
            save_wallet_config(path, config)
            client.authenticate(account.account_id, account.device_id, account.password)
            await client.upload_keys(
                pre_keys=[k.public() for k in prekeys],
                pq_pre_keys=[k.public() for k in pq_prekeys],
            )
            await _open_identity(bridge, account, config)
        except BaseException:
            if client is not None:
                await client.aclose()
            await bridge.aclose()
            store.close()
            raise
        log.info(
            "wallet %s registered as account %s (%.0f ms)",
            path,
            account.account_id,
            (time.perf_counter() - started) * 1000,
        )
        return cls(path, store, config, account, bridge, client)

    @classmethod
    async def open(cls, folder: Path | str) -> Wallet:
        """Open a registered wallet.

        Raises:
            StoreLocked: another process has it open.
            StoreError: the folder is not a registered wallet.
            ConfigError: its ``wallet.toml`` is missing or invalid.
        """
        path = Path(folder)
        store = WalletStore.open(path, create=False)
        bridge = LibsignalBridge(record_source=store)
        try:
            account = store.account()
            if account is None:
                raise StoreError(f"{path} is not registered; run 'wallet init' again")
            config = load_wallet_config(path)
            await bridge.start()
            await _open_identity(bridge, account, config)
            client = IntermediaryClient(config.server_url())
            client.authenticate(account.account_id, account.device_id, account.password)
        except BaseException:
            await bridge.aclose()
            store.close()
            raise
        return cls(path, store, config, account, bridge, client)

    async def aclose(self) -> None:
        """Close the channel, the sidecar and the store, and release the folder's lock."""
        try:
            await self.channel.close()
            await self._client.aclose()
        finally:
            await self._bridge.aclose()
            self.store.close()

    async def __aenter__(self) -> Wallet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _open_identity(bridge: LibsignalBridge, account: Account, config: WalletConfig) -> None:
    await bridge.open(
        identity_key_pair=account.identity_key_pair,
        registration_id=account.registration_id,
        address=ProtocolAddress(account.account_id, account.device_id),
        trust_policy=config.trust_policy,
        last_resort_kyber_ids=[LAST_RESORT_KYBER_ID],
    )
