"""Message throughput through the Python API against libsignal alone.

One operation is one message: the sender encrypts a payload and the receiver decrypts it, the
direction alternating so the ratchet takes a DH step every time. Three measurements per run:

* raw: ``bridge/bench_raw.mjs``, libsignal in one Node process with in-memory stores;
* Python, 1 conversation: two wallets, each with its own sidecar and its own SQLite wallet store
  (WAL); every encrypt and every decrypt commits its record changes in one transaction before the
  next step, exactly as a wallet does;
* Python, N conversations: the same two wallets run N conversations (different peers) at once,
  so each sidecar has calls for several peers in flight;
* diagnostic: Python, 1 conversation, records kept in memory instead of SQLite, to show how much
  of the gap is the durable commits and how much the round trips to the sidecars.

The headline ratio is the like-for-like one: Python with 1 conversation over raw libsignal,
which also runs one conversation, each step waiting for the previous one.

Each measurement also reports the CPU time it used per operation, summed over every process
involved (raw: the one Node process; Python: this process and both sidecars). The raw baseline
runs on one core; the Python cases spread over three processes, so the N-conversation case can
keep both cores of a 2-vCPU machine busy. Its throughput ratio therefore compares two cores with
one, while the CPU ratio (raw CPU per operation over Python CPU per operation) compares the work
each needs per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tigress_signal.bridge.libsignal import (
    LibsignalBridge,
    PreKeyBundle,
    ProtocolAddress,
    locate_sidecar,
)
from tigress_signal.bridge.records import RecordChange, RecordKind
from tigress_signal.wallet.store import WalletStore

LAST_RESORT_KYBER_ID = 0xFFFFFF
TARGET_RATIO = 0.75


@dataclass(frozen=True)
class Settings:
    """What to measure and for how long."""

    runs: int = 5
    seconds: float = 3.0
    warmup: float = 0.5
    payload: int = 1024
    conversations: int = 8


@dataclass
class RunResult:
    """Operations per second of one run, for each measurement, and CPU microseconds per
    operation (all processes of the measurement; None where the platform does not tell)."""

    raw: float
    sequential: float
    concurrent: float
    in_memory: float
    raw_cpu: float | None = None
    sequential_cpu: float | None = None
    concurrent_cpu: float | None = None
    in_memory_cpu: float | None = None


@dataclass(frozen=True)
class Measured:
    """One measurement: operations per second and CPU microseconds per operation."""

    ops_per_sec: float
    cpu_per_op: float | None


class Store(Protocol):
    """The part of the wallet store the benchmark uses."""

    def load_record(self, kind: RecordKind, key: str) -> bytes | None: ...

    def transaction(self) -> contextlib.AbstractContextManager[Any]: ...

    def apply_changes(self, conn: Any, changes: Iterable[RecordChange]) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Records in a dict: the diagnostic run without durable commits."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}

    def load_record(self, kind: RecordKind, key: str) -> bytes | None:
        return self.records.get((kind, key))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[object]:
        yield None

    def apply_changes(self, conn: Any, changes: Iterable[RecordChange]) -> None:
        for change in changes:
            if change.value is None:
                self.records.pop((change.kind, change.key), None)
            else:
                self.records[(change.kind, change.key)] = change.value

    def close(self) -> None:
        pass


@dataclass
class Party:
    """One wallet: its sidecar and its store."""

    name: str
    bridge: LibsignalBridge
    store: Store
    identity_key: bytes
    bundles: list[PreKeyBundle]

    def commit(self, changes: tuple[RecordChange, ...]) -> None:
        with self.store.transaction() as conn:
            self.store.apply_changes(conn, changes)


def run_raw(settings: Settings) -> Measured:
    """Run the Node baseline once; return its operations per second and CPU per operation."""
    script = locate_sidecar().parent / "bench_raw.mjs"
    node = os.environ.get("TIGRESS_SIGNAL_NODE", "node")
    output = subprocess.run(
        [
            node,
            str(script),
            "--seconds",
            str(settings.seconds),
            "--warmup",
            str(settings.warmup),
            "--payload",
            str(settings.payload),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    answer = json.loads(output)
    cpu = answer.get("cpuMicrosPerOp")
    return Measured(float(answer["opsPerSec"]), None if cpu is None else float(cpu))


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of another process so far (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def make_party(folder: Path | None, name: str, conversations: int) -> Party:
    """A wallet with a sidecar, an identity and one-time keys for every conversation.

    With ``folder`` None the records stay in memory.
    """
    store: Store = MemoryStore() if folder is None else WalletStore.open(folder / name)
    bridge = LibsignalBridge(record_source=store)
    await bridge.start()
    identity = await bridge.generate_identity()
    await bridge.open(
        identity.identity_key_pair,
        identity.registration_id,
        ProtocolAddress(name, 1),
        last_resort_kyber_ids=[LAST_RESORT_KYBER_ID],
    )
    signed = await bridge.generate_signed_prekey(1)
    (last_resort,) = await bridge.generate_kyber_prekeys(LAST_RESORT_KYBER_ID, 1)
    prekeys = await bridge.generate_prekeys(1, conversations)
    pq_prekeys = await bridge.generate_kyber_prekeys(1, conversations)
    with store.transaction() as conn:
        store.apply_changes(
            conn,
            [RecordChange("signed_prekey", "1", signed.record)]
            + [RecordChange("kyber_prekey", str(LAST_RESORT_KYBER_ID), last_resort.record)]
            + [RecordChange("prekey", str(k.key_id), k.record) for k in prekeys]
            + [RecordChange("kyber_prekey", str(k.key_id), k.record) for k in pq_prekeys],
        )
    bundles = [
        PreKeyBundle(
            registration_id=identity.registration_id,
            device_id=1,
            identity_key=identity.public_key,
            signed_prekey=signed.public(),
            pq_prekey=pq.public(),
            prekey=ec.public(),
        )
        for ec, pq in zip(prekeys, pq_prekeys, strict=True)
    ]
    return Party(name, bridge, store, identity.public_key, bundles)


async def exchange(sender: Party, receiver: Party, conversation: int, payload: bytes) -> None:
    """One operation: encrypt, commit, decrypt, commit."""
    encrypted = await sender.bridge.encrypt(
        ProtocolAddress(f"{receiver.name}-{conversation}"), payload
    )
    sender.commit(encrypted.changes)
    decrypted = await receiver.bridge.decrypt(
        ProtocolAddress(f"{sender.name}-{conversation}"),
        encrypted.message_type,
        encrypted.ciphertext,
    )
    receiver.commit(decrypted.changes)
    if len(decrypted.plaintext) != len(payload):
        raise RuntimeError("the round trip changed the payload")


class Conversations:
    """Two wallets and the conversations between them, set up once and measured many times."""

    def __init__(self, alice: Party, bob: Party, count: int, payload: bytes) -> None:
        self.alice = alice
        self.bob = bob
        self.count = count
        self.payload = payload
        self.sent = [0] * count

    @classmethod
    async def start(cls, folder: Path | None, count: int, payload: bytes) -> Conversations:
        alice = await make_party(folder, "alice", count)
        bob = await make_party(folder, "bob", count)
        # Conversation i is between peers "alice-i" and "bob-i": different peers for each
        # sidecar, all served by the same two wallets.
        for i in range(count):
            result = await alice.bridge.process_prekey_bundle(
                ProtocolAddress(f"bob-{i}"), bob.bundles[i]
            )
            alice.commit(result.changes)
            await exchange(alice, bob, i, payload)
            await exchange(bob, alice, i, payload)
        return cls(alice, bob, count, payload)

    async def converse(self, conversation: int, until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            if self.sent[conversation] % 2 == 0:
                await exchange(self.alice, self.bob, conversation, self.payload)
            else:
                await exchange(self.bob, self.alice, conversation, self.payload)
            self.sent[conversation] += 1
            done += 1
        return done

    def cpu_seconds(self) -> float | None:
        """CPU seconds used so far by this process and both sidecars, if the platform tells."""
        total = time.process_time()
        for party in (self.alice, self.bob):
            pid = party.bridge.pid
            used = None if pid is None else process_cpu_seconds(pid)
            if used is None:
                return None
            total += used
        return total

    async def measure(self, seconds: float, warmup: float, parallel: int) -> Measured:
        """Operations per second with ``parallel`` conversations in flight at once."""
        await asyncio.gather(
            *(self.converse(i, time.perf_counter() + warmup) for i in range(parallel))
        )
        cpu_before = self.cpu_seconds()
        started = time.perf_counter()
        until = started + seconds
        counts = await asyncio.gather(*(self.converse(i, until) for i in range(parallel)))
        elapsed = time.perf_counter() - started
        cpu_after = self.cpu_seconds()
        ops = sum(counts)
        cpu = None
        if cpu_before is not None and cpu_after is not None and ops:
            cpu = (cpu_after - cpu_before) / ops * 1e6
        return Measured(ops / elapsed, cpu)

    async def aclose(self) -> None:
        for party in (self.alice, self.bob):
            await party.bridge.aclose()
            party.store.close()


async def run(settings: Settings) -> list[RunResult]:
    """All runs; prints a progress line after each."""
    payload = os.urandom(settings.payload)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="tigress-bench-") as tmp:
        conversations = await Conversations.start(Path(tmp), settings.conversations, payload)
        in_memory = await Conversations.start(None, 1, payload)
        try:
            for n in range(1, settings.runs + 1):
                raw = await asyncio.to_thread(run_raw, settings)
                sequential = await conversations.measure(settings.seconds, settings.warmup, 1)
                concurrent = await conversations.measure(
                    settings.seconds, settings.warmup, settings.conversations
                )
                memory = await in_memory.measure(settings.seconds, settings.warmup, 1)
                results.append(
                    RunResult(
                        raw.ops_per_sec,
                        sequential.ops_per_sec,
                        concurrent.ops_per_sec,
                        memory.ops_per_sec,
                        raw.cpu_per_op,
                        sequential.cpu_per_op,
                        concurrent.cpu_per_op,
                        memory.cpu_per_op,
                    )
                )
                print(
                    f"[bench] run {n}/{settings.runs}: raw {raw.ops_per_sec:,.0f} ops/s, "
                    f"python 1 conversation {sequential.ops_per_sec:,.0f} ops/s, "
                    f"python {settings.conversations} conversations "
                    f"{concurrent.ops_per_sec:,.0f} ops/s, "
                    f"python 1 conversation in memory {memory.ops_per_sec:,.0f} ops/s",
                    flush=True,
                )
        finally:
            await conversations.aclose()
            await in_memory.aclose()
    return results


def _median_cpu(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _cpu_column(cpu: float | None, raw_cpu: float | None) -> str:
    if cpu is None:
        return ""
    text = f"   CPU {cpu:>5,.0f} us/op"
    if raw_cpu is not None:
        text += f" (CPU ratio {raw_cpu / cpu:.2f})"
    return text


def report(settings: Settings, results: list[RunResult]) -> dict[str, object]:
    """Print the medians and ratios; return them for a results file."""
    raw = statistics.median(r.raw for r in results)
    sequential = statistics.median(r.sequential for r in results)
    concurrent = statistics.median(r.concurrent for r in results)
    memory = statistics.median(r.in_memory for r in results)
    raw_cpu = _median_cpu(r.raw_cpu for r in results)
    sequential_cpu = _median_cpu(r.sequential_cpu for r in results)
    concurrent_cpu = _median_cpu(r.concurrent_cpu for r in results)
    memory_cpu = _median_cpu(r.in_memory_cpu for r in results)
    ratio = sequential / raw
    concurrent_ratio = concurrent / raw
    n = settings.conversations
    print()
    print(
        f"libsignal throughput: {settings.payload} B payload, alternating directions, "
        f"encrypt+decrypt per operation, median of {len(results)} runs of {settings.seconds:g} s"
    )
    print(
        f"  raw libsignal (one Node process, in-memory stores)  {raw:>9,.0f} ops/s"
        f"             {_cpu_column(raw_cpu, None)}"
    )
    print(
        f"  Python API + SQLite commits, 1 conversation         {sequential:>9,.0f} ops/s"
        f"   ratio {ratio:.2f}{_cpu_column(sequential_cpu, raw_cpu)}"
    )
    print(
        f"  Python API + SQLite commits, {n} conversations at once {concurrent:>7,.0f} ops/s"
        f"   ratio {concurrent_ratio:.2f}{_cpu_column(concurrent_cpu, raw_cpu)}"
    )
    print(
        f"  diagnostic: Python API, records in memory, 1 conv. {memory:>9,.0f} ops/s"
        f"   ratio {memory / raw:.2f}{_cpu_column(memory_cpu, raw_cpu)}"
    )
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(
        f"Headline ratio (1 conversation vs raw, like for like): {ratio:.2f}, "
        f"{verdict} the {TARGET_RATIO} target. The {n}-conversation figure uses both sidecars "
        "at once (two processes), which the single-process raw baseline cannot; its CPU ratio "
        "says how much more CPU time each message costs than in raw libsignal."
    )
    return {
        "settings": settings.__dict__,
        "runs": [r.__dict__ for r in results],
        "median_ops_per_sec": {
            "raw": raw,
            "sequential": sequential,
            "concurrent": concurrent,
            "in_memory_sequential": memory,
        },
        "median_cpu_micros_per_op": {
            "raw": raw_cpu,
            "sequential": sequential_cpu,
            "concurrent": concurrent_cpu,
            "in_memory_sequential": memory_cpu,
        },
        "ratio_sequential": ratio,
        "ratio_concurrent": concurrent_ratio,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
