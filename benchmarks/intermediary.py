"""Intermediary deliveries per second against a bare ASGI echo endpoint.

Run it with ``python -m benchmarks.intermediary`` (``make bench-intermediary``).

One delivery is the whole path of a message: a sender's ``PUT /v1/messages/{uuid}`` with 1 KiB
of ciphertext, the server's push over the recipient's WebSocket, and the recipient's
acknowledgement (which deletes the message). ``--senders`` pairs of sender and recipient run at
once, each sender waiting for its previous message to be delivered before sending the next. The
baseline is a bare ASGI app answering ``PUT /echo`` with the 1 KiB body it got, served the same
way (the intermediary's uvicorn settings, one process) and driven with the same number of
concurrent clients, one request at a time each.

Measured on SQLite (a file, WAL, synchronous=FULL) and on PostgreSQL (a throwaway local
cluster with fsync on, so both commit durably), each with an empty store and with 100,000
undelivered messages already stored for 1,000 other devices. Each figure is the median of
``--runs`` runs of ``--seconds`` after a warm-up. The rate limits are off in the benchmark's
server (they would cap a pair at one message a second); everything else is the default.

Everything runs on 127.0.0.1; the load is bounded by time and stops by itself. Results are
printed and written as JSON (``--output``). Targets (issue 3): deliveries/s at least 0.25 of
the echo requests/s, and the rate with 100,000 stored at least 0.8 of the empty store's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tigress_signal.bridge.libsignal import LibsignalBridge, ProtocolAddress
from tigress_signal.intermediary.auth import hash_password
from tigress_signal.intermediary.client import IntermediaryClient, OutgoingMessage
from tigress_signal.storage import Database
from tigress_signal.storage.throwaway import ThrowawayCluster, free_loopback_port

PAYLOAD = 1024
TARGET_ECHO_RATIO = 0.25
TARGET_STORED_RATIO = 0.8
_NO_LIMIT = {"burst": 0, "per_second": 1.0}


@dataclass
class Settings:
    """What to measure and for how long."""

    runs: int = 3
    seconds: float = 8.0
    warmup: float = 1.5
    senders: int = 4
    stored: int = 100_000
    stored_devices: int = 1000
    dialects: tuple[str, ...] = ("sqlite", "postgresql")


@dataclass
class Measurement:
    """One case's runs (operations per second)."""

    name: str
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


# -- the servers, as child processes ------------------------------------------------------------


