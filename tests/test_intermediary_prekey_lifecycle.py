"""Prekey lifecycle on the server: key ids never handed out twice, last resort kept, counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import (
    NO_LIMIT,
    Registered,
    assert_error_body,
    database_execute,
    database_rows,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    prekey_json,
    raw_client,
    register,
    running_server,
)
from tigress_signal.bridge.libsignal import BundlePreKey
from tigress_signal.errors import PreKeyIdReused
from tigress_signal.intermediary.context import ServerContext
from tigress_signal.intermediary.maintenance import sweep
from tigress_signal.intermediary.server import IntermediaryServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    async with running_server(tmp_path, bundle_fetch_rate=NO_LIMIT) as running:
        yield running


@pytest.fixture
async def bob(server) -> AsyncIterator[Registered]:
    device = await register(server.url, prekeys=3, pq_prekeys=3)
    yield device
    await device.client.aclose()


@pytest.fixture
async def alice(server) -> AsyncIterator[Registered]:
    device = await register(server.url)
    yield device
    await device.client.aclose()


async def fetched_ids(alice: Registered, bob: Registered, times: int) -> list[tuple[int, int]]:
    """(one-time EC id or -1, Kyber id) of ``times`` bundle fetches."""
    ids = []
    for _ in range(times):
        device = (await alice.client.fetch_bundle(bob.uuid, 1)).devices[0]
        ids.append(
            (-1 if device.prekey is None else device.prekey.key_id, device.pq_prekey.key_id)
        )
    return ids


async def test_counts_per_kind_and_the_current_signed_and_last_resort_ids(alice, bob):
    counts = await bob.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (3, 3)
    assert (counts.signed_pre_key_id, counts.pq_last_resort_pre_key_id) == (1, 999)
    await fetched_ids(alice, bob, 1)
    counts = await bob.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (2, 2)


async def test_the_last_resort_kyber_key_is_kept_and_returned_when_one_time_keys_are_gone(
    alice, bob
):
    assert await fetched_ids(alice, bob, 5) == [(1, 1), (2, 2), (3, 3), (-1, 999), (-1, 999)]
    counts = await bob.client.prekey_counts()
    assert (counts.count, counts.pq_count, counts.pq_last_resort_pre_key_id) == (0, 0, 999)


async def test_reusing_an_id_with_other_material_is_refused_whole(alice, bob):
    await fetched_ids(alice, bob, 1)  # hands out EC 1 and Kyber 1
    fresh = bob.keys.prekeys(10, 2)
    with pytest.raises(PreKeyIdReused) as caught:
        await bob.client.upload_keys(pre_keys=[*fresh, BundlePreKey(2, b"\x05" + bytes(32))])
    assert caught.value.reused == [("preKeys", 2)]
    with pytest.raises(PreKeyIdReused):
        await bob.client.upload_keys(pq_pre_keys=[bob.keys.kyber_prekey(1)])  # handed out
    with pytest.raises(PreKeyIdReused):
        await bob.client.upload_keys(signed_prekey=bob.keys.signed_prekey(1))
    with pytest.raises(PreKeyIdReused):
        await bob.client.upload_keys(pq_last_resort_prekey=bob.keys.kyber_prekey(999))
    with pytest.raises(PreKeyIdReused):  # Kyber one-time and last-resort ids share one space
        await bob.client.upload_keys(pq_pre_keys=[bob.keys.kyber_prekey(999)])
    counts = await bob.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (2, 2)  # nothing of the refused uploads stayed


async def test_the_409_body_names_each_reused_key(bob):
    async with raw_client(bob.client.base_url) as http:
        answer = await http.put(
            "/v2/keys",
            auth=bob.auth,
            json={"preKeys": [prekey_json(k) for k in bob.keys.prekeys(2, 2)]},
        )
    assert_error_body(answer, 409, "prekey_id_reused")
    assert answer.json()["reused"] == [
        {"field": "preKeys", "keyId": 2},
        {"field": "preKeys", "keyId": 3},
    ]


async def test_a_retried_upload_is_accepted_and_never_hands_a_key_out_twice(alice, bob):
    batch = bob.keys.prekeys(10, 3)
    await bob.client.upload_keys(pre_keys=batch)
    assert (await fetched_ids(alice, bob, 1))[0][0] == 10
    # The same upload again (a client retrying after a lost answer): accepted, but key 10,
    # already handed out, is not offered again.
    await bob.client.upload_keys(pre_keys=batch)
    assert (await bob.client.prekey_counts()).count == 2
    assert [i for i, _ in await fetched_ids(alice, bob, 3)] == [11, 12, -1]


async def test_a_replacing_upload_never_brings_back_a_replaced_key(alice, bob):
    first = bob.keys.prekeys(10, 2)
    await bob.client.upload_keys(pre_keys=first)
    await bob.client.upload_keys(pre_keys=bob.keys.prekeys(20, 2))  # replaces 10 and 11
    await bob.client.upload_keys(pre_keys=[*first, *bob.keys.prekeys(30, 1)])
    assert [i for i, _ in await fetched_ids(alice, bob, 2)] == [30, -1]


async def test_the_same_signed_key_again_is_fine_and_rotation_is_recorded(bob):
    signed = bob.keys.signed_prekey(5)
    await bob.client.upload_keys(signed_prekey=signed)
    await bob.client.upload_keys(signed_prekey=signed)
    assert (await bob.client.prekey_counts()).signed_pre_key_id == 5
    rows = await database_rows(
        "SELECT key_id, released_at IS NOT NULL FROM prekey_ids WHERE kind = 'signed'"
        " ORDER BY key_id"
    )
    assert [(r[0], bool(r[1])) for r in rows] == [(1, True), (5, False)]


async def test_released_ids_are_forgotten_after_the_retention_time(server, alice, bob):
    await fetched_ids(alice, bob, 1)
    context = server.app.state.intermediary
    assert isinstance(context, ServerContext)
    await database_execute("UPDATE prekey_ids SET released_at = 1 WHERE released_at IS NOT NULL")
    result = await sweep(context)
    assert result.key_ids == 2  # EC 1 and Kyber 1, handed out "long ago"
    # Their ids may now carry new keys (no message can still name the old ones).
    await bob.client.upload_keys(pre_keys=bob.keys.prekeys(1, 1))
