"""Messages: send (``PUT /v1/messages/{uuid}``), list (``GET /v1/messages``), acknowledge.

A send carries one ciphertext per device of the recipient. The server checks, before storing
anything: the sender's rate limit towards this recipient (429), the list against the
recipient's devices (409 with the missing and extra device ids), their registration ids (410
with the stale ones) and each device's queue limit (429 ``recipient_queue_full``); then it
stores all of them in one transaction and wakes the recipient's WebSockets, in whichever server
process they are. A message stays stored until its device acknowledges it (here with
``DELETE``, or over the WebSocket) or until it expires after ``message_retention_seconds``;
an expired message is never delivered, and the sweep deletes it.

A send made only of plaintext-content messages (type 8: a libsignal decryption-error message)
may name some of the recipient's devices instead of all of them: such a message is about one
device's session with one sender device, and only that device should get it. Extra devices and
stale registration ids are refused for it as for every other send.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.api import ApiError, json_response, parse_uuid, read_entity
from tigress_signal.intermediary.context import ServerContext, context_of
from tigress_signal.intermediary.entities import (
    ENVELOPE_PLAINTEXT_CONTENT,
    MAX_MESSAGES_PER_PAGE,
    DeviceAddress,
    Envelope,
    MessagePage,
    OutgoingMessage,
    OutgoingMessageList,
    SendResult,
)
from tigress_signal.intermediary.limits import too_many_requests
from tigress_signal.storage import Connection, Row

logger = logging.getLogger(__name__)

_ENVELOPE_COLUMNS = (
    "seq, guid, type, client_timestamp, source_uuid, source_device, account_uuid,"
    " server_timestamp, urgent, content"
)


async def send_messages(request: Request) -> Response:
    """``PUT /v1/messages/{uuid}``: store one message per device of the recipient."""
    context = context_of(request)
    sender = await context.authenticate(request)
    recipient = parse_uuid(request.path_params["uuid"])
    body = await read_entity(request, OutgoingMessageList, context.config.max_body_bytes)
    _check_sizes(body, context.config.max_message_bytes)
    listed = [message.destination_device_id for message in body.messages]
    if len(set(listed)) != len(listed):
        raise ApiError(422, "invalid_request", "messages: one message per destination device")
    context.limiter.check("message", f"{sender.uuid}>{recipient}")

    # An "online" message is for a device connected right now (to any process), or nobody.
    connected = await context.switchboard.connected_devices(recipient) if body.online else None
    now = int(time.time() * 1000)
    expires_at = now + context.config.message_retention_seconds * 1000
    async with context.db.transaction() as conn:
        # One query reads the recipient's devices, their queues and whether the sender has
        # other devices; a send takes few enough round trips that this matters.
        found = await _recipient_state(conn, recipient, sender, now)
        if found is None:
            raise ApiError(404, "not_found", "no such recipient account")
        devices, queued, sender_has_others = found

        # Sending to one's own account reaches one's other devices, never the sending one.
        expected = dict(devices)
        if recipient == sender.uuid:
            expected.pop(sender.device_id, None)
        missing = sorted(set(expected) - set(listed))
        if body.messages and all(m.type == ENVELOPE_PLAINTEXT_CONTENT for m in body.messages):
            missing = []  # addressed to chosen devices (see the module docstring)
        extra = sorted(set(listed) - set(expected))
        if missing or extra:
            raise ApiError(
                409,
                "mismatched_devices",
                "the messages do not match the recipient's devices",
                missingDevices=missing,
                extraDevices=extra,
            )
        stale = sorted(
            m.destination_device_id
            for m in body.messages
            if m.destination_registration_id != expected[m.destination_device_id]
        )
        if stale:
            raise ApiError(
                410, "stale_devices", "some devices were registered again", staleDevices=stale
            )

        stored = [
            m for m in body.messages if connected is None or m.destination_device_id in connected
        ]
        if stored:
            _check_queues(context, queued, stored)
        await conn.executemany(
            "INSERT INTO messages (guid, account_uuid, device_id, type, client_timestamp,"
            " source_uuid, source_device, server_timestamp, urgent, content, expires_at,"
            " content_size) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            [
                (
                    str(uuid.uuid4()),
                    recipient,
                    m.destination_device_id,
                    m.type,
                    body.timestamp,
                    sender.uuid,
                    sender.device_id,
                    now,
                    body.urgent,
                    m.content,
                    expires_at,
                    len(m.content),
                )
                for m in stored
            ],
        )
        # The sender's other devices would want a copy of what it sent.
        needs_sync = recipient != sender.uuid and sender_has_others
        stored_ids = [m.destination_device_id for m in stored]
        if stored_ids:
            # Sent inside the transaction, PostgreSQL delivers it only once the rows commit.
            await context.switchboard.notify_stored(conn, recipient, stored_ids)

    # Only after the commit: a woken WebSocket must find the rows.
    if stored_ids:
        context.metrics.messages_stored.inc(len(stored))
        context.switchboard.wake_here(recipient, stored_ids)
    return json_response(SendResult(needs_sync=needs_sync))


async def list_messages(request: Request) -> Response:
    """``GET /v1/messages``: the device's oldest stored messages (at most 100)."""
    context = context_of(request)
    device = await context.authenticate(request)
    rows = await context.db.fetch(
        f"SELECT {_ENVELOPE_COLUMNS} FROM messages"  # noqa: S608 - fixed column list
        " WHERE account_uuid = $1 AND device_id = $2 AND expires_at > $3 ORDER BY seq LIMIT $4",
        device.uuid,
        device.device_id,
        int(time.time() * 1000),
        MAX_MESSAGES_PER_PAGE + 1,
    )
    page = [envelope_from_row(row) for row in rows[:MAX_MESSAGES_PER_PAGE]]
    return json_response(MessagePage(messages=page, more=len(rows) > MAX_MESSAGES_PER_PAGE))


