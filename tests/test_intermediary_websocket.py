"""The intermediary's WebSocket over a real loopback socket: push, backlog, ack, 4409."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets.asyncio.client
import websockets.exceptions

from intermediary_fixtures import (
    Registered,
    database_url,  # noqa: F401 - autouse, both dialects
    register,
    running_server,
)
from tigress_signal.errors import AuthenticationFailed, ChannelClosed, ChannelError
from tigress_signal.intermediary.client import (
    Delivery,
    IntermediaryClient,
    MessageStream,
    OutgoingMessage,
)
from tigress_signal.intermediary.server import IntermediaryServer

WAIT = 5.0  # seconds any expected frame may take; nothing here should come close


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    async with running_server(tmp_path) as running:
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


async def send(sender: Registered, recipient: Registered, content: bytes, **options: Any) -> None:
    await sender.client.send_message(
        recipient.uuid,
        OutgoingMessage(
            type=1,
            destination_device_id=1,
            destination_registration_id=recipient.keys.registration_id,
            content=content,
        ),
        **options,
    )


async def next_delivery(stream: MessageStream) -> Delivery:
    delivery = await asyncio.wait_for(stream.receive(), WAIT)
    assert delivery is not None
    return delivery


async def nothing_arrives(stream: MessageStream, seconds: float = 0.3) -> bool:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await stream.receive(stop) is None


def raw_connect(device: Registered, server: IntermediaryServer, password: str | None = None):
    from tigress_signal.intermediary.client import DeviceCredentials

    credentials = DeviceCredentials(device.uuid, 1, password or device.password)
    return websockets.asyncio.client.connect(
        server.url.replace("http", "ws") + "/v1/websocket/",
        additional_headers={"Authorization": credentials.authorization()},
        proxy=None,
    )


async def test_backlog_oldest_first_then_queue_empty_then_push(alice, bob):
    for text in (b"one", b"two", b"three"):
        await send(alice, bob, text)
    async with bob.client.connect_websocket() as stream:
        backlog = [await next_delivery(stream) for _ in range(3)]
        assert [d.envelope.content for d in backlog] == [b"one", b"two", b"three"]
        assert not stream.queue_empty.is_set()
        assert await nothing_arrives(stream)
        assert stream.queue_empty.is_set()

        await send(alice, bob, b"pushed")
        pushed = await next_delivery(stream)
        assert pushed.envelope.content == b"pushed"
        assert pushed.envelope.source_uuid == alice.uuid


async def test_the_wire_frames(alice, bob, server):
    await send(alice, bob, b"stored")
    async with raw_connect(bob, server) as socket:
        first = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        empty = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        assert first["type"] == "request" and first["verb"] == "PUT"
        assert first["path"] == "/api/v1/message" and isinstance(first["id"], int)
        assert first["body"]["sourceUuid"] == alice.uuid
        assert first["body"]["destinationUuid"] == bob.uuid
        assert empty == {
            "type": "request",
            "id": empty["id"],
            "verb": "PUT",
            "path": "/api/v1/queue/empty",
        }
        assert empty["id"] != first["id"]
        await socket.send(json.dumps({"type": "response", "id": first["id"], "status": 200}))
        await asyncio.sleep(0.2)
    assert (await bob.client.list_messages()).messages == []


async def test_an_ack_deletes_and_other_answers_keep_the_message(alice, bob):
    await send(alice, bob, b"keep")
    await send(alice, bob, b"drop")
    async with bob.client.connect_websocket() as stream:
        keep = await next_delivery(stream)
        drop = await next_delivery(stream)
        await stream.reject(keep.id, 500)
        await drop.acknowledge()
        assert await nothing_arrives(stream)  # a rejected message is not re-sent at once
    remaining = (await bob.client.list_messages()).messages
    assert [m.content for m in remaining] == [b"keep"]


async def test_unacknowledged_messages_are_delivered_again_on_the_next_connection(alice, bob):
    await send(alice, bob, b"again")
    async with bob.client.connect_websocket() as stream:
        first = await next_delivery(stream)
    async with bob.client.connect_websocket() as stream:
        second = await next_delivery(stream)
        assert second.envelope.guid == first.envelope.guid
        await second.acknowledge()
        assert await nothing_arrives(stream)
    async with bob.client.connect_websocket() as stream:
        assert await nothing_arrives(stream)
        assert stream.queue_empty.is_set()


async def test_a_second_connection_closes_the_first_with_4409(alice, bob):
    async with bob.client.connect_websocket() as first:
        assert await nothing_arrives(first, 0.1)
        async with bob.client.connect_websocket() as second:
            with pytest.raises(ChannelClosed) as caught:
                await asyncio.wait_for(first.receive(), WAIT)
            assert first.close_code == 4409
            assert "4409" in str(caught.value)
            await send(alice, bob, b"to the new one")
            delivery = await next_delivery(second)
            assert delivery.envelope.content == b"to the new one"
            await delivery.acknowledge()


async def test_the_4409_close_frame_on_the_wire(bob, server):
    async with raw_connect(bob, server) as first:
        await asyncio.wait_for(first.recv(), WAIT)  # queue/empty
        async with raw_connect(bob, server):
            with pytest.raises(websockets.exceptions.ConnectionClosed) as caught:
                await asyncio.wait_for(first.recv(), WAIT)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 4409
    assert caught.value.rcvd.reason == "Connected elsewhere"


async def test_wrong_credentials_are_refused_with_401(bob, server):
    with pytest.raises(websockets.exceptions.InvalidStatus) as caught:
        async with raw_connect(bob, server, password="wrong"):
            pass
    assert caught.value.response.status_code == 401
    assert json.loads(caught.value.response.body)["error"] == "unauthorized"

    client = IntermediaryClient(server.url)
    client.authenticate(bob.uuid, 1, "wrong")
    with pytest.raises(AuthenticationFailed):
        async with client.connect_websocket():
            pass
    await client.aclose()


async def test_at_most_max_unacknowledged_deliveries_are_outstanding(tmp_path):
    async with running_server(tmp_path, max_unacknowledged=3) as server:
        alice = await register(server.url)
        bob = await register(server.url)
        try:
            for i in range(5):
                await send(alice, bob, str(i).encode())
            async with bob.client.connect_websocket() as stream:
                window = [await next_delivery(stream) for _ in range(3)]
                assert await nothing_arrives(stream)
                await window[0].acknowledge()
                fourth = await next_delivery(stream)
                assert fourth.envelope.content == b"3"
                await stream.reject(window[1].id)  # any answer frees the slot
                fifth = await next_delivery(stream)
                assert fifth.envelope.content == b"4"
        finally:
            await alice.client.aclose()
            await bob.client.aclose()


async def test_an_online_message_reaches_a_connected_device(alice, bob):
    async with bob.client.connect_websocket() as stream:
        assert await nothing_arrives(stream, 0.1)
        await send(alice, bob, b"live", online=True)
        delivery = await next_delivery(stream)
        assert delivery.envelope.content == b"live"


async def test_deliveries_end_when_the_stop_event_is_set(alice, bob):
    await send(alice, bob, b"x")
    stop = asyncio.Event()
    seen = []
    async with bob.client.connect_websocket() as stream:
        async for delivery in stream.deliveries(stop):
            seen.append(delivery.envelope.content)
            stop.set()
    assert seen == [b"x"]


async def test_garbage_frames_are_ignored_and_requests_are_answered_404(alice, bob, server):
    async with raw_connect(bob, server) as socket:
        await asyncio.wait_for(socket.recv(), WAIT)  # queue/empty
        for frame in [
            "not json",
            "[]",
            '{"type": "response"}',
            '{"type": "response", "id": true, "status": 200}',
            '{"type": "response", "id": 12345, "status": 200}',
            '{"type": "other", "id": 1}',
            b"\x00\x01binary",
            "[" * 30_000 + "]" * 30_000,  # nested deeper than the JSON parser recurses
        ]:
            await socket.send(frame)
        await socket.send(json.dumps({"type": "request", "id": 77, "verb": "GET", "path": "/x"}))
        answer = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        assert answer["type"] == "response" and answer["id"] == 77 and answer["status"] == 404
        await send(alice, bob, b"still working")
        pushed = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        assert pushed["path"] == "/api/v1/message"


async def test_stopping_the_server_closes_open_websockets(tmp_path):
    async with running_server(tmp_path) as server:
        bob = await register(server.url)
        client = bob.client
        async with client.connect_websocket() as stream:
            assert await nothing_arrives(stream, 0.1)
            await server.stop()
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(stream.receive(), WAIT)
        await client.aclose()


async def test_an_unreachable_server_is_a_channel_error(tmp_path):
    async with running_server(tmp_path) as server:
        url = server.url
    client = IntermediaryClient(url, timeout=2.0)
    client.authenticate("00000000-0000-4000-8000-000000000000", 1, "x")
    with pytest.raises(ChannelError):
        await client.whoami()
    with pytest.raises(ChannelError):
        async with client.connect_websocket():
            pass
    await client.aclose()
