"""A wallet folder brought to life: its store, its libsignal sidecar, its channel, its shares.

:meth:`Wallet.create` registers a new wallet with an intermediary (identity, prekeys, account);
:meth:`Wallet.open` opens an existing one. Either way the wallet holds the folder's process lock
until :meth:`Wallet.aclose`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from tigress_signal.adapters.selfhosted import SelfHostedChannel
from tigress_signal.adapters.signal_cli import SignalCliChannel
from tigress_signal.bridge.libsignal import LibsignalBridge, ProtocolAddress, SafetyNumber
from tigress_signal.bridge.records import RecordChange
from tigress_signal.bridge.signal_cli_client import SignalCliClient
from tigress_signal.bridge.signal_cli_dbus import SignalCliDbusClient
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.channel import CredentialChannel
from tigress_signal.errors import ConfigError, NoSession, StoreError, TigressSignalError
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.shares.service import ShareService
from tigress_signal.wallet import rotation
from tigress_signal.wallet.config import (
    CONFIG_NAME,
    SIGNAL_CLI_CHANNELS,
    SignalCliSettings,
    TrustPolicy,
    WalletConfig,
    load_wallet_config,
    save_wallet_config,
    selfhosted_settings,
)
from tigress_signal.wallet.prekeys import refill_prekeys
from tigress_signal.wallet.rotation import Rotation, last_resort_kyber_ids, record_registered_keys
from tigress_signal.wallet.store import DATABASE_NAME, LOCK_NAME, Account, WalletStore

log = logging.getLogger(__name__)

#: One-time prekeys of each kind (EC and Kyber) a new wallet publishes.
INITIAL_PREKEYS = 100
#: The id of the last-resort Kyber key a new wallet publishes (its signed prekey's id, 1 as
#: well, comes from the signed-prekey counter; rotation takes later ids from the counters).
LAST_RESORT_KYBER_ID = 1
#: The address name a wallet uses before the server has assigned its account id.
_UNREGISTERED = "unregistered"


class Wallet:
    """An open wallet. Use :meth:`create`, :meth:`create_signal_cli` or :meth:`open`, and close
    it with :meth:`aclose`.

    Attributes:
        folder: the wallet folder.
        store: its SQLite store.
        config: its configuration.
        account: its account at the intermediary (not for a wallet whose account is in
            signal-cli; see :attr:`account_id`).
        channel: the channel its transfers travel over.
        shares: its shares.
    """

    def __init__(
        self,
        folder: Path,
        store: WalletStore,
        config: WalletConfig,
        account: Account | None,
        bridge: LibsignalBridge | None,
        client: IntermediaryClient | None,
        *,
        channel: CredentialChannel | None = None,
    ) -> None:
        self.folder = folder
        self.store = store
        self.config = config
        self._account = account
        self._bridge = bridge
        self._client = client
        if channel is None:
            # The self-hosted channel needs all three; the signal-cli one comes ready-made.
            if account is None or bridge is None or client is None:
                raise ValueError("a self-hosted wallet needs its account, sidecar and client")
            channel = SelfHostedChannel(
                store, bridge, client, account, on_connect=self._maintain_prekeys
            )
        self.channel: CredentialChannel = channel
        self.shares = ShareService(store, self.channel)

    async def _maintain_prekeys(self) -> None:
        # Checked on every (re)connect: a wallet that was offline may have been drained, and
        # one that was closed for days may be due a rotation.
        if self._bridge is None or self._client is None:
            return
        try:
            await refill_prekeys(self.store, self._bridge, self._client)
        except TigressSignalError as exc:
            log.warning("could not refill one-time prekeys now: %s", exc.user_message())
        try:
            await self.rotate_prekeys()
        except TigressSignalError as exc:
            log.warning("could not rotate prekeys now: %s", exc.user_message())

    async def rotate_prekeys(self, *, now: datetime | None = None) -> Rotation:
        """Replace the signed prekey and last-resort Kyber key if they are due, and delete
        replaced keys whose grace period has ended (see :mod:`tigress_signal.wallet.rotation`).

        The channel calls it on every (re)connect; ``now`` lets tests move the clock.

        Raises:
            ConfigError: the wallet's account is held by signal-cli.
            ServerApiError: the server refused the upload.
            ChannelError: the server cannot be reached.
            BridgeError: the sidecar failed.
        """
        account = self.account
        if self._bridge is None or self._client is None:
            raise ConfigError(f"the wallet in {self.folder} has no intermediary keys to rotate")
        bridge = self._bridge

        async def reopen() -> None:
            await _open_identity(bridge, account, self.config, self.store)

        return await rotation.rotate_prekeys(
            self.store,
            bridge,
            self._client,
            self.config.rotation_policy(),
            reopen=reopen,
            now=now,
        )

    @property
    def account_id(self) -> str:
        """This wallet's account id (a Signal number over signal-cli): what others send to."""
        if self._account is None:
            assert self.config.signal_cli is not None  # the config validator guarantees it
            return self.config.signal_cli.account
        return self._account.account_id

    @property
    def account(self) -> Account:
        """This wallet's account at the intermediary.

        Raises:
            ConfigError: the wallet's account is held by signal-cli, not by this wallet.
        """
        if self._account is None:
            raise ConfigError(f"the wallet in {self.folder} has its Signal account in signal-cli")
        return self._account

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
            trust_policy=trust_policy, selfhosted=selfhosted_settings(server_url)
        )
        created = _claim_new_folder(path)
        try:
            store = WalletStore.open(path)
        except BaseException:
            _remove_if_created(path, created)
            raise
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
            now = datetime.now(UTC)
            now_ms = int(now.timestamp() * 1000)
            with store.transaction() as conn:
                signed_id = store.next_ids(conn, "signed_prekey", 1)
            signed = await bridge.generate_signed_prekey(signed_id, now_ms)
            (last_resort,) = await bridge.generate_kyber_prekeys(LAST_RESORT_KYBER_ID, 1, now_ms)
            with store.transaction() as conn:
                first_ec = store.next_ids(conn, "prekey", INITIAL_PREKEYS)
                # The last-resort Kyber key takes the first id, the one-time keys the next ones.
                first_kyber = store.next_ids(conn, "kyber_prekey", INITIAL_PREKEYS + 1) + 1
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
            client = IntermediaryClient(config.server_url(), keepalive=config.keepalive())
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
                record_registered_keys(
                    conn,
                    signed_prekey_id=signed.key_id,
                    last_resort_kyber_id=LAST_RESORT_KYBER_ID,
                    now=now,
                )
            save_wallet_config(path, config)
            client.authenticate(account.account_id, account.device_id, account.password)
            await client.upload_keys(
                pre_keys=[k.public() for k in prekeys],
                pq_pre_keys=[k.public() for k in pq_prekeys],
            )
            await _open_identity(bridge, account, config, store)
        except BaseException:
            if client is not None:
                await client.aclose()
            await bridge.aclose()
            store.close()
            # A registration that failed leaves no half-made wallet behind.
            _remove_if_created(path, created)
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
        if store.account() is None and (path / CONFIG_NAME).exists():
            try:
                config = load_wallet_config(path)
            except BaseException:
                store.close()
                raise
            if config.channel in SIGNAL_CLI_CHANNELS:
                # signal-cli holds this wallet's account: no sidecar, no intermediary.
                return await cls._open_signal_cli(path, store, config)
        bridge = LibsignalBridge(record_source=store)
        try:
            account = store.account()
            if account is None:
                raise StoreError(f"{path} is not registered; run 'wallet init' again")
            config = load_wallet_config(path)
            await bridge.start()
            await _open_identity(bridge, account, config, store)
            client = IntermediaryClient(config.server_url(), keepalive=config.keepalive())
            client.authenticate(account.account_id, account.device_id, account.password)
        except BaseException:
            await bridge.aclose()
            store.close()
            raise
        return cls(path, store, config, account, bridge, client)

    async def safety_number(self, peer: str) -> SafetyNumber:
        """The safety number of this wallet's identity and a peer's, as both sides compute it.

        Raises:
            NoSession: this wallet has not exchanged a message with ``peer`` yet, so it holds
                no identity key for it.
        """
        if self._bridge is None or self._account is None:
            raise NoSession(
                "signal-cli holds this wallet's identity keys, not the wallet",
                hint="compare safety numbers in a Signal app linked to the same account",
            )
        remote_key = self.store.load_record("identity", peer)
        if remote_key is None:
            raise NoSession(
                f"no identity key for {peer} yet",
                hint="exchange a message with this peer first (a share or an offer)",
            )
        return await self._bridge.safety_number(
            self.account_id, self._account.identity_public_key, peer, remote_key
        )

    @classmethod
    async def create_signal_cli(
        cls,
        folder: Path | str,
        settings: SignalCliSettings,
        *,
        transport: Literal["dbus", "jsonrpc"],
        trust_policy: TrustPolicy = "tofu",
    ) -> Wallet:
        """Make a new wallet whose Signal account is held by a running signal-cli daemon.

        Nothing is registered anywhere: the account already exists in signal-cli. The daemon is
        asked whether it runs the account before ``wallet.toml`` is written.

        Raises:
            StoreError: ``folder`` already holds a wallet.
            SignalCliError: the daemon is not running or does not have the account.
        """
        path = Path(folder)
        if (path / CONFIG_NAME).exists():
            raise StoreError(f"{path} already holds a wallet")
        config = WalletConfig(
            channel="signal-cli-dbus" if transport == "dbus" else "signal-cli-jsonrpc",
            trust_policy=trust_policy,
            signal_cli=settings,
        )
        store = WalletStore.open(path)
        wallet = await cls._open_signal_cli(path, store, config)
        save_wallet_config(path, config)
        log.info("wallet %s uses Signal account %s through signal-cli", path, settings.account)
        return wallet

    @classmethod
    async def _open_signal_cli(
        cls, path: Path, store: WalletStore, config: WalletConfig
    ) -> Wallet:
        try:
            if config.signal_cli is None:
                raise ConfigError(f"{path / CONFIG_NAME}: the [signal_cli] section is missing")
            client = signal_cli_client(config)
            channel = SignalCliChannel(store, client, config.signal_cli.account)
            try:
                await channel.start()
            except BaseException:
                await client.close()
                raise
        except BaseException:
            store.close()
            raise
        return cls(path, store, config, None, None, None, channel=channel)

    async def aclose(self) -> None:
        """Close the channel, the sidecar and the store, and release the folder's lock."""
        try:
            await self.channel.close()
            if self._client is not None:
                await self._client.aclose()
        finally:
            if self._bridge is not None:
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


