"""Prekey upload, counts and bundle fetch of the intermediary."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import (
    NO_LIMIT,
    Registered,
    assert_error_body,
    b64,
    database_rows,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    prekey_json,
    raw_client,
    register,
    running_server,
    signed_json,
)
from tigress_signal.errors import NotFound, ServerApiError
from tigress_signal.intermediary.server import IntermediaryServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    # The fetch limit has its own tests (test_intermediary_limits.py); here it must not bite.
    async with running_server(tmp_path, bundle_fetch_rate=NO_LIMIT) as running:
        yield running


@pytest.fixture
async def alice(server) -> AsyncIterator[Registered]:
    device = await register(server.url, prekeys=5, pq_prekeys=5)
    yield device
    await device.client.aclose()


@pytest.fixture
async def bob(server) -> AsyncIterator[Registered]:
    device = await register(server.url)
    yield device
    await device.client.aclose()


async def test_counts_after_upload(alice):
    counts = await alice.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (5, 5)


async def test_a_non_empty_list_replaces_that_kind_and_an_absent_one_keeps_it(alice):
    await alice.client.upload_keys(pre_keys=alice.keys.prekeys(100, 3))
    counts = await alice.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (3, 5)
    await alice.client.upload_keys(pre_keys=[], pq_pre_keys=alice.keys.kyber_prekeys(200, 2))
    counts = await alice.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (3, 2)


async def test_upload_with_a_bad_signature_is_422_and_changes_nothing(alice, tmp_path):
    before = await database_rows("SELECT signed_prekey FROM devices")
    good = alice.keys.kyber_prekeys(50, 3)
    bad = alice.keys.kyber_prekey(53, valid=False)
    for attempt in [
        {"pq_pre_keys": [*good, bad]},
        {"signed_prekey": alice.keys.signed_prekey(7, valid=False)},
        {"pq_last_resort_prekey": alice.keys.kyber_prekey(8, valid=False)},
        {"signed_prekey": alice.keys.signed_prekey(7), "pq_pre_keys": [bad]},
    ]:
        with pytest.raises(ServerApiError) as caught:
            await alice.client.upload_keys(**attempt)
        assert caught.value.status == 422
        assert caught.value.body["error"] == "invalid_signature"
    counts = await alice.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (5, 5)
    assert await database_rows("SELECT signed_prekey FROM devices") == before


async def test_signatures_are_checked_against_the_stored_identity_key(alice, bob):
    # Bob's keys are validly signed, but by Bob's identity, not Alice's.
    with pytest.raises(ServerApiError) as caught:
        await alice.client.upload_keys(signed_prekey=bob.keys.signed_prekey(3))
    assert caught.value.status == 422


async def test_upload_replaces_signed_and_last_resort_keys(alice, bob):
    signed = alice.keys.signed_prekey(77)
    last_resort = alice.keys.kyber_prekey(78)
    await alice.client.upload_keys(signed_prekey=signed, pq_last_resort_prekey=last_resort)
    bundle = await bob.client.fetch_bundle(alice.uuid, 1)
    (device,) = bundle.devices
    assert device.signed_prekey == signed
    # The one-time Kyber keys still come first.
    assert device.pq_prekey.key_id == 1


async def test_a_fetch_takes_exactly_one_of_each_oldest_first(alice, bob, tmp_path):
    bundle = await bob.client.fetch_bundle(alice.uuid)
    assert bundle.identity_key == alice.keys.identity_key
    (device,) = bundle.devices
    assert device.device_id == 1
    assert device.registration_id == alice.keys.registration_id
    assert device.identity_key == alice.keys.identity_key
    assert device.prekey is not None and device.prekey.key_id == 1
    assert device.pq_prekey.key_id == 1
    counts = await alice.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (4, 4)
    remaining = await database_rows("SELECT key_id FROM one_time_prekeys ORDER BY seq")
    assert remaining == [(2,), (3,), (4,), (5,)]
    second = (await bob.client.fetch_bundle(alice.uuid, 1)).devices[0]
    assert second.prekey is not None and second.prekey.key_id == 2
    assert second.pq_prekey.key_id == 2


async def test_the_bundle_carries_the_uploaded_bytes(alice, bob):
    uploaded = alice.keys.prekeys(500, 1)
    pq = alice.keys.kyber_prekeys(600, 1)
    await alice.client.upload_keys(pre_keys=uploaded, pq_pre_keys=pq)
    async with raw_client(bob.client.base_url) as http:
        response = await http.get(f"/v2/keys/{alice.uuid}/*", auth=bob.auth)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"identityKey", "devices"}
    (device,) = body["devices"]
    assert set(device) == {"deviceId", "registrationId", "signedPreKey", "preKey", "pqPreKey"}
    assert device["preKey"] == prekey_json(uploaded[0])
    assert device["pqPreKey"] == signed_json(pq[0])
    assert body["identityKey"] == b64(alice.keys.identity_key)


async def test_concurrent_fetches_never_get_the_same_key(server, bob):
    target = await register(server.url, prekeys=30, pq_prekeys=30)
    try:
        bundles = await asyncio.gather(
            *(bob.client.fetch_bundle(target.uuid, 1) for _ in range(40))
        )
    finally:
        await target.client.aclose()
    ec_ids = [b.devices[0].prekey.key_id for b in bundles if b.devices[0].prekey is not None]
    pq_ids = [b.devices[0].pq_prekey.key_id for b in bundles]
    assert sorted(ec_ids) == list(range(1, 31))
    one_time_pq = [i for i in pq_ids if i != 999]
    assert sorted(one_time_pq) == list(range(1, 31))
    # The ten fetches after the pools ran dry: no EC key, the last-resort Kyber key.
    assert sum(1 for b in bundles if b.devices[0].prekey is None) == 10
    assert pq_ids.count(999) == 10


async def test_empty_pools_give_null_prekey_and_the_last_resort_kyber_key(bob, server):
    target = await register(server.url, prekeys=1, pq_prekeys=1)
    try:
        first = (await bob.client.fetch_bundle(target.uuid)).devices[0]
        assert first.prekey is not None and first.pq_prekey.key_id == 1
        for _ in range(3):
            later = (await bob.client.fetch_bundle(target.uuid)).devices[0]
            assert later.prekey is None
            assert later.pq_prekey.key_id == 999  # last resort, never consumed
        async with raw_client(server.url) as http:
            response = await http.get(f"/v2/keys/{target.uuid}/1", auth=bob.auth)
        assert response.json()["devices"][0]["preKey"] is None
        counts = await target.client.prekey_counts()
        assert (counts.count, counts.pq_count) == (0, 0)
    finally:
        await target.client.aclose()


async def test_a_fresh_account_has_no_one_time_keys(bob, server):
    other = await register(server.url)
    try:
        counts = await other.client.prekey_counts()
        assert (counts.count, counts.pq_count) == (0, 0)
        device = (await bob.client.fetch_bundle(other.uuid)).devices[0]
        assert device.prekey is None and device.pq_prekey.key_id == 999
    finally:
        await other.client.aclose()


async def test_unknown_account_or_device_is_404(bob):
    with pytest.raises(NotFound):
        await bob.client.fetch_bundle(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        await bob.client.fetch_bundle(bob.uuid, 2)


@pytest.mark.parametrize("device", ["0", "128", "-1", "abc", "1.5", "01234", "**", "%20"])
async def test_bad_device_id_in_the_path_is_422(alice, bob, device):
    async with raw_client(bob.client.base_url) as http:
        response = await http.get(f"/v2/keys/{alice.uuid}/{device}", auth=bob.auth)
    assert_error_body(response, 422, "invalid_request")


@pytest.mark.parametrize("target", ["nope", "PNI:" + str(uuid.uuid4()), "1234"])
async def test_bad_account_id_in_the_path_is_422(bob, target):
    async with raw_client(bob.client.base_url) as http:
        response = await http.get(f"/v2/keys/{target}/1", auth=bob.auth)
    assert_error_body(response, 422, "invalid_request")


async def test_fetching_a_bundle_needs_credentials(alice):
    async with raw_client(alice.client.base_url) as http:
        response = await http.get(f"/v2/keys/{alice.uuid}/1")
    assert_error_body(response, 401)
    assert (await alice.client.prekey_counts()).count == 5


async def test_more_than_100_keys_or_duplicate_ids_are_422(alice):
    async with raw_client(alice.client.base_url) as http:
        too_many = await http.put(
            "/v2/keys",
            auth=alice.auth,
            json={"preKeys": [prekey_json(k) for k in alice.keys.prekeys(1, 101)]},
        )
        twice = alice.keys.prekeys(7, 1) * 2
        duplicate = await http.put(
            "/v2/keys", auth=alice.auth, json={"preKeys": [prekey_json(k) for k in twice]}
        )
        pni = await http.put("/v2/keys?identity=pni", auth=alice.auth, json={})
        exactly_100 = await http.put(
            "/v2/keys",
            auth=alice.auth,
            json={"preKeys": [prekey_json(k) for k in alice.keys.prekeys(101, 100)]},
        )
    assert_error_body(too_many, 422)
    assert_error_body(duplicate, 422)
    assert_error_body(pni, 422)
    assert exactly_100.status_code == 200 and exactly_100.json() == {}
    assert (await alice.client.prekey_counts()).count == 100
