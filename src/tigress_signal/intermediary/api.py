"""The HTTP conventions every intermediary endpoint shares.

An endpoint raises :class:`ApiError` for anything the caller did wrong; the app turns it into a
JSON body ``{"error": <code>, "message": <text>, ...}``. Request bodies are read with a size
limit and parsed into an entity from :mod:`tigress_signal.intermediary.entities`: text that is
not JSON is a 400, JSON of the wrong shape a 422 naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tigress_signal.intermediary.entities import MAX_DEVICE_ID, WireModel

ModelT = TypeVar("ModelT", bound=BaseModel)

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DEVICE_ID = re.compile(r"[0-9]{1,3}")


class ApiError(Exception):
    """An error answer: HTTP status, a short machine code, a sentence, and extra body fields.

    Args:
        status: the HTTP status.
        error: a short code such as ``"invalid_signature"``.
        message: one sentence for the developer of the client; never secrets or key bytes.
        headers: extra response headers.
        fields: extra fields of the JSON body (``missingDevices`` ...).
    """

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = dict(headers or {})
        self.fields = fields

    def response(self) -> Response:
        """The JSON answer for this error."""
        return error_response(
            self.status, self.error, self.message, headers=self.headers, **self.fields
        )


def error_response(
    status: int,
    error: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **fields: object,
) -> Response:
    """A JSON error answer ``{"error", "message", **fields}``."""
    body: dict[str, object] = {"error": error, "message": message, **fields}
    return json_response(body, status=status, headers=headers)


def json_response(
    body: WireModel | Mapping[str, object],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A JSON answer from an entity (wire field names) or a plain mapping."""
    if isinstance(body, WireModel):
        content = body.to_json()
    else:
        # Compact, ASCII-only output: the bodies are machine-read and must not depend on
        # the reader's text encoding.
        content = json.dumps(body, separators=(",", ":")).encode("ascii")
    return Response(content, status_code=status, headers=headers, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """Read a request body, refusing one larger than ``limit`` bytes without reading it all.

    Raises:
        ApiError: 413 when the body is too large, 400 when Content-Length is malformed.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_entity(request: Request, model: type[ModelT], limit: int) -> ModelT:
    """Read and validate a JSON request body.

    Raises:
        ApiError: 413 too large, 400 not JSON, 422 JSON that does not fit ``model``.
    """
    body = await read_body(request, limit)
    return parse_entity(body, model)


def parse_entity(body: bytes | str, model: type[ModelT]) -> ModelT:
    """Validate JSON text as an entity.

    Raises:
        ApiError: 400 when the text is not JSON, 422 when it does not fit ``model``.
    """
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        # pydantic's messages describe the rule that failed, never the value sent.
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}{more}") from None


def parse_uuid(text: str, what: str = "account id") -> str:
    """Check a UUID from a path or a user name; returns it in lower case.

    Raises:
        ApiError: 422 when ``text`` is not a UUID in its usual 8-4-4-4-12 form.
    """
    if not _UUID.fullmatch(text):
        raise ApiError(422, "invalid_request", f"the {what} is not a UUID")
    return text.lower()


def parse_device_id(text: str) -> int:
    """Check a device id from a path: a number from 1 to 127.

    Raises:
        ApiError: 422 for anything else.
    """
    if not _DEVICE_ID.fullmatch(text) or not 1 <= int(text) <= MAX_DEVICE_ID:
        raise ApiError(422, "invalid_request", f"the device id must be 1..{MAX_DEVICE_ID}")
    return int(text)


def _body_too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
