"""A reference lock: what a door or car would check before it opens for a digital key.

The lock knows two things from its set-up: its own id and its owner's public key. To open, a
key holder shows the owner's endorsement of its key and answers a fresh challenge with that key::

    challenge = lock.challenge()
    response = holder.respond(challenge, lock.lock_id)
    lock.unlock(endorsement, response)      # returns, or raises EndorsementRejected

Challenges are random, single-use and short-lived, so a recorded response opens nothing later.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tigress_signal.credentials import _signing
from tigress_signal.credentials.digital_key import (
    ChallengeResponse,
    unlock_signing_input,
    verify_endorsement,
)
from tigress_signal.credentials.messages import Endorsement, check_lock_id
from tigress_signal.errors import CredentialError, EndorsementRejected

log = logging.getLogger(__name__)

#: How long a challenge may be answered after it was issued.
DEFAULT_CHALLENGE_LIFETIME = timedelta(seconds=30)

#: Challenges a lock remembers at once; past this the oldest is forgotten.
MAX_REMEMBERED_CHALLENGES = 256

#: Size of a challenge in bytes.
CHALLENGE_BYTES = 32


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Issued:
    expires_at: datetime
    used: bool = False


class ReferenceLock:
    """An in-memory lock that opens for keys its owner endorsed.

    Note:
        This is a reference for tests and demonstrations: its challenges live in memory (a
        restart forgets them, which only makes outstanding challenges unusable), it is not
        thread-safe, and it has no revocation list, so an endorsement stays good until its
        ``not_after``.
    """

    def __init__(
        self,
        lock_id: str,
        owner_public_key: _signing.PublicKeyLike,
        *,
        challenge_lifetime: timedelta = DEFAULT_CHALLENGE_LIFETIME,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Set up a lock.

        Args:
            lock_id: this lock's id, as endorsements name it.
            owner_public_key: the owner's P-256 public key (key object or DER).
            challenge_lifetime: how long a challenge stays answerable.
            clock: gives the current time (timezone-aware); replace it in tests.

        Raises:
            CredentialError: the lock id is malformed or the key is not a P-256 public key.
        """
        try:
            self._lock_id = check_lock_id(lock_id)
            self._owner_key = _signing.coerce_public_key(owner_public_key)
        except ValueError as exc:
            raise CredentialError(f"cannot set up lock {lock_id!r}: {exc}") from exc
        self._challenge_lifetime = challenge_lifetime
        self._clock = clock
        self._issued: OrderedDict[bytes, _Issued] = OrderedDict()

    @property
    def lock_id(self) -> str:
        """This lock's id."""
        return self._lock_id

    def challenge(self) -> bytes:
        """Issue a fresh random challenge, answerable once within the challenge lifetime."""
        now = self._clock()
        self._forget_expired(now)
        while len(self._issued) >= MAX_REMEMBERED_CHALLENGES:
            self._issued.popitem(last=False)
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self._issued[challenge] = _Issued(expires_at=now + self._challenge_lifetime)
        return challenge

    def unlock(self, endorsement: Endorsement, response: ChallengeResponse) -> None:
        """Open if the endorsement and the challenge response both check out.

        The challenge is spent by this call whether or not the lock opens.

        Args:
            endorsement: the owner's endorsement of the holder's key.
            response: the holder's answer to a challenge from :meth:`challenge`.

        Raises:
            EndorsementRejected: with the first reason found: the challenge is unknown, spent
                or expired; the endorsement is by another owner key or its signature fails;
                it is for another lock; it is not yet or no longer valid; it does not grant
                ``unlock``; or the response is not the endorsed key's signature.
        """
        now = self._clock()
        try:
            self._spend_challenge(response.challenge, now)
            verify_endorsement(endorsement, self._owner_key)
            self._check_terms(endorsement, now)
            holder_key = _signing.load_public_key(endorsement.public_key)
            message = unlock_signing_input(self._lock_id, response.challenge)
            if not _signing.verify(holder_key, response.signature, message):
                raise EndorsementRejected(
                    "the challenge response is not signed by the endorsed key"
                )
        except EndorsementRejected as exc:
            log.info(
                "lock %s stayed shut for endorsement %d: %s",
                self._lock_id,
                endorsement.serial,
                exc,
            )
            raise
        log.info("lock %s opened for endorsement %d", self._lock_id, endorsement.serial)

    def _spend_challenge(self, challenge: bytes, now: datetime) -> None:
        issued = self._issued.get(challenge)
        if issued is None:
            raise EndorsementRejected(
                "the challenge was not issued by this lock (or is long expired)"
            )
        if issued.used:
            raise EndorsementRejected("the challenge was already used (a replayed response)")
        issued.used = True
        if now >= issued.expires_at:
            raise EndorsementRejected(
                f"the challenge expired at {issued.expires_at.isoformat()}; ask for a new one"
            )

    def _check_terms(self, endorsement: Endorsement, now: datetime) -> None:
        if endorsement.lock_id != self._lock_id:
            raise EndorsementRejected(
                f"the endorsement is for lock {endorsement.lock_id!r}, not {self._lock_id!r}"
            )
        if now < endorsement.not_before:
            raise EndorsementRejected(
                f"the endorsement is not valid before {endorsement.not_before.isoformat()}"
            )
        if now >= endorsement.not_after:
            raise EndorsementRejected(
                f"the endorsement expired at {endorsement.not_after.isoformat()}"
            )
        if "unlock" not in endorsement.rights:
            raise EndorsementRejected(
                f"the endorsement does not grant 'unlock' (it grants: "
                f"{', '.join(endorsement.rights)})"
            )

    def _forget_expired(self, now: datetime) -> None:
        # Spent challenges are kept until they expire, so a replay is named as one.
        expired = [c for c, issued in self._issued.items() if now >= issued.expires_at]
        for challenge in expired:
            del self._issued[challenge]
