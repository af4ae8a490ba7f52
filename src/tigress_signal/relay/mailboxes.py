"""The six mailbox endpoints of draft-vinokurov-tigress-http-00, and the expiry sweep.

================  ===================  ==========================================================
create            ``POST /v1/m``       claim, request id; binds the creator's claim
update            ``PUT /v1/m/{id}``   claim, request id; overwrites the payload
read              ``POST /v1/m/{id}``  claim; the first claim other than the creator's is bound
preview           ``GET /v1/m/{id}``   public HTML with OpenGraph tags (:mod:`.preview`)
delete            ``DELETE /v1/m/{id}``  claim, request id; creator or bound recipient
relinquish        ``PATCH /v1/m/{id}``   claim of the bound recipient, request id; unbinds it
================  ===================  ==========================================================

Rules every endpoint keeps: a mailbox that does not exist, was deleted or has expired is a 404,
whatever else is wrong; a claim that is not bound is a 401; a request id already processed for
the same claim and mailbox is a 201 that changes nothing (a create retried this way answers the
same link). Missing or malformed headers and bodies are 400, oversize ones 413. The creator has
every right; the recipient has those the creator granted (``accessRights``, default ``RD``) and
gets 403 for the others.

One addition to the draft, in place of push notifications (which need a platform push
service): a read may send ``Mailbox-Known-Version: <n>`` and ``Prefer: wait=<seconds>``; while
the stored payload is still version ``n`` the relay holds the answer for up to that long, then
answers 204 if nothing changed. Every answer that knows the payload's version carries it in
``Mailbox-Version``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.api import ApiError, read_body
from tigress_signal.relay.context import RelayContext, client_address, context_of
from tigress_signal.relay.entities import (
    ATTESTATION_HEADER,
    DEVICE_CLAIM_HEADER,
    KNOWN_VERSION_HEADER,
    REQUEST_ID_HEADER,
    VERSION_HEADER,
    CreateMailboxRequest,
    CreateMailboxResponse,
    DisplayInformation,
    Payload,
    ReadMailboxResponse,
    UpdateMailboxRequest,
    UpdateMailboxResponse,
    WireModel,
)
from tigress_signal.relay.preview import missing_page, preview_page
from tigress_signal.storage import Connection, Row

logger = logging.getLogger(__name__)

_ModelT = TypeVar("_ModelT", bound=BaseModel)

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+(?:\.\d+)?)")
_MAX_ATTESTATION_CHARS = 8192
_MAILBOX_COLUMNS = (
    "mailbox_id, payload_type, payload, version, display_title, display_description,"
    " display_image_url, access_rights, expires_at, initiator_claim, recipient_claim"
)


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A live mailbox as stored."""

    mailbox_id: str
    payload: Payload
    version: int
    display: DisplayInformation
    access_rights: str
    expires_at: int
    initiator_claim: str
    recipient_claim: str | None

    def role_of(self, claim: str) -> str | None:
        """``"initiator"``, ``"recipient"`` or None for a claim digest."""
        if claim == self.initiator_claim:
            return "initiator"
        if claim == self.recipient_claim:
            return "recipient"
        return None


# -- endpoints ---------------------------------------------------------------------------------


async def create_mailbox(request: Request) -> Response:
    """``POST /v1/m``: store the first payload in a new mailbox bound to the creator's claim."""
    context = context_of(request)
    claim = _claim(request)
    request_id = _request_id(request)
    _attestation(request)
    body = await _read(request, context, CreateMailboxRequest)
    _check_payload(context, body.payload)
    _check_display(context, body.display_information)
    now = context.clock()
    expires_at = _expiry(context, body, now)

    async with context.db.transaction() as conn:
        # A retried create (same claim, same request id) gets the mailbox it made before.
        earlier = await conn.fetchval(
            "SELECT r.mailbox_id FROM mailbox_requests r JOIN mailboxes m"
            " ON m.mailbox_id = r.mailbox_id"
            " WHERE r.claim = $1 AND r.request_id = $2 AND m.initiator_claim = $1"
            " AND m.expires_at > $3",
            claim,
            request_id,
            int(now),
        )
        if earlier is not None:
            return _answer(
                CreateMailboxResponse(
                    url_link=_link(context, request, earlier), is_push_notification_supported=False
                ),
                status=201,
            )
        # uuid4 draws on os.urandom: 122 bits from the system's CSPRNG, unguessable.
        mailbox_id = str(uuid.uuid4())
        rights = (
            body.mailbox_configuration.access_rights
            if body.mailbox_configuration is not None
            else "RD"
        )
        await conn.execute(
            f"INSERT INTO mailboxes ({_MAILBOX_COLUMNS})"  # noqa: S608 - fixed column list
            " VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8, $9, NULL)",
            mailbox_id,
            body.payload.type,
            body.payload.data,
            body.display_information.title,
            body.display_information.description,
            body.display_information.image_url,
            rights,
            expires_at,
            claim,
        )
        await _remember_request(conn, mailbox_id, claim, request_id)
    answer = CreateMailboxResponse(
        url_link=_link(context, request, mailbox_id), is_push_notification_supported=False
    )
    return _answer(answer, version=1)


