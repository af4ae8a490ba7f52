"""``tigress-signal compare``: the same transfers through each channel, measured in one run.

The run starts, on loopback, an intermediary and a Tigress relay as separate processes (SQLite
in a temporary folder), adds audit triggers to both databases (see :mod:`.inspection`), and
gives every party its own counting proxy (see :mod:`.wire`). Then, for each transfer number,
it runs the stateless and then the stateful transfer through each channel in turn:

* ``selfhosted``: two :class:`~tigress_signal.wallet.wallet.Wallet`\\ s registered at the
  intermediary, libsignal sessions, WebSocket push;
* ``tigress-relay``: two wallets with a
  :class:`~tigress_signal.adapters.tigress_relay.TigressRelayChannel` (drafted or hardened
  mode), one mailbox per share, the link handed over in memory as the out-of-band channel;
* ``signal-cli``: two wallets with the signal-cli channel over JSON-RPC, talking to the fake
  signal-cli daemon and fake Signal service of :mod:`tigress_signal.testing.fake_signal_cli`
  in this process (see :class:`_SignalCliChannel`). Its figures are functional only
  (:data:`SIGNAL_CLI_CAVEAT`); if the fake cannot run, the row says "not run" and why.

Each step is timed and its traffic counted per party; each transfer ends with a check that the
credential arrived intact (the token verifies, the lock opens). After the run, the servers'
stored rows are analysed and the property checks are made; :mod:`.report` writes the folder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import httpx

from tigress_signal.adapters.tigress_relay import (
    TigressRelayChannel,
    hardened_associated_data,
    open_sealed,
)
from tigress_signal.credentials import ReferenceLock, verify_access_token
from tigress_signal.errors import PayloadRejected, TigressSignalError
from tigress_signal.evaluation import inspection
from tigress_signal.evaluation.parties import RelayParty, start_receiving, stop_receiving
from tigress_signal.evaluation.wire import CountingProxy, JsonRpcCountingProxy, WireCounts
from tigress_signal.relay.client import ShareLink
from tigress_signal.relay.entities import Payload
from tigress_signal.shares.service import DigitalKeyTerms, ShareService
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.config import SignalCliSettings
from tigress_signal.wallet.wallet import Wallet

log = logging.getLogger(__name__)

PARTIES = ("sender", "receiver")
_SERVER_START_TIMEOUT = 30.0

#: The label every output of the signal-cli row carries.
SIGNAL_CLI_CAVEAT = (
    "signal-cli over a fake Signal service — functional only: its timings and bytes say "
    "nothing about Signal's real servers"
)
#: The fake's accounts (numbers reserved for fiction).
_SIGNAL_CLI_ACCOUNTS = ("+15555550100", "+15555550123")
#: UNIX socket paths must stay under 108 bytes.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """What one comparison run does.

    Attributes:
        stateless: stateless transfers per channel.
        stateful: stateful transfers per channel.
        out: the report folder (created; files in it are replaced).
        hardened: run the relay channel in its hardened mode.
        progress: draw a progress bar on stderr.
        relay_wait_seconds: how long a relay read waits for news.
        step_timeout: the longest one step may take before the transfer counts as failed.
    """

    stateless: int = 3
    stateful: int = 3
    out: Path = Path("compare-report")
    hardened: bool = False
    progress: bool = True
    relay_wait_seconds: float = 20.0
    step_timeout: float = 60.0


@dataclass(slots=True)
class StepRecord:
    """One step of a transfer: how long it took and what each party put on the wire."""

    name: str
    ms: float
    parties: dict[str, dict[str, int]]


@dataclass(slots=True)
class TransferRecord:
    """One transfer through one channel.

    Attributes:
        transfer_id: ``<channel>/<kind>/<n>``.
        channel: the channel's name.
        kind: ``stateless`` or ``stateful``.
        completed: every step finished.
        verified: the credential arrived intact (token verifies, lock opens).
        error: why it did not complete, or an empty string.
        total_ms: the time of all steps.
        steps: the steps in order.
        parties: the traffic totals per party.
        window_ms: when it ran (ms since the epoch), to attribute stored rows.
    """

    transfer_id: str
    channel: str
    kind: str
    completed: bool = False
    verified: bool = False
    error: str = ""
    total_ms: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    parties: dict[str, dict[str, int]] = field(default_factory=dict)
    window_ms: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class ChannelRun:
    """One channel's part of the run.

    Attributes:
        name: the channel's name in the report.
        description: one line on what it is.
        status: ``run`` or ``not run``.
        note: why it was not run, or remarks.
        caveat: what its figures do not say, shown with every figure of the channel.
        setup: per party, what registering or preparing cost (``ms`` and traffic).
        transfers: its transfers.
        stats: channel counters (relay: payloads rejected, overwritten ...).
    """

    name: str
    description: str
    status: str = "run"
    note: str = ""
    caveat: str = ""
    setup: dict[str, dict[str, float]] = field(default_factory=dict)
    transfers: list[TransferRecord] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ComparisonResult:
    """Everything one run measured; :mod:`.report` turns it into files."""

    settings: CompareSettings
    started_at: str
    duration_s: float = 0.0
    channels: list[ChannelRun] = field(default_factory=list)
    findings: dict[str, inspection.ServerFindings] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def all_completed(self) -> bool:
        """Whether every transfer of every channel that ran completed and verified."""
        return all(
            t.completed and t.verified
            for c in self.channels
            if c.status == "run"
            for t in c.transfers
        )

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per channel and transfer kind (the report's summary table)."""
        from tigress_signal.evaluation.report import summary_rows

        return summary_rows(self)

    def summary_text(self) -> str:
        """The summary table as Markdown text, for the terminal."""
        from tigress_signal.evaluation.report import summary_markdown

        return summary_markdown(self)


