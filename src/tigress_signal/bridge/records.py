"""libsignal records as the wallet stores them, and the changes a sidecar call makes to them.

The wallet's SQLite file owns every libsignal record; the sidecar only caches them. A sidecar
call that changes records returns :class:`RecordChange` values, which the caller writes in the
same transaction as the message's effect. When the sidecar needs a record it does not hold, it
asks a :class:`RecordSource` (the wallet store) for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

RecordKind = Literal[
    "session",  # key "<name>.<deviceId>": SessionRecord
    "identity",  # key "<name>": the peer's identity public key (33 bytes)
    "verified_identity",  # key "<name>": the key the user confirmed with `trust` (wallet-written)
    "prekey",  # key "<id>": one-time EC PreKeyRecord
    "signed_prekey",  # key "<id>": SignedPreKeyRecord
    "kyber_prekey",  # key "<id>": KyberPreKeyRecord, one-time or last resort
    "kyber_used",  # key "<kyberId>:<signedPreKeyId>:<base64 base key>": a last-resort use seen
]

RECORD_KINDS: frozenset[str] = frozenset(get_args(RecordKind))


@dataclass(frozen=True, slots=True)
class RecordChange:
    """One record written or deleted by a libsignal operation.

    Attributes:
        kind: which store the record belongs to.
        key: the record's key within that store.
        value: the serialized record, or None when the operation deleted it.
    """

    kind: RecordKind
    key: str
    value: bytes | None


@dataclass(frozen=True, slots=True)
class IdentityChanged:
    """A peer's identity key was replaced by a different one during an operation.

    Attributes:
        peer: the peer's account id (protocol address name).
    """

    peer: str


class RecordSource(Protocol):
    """Where the sidecar's missing records come from: the durable wallet store."""

    def load_record(self, kind: RecordKind, key: str) -> bytes | None:
        """Return the stored record, or None when there is none."""
        ...
