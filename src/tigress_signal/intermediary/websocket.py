"""The WebSocket ``/v1/websocket/``: stored messages pushed to a connected device.

After the upgrade (authenticated like any request; wrong credentials get an HTTP 401 instead
of a WebSocket) the server sends every stored message of the device, oldest first, as::

    {"type": "request", "id": <n>, "verb": "PUT", "path": "/api/v1/message", "body": <envelope>}

then ``{"type": "request", "id": <n>, "verb": "PUT", "path": "/api/v1/queue/empty"}`` once the
backlog is out, then each new message as it is stored. The device answers a delivery with
``{"type": "response", "id": <n>, "status": 200}``, which deletes the message; any other status
leaves it stored, to be delivered again on the next connection. At most ``max_unacknowledged``
deliveries are outstanding at once. A newer connection of the same device, in this process or
another one sharing the database, closes this one with code 4409; removing the device closes it
with 4401. When the server shuts down, uvicorn closes every WebSocket with 1012 (service
restart); messages in flight stay stored.

The connection remembers the ``seq`` of the last message it sent and asks the database only for
later ones, so a wake-up never re-sends what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from tigress_signal.errors import StoreError
from tigress_signal.intermediary.api import ApiError
from tigress_signal.intermediary.context import ServerContext, client_address, context_of
from tigress_signal.intermediary.delivery import CLOSE_CONNECTED_ELSEWHERE, Presence
from tigress_signal.intermediary.entities import MAX_MESSAGES_PER_PAGE, DeviceAddress
from tigress_signal.intermediary.messages import delete_message, messages_after

logger = logging.getLogger(__name__)

__all__ = ["CLOSE_CONNECTED_ELSEWHERE", "CLOSE_INTERNAL_ERROR", "websocket_endpoint"]

CLOSE_INTERNAL_ERROR = 1011
MESSAGE_PATH = "/api/v1/message"
QUEUE_EMPTY_PATH = "/api/v1/queue/empty"
ACK_STATUS = 200


async def websocket_endpoint(websocket: WebSocket) -> None:
    """Serve one device's WebSocket until it disconnects or is displaced."""
    context = context_of(websocket)
    try:
        context.limiter.check("address", client_address(websocket))
        device = await context.authenticate(websocket)
    except ApiError as exc:
        await websocket.send_denial_response(exc.response())
        return
    presence = context.hub.attach(device)
    try:
        await context.switchboard.connected(presence)
        await websocket.accept()
        await _Connection(context, websocket, presence).run()
    finally:
        context.hub.detach(presence)
        try:
            await context.switchboard.disconnected(presence)
        except StoreError as exc:
            # The process's presence rows go with its heartbeat row anyway (sweep, shutdown).
            logger.warning("could not record a WebSocket's end: %s", exc)


class _PeerGoneError(Exception):
    """The peer is gone; nothing more can be sent."""