async def acknowledge_message(request: Request) -> Response:
    """``DELETE /v1/messages/uuid/{guid}``: delete one of the device's messages."""
    context = context_of(request)
    device = await context.authenticate(request)
    guid = parse_uuid(request.path_params["guid"], "message guid")
    if not await delete_message(context, device, guid):
        raise ApiError(404, "not_found", "no such message for this device")
    context.metrics.messages_acknowledged.inc()
    return Response(status_code=204)


async def delete_message(context: ServerContext, device: DeviceAddress, guid: str) -> bool:
    """Delete a message if it is stored for ``device``; whether it was."""
    changed = await context.db.execute(
        "DELETE FROM messages WHERE guid = $1 AND account_uuid = $2 AND device_id = $3",
        guid,
        device.uuid,
        device.device_id,
    )
    return changed > 0


async def messages_after(
    context: ServerContext, device: DeviceAddress, after_seq: int, limit: int
) -> list[tuple[int, Envelope]]:
    """The device's stored messages with ``seq`` above ``after_seq``, oldest first."""
    rows = await context.db.fetch(
        f"SELECT {_ENVELOPE_COLUMNS} FROM messages"  # noqa: S608 - fixed column list
        " WHERE account_uuid = $1 AND device_id = $2 AND seq > $3 AND expires_at > $4"
        " ORDER BY seq LIMIT $5",
        device.uuid,
        device.device_id,
        after_seq,
        int(time.time() * 1000),
        limit,
    )
    return [(int(row["seq"]), envelope_from_row(row)) for row in rows]


def envelope_from_row(row: Row) -> Envelope:
    """The envelope of a ``messages`` row."""
    return Envelope(
        guid=row["guid"],
        type=row["type"],
        timestamp=row["client_timestamp"],
        source_uuid=row["source_uuid"],
        source_device=row["source_device"],
        destination_uuid=row["account_uuid"],
        content=bytes(row["content"]),
        server_timestamp=row["server_timestamp"],
        urgent=bool(row["urgent"]),
    )


def _check_sizes(body: OutgoingMessageList, limit: int) -> None:
    for index, message in enumerate(body.messages):
        if len(message.content) > limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"messages[{index}].content is {len(message.content)} bytes; the limit is {limit}",
            )


def _check_queues(
    context: ServerContext,
    queued: dict[int, tuple[int, int]],
    adding: list[OutgoingMessage],
) -> None:
    """Refuse the send (429) when a device's queue would pass its message or byte limit."""
    config = context.config
    full = sorted(
        m.destination_device_id
        for m in adding
        if queued.get(m.destination_device_id, (0, 0))[0] + 1 > config.max_queued_messages
        or queued.get(m.destination_device_id, (0, 0))[1] + len(m.content)
        > config.max_queued_bytes
    )
    if full:
        context.metrics.rate_limited.labels("recipient_queue").inc()
        error = too_many_requests(
            "the recipient has too many undelivered messages; retry later",
            config.queue_full_retry_after_seconds,
            error="recipient_queue_full",
        )
        error.fields["fullDevices"] = full
        raise error


async def _recipient_state(
    conn: Connection, recipient: str, sender: DeviceAddress, now: int
) -> tuple[dict[int, int], dict[int, tuple[int, int]], bool] | None:
    """The recipient's devices (id to registration id), each device's unexpired queue
    (messages, bytes), and whether the sender's account has other devices; None when there
    is no such recipient account.
    """
    rows = await conn.fetch(
        "SELECT d.device_id, d.registration_id, COUNT(m.seq), COALESCE(SUM(m.content_size), 0),"
        " EXISTS (SELECT 1 FROM devices o WHERE o.account_uuid = $3 AND o.device_id <> $4)"
        " FROM accounts a"
        " LEFT JOIN devices d ON d.account_uuid = a.uuid"
        " LEFT JOIN messages m ON m.account_uuid = d.account_uuid"
        " AND m.device_id = d.device_id AND m.expires_at > $2"
        " WHERE a.uuid = $1 GROUP BY d.device_id, d.registration_id",
        recipient,
        now,
        sender.uuid,
        sender.device_id,
    )
    if not rows:
        return None
    devices = {int(r[0]): int(r[1]) for r in rows if r[0] is not None}
    queued = {int(r[0]): (int(r[2]), int(r[3])) for r in rows if r[0] is not None}
    return devices, queued, bool(rows[0][4])
