"""Limits and retention: rate limits (429 + Retry-After), queue limits, message expiry."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from intermediary_fixtures import (
    Registered,
    assert_error_body,
    database_execute,
    database_rows,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    raw_client,
    register,
    running_server,
)
from tigress_signal.errors import RateLimited
from tigress_signal.intermediary.client import OutgoingMessage
from tigress_signal.intermediary.config import IntermediaryConfig, RateLimit
from tigress_signal.intermediary.context import ServerContext
from tigress_signal.intermediary.limits import RateLimiter, TokenBuckets
from tigress_signal.intermediary.maintenance import sweep
from tigress_signal.intermediary.server import IntermediaryServer


def context_of(server: IntermediaryServer) -> ServerContext:
    context = server.app.state.intermediary
    assert isinstance(context, ServerContext)
    return context


def message_for(device: Registered, content: bytes = b"x") -> OutgoingMessage:
    return OutgoingMessage(
        type=1,
        destination_device_id=1,
        destination_registration_id=device.keys.registration_id,
        content=content,
    )


# -- the token bucket itself (no server) -------------------------------------------------------


def test_a_bucket_allows_a_burst_then_refills_at_its_rate():
    now = [100.0]
    buckets = TokenBuckets(RateLimit(burst=3, per_second=0.5), 10, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(2.0)
    assert buckets.take("b") == 0  # keys are independent
    now[0] += 1.0
    assert buckets.take("a") == pytest.approx(1.0)  # half a permit so far; nothing taken
    now[0] += 1.0
    assert buckets.take("a") == 0
    assert buckets.take("a") > 0


def test_a_disabled_limit_never_refuses_and_old_keys_are_forgotten():
    off = TokenBuckets(RateLimit(burst=0, per_second=1.0), 10)
    assert all(off.take("a") == 0 for _ in range(1000))
    now = [0.0]
    small = TokenBuckets(RateLimit(burst=1, per_second=0.001), 2, clock=lambda: now[0])
    assert small.take("a") == 0 and small.take("a") > 0
    small.take("b")
    small.take("c")  # "a" is forgotten: a fresh bucket
    assert small.take("a") == 0


def test_a_refusal_is_a_429_with_whole_seconds_and_is_counted():
    refused: list[str] = []
    config = IntermediaryConfig(message_rate=RateLimit(burst=1, per_second=0.4))
    limiter = RateLimiter(config, on_limited=refused.append, clock=lambda: 5.0)
    limiter.check("message", "a>b")
    with pytest.raises(Exception) as caught:
        limiter.check("message", "a>b")
    error = caught.value
    assert getattr(error, "status", None) == 429
    assert getattr(error, "headers", {}) == {"Retry-After": "3"}
    assert getattr(error, "fields", {}) == {"retryAfter": 3}
    assert refused == ["message"]


# -- over HTTP ---------------------------------------------------------------------------------


async def test_bundle_fetches_are_limited_per_requester_and_refused_ones_take_nothing(tmp_path):
    limit = {"burst": 3, "per_second": 0.01}
    async with running_server(tmp_path, bundle_fetch_rate=limit) as server:
        target = await register(server.url, prekeys=10, pq_prekeys=10)
        stranger = await register(server.url)
        other = await register(server.url)
        try:
            for _ in range(3):
                await stranger.client.fetch_bundle(target.uuid)
            for _ in range(5):
                with pytest.raises(RateLimited) as caught:
                    await stranger.client.fetch_bundle(target.uuid)
                assert caught.value.retry_after is not None and caught.value.retry_after >= 1
            counts = await target.client.prekey_counts()
            assert (counts.count, counts.pq_count) == (7, 7)
            # Another requester has its own bucket.
            await other.client.fetch_bundle(target.uuid)
            async with raw_client(server.url) as http:
                refused = await http.get(f"/v2/keys/{target.uuid}/1", auth=stranger.auth)
            assert_error_body(refused, 429, "rate_limited")
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["retryAfter"] == int(refused.headers["retry-after"])
        finally:
            for device in (target, stranger, other):
                await device.client.aclose()


async def test_sends_are_limited_per_sender_and_recipient_pair(tmp_path):
    async with running_server(tmp_path, message_rate={"burst": 2, "per_second": 0.01}) as server:
        alice = await register(server.url)
        bob = await register(server.url)
        carol = await register(server.url)
        try:
            await alice.client.send_message(bob.uuid, message_for(bob))
            await alice.client.send_message(bob.uuid, message_for(bob))
            with pytest.raises(RateLimited):
                await alice.client.send_message(bob.uuid, message_for(bob))
            await alice.client.send_message(carol.uuid, message_for(carol))
            await carol.client.send_message(bob.uuid, message_for(bob))
            assert len(await bob.client.list_all_messages()) == 3  # the refused one is not stored
        finally:
            for device in (alice, bob, carol):
                await device.client.aclose()


async def test_requests_are_limited_per_source_address_but_not_health(tmp_path):
    limit = {"burst": 5, "per_second": 0.01}
    async with (
        running_server(tmp_path, address_rate=limit) as server,
        raw_client(server.url) as http,
    ):
        answers = [await http.get("/v1/accounts/whoami") for _ in range(7)]
        assert [a.status_code for a in answers] == [401] * 5 + [429] * 2
        assert_error_body(answers[-1], 429, "rate_limited")
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200


async def test_account_creation_is_limited_per_source_address(tmp_path):
    limit = {"burst": 2, "per_second": 0.001}
    async with running_server(tmp_path, account_creation_rate=limit) as server:
        devices = [await register(server.url), await register(server.url)]
        with pytest.raises(RateLimited):
            await register(server.url)
        for device in devices:
            await device.client.aclose()
    assert await database_rows("SELECT COUNT(*) FROM accounts") == [(2,)]


async def test_a_full_queue_refuses_sends_with_429_until_it_drains(tmp_path):
    async with running_server(tmp_path, max_queued_messages=3) as server:
        alice = await register(server.url)
        bob = await register(server.url)
        try:
            for _ in range(3):
                await alice.client.send_message(bob.uuid, message_for(bob))
            with pytest.raises(RateLimited) as caught:
                await alice.client.send_message(bob.uuid, message_for(bob))
            assert caught.value.body["error"] == "recipient_queue_full"
            assert caught.value.body["fullDevices"] == [1]
            assert caught.value.retry_after == 300
            first = (await bob.client.list_all_messages())[0]
            await bob.client.acknowledge(first.guid)
            await alice.client.send_message(bob.uuid, message_for(bob))
        finally:
            await alice.client.aclose()
            await bob.client.aclose()


async def test_the_queue_byte_limit(tmp_path):
    limits: dict[str, Any] = {
        "max_queued_bytes": 100_000,
        "max_message_bytes": 60_000,
        "max_body_bytes": 90_000,
    }
    async with running_server(tmp_path, **limits) as server:
        alice = await register(server.url)
        bob = await register(server.url)
        try:
            await alice.client.send_message(bob.uuid, message_for(bob, bytes(60_000)))
            with pytest.raises(RateLimited):
                await alice.client.send_message(bob.uuid, message_for(bob, bytes(40_001)))
            await alice.client.send_message(bob.uuid, message_for(bob, bytes(40_000)))
        finally:
            await alice.client.aclose()
            await bob.client.aclose()


async def test_an_expired_message_is_not_delivered_and_is_swept(tmp_path):
    async with running_server(tmp_path, message_retention_seconds=3600) as server:
        alice = await register(server.url)
        bob = await register(server.url)
        try:
            before = int(time.time() * 1000)
            await alice.client.send_message(bob.uuid, message_for(bob, b"old"))
            await alice.client.send_message(bob.uuid, message_for(bob, b"new"))
            rows = await database_rows("SELECT expires_at FROM messages ORDER BY seq")
            assert all(before + 3600_000 <= r[0] <= before + 3700_000 for r in rows)

            # Age the first message past its expiry: it is neither listed nor pushed.
            await database_execute(
                "UPDATE messages SET expires_at = $1 WHERE seq = (SELECT MIN(seq) FROM messages)",
                before - 1,
            )
            assert [e.content for e in await bob.client.list_all_messages()] == [b"new"]
            async with bob.client.connect_websocket() as stream:
                delivery = await asyncio.wait_for(stream.receive(), 5)
                assert delivery is not None and delivery.envelope.content == b"new"

            result = await sweep(context_of(server))
            assert result.messages == 1
            assert await database_rows("SELECT COUNT(*) FROM messages") == [(1,)]
            async with raw_client(server.url) as http:
                metrics = (await http.get("/metrics")).text
            assert "tigress_messages_expired_total 1.0" in metrics
        finally:
            await alice.client.aclose()
            await bob.client.aclose()


async def test_the_sweep_runs_by_itself(tmp_path):
    async with running_server(tmp_path, sweep_interval_seconds=0.1) as server:
        alice = await register(server.url)
        bob = await register(server.url)
        try:
            await alice.client.send_message(bob.uuid, message_for(bob))
            await database_execute("UPDATE messages SET expires_at = 1")
            for _ in range(50):
                if await database_rows("SELECT COUNT(*) FROM messages") == [(0,)]:
                    break
                await asyncio.sleep(0.1)
            assert await database_rows("SELECT COUNT(*) FROM messages") == [(0,)]
        finally:
            await alice.client.aclose()
            await bob.client.aclose()


async def test_expired_link_codes_and_dead_processes_are_swept(tmp_path: Path):
    async with running_server(tmp_path) as server:
        bob = await register(server.url)
        try:
            await bob.client.issue_link_code()
            await database_execute("UPDATE link_codes SET expires_at = 1")
            await database_execute(
                "INSERT INTO server_processes (server_id, started_at, heartbeat_at)"
                " VALUES ('dead', 1, 1)"
            )
            result = await sweep(context_of(server))
            assert (result.link_codes, result.processes) == (1, 1)
            live = await database_rows("SELECT server_id FROM server_processes")
            assert live == [(context_of(server).switchboard.server_id,)]
        finally:
            await bob.client.aclose()
