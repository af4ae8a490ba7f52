"""A wallet folder brought to life: its store, its libsignal sidecar, its channel, its shares.

:meth:`Wallet.create` registers a new wallet with an intermediary (identity, prekeys, account);
:meth:`Wallet.open` opens an existing one. Either way the wallet holds the folder's process lock
until :meth:`Wallet.aclose`.

A second device joins an existing account in three steps (see :mod:`.linking`):
:meth:`Wallet.link_request` on the new device, :meth:`Wallet.answer_link` on an existing one,
:meth:`Wallet.finish_link` on the new device again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
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
from tigress_signal.errors import (
    ConfigError,
    InvalidLinkAnswer,
    InvalidLinkCode,
    StoreError,
    StoreLocked,
    TigressSignalError,
)
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.intermediary.entities import DeviceInfo
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
from tigress_signal.wallet.identity_reset import reset_identity
from tigress_signal.wallet.linking import (
    LinkSecrets,
    make_link_request,
    open_link_answer,
    parse_link_request,
    request_of,
    seal_link_answer,
)
from tigress_signal.wallet.prekeys import refill_prekeys
from tigress_signal.wallet.rotation import Rotation, last_resort_kyber_ids, record_registered_keys
from tigress_signal.wallet.store import DATABASE_NAME, LOCK_NAME, Account, WalletStore
from tigress_signal.wallet.trust import (
    PeerIdentity,
    peer_identity,
    safety_number_of,
    trust_newest_key,
)

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
            settings = config.selfhosted
            channel = SelfHostedChannel(
                store,
                bridge,
                client,
                account,
                on_connect=self._maintain_prekeys,
                resend_log_seconds=3600 if settings is None else settings.resend_log_seconds,
                max_resends=2 if settings is None else settings.max_resends,
            )
        self.channel: CredentialChannel = channel
        self.shares = ShareService(
            store, self.channel, device_id=account.device_id if account is not None else 1
        )
        if isinstance(channel, SelfHostedChannel):
            # A resend after a peer's decryption error goes out at once, not at the next retry.
            channel.on_outbox = self.shares.deliver_outbox

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
        store = _open_new_store(path, created)
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
            if account is None and store.pending_link() is not None:
                raise StoreError(
                    f"{path} is waiting to be linked to an account",
                    hint="finish with 'wallet link-finish' and the existing device's answer",
                )
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

    # -- devices of this account ----------------------------------------------------------

    @classmethod
    async def link_request(cls, folder: Path | str) -> LinkRequestLine:
        """Make ``folder`` a new device waiting to be linked, and return its link request.

        The folder holds only the request's ephemeral private key until :meth:`finish_link`.

        Raises:
            ConfigError: ``folder`` is not new or empty.
        """
        path = Path(folder)
        if (path / DATABASE_NAME).exists():
            raise ConfigError(
                f"{path} already holds a wallet or a link request",
                hint="use a new folder, or show a waiting folder's request again with --show",
            )
        created = _claim_new_folder(path)
        store = _open_new_store(path, created)
        try:
            with store:
                line, private_pem, check_code = make_link_request()
                with store.transaction() as conn:
                    store.save_pending_link(conn, private_pem)
        except BaseException:
            _remove_if_created(path, created)
            raise
        log.info("wallet %s waits to be linked to an account", path)
        return LinkRequestLine(line, check_code)

    @staticmethod
    def pending_link_request(folder: Path | str) -> LinkRequestLine:
        """The link request of a folder still waiting to be linked (to show it again).

        Raises:
            StoreError: the folder is not waiting to be linked.
        """
        path = Path(folder)
        with WalletStore.open(path, create=False) as store:
            private_pem = store.pending_link()
            if private_pem is None or store.account() is not None:
                raise StoreError(f"{path} is not waiting to be linked")
        return LinkRequestLine(*request_of(private_pem))

    async def answer_link(self, request: str) -> LinkAnswerLine:
        """Answer a new device's link request: a one-time link code and this account's identity
        key pair, encrypted to the request's key.

        Warning:
            The answer gives its reader this account's identity. Only answer a request the
            user made on their own new device, and paste the answer only there.

        Raises:
            InvalidLinkRequest: ``request`` is not a valid link request (checked before the
                intermediary is asked for a code).
            ConfigError: this wallet's account is held by signal-cli.
            ServerApiError: the intermediary would not issue a code.
        """
        account = self.account
        client = self._require_client()
        parsed = parse_link_request(request)
        code = await client.issue_link_code()
        answer = seal_link_answer(
            parsed,
            LinkSecrets(
                server_url=self.config.server_url(),
                account_id=account.account_id,
                identity_key_pair=account.identity_key_pair,
                identity_public_key=account.identity_public_key,
                link_code=code.verification_code,
                code_expires_at=code.expires_at,
                trust_policy=self.config.trust_policy,
            ),
        )
        log.info("answered link request %s for account %s", parsed.check_code, account.account_id)
        return LinkAnswerLine(answer, parsed.check_code, code.expires_at)

    @classmethod
    async def finish_link(cls, folder: Path | str, answer: str) -> Wallet:
        """Link the device waiting in ``folder`` with an existing device's answer, and open it.

        The device makes its own registration id, signed prekey and last-resort Kyber key,
        signed with the account's identity key; stores their private halves; links itself at
        the intermediary; stores its device id and password with the account; and publishes
        one-time prekeys. Until the intermediary has linked it, the folder stays waiting, so a
        refused answer can be followed by a fresh one.

        Raises:
            StoreError: the folder is not waiting to be linked.
            InvalidLinkAnswer: the answer is damaged, for another request, expired or used.
            ServerApiError: the intermediary refused the link otherwise (device limit, ...).
        """
        path = Path(folder)
        started = time.perf_counter()
        store = WalletStore.open(path, create=False)
        bridge = LibsignalBridge(record_source=store)
        client: IntermediaryClient | None = None
        try:
            existing = store.account()
            if existing is not None and existing.device_id == 1:
                # A primary device's folder was registered with 'wallet init', never linked.
                raise StoreError(
                    f"{path} holds a registered wallet, not a device waiting to be linked",
                    hint="make the new device's folder with 'wallet link-request' first",
                )
            if existing is not None:
                raise StoreError(
                    f"{path} is already linked to an account (device {existing.device_id})"
                )
            private_pem = store.pending_link()
            if private_pem is None:
                raise StoreError(
                    f"{path} is not waiting to be linked",
                    hint="run 'wallet link-request' for a new folder first",
                )
            secrets = open_link_answer(answer, private_pem)
            if secrets.code_expires_at <= int(time.time() * 1000):
                raise InvalidLinkAnswer("the link answer's code has expired")
            config = WalletConfig(
                trust_policy=_trust_policy(secrets.trust_policy),
                selfhosted=selfhosted_settings(secrets.server_url),
            )

            # This device's own registration id (the identity made alongside is not used:
            # every device of the account speaks with the account's identity).
            await bridge.start()
            registration_id = (await bridge.generate_identity()).registration_id
            await bridge.open(
                identity_key_pair=secrets.identity_key_pair,
                registration_id=registration_id,
                address=ProtocolAddress(_UNREGISTERED, 1),
                trust_policy=config.trust_policy,
                last_resort_kyber_ids=[LAST_RESORT_KYBER_ID],
            )

            # Private halves first, as at registration; the sidecar signs with the identity.
            now = datetime.now(UTC)
            now_ms = int(now.timestamp() * 1000)
            with store.transaction() as conn:
                signed_id = store.next_ids(conn, "signed_prekey", 1)
            signed = await bridge.generate_signed_prekey(signed_id, now_ms)
            (last_resort,) = await bridge.generate_kyber_prekeys(LAST_RESORT_KYBER_ID, 1, now_ms)
            with store.transaction() as conn:
                store.apply_changes(
                    conn,
                    [
                        RecordChange("signed_prekey", str(signed.key_id), signed.record),
                        RecordChange(
                            "kyber_prekey", str(LAST_RESORT_KYBER_ID), last_resort.record
                        ),
                    ],
                )
                # One-time Kyber keys must never take the last-resort key's id.
                store.skip_ids_through(conn, "kyber_prekey", LAST_RESORT_KYBER_ID)

            # Link; from here on the intermediary knows this device.
            client = IntermediaryClient(config.server_url(), keepalive=config.keepalive())
            try:
                linked = await client.link_device(
                    verification_code=secrets.link_code,
                    registration_id=registration_id,
                    signed_prekey=signed.public(),
                    pq_last_resort_prekey=last_resort.public(),
                )
            except InvalidLinkCode as exc:
                raise InvalidLinkAnswer(
                    "the intermediary refused the answer's link code: it was used or expired"
                ) from exc
            if linked.uuid != secrets.account_id:
                raise InvalidLinkAnswer(
                    f"the intermediary linked this device to account {linked.uuid}, not to"
                    f" {secrets.account_id} as the answer says",
                    hint="check that the existing device and this one use the same server",
                )
            account = Account(
                account_id=linked.uuid,
                device_id=linked.device_id,
                password=linked.password,
                identity_key_pair=secrets.identity_key_pair,
                identity_public_key=secrets.identity_public_key,
                registration_id=registration_id,
            )
            # The configuration first: should storing the account fail, the folder is still
            # only waiting (a wallet.toml without an account opens as "waiting to be linked").
            save_wallet_config(path, config)
            try:
                with store.transaction() as conn:
                    store.save_account(conn, account)
                    store.clear_pending_link(conn)
                    # Rotation replaces these on schedule and names the last-resort key to
                    # the sidecar, so that using it never deletes it.
                    record_registered_keys(
                        conn,
                        signed_prekey_id=signed.key_id,
                        last_resort_kyber_id=LAST_RESORT_KYBER_ID,
                        now=now,
                    )
            except BaseException:
                (path / CONFIG_NAME).unlink(missing_ok=True)
                raise

            # One-time prekeys; if the server is unreachable now, the next connect refills.
            client.authenticate(account.account_id, account.device_id, account.password)
            try:
                await refill_prekeys(store, bridge, client)
            except TigressSignalError as exc:
                log.warning("linked, but no one-time prekeys uploaded yet: %s", exc.user_message())
        finally:
            if client is not None:
                await client.aclose()
            await bridge.aclose()
            store.close()
        log.info(
            "wallet %s linked as device %d of account %s (%.0f ms)",
            path,
            account.device_id,
            account.account_id,
            (time.perf_counter() - started) * 1000,
        )
        return await cls.open(path)

    async def devices(self) -> list[DeviceInfo]:
        """This account's devices at the intermediary (``id``, ``registration_id``, ``created``).

        Raises:
            ConfigError: this wallet's account is held by signal-cli.
        """
        return await self._require_client().list_devices()

    async def remove_device(self, device_id: int) -> None:
        """Remove a device from this account (the primary device 1 may remove any other; a
        device may remove itself, after which this wallet can no longer connect).

        Raises:
            ConfigError: this wallet's account is held by signal-cli.
            ServerApiError: refused (403 for the primary device or without the right; 404 for
                no such device).
        """
        await self._require_client().remove_device(device_id)
        log.info("removed device %d from account %s", device_id, self.account_id)

    def _require_client(self) -> IntermediaryClient:
        if self._client is None:
            raise ConfigError(
                f"the wallet in {self.folder} has its Signal account in signal-cli",
                hint="link devices with signal-cli itself",
            )
        return self._client

    async def safety_number(self, peer: str) -> SafetyNumber:
        """The safety number of this wallet's identity and a peer's, as both sides compute it.

        It is computed over the newest key seen for the peer: after the peer's key changed,
        that is the new key (see :meth:`peer_identity` for whether it is trusted).

        Raises:
            NoSession: this wallet has not exchanged a message with ``peer`` yet, so it holds
                no identity key for it.
        """
        bridge, account = self._own_identity()
        return await safety_number_of(bridge, account, self.peer_identity(peer))

    def peer_identity(self, peer: str) -> PeerIdentity:
        """What this wallet knows of ``peer``'s identity key: newest, trusted, verified.

        Raises:
            NoSession: no key of ``peer`` was seen yet (or signal-cli holds the keys).
        """
        self._own_identity()
        return peer_identity(self.store, peer, self.config.trust_policy)

    async def trust(self, peer: str, safety_number: str | None = None) -> int:
        """Trust (and mark verified) the newest identity key seen for ``peer``.

        With ``safety_number``, the digits must be this wallet's safety number with the peer's
        newest key, else nothing is stored. Then the messages kept from the peer while its key
        was not trusted are processed, oldest first, each once, and the outbox is sent again.

        Note:
            Over signal-cli this is refused: signal-cli keeps the identity keys and has its own
            ``trust`` command, which this wallet does not drive.

        Returns:
            How many kept messages were processed.

        Raises:
            NoSession: no key of ``peer`` was seen yet.
            ConfigError: ``safety_number`` is not 60 digits, or the wallet uses signal-cli.
            SafetyNumberMismatch: the digits are not the safety number; nothing was stored.
        """
        bridge, account = self._own_identity()
        identity = peer_identity(self.store, peer, self.config.trust_policy)
        await trust_newest_key(self.store, bridge, account, identity, safety_number)
        processed = await self.shares.process_held(peer)
        with contextlib.suppress(TigressSignalError):
            await self.shares.deliver_outbox()
        return processed

    async def reset_identity(self) -> Account:
        """Register this wallet's account again with a new identity key (a reinstall).

        See :mod:`tigress_signal.wallet.identity_reset` for what the server and the wallet drop
        and keep. Run it while the wallet's receive loop is stopped: a message decrypted while
        the identity is being replaced could be lost.

        Raises:
            ConfigError: the wallet's account is held by signal-cli, or messages wait in the
                outbox (deliver them first).
            ServerApiError: the intermediary refused; the wallet is unchanged.
        """
        bridge, account = self._own_identity()
        assert self._client is not None  # a wallet with its own identity has a client
        # New ids from the counters: an id is never used twice, even across identities.
        with self.store.transaction() as conn:
            signed_id = self.store.next_ids(conn, "signed_prekey", 1)
            last_resort_id = self.store.next_ids(conn, "kyber_prekey", 1)
        self._account = await reset_identity(
            self.store,
            bridge,
            self._client,
            account,
            self.config,
            signed_prekey_id=signed_id,
            last_resort_kyber_id=last_resort_id,
        )
        await self._maintain_prekeys()
        return self._account

    def _own_identity(self) -> tuple[LibsignalBridge, Account]:
        if self._bridge is None or self._account is None:
            raise ConfigError(
                "signal-cli holds this wallet's identity keys, not the wallet",
                hint="compare safety numbers and trust keys in a Signal app linked to the"
                " same account, or with signal-cli's own commands",
            )
        return self._bridge, self._account

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


@dataclass(frozen=True, slots=True)
class LinkRequestLine:
    """A new device's link request, as the user copies it.

    Attributes:
        line: the request, one line of text.
        check_code: its fingerprint, to compare with what the existing device shows.
    """

    line: str
    check_code: str


@dataclass(frozen=True, slots=True)
class LinkAnswerLine:
    """An existing device's answer to a link request.

    Attributes:
        line: the answer, one line of text (it carries the account's identity: a secret).
        check_code: the fingerprint of the request it answers.
        expires_at: when its link code expires, in milliseconds since the epoch.
    """

    line: str
    check_code: str
    expires_at: int

    def __repr__(self) -> str:
        return f"LinkAnswerLine(check_code={self.check_code!r}, expires_at={self.expires_at})"


def _trust_policy(value: str) -> TrustPolicy:
    for policy in _TRUST_POLICIES:
        if value == policy:
            return policy
    raise InvalidLinkAnswer(f"the link answer names an unknown trust policy {value!r}")


_TRUST_POLICIES: tuple[TrustPolicy, ...] = ("tofu", "always", "verify")


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
    if path.is_symlink() and not path.exists():
        # mkdir would fail with a bare "File exists" on a link that points nowhere.
        raise ConfigError(
            f"{path} is a symbolic link to a path that does not exist",
            hint="give a new or empty folder for the wallet",
        )
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


def _open_new_store(path: Path, created: bool) -> WalletStore:
    """Open the store of a folder :func:`_claim_new_folder` accepted; undo the claim on failure.

    Raises:
        StoreLocked: another process took the folder meanwhile (its files stay: they are its).
        StoreError: the store cannot be made.
    """
    try:
        return WalletStore.open(path)
    except StoreLocked:
        # Another 'wallet init' or 'link-request' claimed the same empty folder a moment
        # earlier and is writing into it: removing "our" files would delete its wallet.
        raise
    except BaseException:
        _remove_if_created(path, created)
        raise


def _remove_if_created(path: Path, created: bool) -> None:
    if created:
        shutil.rmtree(path, ignore_errors=True)
    else:
        for name in (DATABASE_NAME, f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm", LOCK_NAME):
            (path / name).unlink(missing_ok=True)