def _serve_main(kind: str, port: int, database_url: str) -> None:
    """Child process: serve the echo app or the intermediary on 127.0.0.1:port."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from tigress_signal.intermediary.config import IntermediaryConfig
    from tigress_signal.intermediary.server import _uvicorn_config, serve
    from tigress_signal.serving import QuietServer, listen

    logging.basicConfig(level=logging.WARNING)
    config = IntermediaryConfig(
        host="127.0.0.1",
        port=port,
        database_url=database_url or "sqlite:///unused.db",
        message_rate=_NO_LIMIT,
        address_rate=_NO_LIMIT,
        account_creation_rate=_NO_LIMIT,
        bundle_fetch_rate=_NO_LIMIT,
        max_queued_messages=1_000_000,
        max_queued_bytes=4 * 1024**3,
    )
    if kind == "intermediary":
        asyncio.run(serve(config))
        return

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    app = Starlette(routes=[Route("/echo", echo, methods=["PUT"])])

    async def run() -> None:
        server = QuietServer(_uvicorn_config(app, config))
        await server.serve(sockets=[listen("127.0.0.1", port)])

    asyncio.run(run())


@contextlib.asynccontextmanager
async def _server(kind: str, database_url: str, log: Path) -> AsyncIterator[str]:
    port = free_loopback_port()
    with log.open("ab") as output:
        # Started once per case, before any load; blocking here costs nothing measured.
        process = subprocess.Popen(  # noqa: ASYNC220
            [
                sys.executable,
                "-m",
                "benchmarks.intermediary",
                "--serve",
                kind,
                str(port),
                database_url,
            ],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        path = "/health" if kind == "intermediary" else "/echo"
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
            for _ in range(600):
                if process.poll() is not None:
                    raise RuntimeError(f"the {kind} server exited; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    answer = await http.request(
                        "GET" if kind == "intermediary" else "PUT", url + path
                    )
                    if answer.status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the {kind} server did not start; see {log}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# -- load ---------------------------------------------------------------------------------------


async def _measure_echo(url: str, settings: Settings) -> float:
    body = os.urandom(PAYLOAD)
    counted = 0
    counting = False
    stop = False

    async def worker() -> None:
        nonlocal counted
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0) as http:
            while not stop:
                answer = await http.put("/echo", content=body)
                assert answer.status_code == 200 and len(answer.content) == PAYLOAD
                if counting:
                    counted += 1

    tasks = [asyncio.create_task(worker()) for _ in range(settings.senders)]
    await asyncio.sleep(settings.warmup)
    counting, started = True, time.perf_counter()
    await asyncio.sleep(settings.seconds)
    counting, elapsed = False, time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return counted / elapsed


@dataclass
class _Account:
    client: IntermediaryClient
    uuid: str
    registration_id: int


async def _make_accounts(url: str, count: int, bridge: LibsignalBridge) -> list[_Account]:
    accounts = []
    for index in range(count):
        identity = await bridge.generate_identity()
        await bridge.open(
            identity.identity_key_pair,
            identity.registration_id,
            ProtocolAddress(f"bench-{index}", 1),
            last_resort_kyber_ids=[1000],
        )
        signed = await bridge.generate_signed_prekey(1)
        (last_resort,) = await bridge.generate_kyber_prekeys(1000, 1)
        client = IntermediaryClient(url)
        created = await client.create_account(
            identity_key=identity.public_key,
            registration_id=identity.registration_id,
            signed_prekey=signed.public(),
            pq_last_resort_prekey=last_resort.public(),
        )
        client.authenticate(created.uuid, created.device_id, created.password)
        accounts.append(_Account(client, created.uuid, identity.registration_id))
    return accounts


async def _measure_deliveries(pairs: list[tuple[_Account, _Account]], settings: Settings) -> float:
    counted = 0
    counting = False
    stop = asyncio.Event()

    async def pair(sender: _Account, recipient: _Account) -> None:
        nonlocal counted
        message = OutgoingMessage(
            type=1,
            destination_device_id=1,
            destination_registration_id=recipient.registration_id,
            content=os.urandom(PAYLOAD),
        )
        async with recipient.client.connect_websocket() as stream:
            while not stop.is_set():
                await sender.client.send_message(recipient.uuid, message)
                delivery = await asyncio.wait_for(stream.receive(), 30)
                assert delivery is not None and len(delivery.envelope.content) == PAYLOAD
                await delivery.acknowledge()
                if counting:
                    counted += 1

    tasks = [asyncio.create_task(pair(s, r)) for s, r in pairs]
    await asyncio.sleep(settings.warmup)
    counting, started = True, time.perf_counter()
    await asyncio.sleep(settings.seconds)
    counting, elapsed = False, time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    return counted / elapsed


async def _prefill(database_url: str, settings: Settings) -> None:
    """Store ``settings.stored`` undelivered messages for ``stored_devices`` idle devices."""
    db = await Database.open(database_url)
    try:
        now = int(time.time() * 1000)
        expires = now + 30 * 24 * 3600 * 1000
        password_hash = hash_password("not used")
        devices = [str(uuid.uuid4()) for _ in range(settings.stored_devices)]
        async with db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO accounts (uuid, identity_key, created_at) VALUES ($1, $2, $3)",
                [(d, b"\x05" + bytes(32), now) for d in devices],
            )
            await conn.executemany(
                "INSERT INTO devices (account_uuid, device_id, registration_id, password_hash,"
                " signed_prekey_id, signed_prekey, signed_prekey_signature, pq_last_resort_id,"
                " pq_last_resort_key, pq_last_resort_signature, created_at)"
                " VALUES ($1, 1, 1, $2, 1, $3, $4, 1, $5, $4, $6)",
                [
                    (d, password_hash, b"\x05" + bytes(32), bytes(64), b"\x08" + bytes(1568), now)
                    for d in devices
                ],
            )
        content = os.urandom(PAYLOAD)
        per_device = settings.stored // settings.stored_devices
        batch: list[tuple[Any, ...]] = []
        for device in devices:
            for _ in range(per_device):
                batch.append((str(uuid.uuid4()), device, now, content, expires, PAYLOAD))
            if len(batch) >= 5000:
                await _insert_messages(db, batch)
                batch = []
        if batch:
            await _insert_messages(db, batch)
    finally:
        await db.close()


async def _insert_messages(db: Database, rows: list[tuple[Any, ...]]) -> None:
    async with db.transaction() as conn:
        await conn.executemany(
            "INSERT INTO messages (guid, account_uuid, device_id, type, client_timestamp,"
            " source_uuid, source_device, server_timestamp, urgent, content, expires_at,"
            " content_size) VALUES ($1, $2, 1, 1, $3, $2, 1, $3, TRUE, $4, $5, $6)",
            rows,
        )


async def _run_dialect(
    dialect: str, settings: Settings, folder: Path, results: dict[str, Measurement]
) -> None:
    cluster: ThrowawayCluster | None = None
    if dialect == "sqlite":
        database_url = f"sqlite:///{folder / 'bench.db'}"
    else:
        cluster = ThrowawayCluster(durable=True)
        cluster.start()
        database_url = await cluster.create_database("bench")
    try:
        bridge = LibsignalBridge()
        await bridge.start()
        try:
            for stored in (0, settings.stored):
                name = f"{dialect}, {'empty' if stored == 0 else f'{stored:,} stored'}"
                log = folder / f"intermediary-{dialect}-{stored}.log"
                async with _server("intermediary", database_url, log) as url:
                    if stored:
                        await _prefill(database_url, settings)
                    accounts = await _make_accounts(url, 2 * settings.senders, bridge)
                    pairs = list(zip(accounts[::2], accounts[1::2], strict=True))
                    measurement = results.setdefault(name, Measurement(name))
                    for _ in range(settings.runs):
                        measurement.rates.append(await _measure_deliveries(pairs, settings))
                    for account in accounts:
                        await account.client.aclose()
                print(f"  {name}: {measurement.median:,.0f} deliveries/s", flush=True)
        finally:
            await bridge.aclose()
    finally:
        if cluster is not None:
            cluster.stop()


async def run(settings: Settings) -> dict[str, Measurement]:
    """Measure every case; returns them by name."""
    results: dict[str, Measurement] = {}
    with tempfile.TemporaryDirectory(prefix="tigress-bench-") as tmp:
        folder = Path(tmp)
        async with _server("echo", "", folder / "echo.log") as url:
            echo = results.setdefault("echo", Measurement("echo"))
            for _ in range(settings.runs):
                echo.rates.append(await _measure_echo(url, settings))
        print(f"  echo: {echo.median:,.0f} requests/s", flush=True)
        for dialect in settings.dialects:
            await _run_dialect(dialect, settings, folder, results)
    return results


def report(settings: Settings, results: dict[str, Measurement]) -> dict[str, Any]:
    """Print the table and return it as JSON-ready data."""
    echo = results["echo"].median
    summary: dict[str, Any] = {
        "settings": settings.__dict__ | {"dialects": list(settings.dialects)},
        "cpu_count": os.cpu_count(),
        "cases": {},
    }
    print(
        f"\nmedian of {settings.runs} runs of {settings.seconds:.0f} s, {settings.senders} pairs"
    )
    print(f"{'case':<32}{'per second':>12}{'/ echo':>10}{'/ empty':>10}   runs")
    for name, measurement in results.items():
        dialect = name.partition(",")[0]
        empty = results.get(f"{dialect}, empty")
        row = {
            "median": round(measurement.median, 1),
            "runs": [round(r, 1) for r in measurement.rates],
            "ratio_to_echo": round(measurement.median / echo, 3) if echo else None,
        }
        vs_empty = ""
        if name != "echo" and empty is not None and empty.median:
            row["ratio_to_empty"] = round(measurement.median / empty.median, 3)
            vs_empty = f"{row['ratio_to_empty']:.3f}"
        summary["cases"][name] = row
        runs = ", ".join(f"{r:,.0f}" for r in measurement.rates)
        print(
            f"{name:<32}{measurement.median:>12,.0f}{row['ratio_to_echo']:>10.3f}"
            f"{vs_empty:>10}   {runs}"
        )
    print(
        f"targets: >= {TARGET_ECHO_RATIO} of echo, >= {TARGET_STORED_RATIO} of empty "
        f"with {settings.stored:,} stored"
    )
    return summary


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        _serve_main(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
        return
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.intermediary", description=__doc__)
    parser.add_argument("--runs", type=int, default=defaults.runs)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="per run")
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--senders", type=int, default=defaults.senders, help="concurrent pairs")
    parser.add_argument("--stored", type=int, default=defaults.stored)
    parser.add_argument(
        "--dialects", default=",".join(defaults.dialects), help="sqlite,postgresql"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("bench-results/intermediary_delivery.json")
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(
        runs=args.runs,
        seconds=args.seconds,
        warmup=args.warmup,
        senders=args.senders,
        stored=args.stored,
        dialects=tuple(d for d in args.dialects.split(",") if d),
    )
    results = asyncio.run(run(settings))
    summary = report(settings, results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
