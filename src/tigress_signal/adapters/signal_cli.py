"""The CredentialChannel over real Signal accounts, held by signal-cli (D-Bus or JSON-RPC).

signal-cli owns the account and all of its Signal state (identity, sessions, prekeys), so
:attr:`IncomingMessage.record_changes` is always empty here: there is nothing of libsignal's for
the wallet to commit. A transfer message travels as one or more Signal text messages written
by :mod:`tigress_signal.adapters.text_format`; text that is not ours is ignored.

What "acknowledge" means with signal-cli:
    The daemon runs in manual receive mode, so it takes nothing from Signal's servers until we
    subscribe. Once subscribed, though, signal-cli fetches a message, emits it to us and then
    deletes it at Signal: by the time we see a message, Signal no longer has it, and signal-cli
    offers no way to acknowledge later. So this channel writes every part it receives to its
    own table in the wallet store (``signal_cli_parts``) and every complete message to
    ``signal_cli_inbox`` *before* handing it to the wallet. :meth:`SignalCliChannel.acknowledge`
    deletes the inbox row once the wallet committed the effect; :meth:`SignalCliChannel.release`
    leaves it, and a row left behind (a release, or a crash before the commit) is handed out
    again the next time :meth:`SignalCliChannel.receive` starts. A row whose envelope the wallet
    already marked as processed (a crash between commit and acknowledge) is dropped.

Warning:
    The gap that remains is between signal-cli emitting a message and our insert committing.
    Over JSON-RPC it is milliseconds, because subscriptions end with our connection and signal-cli
    stops fetching when we are gone. Over D-Bus a subscription outlives a crashed client: until
    this process comes back, signal-cli keeps fetching and emitting to nobody, and those
    messages are lost. Prefer the JSON-RPC transport on a UNIX socket where that matters.

Identity keys and trust: signal-cli keeps the peers' identity keys and applies its own trust
setting (``--trust-new-identities``) and its own ``trust`` command; the wallet's
``trust_policy`` does not apply. ``Wallet.trust`` and ``safety-number`` refuse such a wallet
with a ConfigError that points at signal-cli or a linked Signal app; wiring signal-cli's
``trust`` into ``tigress-signal trust`` is not done. A send to a changed key fails with
UntrustedIdentity (from signal-cli's error) and the share's message stays in the outbox until
the key is trusted in signal-cli. This channel never keeps messages back for trust (signal-cli
decides before we see them), so its ``replay_held`` is the default that yields nothing.

Peers are addressed by E.164 number or ACI. The peer string the wallet used for a send is
remembered for the number and the ACI signal-cli reports, so a reply comes back under the same
name even when signal-cli names its sender differently (by ACI when the number is hidden).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from tigress_signal.adapters.text_format import (
    MAX_PARTS,
    TransferPart,
    assemble,
    encode_parts,
    parse_part,
)
from tigress_signal.bridge.signal_cli_client import (
    ReceivedText,
    SendReceipt,
    SignalCliClient,
    normalise_recipient,
)
from tigress_signal.channel import CredentialChannel, IncomingMessage, SealedMessage
from tigress_signal.errors import (
    ChannelClosed,
    MalformedTransferMessage,
    SignalCliAccountNotFound,
    SignalCliError,
    SignalCliInvalidNumber,
    SignalCliUnavailable,
    SignalCliUnregisteredUser,
    SignalCliUntrustedIdentity,
    UnknownPeer,
    UntrustedIdentity,
)
from tigress_signal.wallet.store import WalletStore, utc_now_text

log = logging.getLogger(__name__)

#: Parts of a message that never completed are dropped after this long.
PART_LIFETIME = timedelta(days=7)
#: The most unassembled parts kept from one sender; more are dropped (a flood, not a transfer).
MAX_PARTS_PER_SENDER = 4 * MAX_PARTS

_RECONNECT_FIRST_DELAY = 0.2
_RECONNECT_MAX_DELAY = 10.0

# The channel's own tables, beside the wallet's: what signal-cli handed over but the wallet has
# not committed yet, parts of long messages, and the names peers were sent to.
_TABLES = (
    """CREATE TABLE IF NOT EXISTS signal_cli_inbox (
        envelope_id TEXT PRIMARY KEY,
        peer TEXT NOT NULL,
        payload BLOB NOT NULL,
        received_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS signal_cli_parts (
        account TEXT NOT NULL,
        sender TEXT NOT NULL,
        share_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        part INTEGER NOT NULL,
        count INTEGER NOT NULL,
        size INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        data BLOB NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (account, sender, share_id, digest, part)
    )""",
    """CREATE TABLE IF NOT EXISTS signal_cli_peers (
        address TEXT PRIMARY KEY,
        peer TEXT NOT NULL
    )""",
)


class SignalCliChannel(CredentialChannel):
    """Transfer messages as Signal texts through a signal-cli daemon.

    Args:
        store: the wallet store (the channel keeps its inbox and parts there).
        client: a D-Bus or JSON-RPC client of the daemon (not connected yet).
        account: the wallet's Signal account in that daemon (E.164).
    """

    def __init__(self, store: WalletStore, client: SignalCliClient, account: str) -> None:
        self.name = f"signal-cli-{client.transport}"
        self._store = store
        self._client = client
        self._account = account
        self._closed = asyncio.Event()
        with store.transaction() as conn:
            for statement in _TABLES:
                conn.execute(statement)

    @property
    def account(self) -> str:
        """The wallet's Signal account."""
        return self._account

    async def start(self) -> None:
        """Connect to the daemon and check it runs the account.

        Raises:
            SignalCliUnavailable: no daemon answers.
            SignalCliAccountNotFound: the daemon does not have the account.
        """
        await self._client.connect()
        accounts = await self._client.list_accounts()
        if self._account not in accounts:
            raise SignalCliAccountNotFound(
                f"the signal-cli daemon has no account {self._account}"
                f" (it has {', '.join(accounts) or 'none'})"
            )

    # -- sending --------------------------------------------------------------------------------

    async def seal(
        self,
        peer: str,
        payload: bytes,
        *,
        summary: str = "",
        during: IncomingMessage | None = None,
    ) -> SealedMessage:
        """Check the recipient's address before the wallet stores anything for it.

        signal-cli encrypts when it sends, so there is nothing to seal; what can be checked
        without asking Signal's servers is that ``peer`` is an E.164 number or an ACI.
        Whether it has a Signal account, and whether its identity is trusted, is only known
        when :meth:`send` runs (asking Signal for every offer would hit its rate limits).

        Raises:
            UnknownPeer: ``peer`` is neither an E.164 number nor an ACI.
        """
        try:
            normalise_recipient(peer)
        except SignalCliInvalidNumber as exc:
            raise UnknownPeer(str(exc), hint=exc.hint) from exc
        return await super().seal(peer, payload, summary=summary, during=during)

    async def send(self, peer: str, payload: bytes, *, summary: str = "") -> None:
        """Send ``payload`` to ``peer`` as one or more Signal texts.

        Raises:
            UnknownPeer: ``peer`` is not a valid number or ACI, or has no Signal account.
            UntrustedIdentity: signal-cli does not trust the peer's identity key.
            SignalCliError: any other failure (the daemon is gone, rate limits, ...); the
                wallet keeps the message and tries again.
            MalformedTransferMessage: the payload is too long for :data:`MAX_PARTS` texts.
        """
        if self._closed.is_set():
            raise ChannelClosed("the signal-cli channel is closed")
        started = time.perf_counter()
        try:
            recipient = normalise_recipient(peer)
        except SignalCliInvalidNumber as exc:
            raise UnknownPeer(str(exc), hint=exc.hint) from exc
        texts = encode_parts(payload, summary)
        receipt: SendReceipt | None = None
        for text in texts:
            try:
                receipt = await self._client.send_text(self._account, recipient, text)
            except (SignalCliInvalidNumber, SignalCliUnregisteredUser) as exc:
                raise UnknownPeer(f"cannot send to {peer}: {exc}", hint=exc.hint) from exc
            except SignalCliUntrustedIdentity as exc:
                raise UntrustedIdentity(
                    f"signal-cli does not trust the identity key of {peer}",
                    peer=peer,
                    hint=exc.hint,
                ) from exc
        self._remember_peer(peer, recipient, receipt)
        log.info(
            "sent %d bytes to %s in %d Signal message(s) over %s (%.1f ms)",
            len(payload),
            peer,
            len(texts),
            self._client.transport,
            (time.perf_counter() - started) * 1000,
        )

    def _remember_peer(self, peer: str, recipient: str, receipt: SendReceipt | None) -> None:
        addresses = {recipient}
        if receipt is not None:
            addresses |= {a for a in (receipt.recipient_number, receipt.recipient_uuid) if a}
        with self._store.transaction() as conn:
            for address in addresses:
                conn.execute(
                    "INSERT INTO signal_cli_peers (address, peer) VALUES (?, ?)"
                    " ON CONFLICT (address) DO UPDATE SET peer = excluded.peer",
                    (address, peer),
                )

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self) -> AsyncIterator[IncomingMessage]:
        """Yield transfer messages: first those stored but not committed, then new ones.

        Reconnects with backoff when the daemon goes away, until :meth:`close`.
        """
        for incoming in self._stored_messages():
            yield incoming
        delay = _RECONNECT_FIRST_DELAY
        while not self._closed.is_set():
            try:
                async for text in self._client.receive(self._account):
                    delay = _RECONNECT_FIRST_DELAY
                    taken = self._take(text)
                    if taken is not None:
                        yield taken
                if self._closed.is_set():
                    break
                raise SignalCliUnavailable("signal-cli ended the subscription")
            except SignalCliError as exc:
                if self._closed.is_set():
                    break
                log.warning("signal-cli connection lost (%s); retrying in %.1f s", exc, delay)
                await _sleep_unless(self._closed, delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)
                with contextlib.suppress(SignalCliError):
                    await self._client.connect()

    def _stored_messages(self) -> list[IncomingMessage]:
        rows = self._store.connection.execute(
            "SELECT envelope_id, peer, payload FROM signal_cli_inbox ORDER BY received_at"
        ).fetchall()
        found = []
        for envelope_id, peer, payload in rows:
            if self._store.envelope_seen(envelope_id):
                self._forget(envelope_id)  # committed, but the acknowledgement was cut short
                continue
            found.append(
                IncomingMessage(peer=peer, payload=bytes(payload), envelope_id=envelope_id)
            )
        if found:
            log.info("%d stored signal-cli message(s) to process again", len(found))
        return found

    def _take(self, text: ReceivedText) -> IncomingMessage | None:
        """Store a received part; the whole message once every part is there."""
        try:
            part = parse_part(text.text)
        except MalformedTransferMessage as exc:
            log.warning("dropped a damaged transfer text from %s: %s", text.sender, exc)
            return None
        if part is None:
            log.debug("ignored a text from %s that is not a transfer", text.sender)
            return None
        peer = self._peer_of(text)
        with self._store.transaction() as conn:
            parts = self._store_part(conn, text, part)
            if parts is None:
                return None
            envelope_id = f"signal-cli:{text.account}:{text.sender}:{parts[0][1]}"
            conn.execute(
                "DELETE FROM signal_cli_parts WHERE account = ? AND sender = ? AND share_id = ?"
                " AND digest = ?",
                (text.account, text.sender, part.share_id, part.digest),
            )
            try:
                payload = assemble(p for p, _ in parts)
            except MalformedTransferMessage as exc:
                log.warning("dropped a transfer message from %s: %s", text.sender, exc)
                return None
            conn.execute(
                "INSERT OR IGNORE INTO signal_cli_inbox (envelope_id, peer, payload, received_at)"
                " VALUES (?, ?, ?, ?)",
                (envelope_id, peer, payload, utc_now_text()),
            )
        if self._store.envelope_seen(envelope_id):
            self._forget(envelope_id)
            return None
        return IncomingMessage(peer=peer, payload=payload, envelope_id=envelope_id)

    def _store_part(
        self, conn: sqlite3.Connection, text: ReceivedText, part: TransferPart
    ) -> list[tuple[TransferPart, int]] | None:
        """Keep one part; all parts with their timestamps once complete, else None."""
        cutoff = (datetime.now(UTC) - PART_LIFETIME).isoformat(timespec="milliseconds")
        conn.execute("DELETE FROM signal_cli_parts WHERE received_at < ?", (cutoff,))
        (held,) = conn.execute(
            "SELECT count(*) FROM signal_cli_parts WHERE account = ? AND sender = ?",
            (text.account, text.sender),
        ).fetchone()
        if held >= MAX_PARTS_PER_SENDER:
            log.warning("dropped a transfer part from %s: too many incomplete parts", text.sender)
            return None
        conn.execute(
            "INSERT OR IGNORE INTO signal_cli_parts (account, sender, share_id, digest, part,"
            " count, size, timestamp, data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                text.account,
                text.sender,
                part.share_id,
                part.digest,
                part.index,
                part.count,
                part.size,
                text.timestamp,
                part.data,
                utc_now_text(),
            ),
        )
        rows = conn.execute(
            "SELECT part, count, size, timestamp, data FROM signal_cli_parts WHERE account = ?"
            " AND sender = ? AND share_id = ? AND digest = ? ORDER BY part",
            (text.account, text.sender, part.share_id, part.digest),
        ).fetchall()
        if len(rows) < part.count:
            return None
        return [
            (TransferPart(index, count, part.share_id, part.digest, size, bytes(data)), timestamp)
            for index, count, size, timestamp, data in rows
        ]

    def _peer_of(self, text: ReceivedText) -> str:
        for address in (text.sender, text.sender_uuid):
            if address:
                row = self._store.connection.execute(
                    "SELECT peer FROM signal_cli_peers WHERE address = ?", (address,)
                ).fetchone()
                if row is not None:
                    return str(row[0])
        return text.sender

    def _forget(self, envelope_id: str) -> None:
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM signal_cli_inbox WHERE envelope_id = ?", (envelope_id,))

    async def acknowledge(self, incoming: IncomingMessage) -> None:
        """The wallet committed the message's effect: drop our stored copy."""
        self._forget(incoming.envelope_id)

    async def release(self, incoming: IncomingMessage) -> None:
        """Keep the stored copy; it is handed out again when :meth:`receive` next starts."""
        log.info("kept %s for another try", incoming.envelope_id)

    async def close(self) -> None:
        """Stop receiving, unsubscribe and disconnect from signal-cli."""
        self._closed.set()
        await self._client.close()


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