class _Connection:
    """The delivery state of one open WebSocket."""

    def __init__(self, context: ServerContext, websocket: WebSocket, presence: Presence) -> None:
        self._context = context
        self._websocket = websocket
        self._presence = presence
        self._device: DeviceAddress = presence.device
        self._ids = itertools.count(1)
        self._in_flight: dict[int, str] = {}  # request id -> message guid
        self._slot_freed = asyncio.Event()
        self._cursor = 0

    async def run(self) -> None:
        deliver = asyncio.create_task(self._deliver(), name="websocket-deliver")
        receive = asyncio.create_task(self._receive(), name="websocket-receive")
        closing = asyncio.create_task(self._presence.closing.wait(), name="websocket-closing")
        tasks = {deliver, receive, closing}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if closing in done:
            await self._close(self._presence.close_code, self._presence.close_reason)
        elif deliver in done and not deliver.cancelled():
            error = deliver.exception()
            if error is not None and not isinstance(error, _PeerGoneError):
                logger.error("delivering to a WebSocket failed", exc_info=error)
                await self._close(CLOSE_INTERNAL_ERROR, "server error")
        elif receive in done and not receive.cancelled():
            error = receive.exception()
            if error is not None and not isinstance(error, _PeerGoneError):
                logger.error("reading a WebSocket failed", exc_info=error)
                await self._close(CLOSE_INTERNAL_ERROR, "server error")

    async def _deliver(self) -> None:
        """Send the backlog, then ``queue/empty``, then each new message as it is stored."""
        backlog_sent = False
        limit = self._context.config.max_unacknowledged
        while True:
            room = limit - len(self._in_flight)
            if room <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue

            # Clear before looking, so a message stored while we look wakes us again.
            self._presence.wakeup.clear()
            wanted = min(room, MAX_MESSAGES_PER_PAGE)
            batch = await messages_after(self._context, self._device, self._cursor, wanted)
            for seq, envelope in batch:
                request_id = next(self._ids)
                self._in_flight[request_id] = envelope.guid
                self._cursor = seq
                body = envelope.model_dump(mode="json", by_alias=True)
                await self._send_request(request_id, MESSAGE_PATH, body)
            if len(batch) == wanted:
                continue  # there may be more stored right now

            if not backlog_sent:
                await self._send_request(next(self._ids), QUEUE_EMPTY_PATH, None)
                backlog_sent = True
            await self._presence.wakeup.wait()

    async def _receive(self) -> None:
        """Read the device's frames until it disconnects."""
        while True:
            message = await self._websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                logger.debug("ignored a binary WebSocket frame")
                continue
            await self._on_frame(text)

    async def _on_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):  # nesting too deep is not JSON we take
            logger.debug("ignored a WebSocket frame that is not JSON")
            return
        if not isinstance(frame, dict):
            logger.debug("ignored a WebSocket frame that is not an object")
            return
        frame_id = frame.get("id")
        if type(frame_id) is not int:  # bool is an int subclass; it is no id
            logger.debug("ignored a WebSocket frame without a numeric id")
            return
        kind = frame.get("type")
        if kind == "response":
            await self._on_response(frame_id, frame.get("status"))
        elif kind == "request":
            # Signal clients may send REST calls over the socket; this server takes them
            # over HTTP only.
            await self._send(
                {"type": "response", "id": frame_id, "status": 404, "message": "Not Found"}
            )
        else:
            logger.debug("ignored a WebSocket frame of unknown type")

    async def _on_response(self, request_id: int, status: object) -> None:
        guid = self._in_flight.pop(request_id, None)
        if guid is None:
            return  # an answer to queue/empty, or to a delivery already answered
        self._slot_freed.set()
        if status == ACK_STATUS and type(status) is int:
            if await delete_message(self._context, self._device, guid):
                self._context.metrics.messages_acknowledged.inc()
        else:
            logger.debug("a delivery was answered with %r; the message stays stored", status)

    async def _send_request(self, request_id: int, path: str, body: Any) -> None:
        frame: dict[str, Any] = {"type": "request", "id": request_id, "verb": "PUT", "path": path}
        if body is not None:
            frame["body"] = body
        await self._send(frame)

    async def _send(self, frame: dict[str, Any]) -> None:
        if self._websocket.application_state != WebSocketState.CONNECTED:
            raise _PeerGoneError
        try:
            await self._websocket.send_text(json.dumps(frame, separators=(",", ":")))
        except (OSError, RuntimeError) as exc:
            # The server reports a vanished peer as an OSError (uvicorn's ClientDisconnected)
            # or, after a close, as a RuntimeError from Starlette.
            raise _PeerGoneError from exc

    async def _close(self, code: int, reason: str) -> None:
        if self._websocket.application_state != WebSocketState.CONNECTED:
            return
        with contextlib.suppress(OSError, RuntimeError):
            await self._websocket.close(code, reason)