async def run_comparison(settings: CompareSettings) -> ComparisonResult:
    """Run the comparison and write its report into ``settings.out``.

    Raises:
        TigressSignalError: a server would not start, or the report cannot be written.
    """
    from tigress_signal.evaluation.report import write_report

    started = time.perf_counter()
    result = ComparisonResult(
        settings=settings,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        environment={
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": str(os.cpu_count()),
        },
    )
    with tempfile.TemporaryDirectory(prefix="tigress-compare-") as tmp:
        folder = Path(tmp)
        async with (
            _server_process(folder, "intermediary") as (intermediary_url, intermediary_db),
            _server_process(folder, "relay") as (relay_url, relay_db),
        ):
            for db in (intermediary_db, relay_db):
                tables = [t for t in inspection.table_names(db) if t != "schema_version"]
                inspection.install_audit(db, tables)
            selfhosted = _SelfHostedChannel(folder, intermediary_url, settings)
            relay = _RelayChannel(folder, relay_url, settings)
            signal_cli = _SignalCliChannel(folder, settings)
            drivers: list[_Channel] = [selfhosted, relay]
            try:
                for driver in drivers:
                    await driver.setup()
                if await signal_cli.try_setup():
                    drivers.append(signal_cli)
                await _run_transfers(settings, drivers)
            finally:
                for driver in (*drivers, signal_cli):
                    with contextlib.suppress(Exception):
                        await driver.close()
            result.channels = [selfhosted.run, relay.run, signal_cli.run]
        # The servers have stopped: their databases are complete and quiet.
        windows = {
            t.transfer_id: t.window_ms for d in drivers for t in d.run.transfers if t.window_ms[1]
        }
        for server, db, channel in (
            ("intermediary", intermediary_db, selfhosted.run.name),
            ("tigress-relay", relay_db, relay.run.name),
        ):
            mine = {k: v for k, v in windows.items() if k.startswith(channel + "/")}
            tables = [t for t in inspection.table_names(db) if t != "schema_version"]
            result.findings[server] = inspection.analyse(
                server, inspection.read_observations(db), mine, inspection.rows_left(db, tables)
            )
        result.checks = _property_checks(result, selfhosted, relay, intermediary_db, relay_db)
    result.duration_s = time.perf_counter() - started
    write_report(result, settings.out)
    return result


# -- channels ----------------------------------------------------------------------------------