async def read_mailbox(request: Request) -> Response:
    """``POST /v1/m/{id}``: the payload for a bound claim; binds the first new claim."""
    context = context_of(request)
    claim = _claim(request)
    mailbox_id = _mailbox_id(request, context)
    known, wait = _long_poll(request, context)
    event = context.watch.event(mailbox_id) if known is not None and wait > 0 else None

    async with context.db.transaction() as conn:
        mailbox = await _live(conn, context, request, mailbox_id)
        role = mailbox.role_of(claim)
        if role is None and mailbox.recipient_claim is None:
            # First claimer wins; the condition makes a race between two claimers safe.
            bound = await conn.execute(
                "UPDATE mailboxes SET recipient_claim = $1"
                " WHERE mailbox_id = $2 AND recipient_claim IS NULL",
                claim,
                mailbox_id,
            )
            role = "recipient" if bound else None
    if role is None:
        raise ApiError(401, "claim_rejected", "this device claim is not bound to the mailbox")
    if role == "recipient" and "R" not in mailbox.access_rights:
        raise ApiError(403, "access_denied", "the recipient may not read this mailbox")

    if event is not None and known == mailbox.version:
        context.watch.enter(mailbox_id)
        try:
            await context.watch.wait(event, wait)
        finally:
            context.watch.leave(mailbox_id)
        async with context.db.transaction() as conn:
            mailbox = await _live(conn, context, request, mailbox_id)
        if mailbox.version == known:
            return Response(status_code=204, headers={VERSION_HEADER: str(known)})
    answer = ReadMailboxResponse(
        display_information=mailbox.display,
        payload=mailbox.payload,
        expiration=_datetime(mailbox.expires_at),
    )
    return _answer(answer, version=mailbox.version)


async def update_mailbox(request: Request) -> Response:
    """``PUT /v1/m/{id}``: replace the payload (a bound claim with the right to write)."""
    context = context_of(request)
    claim = _claim(request)
    request_id = _request_id(request)
    _attestation(request)
    mailbox_id = _mailbox_id(request, context)
    body = await _read(request, context, UpdateMailboxRequest)
    _check_payload(context, body.payload)

    async with context.db.transaction() as conn:
        mailbox = await _live(conn, context, request, mailbox_id)
        if await _is_repeat(conn, mailbox_id, claim, request_id):
            return _answer(UpdateMailboxResponse(is_push_notification_supported=False), status=201)
        _require(mailbox, claim, "W")
        version = mailbox.version + 1
        await conn.execute(
            "UPDATE mailboxes SET payload_type = $1, payload = $2, version = $3"
            " WHERE mailbox_id = $4",
            body.payload.type,
            body.payload.data,
            version,
            mailbox_id,
        )
        await _remember_request(conn, mailbox_id, claim, request_id)
    context.watch.changed(mailbox_id)
    return _answer(UpdateMailboxResponse(is_push_notification_supported=False), version=version)


async def delete_mailbox(request: Request) -> Response:
    """``DELETE /v1/m/{id}``: the creator or the bound recipient removes the mailbox."""
    context = context_of(request)
    claim = _claim(request)
    _request_id(request)
    mailbox_id = _mailbox_id(request, context)
    async with context.db.transaction() as conn:
        mailbox = await _live(conn, context, request, mailbox_id)
        _require(mailbox, claim, "D")
        await conn.execute("DELETE FROM mailboxes WHERE mailbox_id = $1", mailbox_id)
    context.watch.changed(mailbox_id)
    return Response(b"{}", media_type="application/json")


