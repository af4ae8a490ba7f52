"""The stateful digital key: holder, owner, endorsement, and the reference lock."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tigress_signal.credentials import (
    ChallengeResponse,
    DigitalKeyHolder,
    Endorsement,
    KeyImportRequest,
    KeyOwner,
    KeySigningRequest,
    ReferenceLock,
    TransferEnvelope,
    TransferMessage,
    decode_transfer,
    encode_transfer,
    verify_endorsement,
)
from tigress_signal.credentials.lock import DEFAULT_CHALLENGE_LIFETIME, MAX_REMEMBERED_CHALLENGES
from tigress_signal.errors import CredentialError, EndorsementRejected

START = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
LOCK_ID = "garage-7"


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class KeyFlow:
    """One completed stateful share: a holder with an endorsed key, and its lock."""

    share_id: uuid.UUID
    holder: DigitalKeyHolder
    owner: KeyOwner
    endorsement: Endorsement
    clock: Clock = field(default_factory=Clock)

    def lock(self) -> ReferenceLock:
        return ReferenceLock(LOCK_ID, self.owner.public_key_der, clock=self.clock)


def through_the_wire(body: TransferMessage) -> TransferMessage:
    envelope = TransferEnvelope(message_id=uuid.uuid4(), sent_at=START, body=body)
    return decode_transfer(encode_transfer(envelope)).body


def endorse(
    owner: KeyOwner,
    holder: DigitalKeyHolder,
    share_id: uuid.UUID,
    *,
    lock_id: str = LOCK_ID,
    rights: tuple[str, ...] = ("unlock", "lock"),
    not_before: datetime = START - timedelta(hours=1),
    not_after: datetime = START + timedelta(days=3),
) -> Endorsement:
    request = holder.signing_request(share_id)
    return owner.endorse(
        request, lock_id=lock_id, rights=rights, not_before=not_before, not_after=not_after
    )


@pytest.fixture
def flow() -> KeyFlow:
    share_id = uuid.uuid4()
    owner = KeyOwner.generate()

    # Receiver: a new key on this device, and a request for the owner to endorse it.
    holder = DigitalKeyHolder.generate()
    request = through_the_wire(holder.signing_request(share_id))
    assert isinstance(request, KeySigningRequest)

    # Owner: check the proof of possession and sign the key for the lock.
    endorsement = owner.endorse(
        request,
        lock_id=LOCK_ID,
        rights=("unlock", "lock"),
        not_before=START - timedelta(hours=1),
        not_after=START + timedelta(days=3),
    )
    reply = through_the_wire(KeyImportRequest(share_id=share_id, endorsement=endorsement))
    assert isinstance(reply, KeyImportRequest)

    # Receiver: the endorsement is for this key and this share, and the owner signed it.
    holder.check_endorsement(reply.endorsement, share_id)
    return KeyFlow(share_id, holder, owner, reply.endorsement)


def unlock_once(flow: KeyFlow, lock: ReferenceLock) -> None:
    challenge = lock.challenge()
    lock.unlock(flow.endorsement, flow.holder.respond(challenge, LOCK_ID))


# -- the whole flow --------------------------------------------------------------------------


def test_full_stateful_flow_opens_the_lock(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    response = flow.holder.respond(challenge, LOCK_ID)
    lock.unlock(flow.endorsement, response)


def test_holder_key_survives_storage_as_pem(flow: KeyFlow) -> None:
    pem = flow.holder.private_key_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    restored = DigitalKeyHolder.from_private_key_pem(pem)
    assert restored.public_key_der == flow.holder.public_key_der
    lock = flow.lock()
    challenge = lock.challenge()
    lock.unlock(flow.endorsement, restored.respond(challenge, LOCK_ID))


def test_encrypted_pem_needs_its_password(flow: KeyFlow) -> None:
    pem = flow.holder.private_key_pem(password=b"correct horse")
    assert b"ENCRYPTED" in pem
    restored = DigitalKeyHolder.from_private_key_pem(pem, password=b"correct horse")
    assert restored.public_key_der == flow.holder.public_key_der
    with pytest.raises(CredentialError, match="password is wrong or missing"):
        DigitalKeyHolder.from_private_key_pem(pem, password=b"wrong")
    with pytest.raises(CredentialError, match="password is wrong or missing"):
        DigitalKeyHolder.from_private_key_pem(pem)


def test_owner_key_survives_storage_as_pem(flow: KeyFlow) -> None:
    restored = KeyOwner.from_private_key_pem(flow.owner.private_key_pem())
    assert restored.public_key_der == flow.owner.public_key_der


def test_keys_on_other_curves_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CredentialError, match="P-256"):
        DigitalKeyHolder(p384)
    with pytest.raises(CredentialError, match="P-256"):
        KeyOwner(p384)
    with pytest.raises(CredentialError, match="cannot set up lock"):
        ReferenceLock(LOCK_ID, p384.public_key())


# -- the key signing request's proof of possession --------------------------------------------


def test_request_proves_possession_for_this_share_and_nonce() -> None:
    owner = KeyOwner.generate()
    holder = DigitalKeyHolder.generate()
    request = holder.signing_request(uuid.uuid4(), nonce=b"n" * 16)
    owner.verify_request(request)
    assert request.nonce == b"n" * 16
    assert request.public_key == holder.public_key_der


def test_request_with_another_keys_attestation_is_refused() -> None:
    owner = KeyOwner.generate()
    share_id = uuid.uuid4()
    honest = DigitalKeyHolder.generate().signing_request(share_id)
    other = DigitalKeyHolder.generate().signing_request(share_id, nonce=honest.nonce)
    forged = honest.model_copy(update={"public_key": other.public_key})
    with pytest.raises(CredentialError, match="does not prove possession"):
        owner.verify_request(forged)
    with pytest.raises(CredentialError, match="does not prove possession"):
        owner.endorse(
            forged,
            lock_id=LOCK_ID,
            rights=("unlock",),
            not_before=START,
            not_after=START + timedelta(days=1),
        )


def test_request_replayed_into_another_share_is_refused() -> None:
    owner = KeyOwner.generate()
    request = DigitalKeyHolder.generate().signing_request(uuid.uuid4())
    with pytest.raises(CredentialError, match="does not prove possession"):
        owner.verify_request(request.model_copy(update={"share_id": uuid.uuid4()}))
    with pytest.raises(CredentialError, match="does not prove possession"):
        owner.verify_request(request.model_copy(update={"nonce": secrets.token_bytes(32)}))


@pytest.mark.parametrize(
    ("terms", "reason"),
    [
        ({"rights": ()}, "rights"),
        ({"rights": ("unlock", "unlock")}, "more than once"),
        ({"lock_id": "bad lock id"}, "lock id"),
        ({"not_after": START - timedelta(days=2)}, "not_after must be later"),
        ({"not_before": datetime(2030, 5, 1)}, "timezone"),  # naive on purpose
    ],
)
def test_owner_refuses_to_sign_invalid_terms(terms: dict[str, object], reason: str) -> None:
    owner = KeyOwner.generate()
    holder = DigitalKeyHolder.generate()
    with pytest.raises(CredentialError, match=reason):
        endorse(owner, holder, uuid.uuid4(), **terms)  # type: ignore[arg-type]


def test_endorsements_get_distinct_serials() -> None:
    owner = KeyOwner.generate()
    holder = DigitalKeyHolder.generate()
    serials = {endorse(owner, holder, uuid.uuid4()).serial for _ in range(20)}
    assert len(serials) == 20


# -- the receiver's check of the endorsement ------------------------------------------------------


def test_holder_refuses_endorsement_of_another_key(flow: KeyFlow) -> None:
    stranger = DigitalKeyHolder.generate()
    with pytest.raises(EndorsementRejected, match="for another key than this device's"):
        stranger.check_endorsement(flow.endorsement, flow.share_id)


def test_holder_refuses_endorsement_for_another_share(flow: KeyFlow) -> None:
    with pytest.raises(EndorsementRejected, match=r"is for share .*, not "):
        flow.holder.check_endorsement(flow.endorsement, uuid.uuid4())


def test_holder_refuses_altered_endorsement(flow: KeyFlow) -> None:
    widened = flow.endorsement.model_copy(update={"rights": ("unlock", "lock", "start_engine")})
    with pytest.raises(EndorsementRejected, match=r"owner signature .* does not verify"):
        flow.holder.check_endorsement(widened, flow.share_id)


def test_holder_can_insist_on_a_known_owner(flow: KeyFlow) -> None:
    flow.holder.check_endorsement(flow.endorsement, flow.share_id, flow.owner.public_key)
    with pytest.raises(EndorsementRejected, match="made by another owner key"):
        flow.holder.check_endorsement(
            flow.endorsement, flow.share_id, KeyOwner.generate().public_key_der
        )


def test_verify_endorsement_accepts_key_object_or_der(flow: KeyFlow) -> None:
    verify_endorsement(flow.endorsement, flow.owner.public_key)
    verify_endorsement(flow.endorsement, flow.owner.public_key_der)
    with pytest.raises(CredentialError, match="unusable owner public key"):
        verify_endorsement(flow.endorsement, b"not a key")


# -- the lock: what opens it and what does not -------------------------------------------------


def test_lock_refuses_endorsement_by_another_owner(flow: KeyFlow) -> None:
    impostor = KeyOwner.generate()
    foreign = endorse(impostor, flow.holder, flow.share_id)
    lock = flow.lock()
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match="made by another owner key"):
        lock.unlock(foreign, flow.holder.respond(challenge, LOCK_ID))


def test_lock_refuses_endorsement_that_claims_its_owner_but_is_signed_by_another(
    flow: KeyFlow,
) -> None:
    impostor = KeyOwner.generate()
    forged = endorse(impostor, flow.holder, flow.share_id).model_copy(
        update={"owner_public_key": flow.owner.public_key_der}
    )
    lock = flow.lock()
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match=r"owner signature .* does not verify"):
        lock.unlock(forged, flow.holder.respond(challenge, LOCK_ID))


def test_lock_refuses_expired_endorsement(flow: KeyFlow) -> None:
    lock = flow.lock()
    flow.clock.advance(timedelta(days=3))  # exactly not_after: no longer valid
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match="endorsement expired at 2030-05-04T12:00"):
        lock.unlock(flow.endorsement, flow.holder.respond(challenge, LOCK_ID))


def test_lock_refuses_endorsement_not_yet_valid(flow: KeyFlow) -> None:
    later = endorse(
        flow.owner,
        flow.holder,
        flow.share_id,
        not_before=START + timedelta(hours=2),
        not_after=START + timedelta(days=1),
    )
    lock = flow.lock()
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match="not valid before 2030-05-01T14:00"):
        lock.unlock(later, flow.holder.respond(challenge, LOCK_ID))


def test_lock_opens_exactly_from_not_before(flow: KeyFlow) -> None:
    lock = flow.lock()
    flow.clock.now = flow.endorsement.not_before
    unlock_once(flow, lock)


def test_lock_refuses_endorsement_for_another_lock(flow: KeyFlow) -> None:
    other_lock = ReferenceLock("garage-8", flow.owner.public_key, clock=flow.clock)
    challenge = other_lock.challenge()
    with pytest.raises(EndorsementRejected, match="for lock 'garage-7', not 'garage-8'"):
        other_lock.unlock(flow.endorsement, flow.holder.respond(challenge, "garage-8"))


def test_lock_refuses_replayed_challenge(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    response = flow.holder.respond(challenge, LOCK_ID)
    lock.unlock(flow.endorsement, response)
    with pytest.raises(EndorsementRejected, match="already used"):
        lock.unlock(flow.endorsement, response)


def test_lock_refuses_unknown_challenge(flow: KeyFlow) -> None:
    lock = flow.lock()
    lock.challenge()
    response = flow.holder.respond(secrets.token_bytes(32), LOCK_ID)
    with pytest.raises(EndorsementRejected, match="not issued by this lock"):
        lock.unlock(flow.endorsement, response)


def test_lock_refuses_challenge_of_another_lock(flow: KeyFlow) -> None:
    twin = flow.lock()
    challenge = twin.challenge()
    with pytest.raises(EndorsementRejected, match="not issued by this lock"):
        flow.lock().unlock(flow.endorsement, flow.holder.respond(challenge, LOCK_ID))


def test_lock_refuses_expired_challenge(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    flow.clock.advance(DEFAULT_CHALLENGE_LIFETIME)
    with pytest.raises(EndorsementRejected, match="challenge expired at"):
        lock.unlock(flow.endorsement, flow.holder.respond(challenge, LOCK_ID))


def test_lock_accepts_challenge_just_inside_its_lifetime(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    flow.clock.advance(DEFAULT_CHALLENGE_LIFETIME - timedelta(milliseconds=1))
    lock.unlock(flow.endorsement, flow.holder.respond(challenge, LOCK_ID))


def test_lock_refuses_rights_without_unlock(flow: KeyFlow) -> None:
    lock_only = endorse(flow.owner, flow.holder, flow.share_id, rights=("lock", "open_trunk"))
    lock = flow.lock()
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match=r"does not grant 'unlock' .*lock, open_trunk"):
        lock.unlock(lock_only, flow.holder.respond(challenge, LOCK_ID))


def test_lock_refuses_response_by_another_key(flow: KeyFlow) -> None:
    thief = DigitalKeyHolder.generate()
    lock = flow.lock()
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match="not signed by the endorsed key"):
        lock.unlock(flow.endorsement, thief.respond(challenge, LOCK_ID))


def test_lock_refuses_response_bound_to_another_lock(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    with pytest.raises(EndorsementRejected, match="not signed by the endorsed key"):
        lock.unlock(flow.endorsement, flow.holder.respond(challenge, "garage-8"))


def test_lock_refuses_tampered_response_signature(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    genuine = flow.holder.respond(challenge, LOCK_ID)
    other = flow.holder.respond(lock.challenge(), LOCK_ID)
    spliced = ChallengeResponse(challenge=challenge, signature=other.signature)
    assert spliced.signature != genuine.signature
    with pytest.raises(EndorsementRejected, match="not signed by the endorsed key"):
        lock.unlock(flow.endorsement, spliced)


def test_a_refused_attempt_spends_its_challenge(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenge = lock.challenge()
    thief = DigitalKeyHolder.generate()
    with pytest.raises(EndorsementRejected, match="not signed by the endorsed key"):
        lock.unlock(flow.endorsement, thief.respond(challenge, LOCK_ID))
    with pytest.raises(EndorsementRejected, match="already used"):
        lock.unlock(flow.endorsement, flow.holder.respond(challenge, LOCK_ID))


def test_challenges_are_fresh_random_bytes(flow: KeyFlow) -> None:
    lock = flow.lock()
    challenges = {lock.challenge() for _ in range(50)}
    assert len(challenges) == 50
    assert all(len(c) == 32 for c in challenges)


def test_lock_remembers_a_bounded_number_of_challenges(flow: KeyFlow) -> None:
    lock = flow.lock()
    first = lock.challenge()
    for _ in range(MAX_REMEMBERED_CHALLENGES):
        lock.challenge()
    with pytest.raises(EndorsementRejected, match="not issued by this lock"):
        lock.unlock(flow.endorsement, flow.holder.respond(first, LOCK_ID))
    unlock_once(flow, lock)


def test_lock_id_is_checked_at_setup(flow: KeyFlow) -> None:
    with pytest.raises(CredentialError, match="a lock id is 1-64 characters"):
        ReferenceLock("no spaces allowed", flow.owner.public_key)
    assert ReferenceLock("site-1:door.2_b", flow.owner.public_key).lock_id == "site-1:door.2_b"


def test_respond_refuses_a_challenge_of_wrong_size(flow: KeyFlow) -> None:
    with pytest.raises(CredentialError, match=r"challenge: .*fewer than the minimum of 16"):
        flow.holder.respond(b"short", LOCK_ID)


def test_lock_logs_no_key_material(flow: KeyFlow, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="tigress_signal.credentials")
    lock = flow.lock()
    unlock_once(flow, lock)
    thief = DigitalKeyHolder.generate()
    with pytest.raises(EndorsementRejected):
        lock.unlock(flow.endorsement, thief.respond(lock.challenge(), LOCK_ID))
    assert "opened for endorsement" in caplog.text
    assert "stayed shut" in caplog.text
    assert flow.holder.private_key_pem().decode() not in caplog.text
    assert flow.endorsement.signature.hex() not in caplog.text
