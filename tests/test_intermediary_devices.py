"""Several devices per account: linking, device lists in sends (409/410), delivery, removal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import (
    FakeKeys,
    Registered,
    assert_error_body,
    database_execute,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    link,
    raw_client,
    register,
    running_server,
    signed_json,
)
from tigress_signal.errors import (
    AuthenticationFailed,
    ChannelClosed,
    DeviceLimitReached,
    InvalidLinkCode,
    MismatchedDevices,
    StaleDevices,
)
from tigress_signal.intermediary.client import IntermediaryClient, OutgoingMessage
from tigress_signal.intermediary.server import IntermediaryServer

WAIT = 5.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    async with running_server(tmp_path, max_devices_per_account=3) as running:
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


@pytest.fixture
async def bob2(server, bob) -> AsyncIterator[Registered]:
    device = await link(server.url, bob, registration_id=777)
    yield device
    await device.client.aclose()


def to(device_id: int, registration_id: int, content: bytes = b"ciphertext") -> OutgoingMessage:
    return OutgoingMessage(
        type=1,
        destination_device_id=device_id,
        destination_registration_id=registration_id,
        content=content,
    )


async def test_a_linked_device_gets_its_own_id_password_and_keys(server, bob, bob2):
    assert (bob2.uuid, bob2.device_id) == (bob.uuid, 2)
    assert bob2.password != bob.password
    who = await bob2.client.whoami()
    assert (who.uuid, who.device_id) == (bob.uuid, 2)
    devices = await bob.client.list_devices()
    assert [(d.id, d.registration_id) for d in devices] == [(1, 4242), (2, 777)]

    # A bundle for every device: each with its own registration id and keys.
    bundle = await bob.client.fetch_bundle(bob.uuid, "*")
    assert [(d.device_id, d.registration_id) for d in bundle.devices] == [(1, 4242), (2, 777)]
    assert bundle.devices[0].signed_prekey.public_key != bundle.devices[1].signed_prekey.public_key
    assert bundle.devices[0].prekey is not None and bundle.devices[1].prekey is None


async def test_a_send_must_carry_one_message_per_device(alice, bob, bob2):
    with pytest.raises(MismatchedDevices) as caught:
        await alice.client.send_messages(bob.uuid, [to(1, 4242)])
    assert (caught.value.missing_devices, caught.value.extra_devices) == ([2], [])
    with pytest.raises(MismatchedDevices) as caught:
        await alice.client.send_messages(bob.uuid, [to(1, 4242), to(2, 777), to(3, 1)])
    assert (caught.value.missing_devices, caught.value.extra_devices) == ([], [3])
    with pytest.raises(StaleDevices) as stale:
        await alice.client.send_messages(bob.uuid, [to(1, 4242), to(2, 778)])
    assert stale.value.stale_devices == [2]
    await alice.client.send_messages(bob.uuid, [to(1, 4242, b"for 1"), to(2, 777, b"for 2")])
    assert [e.content for e in await bob.client.list_all_messages()] == [b"for 1"]
    assert [e.content for e in await bob2.client.list_all_messages()] == [b"for 2"]


async def test_the_409_and_410_bodies_on_the_wire(alice, bob, bob2):
    async with raw_client(alice.client.base_url) as http:
        body = {
            "messages": [
                {
                    "type": 1,
                    "destinationDeviceId": 2,
                    "destinationRegistrationId": 1,
                    "content": "AA==",
                }
            ]
        }
        mismatched = await http.put(f"/v1/messages/{bob.uuid}", auth=alice.auth, json=body)
        body["messages"].append({**body["messages"][0], "destinationDeviceId": 1})
        stale = await http.put(f"/v1/messages/{bob.uuid}", auth=alice.auth, json=body)
    assert_error_body(mismatched, 409, "mismatched_devices")
    assert mismatched.json()["missingDevices"] == [1]
    assert mismatched.json()["extraDevices"] == []
    assert_error_body(stale, 410, "stale_devices")
    assert stale.json()["staleDevices"] == [1, 2]


async def test_every_device_gets_its_copy_over_its_websocket(alice, bob, bob2):
    async with bob.client.connect_websocket() as one, bob2.client.connect_websocket() as two:
        await alice.client.send_messages(bob.uuid, [to(1, 4242, b"one"), to(2, 777, b"two")])
        first = await asyncio.wait_for(one.receive(), WAIT)
        second = await asyncio.wait_for(two.receive(), WAIT)
        assert first is not None and second is not None
        assert (first.envelope.content, second.envelope.content) == (b"one", b"two")
        await first.acknowledge()
        await second.acknowledge()


async def test_a_send_to_ones_own_account_reaches_the_other_devices(bob, bob2):
    result = await bob.client.send_messages(bob.uuid, [to(2, 777, b"sync")])
    assert result.needs_sync is False
    assert [e.content for e in await bob2.client.list_all_messages()] == [b"sync"]
    assert [e.source_device for e in await bob2.client.list_all_messages()] == [1]


async def test_needs_sync_is_true_for_a_sender_with_other_devices(alice, bob, bob2):
    result = await bob.client.send_messages(alice.uuid, [to(1, 4242)])
    assert result.needs_sync is True


async def test_a_link_code_works_once(server, bob):
    code = await bob.client.issue_link_code()
    keys = FakeKeys(bob.keys.identity_key, 900)
    new = IntermediaryClient(server.url)
    try:
        options = {
            "verification_code": code.verification_code,
            "registration_id": 900,
            "signed_prekey": keys.signed_prekey(),
            "pq_last_resort_prekey": keys.kyber_prekey(),
        }
        await new.link_device(**options)
        with pytest.raises(InvalidLinkCode):
            await new.link_device(**options)
        with pytest.raises(InvalidLinkCode):
            await new.link_device(**{**options, "verification_code": "made-up"})
    finally:
        await new.aclose()


async def test_an_expired_link_code_is_refused(server, bob):
    code = await bob.client.issue_link_code()
    await database_execute("UPDATE link_codes SET expires_at = 1")
    keys = FakeKeys(bob.keys.identity_key, 900)
    async with IntermediaryClient(server.url) as new:
        with pytest.raises(InvalidLinkCode):
            await new.link_device(
                verification_code=code.verification_code,
                registration_id=900,
                signed_prekey=keys.signed_prekey(),
                pq_last_resort_prekey=keys.kyber_prekey(),
            )


async def test_keys_not_signed_by_the_account_identity_are_422_and_the_code_stays(server, bob):
    code = await bob.client.issue_link_code()
    stranger = FakeKeys(b"\x05" + bytes(32), 900)
    async with raw_client(server.url) as http:
        refused = await http.put(
            "/v1/devices/link",
            json={
                "verificationCode": code.verification_code,
                "registrationId": 900,
                "signedPreKey": signed_json(stranger.signed_prekey()),
                "pqLastResortPreKey": signed_json(stranger.kyber_prekey()),
            },
        )
    assert_error_body(refused, 422, "invalid_signature")
    own = FakeKeys(bob.keys.identity_key, 900)
    async with IntermediaryClient(server.url) as new:
        linked = await new.link_device(
            verification_code=code.verification_code,
            registration_id=900,
            signed_prekey=own.signed_prekey(),
            pq_last_resort_prekey=own.kyber_prekey(),
        )
    assert linked.device_id == 2


async def test_the_device_limit(server, bob, bob2):
    third = await link(server.url, bob, registration_id=3)
    await third.client.aclose()
    with pytest.raises(DeviceLimitReached):
        await link(server.url, bob)


async def test_concurrent_links_with_one_code_make_one_device(server, bob):
    code = await bob.client.issue_link_code()
    keys = FakeKeys(bob.keys.identity_key, 900)
    clients = [IntermediaryClient(server.url) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                c.link_device(
                    verification_code=code.verification_code,
                    registration_id=900,
                    signed_prekey=keys.signed_prekey(),
                    pq_last_resort_prekey=keys.kyber_prekey(),
                )
                for c in clients
            ),
            return_exceptions=True,
        )
    finally:
        for c in clients:
            await c.aclose()
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, InvalidLinkCode) for r in results if isinstance(r, BaseException))
    assert len(await bob.client.list_devices()) == 2


async def test_removing_a_device_closes_its_websocket_and_its_credentials(alice, bob, bob2):
    async with bob2.client.connect_websocket() as stream:
        await bob.client.remove_device(2)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(stream.receive(), WAIT)
        assert stream.close_code == 4401
    with pytest.raises(AuthenticationFailed):
        await bob2.client.whoami()
    with pytest.raises(MismatchedDevices) as caught:
        await alice.client.send_messages(bob.uuid, [to(1, 4242), to(2, 777)])
    assert caught.value.extra_devices == [2]


async def test_a_relinked_device_id_with_a_new_registration_id_is_410(server, alice, bob, bob2):
    await bob.client.remove_device(2)
    again = await link(server.url, bob, registration_id=778)
    try:
        assert again.device_id == 2
        with pytest.raises(StaleDevices) as caught:
            await alice.client.send_messages(bob.uuid, [to(1, 4242), to(2, 777)])
        assert caught.value.stale_devices == [2]
    finally:
        await again.client.aclose()


async def test_who_may_remove_which_device(server, bob, bob2):
    third = await link(server.url, bob, registration_id=3)
    async with raw_client(server.url) as http:
        primary = await http.delete("/v1/devices/1", auth=bob2.auth)
        other = await http.delete("/v1/devices/3", auth=bob2.auth)
        unknown = await http.delete("/v1/devices/9", auth=bob.auth)
        bad = await http.delete("/v1/devices/0", auth=bob.auth)
    assert_error_body(primary, 403)
    assert_error_body(other, 403)
    assert_error_body(unknown, 404)
    assert_error_body(bad, 422)
    await third.client.remove_device(3)  # a device may remove itself
    await third.client.aclose()
    assert [d.id for d in await bob.client.list_devices()] == [1, 2]