async def relinquish_mailbox(request: Request) -> Response:
    """``PATCH /v1/m/{id}``: the bound recipient lets go, so another device may claim it."""
    context = context_of(request)
    claim = _claim(request)
    request_id = _request_id(request)
    mailbox_id = _mailbox_id(request, context)
    async with context.db.transaction() as conn:
        mailbox = await _live(conn, context, request, mailbox_id)
        if await _is_repeat(conn, mailbox_id, claim, request_id):
            return Response(b"{}", status_code=201, media_type="application/json")
        if mailbox.recipient_claim is None or claim != mailbox.recipient_claim:
            raise ApiError(
                401, "claim_rejected", "only the bound recipient's claim may relinquish"
            )
        await conn.execute(
            "UPDATE mailboxes SET recipient_claim = NULL WHERE mailbox_id = $1", mailbox_id
        )
        await _remember_request(conn, mailbox_id, claim, request_id)
    return Response(b"{}", media_type="application/json")


async def preview_mailbox(request: Request) -> Response:
    """``GET /v1/m/{id}``: the public HTML preview; no claim needed."""
    context = context_of(request)
    text = request.path_params["mailbox_id"]
    _check_misses(context, request)
    mailbox: Mailbox | None = None
    if _UUID.fullmatch(text):
        async with context.db.transaction() as conn:
            mailbox = await _load(conn, text.lower(), int(context.clock()))
    if mailbox is None:
        context.misses.take(client_address(request))
        return missing_page()
    return preview_page(mailbox.display, _link(context, request, mailbox.mailbox_id))


# -- expiry ------------------------------------------------------------------------------------


async def sweep_expired(context: RelayContext) -> int:
    """Delete every mailbox whose expiry has passed; returns how many went."""
    now = int(context.clock())
    async with context.db.transaction() as conn:
        gone = await conn.fetch("SELECT mailbox_id FROM mailboxes WHERE expires_at <= $1", now)
        if gone:
            await conn.execute("DELETE FROM mailboxes WHERE expires_at <= $1", now)
    for row in gone:
        context.watch.changed(str(row["mailbox_id"]))
    if gone:
        logger.info("expiry sweep deleted %d mailbox(es)", len(gone))
    return len(gone)


# -- request parts ---------------------------------------------------------------------------


def claim_digest(claim: str) -> str:
    """How a device claim is stored and compared: SHA-256 of its lower-case text, in hex."""
    return hashlib.sha256(claim.lower().encode("ascii")).hexdigest()


def _claim(request: Request) -> str:
    value = request.headers.get(DEVICE_CLAIM_HEADER)
    if value is None:
        raise ApiError(400, "missing_claim", f"the {DEVICE_CLAIM_HEADER} header is required")
    if not _UUID.fullmatch(value.strip()):
        raise ApiError(400, "bad_claim", f"the {DEVICE_CLAIM_HEADER} header must be a UUID")
    return claim_digest(value.strip())


def _request_id(request: Request) -> str:
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is None:
        raise ApiError(400, "missing_request_id", f"the {REQUEST_ID_HEADER} header is required")
    value = value.strip()
    if not value or len(value) > 64 or not value.isascii() or not value.isprintable():
        raise ApiError(400, "bad_request_id", f"the {REQUEST_ID_HEADER} header is malformed")
    return value


def _attestation(request: Request) -> None:
    # Opaque data of the device's maker. This relay verifies none and keeps none: a stored
    # attestation could identify a device across mailboxes.
    value = request.headers.get(ATTESTATION_HEADER)
    if value is not None and len(value) > _MAX_ATTESTATION_CHARS:
        raise ApiError(400, "bad_attestation", f"the {ATTESTATION_HEADER} header is too long")


def _mailbox_id(request: Request, context: RelayContext) -> str:
    _check_misses(context, request)
    text = str(request.path_params["mailbox_id"])
    if not _UUID.fullmatch(text):
        context.misses.take(client_address(request))
        raise ApiError(404, "not_found", "no such mailbox")
    return text.lower()


def _long_poll(request: Request, context: RelayContext) -> tuple[int | None, float]:
    known_text = request.headers.get(KNOWN_VERSION_HEADER)
    known: int | None = None
    if known_text is not None:
        if not known_text.isascii() or not known_text.isdigit():
            raise ApiError(400, "bad_request", f"{KNOWN_VERSION_HEADER} must be a number")
        known = int(known_text)
    match = _WAIT.search(request.headers.get("prefer", ""))
    wait = min(float(match.group(1)), context.config.max_wait_seconds) if match else 0.0
    return known, wait


def _check_misses(context: RelayContext, request: Request) -> None:
    wait = context.misses.peek(client_address(request))
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many requests for unknown mailboxes",
            headers={"Retry-After": str(max(1, round(wait)))},
        )


