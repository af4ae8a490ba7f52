"""The share state machine: which message or action may move a share from which state.

A share is keyed by the share id the sender chose and lives in both wallets. The two flows:

* stateless: sender ``Offer(provisioning)``; receiver accepts (stores the credential and answers
  ``Accepted``) or declines (``Declined``).
* stateful: sender ``Offer``; receiver accepts by sending a ``KeySigningRequest`` for a key its
  device made; sender answers with a ``KeyImportRequest`` carrying the endorsement; receiver
  stores the key and answers ``Accepted``.

Either side may cancel a share that has not ended. A share is redeemed at most once: the sender
endorses only the first key signing request, and the receiver stores at most one credential per
share (the database enforces it too).

A receiving account may have several devices, and every one of them gets the offer. The sender
honours only the first device that answers and tells the others with ``Taken`` (or, in the
stateful flow, with a ``KeyImportRequest`` naming the winning device); each of them then moves
its copy of the share to ``taken`` (event ``"taken"``), dropping anything it stored for it.
"""

from __future__ import annotations

import enum
from typing import Literal

from tigress_signal.errors import InvalidTransition

Role = Literal["sender", "receiver"]
Flow = Literal["stateless", "stateful"]


class ShareState(enum.StrEnum):
    """Where a share stands, on either side."""

    OFFERED = "offered"
    """Sender: offer sent. Receiver: offer received, waiting for the user."""
    KEY_REQUESTED = "key_requested"
    """Receiver: key signing request sent, waiting for the endorsement."""
    ENDORSED = "endorsed"
    """Sender: endorsement sent, waiting for the receiver's acceptance."""
    ACCEPTED = "accepted"
    """The credential is in the receiver's wallet (final)."""
    DECLINED = "declined"
    """The receiver said no (final)."""
    CANCELLED = "cancelled"
    """One side withdrew (final)."""
    EXPIRED = "expired"
    """The share's expiry passed before it completed (final)."""
    TAKEN = "taken"
    """Receiver: another device of this account answered first; nothing is kept here (final)."""

    @property
    def is_final(self) -> bool:
        """Whether no message can move the share any more."""
        return self in _FINAL


_FINAL = frozenset(
    {
        ShareState.ACCEPTED,
        ShareState.DECLINED,
        ShareState.CANCELLED,
        ShareState.EXPIRED,
        ShareState.TAKEN,
    }
)

# (role, flow, state, event) -> next state. Events are transfer message types received from the
# peer, or "user:<action>" for what this wallet's user does.
_TRANSITIONS: dict[tuple[Role, Flow, ShareState, str], ShareState] = {
    # sender, stateless
    ("sender", "stateless", ShareState.OFFERED, "accepted"): ShareState.ACCEPTED,
    ("sender", "stateless", ShareState.OFFERED, "declined"): ShareState.DECLINED,
    # sender, stateful
    ("sender", "stateful", ShareState.OFFERED, "key_signing_request"): ShareState.ENDORSED,
    ("sender", "stateful", ShareState.OFFERED, "declined"): ShareState.DECLINED,
    ("sender", "stateful", ShareState.ENDORSED, "accepted"): ShareState.ACCEPTED,
    ("sender", "stateful", ShareState.ENDORSED, "declined"): ShareState.DECLINED,
    # receiver, stateless
    ("receiver", "stateless", ShareState.OFFERED, "user:accept"): ShareState.ACCEPTED,
    ("receiver", "stateless", ShareState.OFFERED, "user:decline"): ShareState.DECLINED,
    # receiver, stateful
    ("receiver", "stateful", ShareState.OFFERED, "user:accept"): ShareState.KEY_REQUESTED,
    ("receiver", "stateful", ShareState.OFFERED, "user:decline"): ShareState.DECLINED,
    ("receiver", "stateful", ShareState.KEY_REQUESTED, "key_import_request"): ShareState.ACCEPTED,
    # receiver, another device of the account answered first. A device that had already
    # answered locally (accepted a stateless share, asked for a key, declined) lost the race.
    ("receiver", "stateless", ShareState.OFFERED, "taken"): ShareState.TAKEN,
    ("receiver", "stateless", ShareState.ACCEPTED, "taken"): ShareState.TAKEN,
    ("receiver", "stateless", ShareState.DECLINED, "taken"): ShareState.TAKEN,
    ("receiver", "stateful", ShareState.OFFERED, "taken"): ShareState.TAKEN,
    ("receiver", "stateful", ShareState.KEY_REQUESTED, "taken"): ShareState.TAKEN,
    ("receiver", "stateful", ShareState.DECLINED, "taken"): ShareState.TAKEN,
}


def next_state(role: Role, flow: Flow, state: ShareState, event: str) -> ShareState:
    """The state a share moves to on ``event``.

    Args:
        role: this wallet's role in the share.
        flow: the share's flow.
        state: the share's current state.
        event: a received message type (``"accepted"``, ``"key_signing_request"``, ...) or a
            user action (``"user:accept"``, ``"user:decline"``, ``"user:cancel"``), or
            ``"cancelled"`` when the peer cancels, ``"taken"`` when another device of this
            account answered first.

    Raises:
        InvalidTransition: the event does not fit the share's state.
    """
    if event in ("cancelled", "user:cancel") and not state.is_final:
        return ShareState.CANCELLED
    try:
        return _TRANSITIONS[(role, flow, state, event)]
    except KeyError:
        if state is ShareState.TAKEN:
            raise InvalidTransition(
                f"the share is {state.value!r}: another device of this account answered it first"
            ) from None
        if state.is_final:
            what = (
                f"{event.removeprefix('user:')!r} is no longer possible"
                if event.startswith("user:")
                else f"the message {event!r} changes nothing"
            )
            raise InvalidTransition(f"the share is already {state.value!r}: {what}") from None
        raise InvalidTransition(
            f"a {flow} share in state {state.value!r} on the {role} side does not accept"
            f" {event.removeprefix('user:')!r}"
        ) from None
