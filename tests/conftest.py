"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import pytest

from tigress_signal.bridge.libsignal import (
    GeneratedIdentity,
    KyberPreKey,
    LibsignalBridge,
    PreKey,
    PreKeyBundle,
    ProtocolAddress,
    SignedPreKey,
    TrustPolicy,
)
from tigress_signal.bridge.records import RecordChange, RecordKind

# -- libsignal bridge ------------------------------------------------------------------------

BRIDGE_LAST_RESORT_KYBER_ID = 1000


class BridgeMemoryRecords:
    """An in-memory RecordSource that remembers which records the sidecar asked for."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}
        self.loads: list[tuple[str, str]] = []

    def load_record(self, kind: RecordKind, key: str) -> bytes | None:
        self.loads.append((kind, key))
        return self.records.get((kind, key))

    def apply(self, changes: Iterable[RecordChange]) -> None:
        for change in changes:
            if change.value is None:
                self.records.pop((change.kind, change.key), None)
            else:
                self.records[(change.kind, change.key)] = change.value

    def get(self, kind: str, key: str) -> bytes | None:
        return self.records.get((kind, key))


@dataclass
class BridgeWallet:
    """One party of a bridge test: its sidecar, its records and its published keys."""

    name: str
    bridge: LibsignalBridge
    records: BridgeMemoryRecords
    identity: GeneratedIdentity
    signed_prekey: SignedPreKey
    last_resort: KyberPreKey
    prekeys: list[PreKey] = field(default_factory=list)
    pq_prekeys: list[KyberPreKey] = field(default_factory=list)

    @property
    def address(self) -> ProtocolAddress:
        return ProtocolAddress(self.name, 1)

    def bundle(self, *, one_time: bool = True, one_time_kyber: bool = True) -> PreKeyBundle:
        """A bundle as the server would hand it out, taking one-time keys off the lists."""
        prekey = self.prekeys.pop(0).public() if one_time else None
        pq = self.pq_prekeys.pop(0) if one_time_kyber else self.last_resort
        return PreKeyBundle(
            registration_id=self.identity.registration_id,
            device_id=1,
            identity_key=self.identity.public_key,
            signed_prekey=self.signed_prekey.public(),
            pq_prekey=pq.public(),
            prekey=prekey,
        )


BridgeWalletFactory = Callable[..., Awaitable[BridgeWallet]]


@pytest.fixture
async def bridge_wallets() -> AsyncIterator[BridgeWalletFactory]:
    """A factory of opened bridge wallets with prekeys in their records; closes them after."""
    opened: list[LibsignalBridge] = []

    async def make(
        name: str,
        *,
        trust_policy: TrustPolicy = "tofu",
        prekeys: int = 3,
        records: BridgeMemoryRecords | None = None,
    ) -> BridgeWallet:
        records = records if records is not None else BridgeMemoryRecords()
        bridge = LibsignalBridge(records)
        opened.append(bridge)
        await bridge.start()
        identity = await bridge.generate_identity()
        await bridge.open(
            identity.identity_key_pair,
            identity.registration_id,
            ProtocolAddress(name, 1),
            trust_policy=trust_policy,
            last_resort_kyber_ids=[BRIDGE_LAST_RESORT_KYBER_ID],
        )
        signed = await bridge.generate_signed_prekey(1)
        (last_resort,) = await bridge.generate_kyber_prekeys(BRIDGE_LAST_RESORT_KYBER_ID, 1)
        one_time = list(await bridge.generate_prekeys(1, prekeys))
        pq = list(await bridge.generate_kyber_prekeys(1, prekeys))
        records.apply(
            [RecordChange("signed_prekey", "1", signed.record)]
            + [RecordChange("kyber_prekey", str(last_resort.key_id), last_resort.record)]
            + [RecordChange("prekey", str(k.key_id), k.record) for k in one_time]
            + [RecordChange("kyber_prekey", str(k.key_id), k.record) for k in pq]
        )
        return BridgeWallet(name, bridge, records, identity, signed, last_resort, one_time, pq)

    yield make
    for bridge in opened:
        await bridge.aclose()