def signal_cli_client(config: WalletConfig) -> SignalCliClient:
    """The signal-cli client a wallet's configuration asks for (not connected yet).

    Raises:
        ConfigError: the configuration names no signal-cli channel, or a non-loopback address.
    """
    settings = config.signal_cli
    if settings is None or config.channel not in SIGNAL_CLI_CHANNELS:
        raise ConfigError("wallet.toml: this wallet does not use signal-cli")
    if config.channel == "signal-cli-dbus":
        return SignalCliDbusClient(
            bus_address=settings.bus_address,
            bus_name=settings.bus_name,
            call_timeout=settings.call_timeout,
        )
    if settings.command is not None:
        return SignalCliJsonRpcClient.stdio(settings.command, call_timeout=settings.call_timeout)
    if settings.tcp is not None:
        host, _, port = settings.tcp.rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"wallet.toml: [signal_cli] tcp = {settings.tcp!r} is not host:port")
        return SignalCliJsonRpcClient.tcp_loopback(
            host.strip("[]"), int(port), call_timeout=settings.call_timeout
        )
    return SignalCliJsonRpcClient.unix(
        settings.socket or default_jsonrpc_socket(), call_timeout=settings.call_timeout
    )


def default_jsonrpc_socket() -> Path:
    """Where ``signal-cli daemon --socket`` listens unless told otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Path(runtime) / "signal-cli" / "socket"


async def _open_identity(
    bridge: LibsignalBridge, account: Account, config: WalletConfig, store: WalletStore
) -> None:
    # Every last-resort Kyber key still kept (the current one and replaced ones in their grace
    # period) is named, so that a message using one never deletes it.
    await bridge.open(
        identity_key_pair=account.identity_key_pair,
        registration_id=account.registration_id,
        address=ProtocolAddress(account.account_id, account.device_id),
        trust_policy=config.trust_policy,
        last_resort_kyber_ids=last_resort_kyber_ids(store),
    )


def _claim_new_folder(path: Path) -> bool:
    """Check that ``path`` can become a new wallet; True when this call created the folder.

    Raises:
        ConfigError: the path is empty, is a file, or is a folder that already holds files.
    """
    if not str(path).strip() or path == Path():
        raise ConfigError("name the folder for the new wallet")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} exists and is not a folder")
        if any(path.iterdir()):
            raise ConfigError(
                f"{path} is not empty", hint="give a new or empty folder for the wallet"
            )
        return False
    try:
        path.mkdir(parents=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return True


def _remove_if_created(path: Path, created: bool) -> None:
    if created:
        shutil.rmtree(path, ignore_errors=True)
    else:
        for name in (DATABASE_NAME, f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm", LOCK_NAME):
            (path / name).unlink(missing_ok=True)
