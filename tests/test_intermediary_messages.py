"""Sending, listing and acknowledging messages through the intermediary."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import (
    KIB,
    NO_LIMIT,
    Registered,
    assert_error_body,
    b64,
    database_rows,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    link,
    raw_client,
    register,
    running_server,
)
from tigress_signal.errors import (
    MismatchedDevices,
    NotFound,
    PayloadTooLarge,
    StaleDevices,
)
from tigress_signal.intermediary.client import OutgoingMessage
from tigress_signal.intermediary.server import IntermediaryServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    # The send limit has its own tests (test_intermediary_limits.py); here it must not bite.
    async with running_server(tmp_path, message_rate=NO_LIMIT) as running:
        yield running


@pytest.fixture
async def alice(server) -> AsyncIterator[Registered]:
    device = await register(server.url)
    yield device
    await device.client.aclose()


@pytest.fixture
async def bob(server) -> AsyncIterator[Registered]:
    device = await register(server.url)
    yield device
    await device.client.aclose()


def message_to(device: Registered, content: bytes, *, kind: int = 1) -> OutgoingMessage:
    return OutgoingMessage(
        type=kind,
        destination_device_id=1,
        destination_registration_id=device.keys.registration_id,
        content=content,
    )


async def test_send_list_acknowledge(alice, bob):
    result = await alice.client.send_messages(
        bob.uuid, [message_to(bob, b"first", kind=3)], timestamp=1234
    )
    assert result.needs_sync is False
    await alice.client.send_message(bob.uuid, message_to(bob, b"second"))

    page = await bob.client.list_messages()
    assert page.more is False
    first, second = page.messages
    assert (first.content, second.content) == (b"first", b"second")
    assert first.type == 3 and second.type == 1
    assert first.timestamp == 1234
    assert first.source_uuid == alice.uuid and first.source_device == 1
    assert first.destination_uuid == bob.uuid
    assert first.urgent is True and first.server_timestamp > 0
    assert first.guid != second.guid

    await bob.client.acknowledge(first.guid)
    assert [m.content for m in (await bob.client.list_messages()).messages] == [b"second"]
    await bob.client.acknowledge(second.guid)
    assert (await bob.client.list_messages()).messages == []
    # The sender's own mailbox is untouched.
    assert (await alice.client.list_messages()).messages == []


async def test_the_wire_form_of_a_listed_envelope(alice, bob):
    async with raw_client(bob.client.base_url) as http:
        sent = await http.put(
            f"/v1/messages/{bob.uuid}",
            auth=alice.auth,
            json={
                "messages": [
                    {
                        "type": 1,
                        "destinationDeviceId": 1,
                        "destinationRegistrationId": bob.keys.registration_id,
                        "content": b64(b"hello"),
                    }
                ],
                "online": False,
                "urgent": False,
                "timestamp": 99,
            },
        )
        assert sent.status_code == 200 and sent.json() == {"needsSync": False}
        listed = await http.get("/v1/messages", auth=bob.auth)
    body = listed.json()
    assert set(body) == {"messages", "more"}
    (envelope,) = body["messages"]
    assert set(envelope) == {
        "guid",
        "type",
        "timestamp",
        "sourceUuid",
        "sourceDevice",
        "destinationUuid",
        "content",
        "serverTimestamp",
        "urgent",
    }
    assert envelope["content"] == b64(b"hello")
    assert envelope["urgent"] is False and envelope["timestamp"] == 99


async def test_at_most_100_messages_per_page_oldest_first(alice, bob):
    for i in range(102):
        await alice.client.send_message(bob.uuid, message_to(bob, str(i).encode()))
    page = await bob.client.list_messages()
    assert page.more is True
    assert [m.content for m in page.messages] == [str(i).encode() for i in range(100)]
    for envelope in page.messages[:2]:
        await bob.client.acknowledge(envelope.guid)
    page = await bob.client.list_messages()
    assert page.more is False and len(page.messages) == 100
    assert page.messages[-1].content == b"101"


async def test_content_of_96_kib_is_accepted_and_one_byte_more_is_413(alice, bob, tmp_path):
    await alice.client.send_message(bob.uuid, message_to(bob, os.urandom(96 * KIB)))
    with pytest.raises(PayloadTooLarge) as caught:
        await alice.client.send_message(bob.uuid, message_to(bob, os.urandom(96 * KIB + 1)))
    assert caught.value.status == 413
    assert caught.value.body["error"] == "payload_too_large"
    assert await database_rows("SELECT length(content) FROM messages") == [(96 * KIB,)]


async def test_a_body_over_the_limit_is_413_without_being_stored(tmp_path):
    async with running_server(tmp_path, max_body_bytes=200 * KIB) as server:
        sender = await register(server.url)
        try:
            async with raw_client(server.url) as http:
                response = await http.put(
                    f"/v1/messages/{sender.uuid}",
                    auth=sender.auth,
                    content=b'{"messages": ["' + b"A" * (300 * KIB) + b'"]}',
                    headers={"Content-Type": "application/json"},
                )

                async def chunks():
                    for _ in range(300):
                        yield b" " * KIB

                streamed = await http.put(
                    f"/v1/messages/{sender.uuid}", auth=sender.auth, content=chunks()
                )
        finally:
            await sender.client.aclose()
    assert_error_body(response, 413, "payload_too_large")
    assert_error_body(streamed, 413, "payload_too_large")


async def test_unknown_recipient_is_404(alice):
    message = OutgoingMessage(
        type=1, destination_device_id=1, destination_registration_id=1, content=b"x"
    )
    with pytest.raises(NotFound) as caught:
        await alice.client.send_messages(str(uuid.uuid4()), [message])
    assert caught.value.status == 404


async def test_missing_and_extra_devices_are_409_with_both_lists(alice, bob):
    async with raw_client(bob.client.base_url) as http:
        missing = await http.put(
            f"/v1/messages/{bob.uuid}", auth=alice.auth, json={"messages": [], "timestamp": 1}
        )
        extra = await http.put(
            f"/v1/messages/{bob.uuid}",
            auth=alice.auth,
            json={
                "messages": [
                    {
                        "type": 1,
                        "destinationDeviceId": device,
                        "destinationRegistrationId": bob.keys.registration_id,
                        "content": b64(b"x"),
                    }
                    for device in (1, 2, 5)
                ]
            },
        )
    assert_error_body(missing, 409, "mismatched_devices")
    assert missing.json()["missingDevices"] == [1] and missing.json()["extraDevices"] == []
    assert_error_body(extra, 409, "mismatched_devices")
    assert extra.json()["missingDevices"] == [] and extra.json()["extraDevices"] == [2, 5]
    assert (await bob.client.list_messages()).messages == []

    with pytest.raises(MismatchedDevices) as caught:
        await alice.client.send_messages(bob.uuid, [])
    assert caught.value.missing_devices == [1] and caught.value.extra_devices == []


async def test_a_wrong_registration_id_is_410_with_the_stale_devices(alice, bob):
    stale = OutgoingMessage(
        type=1,
        destination_device_id=1,
        destination_registration_id=bob.keys.registration_id + 1,
        content=b"x",
    )
    with pytest.raises(StaleDevices) as caught:
        await alice.client.send_message(bob.uuid, stale)
    assert caught.value.status == 410
    assert caught.value.stale_devices == [1]
    assert caught.value.body["error"] == "stale_devices"
    assert (await bob.client.list_messages()).messages == []


async def test_sending_to_ones_own_account_excludes_the_sending_device(alice):
    # With one device there is nobody to sync to: the only valid list is empty.
    result = await alice.client.send_messages(alice.uuid, [])
    assert result.needs_sync is False
    with pytest.raises(MismatchedDevices) as caught:
        await alice.client.send_message(alice.uuid, message_to(alice, b"self"))
    assert caught.value.extra_devices == [1]


async def test_an_online_message_to_an_offline_device_is_not_stored(alice, bob):
    await alice.client.send_messages(bob.uuid, [message_to(bob, b"ephemeral")], online=True)
    assert (await bob.client.list_messages()).messages == []


async def test_another_accounts_message_cannot_be_acknowledged(alice, bob, server):
    await alice.client.send_message(bob.uuid, message_to(bob, b"for bob"))
    (envelope,) = (await bob.client.list_messages()).messages
    mallory = await register(server.url)
    try:
        with pytest.raises(NotFound):
            await mallory.client.acknowledge(envelope.guid)
        with pytest.raises(NotFound):
            await alice.client.acknowledge(envelope.guid)
        assert (await mallory.client.list_messages()).messages == []
    finally:
        await mallory.client.aclose()
    assert [m.guid for m in (await bob.client.list_messages()).messages] == [envelope.guid]


async def test_acknowledging_twice_or_an_unknown_guid_is_404(alice, bob):
    await alice.client.send_message(bob.uuid, message_to(bob, b"x"))
    (envelope,) = (await bob.client.list_messages()).messages
    await bob.client.acknowledge(envelope.guid)
    with pytest.raises(NotFound):
        await bob.client.acknowledge(envelope.guid)
    with pytest.raises(NotFound):
        await bob.client.acknowledge(str(uuid.uuid4()))
    async with raw_client(bob.client.base_url) as http:
        response = await http.delete("/v1/messages/uuid/not-a-guid", auth=bob.auth)
    assert_error_body(response, 422)


async def test_list_all_messages_returns_the_listed_page(alice, bob):
    for text in (b"a", b"b"):
        await alice.client.send_message(bob.uuid, message_to(bob, text))
    assert [m.content for m in await bob.client.list_all_messages()] == [b"a", b"b"]


# -- type 8: plaintext content (decryption-error messages) --------------------------------------


async def test_plaintext_content_is_carried_as_type_8(alice, bob):
    await alice.client.send_messages(bob.uuid, [message_to(bob, b"error", kind=8)], timestamp=77)
    (envelope,) = (await bob.client.list_messages()).messages
    assert (envelope.type, envelope.content, envelope.timestamp) == (8, b"error", 77)


async def test_plaintext_content_has_the_same_size_limit(alice, bob):
    with pytest.raises(PayloadTooLarge):
        await alice.client.send_message(
            bob.uuid, message_to(bob, os.urandom(96 * KIB + 1), kind=8)
        )
    assert (await bob.client.list_messages()).messages == []


async def test_only_plaintext_content_may_go_to_some_of_the_devices(alice, bob, server):
    second = await link(server.url, bob, registration_id=5151)
    try:
        to_second = OutgoingMessage(
            type=8, destination_device_id=second.device_id, destination_registration_id=5151,
            content=b"to the second device",
        )  # fmt: skip
        await alice.client.send_messages(bob.uuid, [to_second])
        assert [m.content for m in (await second.client.list_messages()).messages] == [
            b"to the second device"
        ]
        assert (await bob.client.list_messages()).messages == []

        # A ciphertext still goes to every device.
        with pytest.raises(MismatchedDevices) as caught:
            await alice.client.send_messages(bob.uuid, [message_to(bob, b"x")])
        assert caught.value.missing_devices == [second.device_id]
        # Extra devices and stale registration ids are refused for plaintext content too.
        with pytest.raises(MismatchedDevices) as extra:
            await alice.client.send_messages(
                bob.uuid, [to_second.model_copy(update={"destination_device_id": 9})]
            )
        assert extra.value.extra_devices == [9]
        with pytest.raises(StaleDevices):
            await alice.client.send_messages(
                bob.uuid, [to_second.model_copy(update={"destination_registration_id": 1})]
            )
        # An empty send is not "plaintext content to some devices".
        with pytest.raises(MismatchedDevices):
            await alice.client.send_messages(bob.uuid, [])
        assert len((await second.client.list_messages()).messages) == 1
        assert (await bob.client.list_messages()).messages == []
    finally:
        await second.client.aclose()