async def _read(request: Request, context: RelayContext, model: type[_ModelT]) -> _ModelT:
    body = await read_body(request, context.config.max_body_bytes)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        # pydantic's messages describe the rule that failed, never the value sent.
        raise ApiError(400, "invalid_request", f"{where}: {first['msg']}") from None


def _check_payload(context: RelayContext, payload: Payload) -> None:
    limit = context.config.max_payload_bytes
    if len(payload.data) > limit:
        raise ApiError(413, "payload_too_large", f"the payload is over {limit} bytes")


def _check_display(context: RelayContext, display: DisplayInformation) -> None:
    limit = context.config.max_display_chars
    for name, value in (
        ("title", display.title),
        ("description", display.description),
        ("imageURL", display.image_url),
    ):
        if len(value) > limit:
            raise ApiError(413, "payload_too_large", f"displayInformation.{name} is over {limit}")


def _expiry(context: RelayContext, body: CreateMailboxRequest, now: float) -> int:
    cap = now + context.config.max_lifetime_hours * 3600
    if body.mailbox_configuration is None:
        return int(now + context.config.default_lifetime_hours * 3600)
    wanted = body.mailbox_configuration.expiration.timestamp()
    if wanted <= now:
        raise ApiError(400, "invalid_request", "mailboxConfiguration.expiration has passed")
    # Longer lifetimes are cut to the cap rather than refused: the read answer tells the
    # parties the expiry that applies.
    return int(min(wanted, cap))


# -- storage ---------------------------------------------------------------------------------


async def _live(
    conn: Connection, context: RelayContext, request: Request, mailbox_id: str
) -> Mailbox:
    mailbox = await _load(conn, mailbox_id, int(context.clock()))
    if mailbox is None:
        context.misses.take(client_address(request))
        raise ApiError(404, "not_found", "no such mailbox")
    return mailbox


async def _load(conn: Connection, mailbox_id: str, now: int) -> Mailbox | None:
    row = await conn.fetchrow(
        f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes"  # noqa: S608 - fixed column list
        " WHERE mailbox_id = $1 AND expires_at > $2",
        mailbox_id,
        now,
    )
    return None if row is None else _mailbox(row)


def _mailbox(row: Row) -> Mailbox:
    return Mailbox(
        mailbox_id=str(row["mailbox_id"]),
        payload=Payload(type=row["payload_type"], data=bytes(row["payload"])),
        version=int(row["version"]),
        display=DisplayInformation(
            title=row["display_title"],
            description=row["display_description"],
            image_url=row["display_image_url"],
        ),
        access_rights=str(row["access_rights"]),
        expires_at=int(row["expires_at"]),
        initiator_claim=str(row["initiator_claim"]),
        recipient_claim=row["recipient_claim"],
    )


async def _is_repeat(conn: Connection, mailbox_id: str, claim: str, request_id: str) -> bool:
    value = await conn.fetchval(
        "SELECT 1 FROM mailbox_requests WHERE mailbox_id = $1 AND claim = $2 AND request_id = $3",
        mailbox_id,
        claim,
        request_id,
    )
    return value is not None


async def _remember_request(
    conn: Connection, mailbox_id: str, claim: str, request_id: str
) -> None:
    changed = await conn.execute(
        "UPDATE mailbox_requests SET request_id = $3 WHERE mailbox_id = $1 AND claim = $2",
        mailbox_id,
        claim,
        request_id,
    )
    if not changed:
        await conn.execute(
            "INSERT INTO mailbox_requests (mailbox_id, claim, request_id) VALUES ($1, $2, $3)",
            mailbox_id,
            claim,
            request_id,
        )


def _require(mailbox: Mailbox, claim: str, right: str) -> None:
    role = mailbox.role_of(claim)
    if role is None:
        raise ApiError(401, "claim_rejected", "this device claim is not bound to the mailbox")
    if role == "recipient" and right not in mailbox.access_rights:
        raise ApiError(403, "access_denied", f"the recipient lacks the {right!r} right")


# -- answers ---------------------------------------------------------------------------------


def _answer(body: WireModel, *, status: int = 200, version: int | None = None) -> Response:
    headers = {VERSION_HEADER: str(version)} if version is not None else None
    return Response(
        body.to_json(), status_code=status, headers=headers, media_type="application/json"
    )


def _link(context: RelayContext, request: Request, mailbox_id: str) -> str:
    return f"{context.public_base(request)}/v1/m/{mailbox_id}"


def _datetime(epoch_seconds: int) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)
