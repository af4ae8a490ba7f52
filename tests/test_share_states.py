"""The share state machine's transition rules."""

from __future__ import annotations

import pytest

from tigress_signal.errors import InvalidTransition
from tigress_signal.shares.states import ShareState, next_state

S = ShareState


@pytest.mark.parametrize(
    ("role", "flow", "state", "event", "expected"),
    [
        ("sender", "stateless", S.OFFERED, "accepted", S.ACCEPTED),
        ("sender", "stateless", S.OFFERED, "declined", S.DECLINED),
        ("sender", "stateful", S.OFFERED, "key_signing_request", S.ENDORSED),
        ("sender", "stateful", S.ENDORSED, "accepted", S.ACCEPTED),
        ("receiver", "stateless", S.OFFERED, "user:accept", S.ACCEPTED),
        ("receiver", "stateful", S.OFFERED, "user:accept", S.KEY_REQUESTED),
        ("receiver", "stateful", S.KEY_REQUESTED, "key_import_request", S.ACCEPTED),
        ("receiver", "stateful", S.OFFERED, "user:decline", S.DECLINED),
        ("receiver", "stateful", S.KEY_REQUESTED, "cancelled", S.CANCELLED),
        ("sender", "stateful", S.ENDORSED, "user:cancel", S.CANCELLED),
        # Another device of the receiver's account answered first.
        ("receiver", "stateless", S.OFFERED, "taken", S.TAKEN),
        ("receiver", "stateless", S.ACCEPTED, "taken", S.TAKEN),
        ("receiver", "stateful", S.KEY_REQUESTED, "taken", S.TAKEN),
        ("receiver", "stateful", S.DECLINED, "taken", S.TAKEN),
    ],
)
def test_allowed_transitions(role, flow, state, event, expected):
    assert next_state(role, flow, state, event) is expected


@pytest.mark.parametrize(
    ("role", "flow", "state", "event"),
    [
        # A second key signing request must not be endorsed: a share is redeemed at most once.
        ("sender", "stateful", S.ENDORSED, "key_signing_request"),
        # Acceptance before the endorsement is out of order.
        ("sender", "stateful", S.OFFERED, "accepted"),
        # A stateless share has no key signing step.
        ("sender", "stateless", S.OFFERED, "key_signing_request"),
        # The receiver cannot import a key it never asked for.
        ("receiver", "stateful", S.OFFERED, "key_import_request"),
        # Nothing moves a finished share, not even a cancel.
        ("sender", "stateless", S.ACCEPTED, "accepted"),
        ("receiver", "stateless", S.ACCEPTED, "cancelled"),
        ("sender", "stateful", S.DECLINED, "user:cancel"),
        # A sender cannot accept its own offer.
        ("sender", "stateless", S.OFFERED, "user:accept"),
        # Only a receiver's copy can be taken, and a key this device imported stays.
        ("sender", "stateless", S.OFFERED, "taken"),
        ("receiver", "stateful", S.ACCEPTED, "taken"),
        ("receiver", "stateless", S.CANCELLED, "taken"),
    ],
)
def test_refused_transitions(role, flow, state, event):
    with pytest.raises(InvalidTransition, match=state.value):
        next_state(role, flow, state, event)


def test_final_states():
    assert {s for s in ShareState if s.is_final} == {
        S.ACCEPTED,
        S.DECLINED,
        S.CANCELLED,
        S.EXPIRED,
        S.TAKEN,
    }
