"""What a wallet knows of a peer's identity key, and the user's decision to trust one.

The wallet store keeps three things per peer: the ``identity`` record (the key libsignal trusts
for the peer), the ``verified_identity`` record (the key the user confirmed with ``trust``; only
the ``verify`` policy needs it to send) and the newest key seen (``peer_identity_seen``: a key
the trust policy refused, from a kept PreKey message or a refused bundle). The safety number a
person compares is always computed over the newest key, so that after a change it is the new
key's number that gets compared.

Trusting (:func:`trust_newest_key`) stores the newest key as both trusted and verified in one
transaction and evicts the sidecar's cached copies. When the key differs from the one trusted
before, the peer's sessions (bound to the old key) are deleted too, so the next message to the
peer starts a fresh session from its current bundle.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from tigress_signal.bridge.libsignal import LibsignalBridge, SafetyNumber
from tigress_signal.bridge.records import RecordChange, RecordKind
from tigress_signal.errors import ConfigError, NoSession, SafetyNumberMismatch
from tigress_signal.wallet.config import TrustPolicy
from tigress_signal.wallet.store import Account, WalletStore

log = logging.getLogger(__name__)

#: A safety number is 60 digits; people write it in groups of five.
SAFETY_NUMBER_DIGITS = 60
_GROUPING = re.compile(r"[\s-]+")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What this wallet knows of one peer's identity key.

    Attributes:
        peer: the peer's account id.
        newest_key: the newest identity key seen for the peer (the safety number's key).
        trusted_key: the key stored as trusted, or None before any was.
        verified_key: the key the user confirmed with ``trust``, or None.
        policy: this wallet's trust policy.
    """

    peer: str
    newest_key: bytes
    trusted_key: bytes | None
    verified_key: bytes | None
    policy: TrustPolicy

    @property
    def changed(self) -> bool:
        """The peer's key differs from the one trusted before (a reinstall, or an attack)."""
        return self.trusted_key is not None and self.trusted_key != self.newest_key

    @property
    def verified(self) -> bool:
        """The user has confirmed the newest key."""
        return self.verified_key == self.newest_key

    @property
    def can_send(self) -> bool:
        """Whether the trust policy lets this wallet send to the newest key."""
        if self.policy == "always":
            return True
        if self.policy == "verify":
            return self.verified
        return not self.changed  # tofu trusts a first key on first contact

    def status(self) -> str:
        """One line for a person: is the key trusted, did it change."""
        if self.changed:
            return f"the identity key of {self.peer} CHANGED and is not trusted yet"
        if self.trusted_key is None:
            return f"the identity key of {self.peer} is not trusted yet"
        if self.policy == "verify" and not self.verified:
            return f"the identity key of {self.peer} is not verified yet (policy 'verify')"
        return f"the identity key of {self.peer} is {'verified' if self.verified else 'trusted'}"


def peer_identity(store: WalletStore, peer: str, policy: TrustPolicy) -> PeerIdentity:
    """What the wallet knows of ``peer``'s identity key.

    Raises:
        NoSession: no key of the peer was seen yet.
    """
    trusted = store.load_record("identity", peer)
    newest = store.identity_seen(peer) or trusted
    if newest is None:
        raise NoSession(
            f"no identity key for {peer} yet",
            hint="exchange a message with this peer first (a share or an offer)",
        )
    verified = store.load_record("verified_identity", peer)
    return PeerIdentity(peer, newest, trusted, verified, policy)


def normalize_safety_number(text: str) -> str:
    """The 60 digits of a safety number as typed (spaces and dashes between groups allowed).

    Raises:
        ConfigError: the text is not 60 digits.
    """
    digits = _GROUPING.sub("", text)
    if len(digits) != SAFETY_NUMBER_DIGITS or not digits.isascii() or not digits.isdigit():
        raise ConfigError(
            f"a safety number is {SAFETY_NUMBER_DIGITS} digits; got {len(digits)} characters",
            hint="copy the digits 'safety-number' shows, in groups of five or all together",
        )
    return digits


async def safety_number_of(
    bridge: LibsignalBridge, account: Account, identity: PeerIdentity
) -> SafetyNumber:
    """The safety number of this wallet's identity and the peer's newest key."""
    return await bridge.safety_number(
        account.account_id, account.identity_public_key, identity.peer, identity.newest_key
    )


async def trust_newest_key(
    store: WalletStore,
    bridge: LibsignalBridge,
    account: Account,
    identity: PeerIdentity,
    safety_number: str | None,
) -> None:
    """Store the peer's newest key as trusted and verified; evict the sidecar's copies.

    Args:
        store: the wallet store.
        bridge: the wallet's sidecar.
        account: this wallet's account (for the safety number).
        identity: what the wallet knows of the peer (:func:`peer_identity`).
        safety_number: the digits the user compared, checked against the newest key's number
            before anything is stored; None to trust without the check.

    Raises:
        ConfigError: ``safety_number`` is not 60 digits.
        SafetyNumberMismatch: the digits are not this wallet's safety number with the peer.
    """
    peer = identity.peer
    if safety_number is not None:
        given = normalize_safety_number(safety_number)
        expected = await safety_number_of(bridge, account, identity)
        if given != expected.digits:
            raise SafetyNumberMismatch(
                f"the safety number given is not the one of this wallet and {peer}'s current key;"
                " nothing was trusted"
            )

    # The new key, trusted and verified; sessions bound to an older key go with it.
    key = identity.newest_key
    changes = [RecordChange("identity", peer, key), RecordChange("verified_identity", peer, key)]
    stale_sessions: list[str] = []
    if identity.changed:
        stale_sessions = [
            str(row[0])
            for row in store.connection.execute(
                "SELECT key FROM records WHERE kind = 'session' AND key LIKE ? ESCAPE '\\'",
                (_like_prefix(peer) + ".%",),
            )
        ]
        changes += [RecordChange("session", name, None) for name in stale_sessions]
    with store.transaction() as conn:
        store.apply_changes(conn, changes)
        conn.execute("DELETE FROM peer_identity_seen WHERE peer = ?", (peer,))
        if identity.changed:
            conn.execute("DELETE FROM peer_devices WHERE peer = ?", (peer,))
    evicted: list[tuple[RecordKind, str]] = [(c.kind, c.key) for c in changes]
    await bridge.evict(evicted)
    log.info(
        "trusted the %s identity key of %s%s",
        "new" if identity.changed else "current",
        peer,
        " (safety number compared)" if safety_number is not None else "",
    )


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
