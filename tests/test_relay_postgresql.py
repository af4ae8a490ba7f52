"""The relay on PostgreSQL (the storage layer's other dialect): the mailbox rules and a whole
transfer, on a throwaway cluster shared with the intermediary's tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from intermediary_fixtures import POSTGRES
from relay_fixtures import Clock, create_body, headers, new_claim, payload
from tigress_signal.adapters.tigress_relay import TigressRelayChannel
from tigress_signal.credentials import ProvisioningInformation
from tigress_signal.evaluation.parties import RelayParty
from tigress_signal.relay.config import RelayConfig
from tigress_signal.relay.mailboxes import sweep_expired
from tigress_signal.relay.server import RelayServer
from tigress_signal.shares.states import ShareState
from tigress_signal.storage import Database


async def count(url: str, sql: str) -> int:
    db = await Database.open(url)
    try:
        return int(await db.fetchval(sql))
    finally:
        await db.close()


async def test_mailbox_rules_on_postgresql():
    url = await POSTGRES.new_database()
    clock = Clock()
    config = RelayConfig(port=0, database_url=url, requests_per_minute=0, misses_per_minute=0)
    async with (
        RelayServer(config, clock=clock) as relay,
        httpx.AsyncClient(base_url=relay.url, trust_env=False) as http,
    ):
        sender, receiver, third = new_claim(), new_claim(), new_claim()
        expiry = datetime.fromtimestamp(clock.now + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        request_id = str(uuid.uuid4())
        body = create_body(expiration=expiry)
        first = await http.post("/v1/m", json=body, headers=headers(sender, request_id))
        again = await http.post("/v1/m", json=body, headers=headers(sender, request_id))
        assert (first.status_code, again.status_code) == (200, 201)
        path = "/v1/m/" + first.json()["urlLink"].rsplit("/", 1)[1]
        assert (await http.post(path, headers=headers(receiver))).status_code == 200
        assert (await http.post(path, headers=headers(third))).status_code == 401

        async def update_soon() -> None:
            await asyncio.sleep(0.1)
            await http.put(path, json={"payload": payload()}, headers=headers(receiver))

        writer = asyncio.create_task(update_soon())
        waited = {**headers(sender), "Mailbox-Known-Version": "1", "Prefer": "wait=5"}
        news = await http.post(path, headers=waited)
        await writer
        assert news.headers["mailbox-version"] == "2"
        assert (await http.patch(path, headers=headers(receiver))).status_code == 200
        assert (await http.post(path, headers=headers(third))).status_code == 200
        assert (await http.delete(path, headers=headers(sender))).status_code == 200
        assert (await http.post(path, headers=headers(sender))).status_code == 404
        assert await count(url, "SELECT COUNT(*) FROM mailbox_requests") == 0

        await http.post("/v1/m", json=create_body(expiration=expiry), headers=headers(sender))
        clock.now += 3601
        assert await sweep_expired(relay.context) == 1
        assert await count(url, "SELECT COUNT(*) FROM mailboxes") == 0


async def test_a_transfer_over_a_postgresql_relay(tmp_path: Path):
    url = await POSTGRES.new_database()
    config = RelayConfig(port=0, database_url=url, requests_per_minute=0)
    async with (
        RelayServer(config, clock=time.time) as relay,
        RelayParty(tmp_path / "a", TigressRelayChannel(relay.url, wait_seconds=5)) as alice,
        RelayParty(tmp_path / "b", TigressRelayChannel(relay.url, wait_seconds=5)) as bob,
    ):
        peer = alice.channel.new_peer(title="Room")
        token = ProvisioningInformation(media_type="application/octet-stream", content=b"k")
        share = await alice.shares.offer_provisioning(peer, token, title="Room")
        await bob.channel.open_link(alice.channel.share_link(peer))
        await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], 20)
        await bob.shares.accept(share.share_id)
        await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], 20)
        await alice.channel.finish(peer)
    assert await count(url, "SELECT COUNT(*) FROM mailboxes") == 0