class _Channel:
    """One channel under test: its parties, their proxies, and how a transfer runs on it."""

    run: ChannelRun
    proxies: dict[str, CountingProxy]
    sender_shares: ShareService
    receiver_shares: ShareService

    async def setup(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def receiver_peer(self) -> str:
        """Whom the sender offers to."""
        raise NotImplementedError

    async def deliver(self, peer: str) -> None:
        """Whatever happens between the offer and the receiver seeing it (the link hop)."""

    async def cleanup(self, peer: str) -> None:
        """Whatever ends a completed transfer on this channel."""

    def counts(self) -> dict[str, WireCounts]:
        return {party: proxy.counts.copy() for party, proxy in self.proxies.items()}


class _SelfHostedChannel(_Channel):
    def __init__(self, folder: Path, server_url: str, settings: CompareSettings) -> None:
        self._folder = folder / "selfhosted"
        self._server_url = server_url
        self._settings = settings
        self.run = ChannelRun(
            name="selfhosted",
            description="self-hosted intermediary, official libsignal (PQXDH, Double Ratchet)",
        )
        self.proxies = {}
        self._wallets: dict[str, Wallet] = {}
        self._loops: list[asyncio.Task[None]] = []

    async def setup(self) -> None:
        host, port = _host_port(self._server_url)
        for party, name in zip(PARTIES, ("alice", "bob"), strict=True):
            proxy = CountingProxy(host, port)
            await proxy.start()
            self.proxies[party] = proxy
            started = time.perf_counter()
            wallet = await Wallet.create(self._folder / name, proxy.url)
            self._wallets[party] = wallet
            self.run.setup[party] = {
                "ms": (time.perf_counter() - started) * 1000,
                **proxy.counts.as_dict(),
            }
        for party in PARTIES:
            wallet = self._wallets[party]
            self._loops.append(start_receiving(wallet.shares, wallet.channel.name))
        self.sender_shares = self._wallets["sender"].shares
        self.receiver_shares = self._wallets["receiver"].shares

    def receiver_peer(self) -> str:
        return self._wallets["receiver"].account_id

    async def close(self) -> None:
        for wallet, loop in zip(self._wallets.values(), self._loops, strict=False):
            await stop_receiving(wallet.channel, loop)
        for wallet in self._wallets.values():
            await wallet.aclose()
        for proxy in self.proxies.values():
            await proxy.stop()


class _RelayChannel(_Channel):
    def __init__(self, folder: Path, relay_url: str, settings: CompareSettings) -> None:
        self._folder = folder / "tigress-relay"
        self._relay_url = relay_url
        self._settings = settings
        mode = "hardened" if settings.hardened else "as drafted"
        self.run = ChannelRun(
            name="tigress-relay",
            description=f"Tigress mailbox relay, AES-256-GCM with the link's secret ({mode})",
        )
        self.proxies = {}
        self._parties: dict[str, RelayParty] = {}
        self._stack = contextlib.AsyncExitStack()
        self._handles: dict[str, str] = {}
        self.links: dict[str, ShareLink] = {}
        self.current_transfer = ""

    async def setup(self) -> None:
        host, port = _host_port(self._relay_url)
        for party, name in zip(PARTIES, ("alice", "bob"), strict=True):
            # The relay's traffic is kept to check afterwards that no secret was in it.
            proxy = CountingProxy(host, port, keep_sent_bytes=True)
            await proxy.start()
            self.proxies[party] = proxy
            channel = TigressRelayChannel(
                proxy.url,
                # Links name the relay's own origin; this party reaches it through its proxy.
                trusted_relays={self._relay_url: proxy.url},
                hardened=self._settings.hardened,
                wait_seconds=self._settings.relay_wait_seconds,
            )
            started = time.perf_counter()
            self._parties[party] = await self._stack.enter_async_context(
                RelayParty(self._folder / name, channel)
            )
            self.run.setup[party] = {
                "ms": (time.perf_counter() - started) * 1000,
                **proxy.counts.as_dict(),
            }
        self.sender_shares = self._parties["sender"].shares
        self.receiver_shares = self._parties["receiver"].shares

    @property
    def sender(self) -> TigressRelayChannel:
        return self._parties["sender"].channel

    @property
    def receiver(self) -> TigressRelayChannel:
        return self._parties["receiver"].channel

    def receiver_peer(self) -> str:
        return self.sender.new_peer(title=None)

    async def deliver(self, peer: str) -> None:
        # The out-of-band hop (QR code, chat): the link goes from one wallet to the other in
        # memory; only what the receiver then does with the relay is measured.
        link = self.sender.share_link(peer)
        self.links[self.current_transfer] = ShareLink.parse(link)
        self._handles[peer] = await self.receiver.open_link(link)

    async def cleanup(self, peer: str) -> None:
        # The sender read the last message (Accepted), so it deletes the mailbox.
        await self.sender.finish(peer)
        handle = self._handles.pop(peer, None)
        if handle is not None:
            await self.receiver.finish(handle, delete=False)

    async def close(self) -> None:
        stats: dict[str, int] = {}
        for party, relay_party in self._parties.items():
            for name, value in vars_of(relay_party.channel.stats).items():
                stats[f"{party}_{name}"] = value
        self.run.stats = stats
        await self._stack.aclose()
        for proxy in self.proxies.values():
            await proxy.stop()


class _SignalCliChannel(_Channel):
    """Two wallets with the signal-cli channel, over the package's fake signal-cli and Signal.

    The fake (:mod:`tigress_signal.testing.fake_signal_cli`) runs in this process: a JSON-RPC
    daemon in manual receive mode on a UNIX socket in a temporary folder, and a fake Signal
    service that routes texts between two fake accounts in memory. Each wallet reaches the
    daemon through its own :class:`JsonRpcCountingProxy`, so what is counted is the wallet's
    JSON-RPC traffic with signal-cli; nothing goes to Signal, and the fake adds its own answer
    jitter. Its figures are therefore functional only (:data:`SIGNAL_CLI_CAVEAT`).
    """

    def __init__(self, folder: Path, settings: CompareSettings) -> None:
        self._folder = folder / "signal-cli"
        self._settings = settings
        self.run = ChannelRun(
            name="signal-cli",
            description=(
                "signal-cli channel over JSON-RPC to the package's fake signal-cli 0.13.19 "
                "daemon and fake Signal service (in this process, UNIX sockets, texts routed "
                "in memory; the wallet's bytes to signal-cli are counted, not signal-cli's "
                "to any server)"
            ),
            caveat=SIGNAL_CLI_CAVEAT,
        )
        self.proxies = {}  # no HTTP here; see rpc_proxies
        self.rpc_proxies: dict[str, JsonRpcCountingProxy] = {}
        self._sockets: Path | None = None
        self._daemon: Any = None
        self._wallets: dict[str, Wallet] = {}
        self._loops: list[asyncio.Task[None]] = []

    async def try_setup(self) -> bool:
        """Set up; on failure, clean up and mark the row "not run" with the reason."""
        try:
            await self.setup()
        except (ImportError, OSError, TigressSignalError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("signal-cli channel not run: %s", reason)
            await self.close()
            self.run.status = "not run"
            self.run.note = f"not run: {reason}"
            self.run.setup = {}
            return False
        return True

    async def setup(self) -> None:
        from tigress_signal.testing.fake_signal_cli import FakeJsonRpcDaemon, FakeSignal

        # A short folder of its own: the report's temporary folder may be too deep for a
        # UNIX socket path.
        self._sockets = Path(tempfile.mkdtemp(prefix="tsig-cmp-"))
        daemon_socket = self._sockets / "signal-cli.sock"
        if len(str(self._sockets / "receiver.sock")) > _MAX_SOCKET_PATH:
            raise OSError(f"socket paths under {self._sockets} are too long for UNIX sockets")
        signal = FakeSignal()
        for number in _SIGNAL_CLI_ACCOUNTS:
            signal.register(number)
        self._daemon = FakeJsonRpcDaemon(
            signal, list(_SIGNAL_CLI_ACCOUNTS), socket_path=daemon_socket
        )
        await self._daemon.start()
        for party, name, number in zip(
            PARTIES, ("alice", "bob"), _SIGNAL_CLI_ACCOUNTS, strict=True
        ):
            proxy = JsonRpcCountingProxy(self._sockets / f"{party}.sock", daemon_socket)
            await proxy.start()
            self.rpc_proxies[party] = proxy
            started = time.perf_counter()
            wallet = await asyncio.wait_for(
                Wallet.create_signal_cli(
                    self._folder / name,
                    SignalCliSettings(account=number, socket=proxy.path, call_timeout=30.0),
                    transport="jsonrpc",
                ),
                self._settings.step_timeout,
            )
            self._wallets[party] = wallet
            self.run.setup[party] = {
                "ms": (time.perf_counter() - started) * 1000,
                **proxy.counts.as_dict(),
            }
        for party in PARTIES:
            wallet = self._wallets[party]
            self._loops.append(start_receiving(wallet.shares, wallet.channel.name))
        self.sender_shares = self._wallets["sender"].shares
        self.receiver_shares = self._wallets["receiver"].shares

    def receiver_peer(self) -> str:
        return self._wallets["receiver"].account_id

    def counts(self) -> dict[str, WireCounts]:
        return {party: proxy.counts.copy() for party, proxy in self.rpc_proxies.items()}

    async def close(self) -> None:
        for wallet, loop in zip(self._wallets.values(), self._loops, strict=False):
            await stop_receiving(wallet.channel, loop)
        self._loops = []
        for wallet in self._wallets.values():
            with contextlib.suppress(Exception):
                await wallet.aclose()
        self._wallets = {}
        for proxy in self.rpc_proxies.values():
            await proxy.stop()
        if self._daemon is not None:
            await self._daemon.stop()
            self._daemon = None
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
            self._sockets = None


def vars_of(stats: object) -> dict[str, int]:
    """The integer fields of a dataclass of counters."""
    names = getattr(stats, "__dataclass_fields__", {})
    return {name: int(getattr(stats, name)) for name in names}


# -- transfers -----------------------------------------------------------------------------------


async def _run_transfers(settings: CompareSettings, drivers: list[_Channel]) -> None:
    plan = [("stateless", n) for n in range(1, settings.stateless + 1)]
    plan += [("stateful", n) for n in range(1, settings.stateful + 1)]
    progress = _Progress(len(plan) * len(drivers), enabled=settings.progress)
    for kind, number in plan:
        for driver in drivers:
            progress.show(f"{driver.run.name} {kind} {number}")
            record = await _transfer(driver, kind, number, settings.step_timeout)
            driver.run.transfers.append(record)
            progress.advance()
    progress.done()


async def _transfer(driver: _Channel, kind: str, number: int, timeout: float) -> TransferRecord:
    record = TransferRecord(
        transfer_id=f"{driver.run.name}/{kind}/{number}", channel=driver.run.name, kind=kind
    )
    if isinstance(driver, _RelayChannel):
        driver.current_transfer = record.transfer_id
    sender, receiver = driver.sender_shares, driver.receiver_shares
    before_all = driver.counts()
    start_ms = int(time.time() * 1000)

    async def step(name: str, action: Awaitable[Any]) -> Any:
        before = driver.counts()
        started = time.perf_counter()
        value = await asyncio.wait_for(action, timeout)
        ms = (time.perf_counter() - started) * 1000
        after = driver.counts()
        record.steps.append(
            StepRecord(name, ms, {p: after[p].minus(before[p]).as_dict() for p in after})
        )
        return value

    try:
        peer = driver.receiver_peer()
        if kind == "stateless":
            share = await step(
                "offer",
                sender.offer_access_token(
                    peer, [f"room:{100 + number}"], title=f"Room {100 + number}"
                ),
            )
        else:
            now = datetime.now(UTC)
            terms = DigitalKeyTerms(f"door-{number}", ("unlock",), now, now + timedelta(days=1))
            share = await step(
                "offer", sender.offer_digital_key(peer, terms, title=f"Door {number}")
            )
        await step("deliver", _delivered(driver, peer, share.share_id))
        await step("accept", receiver.accept(share.share_id))
        if kind == "stateful":
            await step(
                "endorse and import",
                receiver.wait_for(share.share_id, [ShareState.ACCEPTED], timeout),
            )
        await step("complete", sender.wait_for(share.share_id, [ShareState.ACCEPTED], timeout))
        await step("clean up", driver.cleanup(peer))
        record.completed = True
        record.verified = _verify(sender, receiver, share.share_id, kind, number)
    except (TigressSignalError, TimeoutError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        log.warning("transfer %s failed: %s", record.transfer_id, record.error)
    end_ms = int(time.time() * 1000)
    record.window_ms = (start_ms, end_ms)
    record.total_ms = sum(s.ms for s in record.steps)
    after_all = driver.counts()
    record.parties = {p: after_all[p].minus(before_all[p]).as_dict() for p in after_all}
    return record


async def _delivered(driver: _Channel, peer: str, share_id: str) -> None:
    await driver.deliver(peer)
    await driver.receiver_shares.wait_for(share_id, [ShareState.OFFERED], 60)


def _verify(
    sender: ShareService, receiver: ShareService, share_id: str, kind: str, number: int
) -> bool:
    try:
        if kind == "stateless":
            stored = receiver.credential(share_id)
            offered = sender.offer(share_id).provisioning
            if offered is None or stored.content != offered.content:
                return False
            verify_access_token(stored.content, sender.access_token_issuer().public_key)
            return True
        key = receiver.digital_key(share_id)
        lock_id = f"door-{number}"
        lock = ReferenceLock(lock_id, sender.owner_key(lock_id).public_key)
        lock.unlock(key.endorsement, key.holder.respond(lock.challenge(), lock_id))
        return True
    except TigressSignalError as exc:
        log.warning("share %s did not verify: %s", share_id, exc)
        return False


# -- property checks -------------------------------------------------------------------------


def _property_checks(
    result: ComparisonResult,
    selfhosted: _SelfHostedChannel,
    relay: _RelayChannel,
    intermediary_db: Path,
    relay_db: Path,
) -> dict[str, dict[str, Any]]:
    """The checks behind the properties table, each from this run's data."""
    checks: dict[str, dict[str, Any]] = {}
    relay_observed = inspection.read_observations(relay_db)
    signal_observed = inspection.read_observations(intermediary_db)

    # The link's secret, searched for in every byte the relay's parties sent.
    sent = b"".join(bytes(p.sent_bytes or b"") for p in relay.proxies.values())
    hits = 0
    for link in relay.links.values():
        for form in _encodings(link.secret):
            hits += sent.count(form)
    checks["secret_never_sent"] = {
        "shares": len(relay.links),
        "bytes_searched": len(sent),
        "occurrences": hits,
        "passed": hits == 0 and bool(relay.links),
    }

    # Everything the relay stored for a share opens with that share's link, in both
    # directions; no other share's link opens any of it.
    payloads: dict[str, list[Payload]] = {}
    for observation in relay_observed:
        if observation.table == "mailboxes" and observation.operation in ("insert", "update"):
            row = observation.row
            data = bytes.fromhex(str(row["payload"]))
            payloads.setdefault(str(row["mailbox_id"]), []).append(
                Payload(type=row["payload_type"], data=data)
            )
    opened = total = crossed = 0
    for link in relay.links.values():
        for payload in _unique(payloads.get(link.mailbox_id, [])):
            total += 1
            opened += _opens(link.secret, payload, relay.run, result.settings.hardened)
        for other in relay.links.values():
            if other.mailbox_id != link.mailbox_id:
                for payload in _unique(payloads.get(other.mailbox_id, [])):
                    crossed += _opens(link.secret, payload, relay.run, result.settings.hardened)
    checks["one_key_opens_a_whole_share"] = {
        "payloads_stored": total,
        "opened_with_the_link_secret": opened,
        "opened_with_another_shares_secret": crossed,
    }

    findings = result.findings.get("tigress-relay")
    claims_sender = claims_receiver = 0
    if findings is not None:
        for column in findings.columns:
            if column.column == "mailboxes.initiator_claim":
                claims_sender = column.distinct
            if column.column == "mailboxes.recipient_claim":
                claims_receiver = column.distinct
    checks["relay_accounts"] = {
        "tables": sorted(findings.tables) if findings else [],
        "shares": len(relay.links),
        "distinct_sender_claims": claims_sender,
        "distinct_recipient_claims": claims_receiver,
    }

    signal_findings = result.findings.get("intermediary")
    types: dict[str, int] = {}
    consumed = 0
    windows = [t.window_ms for t in selfhosted.run.transfers]
    for observation in signal_observed:
        in_transfer = any(start <= observation.at_ms <= end for start, end in windows)
        if observation.table == "messages" and observation.operation == "insert":
            name = "prekey_messages" if observation.row.get("type") == 3 else "ratchet_messages"
            types[name] = types.get(name, 0) + 1
        if (
            in_transfer
            and observation.operation == "delete"
            and observation.table in ("one_time_prekeys", "one_time_pq_prekeys")
        ):
            consumed += 1
    accounts = signal_findings.tables.get("accounts", {}) if signal_findings else {}
    checks["signal_sessions"] = {
        **{"prekey_messages": 0, "ratchet_messages": 0},
        **types,
        "one_time_prekeys_consumed": consumed,
        "accounts_stored": accounts.get("rows_left", 0),
    }
    return checks


def _opens(secret: bytes, payload: Payload, run: ChannelRun, hardened: bool) -> int:
    """1 if the payload opens with ``secret`` (at any position, in the hardened mode)."""
    candidates: list[bytes | None] = [None]
    if hardened:
        candidates = [
            hardened_associated_data(writer, n)
            for writer in ("initiator", "recipient")
            for n in range(8)
        ]
    for associated in candidates:
        try:
            open_sealed(secret, payload, associated)
        except PayloadRejected:
            continue
        return 1
    return 0


def _unique(payloads: list[Payload]) -> list[Payload]:
    seen: set[bytes] = set()
    result = []
    for payload in payloads:
        if payload.data not in seen:
            seen.add(payload.data)
            result.append(payload)
    return result


def _encodings(secret: bytes) -> list[bytes]:
    standard = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return [secret, standard, standard.rstrip(b"="), url.rstrip(b"="), secret.hex().encode()]


# -- servers -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _server_process(folder: Path, kind: str) -> AsyncIterator[tuple[str, Path]]:
    """Start ``tigress-signal serve`` or ``relay serve`` on a free loopback port."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    db = folder / f"{kind}.sqlite3"
    if kind == "intermediary":
        arguments = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        arguments += ["--database", f"sqlite:///{db}"]
    else:
        config = folder / "relay.toml"
        # All parties share 127.0.0.1 here, so the per-address request limit is off; the
        # limits themselves are tested on their own.
        config.write_text(
            "[relay]\n"
            f'host = "127.0.0.1"\nport = {port}\n'
            f'database_url = "sqlite:///{db}"\n'
            f'public_url = "{url}"\n'
            "requests_per_minute = 0\n",
            encoding="utf-8",
        )
        arguments = ["relay", "serve", "--config", str(config)]
    log_path = folder / f"{kind}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits are off-thread
            [sys.executable, "-m", "tigress_signal", *arguments],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            await _wait_ready(url, process, kind)
            yield url, db
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


async def _wait_ready(url: str, process: subprocess.Popen[bytes], kind: str) -> None:
    deadline = time.monotonic() + _SERVER_START_TIMEOUT
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise TigressSignalError(f"the {kind} exited with status {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TigressSignalError(f"the {kind} did not start in time")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _host_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host, int(parsed.port or 80)


class _Progress:
    """A one-line progress bar on a terminal; one line per transfer elsewhere (logs, CI)."""

    def __init__(self, total: int, *, enabled: bool, stream: TextIO | None = None) -> None:
        self._total = max(total, 1)
        self._done = 0
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._started = time.monotonic()
        self._label = ""

    def show(self, label: str) -> None:
        self._label = label
        if self._tty:
            self._draw()

    def advance(self) -> None:
        self._done += 1
        if self._tty:
            self._draw()
        elif self._enabled:
            elapsed = time.monotonic() - self._started
            self._stream.write(f"[{self._done}/{self._total}] {self._label} ({elapsed:.1f} s)\n")
            self._stream.flush()

    def done(self) -> None:
        if self._enabled and self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self) -> None:
        if not self._enabled:
            return
        width = 30
        filled = width * self._done // self._total
        elapsed = time.monotonic() - self._started
        bar = "#" * filled + "." * (width - filled)
        self._stream.write(
            f"\r[{bar}] {self._done}/{self._total} {elapsed:5.1f}s {self._label:<32}"
        )
        self._stream.flush()
