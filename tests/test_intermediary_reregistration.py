"""Registering an account again with a new identity: ``PUT /v1/accounts/identity``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import (
    NO_LIMIT,
    Registered,
    assert_error_body,
    b64,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    link,
    new_keys,
    raw_client,
    register,
    running_server,
    signed_json,
)
from tigress_signal.errors import AuthenticationFailed, StaleDevices
from tigress_signal.intermediary.client import IntermediaryClient, OutgoingMessage
from tigress_signal.intermediary.server import IntermediaryServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    async with running_server(tmp_path, message_rate=NO_LIMIT) as running:
        yield running


@pytest.fixture
async def alice(server) -> AsyncIterator[Registered]:
    device = await register(server.url)
    yield device
    await device.client.aclose()


@pytest.fixture
async def bob(server) -> AsyncIterator[Registered]:
    device = await register(server.url, prekeys=3, pq_prekeys=3)
    yield device
    await device.client.aclose()


def to_device_1(registration_id: int, content: bytes) -> OutgoingMessage:
    return OutgoingMessage(
        type=1,
        destination_device_id=1,
        destination_registration_id=registration_id,
        content=content,
    )


async def test_reregistration_replaces_identity_devices_keys_messages_and_password(
    server, alice, bob
):
    await alice.client.send_messages(
        bob.uuid, [to_device_1(bob.keys.registration_id, b"for the old identity")]
    )
    linked = await link(server.url, bob)
    fresh = new_keys(registration_id=777)

    created = await bob.client.replace_identity(
        identity_key=fresh.identity_key,
        registration_id=fresh.registration_id,
        signed_prekey=fresh.signed_prekey(key_id=1),
        pq_last_resort_prekey=fresh.kyber_prekey(key_id=1),
    )
    assert (created.uuid, created.device_id) == (bob.uuid, 1)
    assert created.password != bob.password

    # The old password stops working at once; the new one works.
    with pytest.raises(AuthenticationFailed):
        await bob.client.whoami()
    with pytest.raises(AuthenticationFailed):
        await linked.client.whoami()
    await linked.client.aclose()
    bob.client.authenticate(bob.uuid, 1, created.password)
    assert (await bob.client.whoami()).uuid == bob.uuid

    # Others now get the new identity, only the primary device, and no old one-time key.
    bundle = await alice.client.fetch_bundle(bob.uuid)
    assert bundle.identity_key == fresh.identity_key
    assert [d.device_id for d in bundle.devices] == [1]
    (device,) = bundle.devices
    assert device.registration_id == 777
    assert device.prekey is None
    assert device.pq_prekey.key_id == 1
    counts = await bob.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (0, 0)

    # Messages for the old identity are gone; a send with the old registration id is stale.
    assert await bob.client.list_all_messages() == []
    with pytest.raises(StaleDevices) as caught:
        await alice.client.send_messages(
            bob.uuid, [to_device_1(bob.keys.registration_id, b"late")]
        )
    assert caught.value.stale_devices == [1]
    await alice.client.send_messages(bob.uuid, [to_device_1(777, b"to the new install")])
    (envelope,) = await bob.client.list_all_messages()
    assert envelope.content == b"to the new install"


async def test_only_the_primary_device_may_register_again(server, bob):
    linked = await link(server.url, bob)
    try:
        fresh = new_keys()
        async with raw_client(server.url) as http:
            response = await http.put(
                "/v1/accounts/identity", json=fresh.account_body(), auth=linked.auth
            )
        assert_error_body(response, 403, "forbidden")
    finally:
        await linked.client.aclose()
    assert (await bob.client.whoami()).uuid == bob.uuid


@pytest.mark.parametrize("broken", ["signed", "kyber"])
async def test_a_bad_signature_changes_nothing(server, alice, bob, broken):
    fresh = new_keys()
    body = fresh.account_body(valid_signed=broken != "signed", valid_kyber=broken != "kyber")
    async with raw_client(server.url) as http:
        response = await http.put("/v1/accounts/identity", json=body, auth=bob.auth)
        assert_error_body(response, 422, "invalid_signature")
        unauthenticated = await http.put("/v1/accounts/identity", json=body)
        assert unauthenticated.status_code == 401
        malformed = await http.put(
            "/v1/accounts/identity",
            json={
                "identityKey": b64(b"short"),
                "signedPreKey": signed_json(fresh.signed_prekey()),
            },
            auth=bob.auth,
        )
        assert malformed.status_code == 422
    assert (await bob.client.whoami()).uuid == bob.uuid
    bundle = await alice.client.fetch_bundle(bob.uuid)
    assert bundle.identity_key == bob.keys.identity_key
    assert (await bob.client.prekey_counts()).count == 2


async def test_a_client_without_credentials_cannot_register_again(server):
    async with IntermediaryClient(server.url) as client:
        fresh = new_keys()
        with pytest.raises(AuthenticationFailed):
            await client.replace_identity(
                identity_key=fresh.identity_key,
                registration_id=1,
                signed_prekey=fresh.signed_prekey(),
                pq_last_resort_prekey=fresh.kyber_prekey(),
            )


async def test_registering_again_is_rate_limited_per_account(tmp_path):
    rate = {"burst": 2, "per_second": 0.001}
    async with running_server(tmp_path, account_creation_rate=rate) as server:
        bob = await register(server.url)
        statuses = []
        try:
            async with raw_client(server.url) as http:
                auth = bob.auth
                for _ in range(3):
                    response = await http.put(
                        "/v1/accounts/identity", json=new_keys().account_body(), auth=auth
                    )
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        auth = (auth[0], response.json()["password"])
        finally:
            await bob.client.aclose()
    assert statuses == [200, 200, 429]
    assert_error_body(response, 429)
    assert "retry-after" in response.headers
