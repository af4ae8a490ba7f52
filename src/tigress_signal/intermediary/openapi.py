"""The intermediary's OpenAPI 3.1 document, served at ``GET /openapi.json``.

The operations are listed here by hand (path, method, what they take and answer); the body
schemas are generated from the pydantic entities the endpoints themselves parse and answer
with, so the document cannot drift from the validation. Statuses every operation may answer
are added to each: 429 (the per-address limit) and 503 (database or libsignal unavailable), and
401 for those needing credentials. The WebSocket ``/v1/websocket/`` is described in the
document's text, as OpenAPI has no way to describe its frames.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from tigress_signal import __version__
from tigress_signal.intermediary.entities import (
    MAX_DEVICE_ID,
    AccountCreated,
    AccountCreateRequest,
    DeviceLinked,
    DeviceList,
    ErrorBody,
    LinkCode,
    LinkDeviceRequest,
    MessagePage,
    MismatchedDevicesBody,
    OutgoingMessageList,
    PreKeyBundle,
    PreKeyCount,
    RateLimitedBody,
    SendResult,
    SetKeysRequest,
    StaleDevicesBody,
    WhoAmI,
)

_Mode = Literal["validation", "serialization"]

_REQUESTS: list[type[BaseModel]] = [
    AccountCreateRequest,
    LinkDeviceRequest,
    SetKeysRequest,
    OutgoingMessageList,
]
_ANSWERS: list[type[BaseModel]] = [
    AccountCreated,
    DeviceLinked,
    DeviceList,
    ErrorBody,
    LinkCode,
    MessagePage,
    MismatchedDevicesBody,
    PreKeyBundle,
    PreKeyCount,
    RateLimitedBody,
    SendResult,
    StaleDevicesBody,
    WhoAmI,
]

_DESCRIPTION = """\
A Signal-Server-style keys and messages API for tigress-signal wallets. Byte fields are
standard base64 with padding. Devices authenticate with HTTP Basic auth, user
`<account uuid>.<device id>`, password the device password.

Messages are also pushed over the WebSocket `GET /v1/websocket/` (Basic auth on the upgrade):
the server sends `{"type":"request","id":N,"verb":"PUT","path":"/api/v1/message","body":
<envelope>}` per stored message, then `{"type":"request","id":N,"verb":"PUT","path":
"/api/v1/queue/empty"}`; the device answers `{"type":"response","id":N,"status":200}` to
delete a message. Close codes: 4409 connected elsewhere, 4401 device removed, 1012 server
restart."""


async def openapi_document(request: Request) -> Response:
    """``GET /openapi.json``: the OpenAPI document of this server."""
    return Response(_document_bytes(), media_type="application/json")


@functools.cache
def _document_bytes() -> bytes:
    return json.dumps(build_document(), separators=(",", ":")).encode("utf-8")


def build_document() -> dict[str, Any]:
    """The OpenAPI document as a JSON-ready mapping."""
    pairs: list[tuple[type[BaseModel], _Mode]] = [(m, "validation") for m in _REQUESTS]
    pairs += [(m, "serialization") for m in _ANSWERS]
    refs, definitions = models_json_schema(
        pairs, by_alias=True, ref_template="#/components/schemas/{model}"
    )

    def ref(model: type[BaseModel], mode: _Mode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {
            "required": True,
            "content": {"application/json": {"schema": ref(model, "validation")}},
        }

    def answer(description: str, model: type[BaseModel] | None = None) -> dict[str, Any]:
        if model is None:
            return {"description": description}
        return {
            "description": description,
            "content": {"application/json": {"schema": ref(model, "serialization")}},
        }

    def error(description: str, model: type[BaseModel] = ErrorBody) -> dict[str, Any]:
        return answer(description, model)

    retry_after = {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    }

    def operation(
        summary: str,
        answers: dict[str, dict[str, Any]],
        *,
        authenticated: bool = True,
        request: type[BaseModel] | None = None,
        parameters: list[dict[str, Any]] | None = None,
        limited: bool = True,
    ) -> dict[str, Any]:
        responses = dict(answers)
        if limited:
            responses.setdefault(
                "429", {**error("too many requests", RateLimitedBody), "headers": retry_after}
            )
            responses.setdefault(
                "503", {**error("database or libsignal unavailable"), "headers": retry_after}
            )
        if authenticated:
            responses.setdefault("401", error("missing or wrong credentials"))
        if request is not None:
            responses.setdefault("400", error("the body is not JSON"))
            responses.setdefault("413", error("the body or a message is too large"))
            responses.setdefault("422", error("the body does not fit the schema"))
        else:
            # A malformed Content-Length is refused on any request.
            responses.setdefault("400", error("malformed request"))
        result: dict[str, Any] = {"summary": summary, "responses": responses}
        result["security"] = [{"basic": []}] if authenticated else []
        if request is not None:
            result["requestBody"] = body(request)
        if parameters:
            result["parameters"] = parameters
        return result

    uuid_param = {
        "name": "uuid",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }
    device_param = {
        "name": "deviceId",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DEVICE_ID},
    }
    bundle_device_param = {
        "name": "deviceId",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": r"^(\*|[1-9][0-9]{0,2})$"},
        "description": f"a device id (1..{MAX_DEVICE_ID}) or * for every device",
    }
    guid_param = {
        "name": "guid",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }
    identity_param = {
        "name": "identity",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["aci"]},
    }
    ok_json = {"type": "object"}

    paths: dict[str, Any] = {
        "/health": {
            "get": operation(
                "Liveness: 200 while the process serves",
                {"200": {"description": "serving", "content": _json(ok_json)}},
                authenticated=False,
                limited=False,
            )
        },
        "/ready": {
            "get": operation(
                "Readiness: the database and the wake-up channel work",
                {
                    "200": {"description": "ready", "content": _json(ok_json)},
                    "503": {**error("not ready"), "headers": retry_after},
                },
                authenticated=False,
                limited=False,
            )
        },
        "/metrics": {
            "get": operation(
                "Prometheus metrics (text exposition format)",
                {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": error("metrics are disabled"),
                },
                authenticated=False,
                limited=False,
            )
        },
        "/openapi.json": {
            "get": operation(
                "This document",
                {"200": {"description": "OpenAPI 3.1", "content": _json(ok_json)}},
                authenticated=False,
                limited=False,
            )
        },
        "/v1/accounts": {
            "post": operation(
                "Register an identity and its first device",
                {"200": answer("the new device's credentials", AccountCreated)},
                authenticated=False,
                request=AccountCreateRequest,
            )
        },
        "/v1/accounts/identity": {
            "put": operation(
                "Register the account again with a new identity (primary device only): linked"
                " devices, one-time prekeys and waiting messages are removed",
                {
                    "200": answer("the primary device's new credentials", AccountCreated),
                    "403": error("not the primary device"),
                },
                request=AccountCreateRequest,
            )
        },
        "/v1/accounts/whoami": {
            "get": operation(
                "The account and device the credentials prove",
                {"200": answer("the device", WhoAmI)},
            )
        },
        "/v1/devices": {
            "get": operation(
                "The devices of the caller's account", {"200": answer("devices", DeviceList)}
            )
        },
        "/v1/devices/provisioning/code": {
            "post": operation(
                "A one-time code to link a new device", {"200": answer("the code", LinkCode)}
            )
        },
        "/v1/devices/link": {
            "put": operation(
                "Link a new device with a code from an existing device",
                {
                    "200": answer("the new device's credentials", DeviceLinked),
                    "403": error("the code is wrong, used or expired"),
                    "409": error("the account has the most devices it may have"),
                },
                authenticated=False,
                request=LinkDeviceRequest,
            )
        },
        "/v1/devices/{deviceId}": {
            "delete": operation(
                "Remove a device (itself, or any other from the primary device)",
                {
                    "204": answer("removed"),
                    "403": error("not allowed"),
                    "404": error("no such device"),
                    "422": error("not a device id"),
                },
                parameters=[device_param],
            )
        },
        "/v2/keys": {
            "put": operation(
                "Upload prekeys; a non-empty list replaces that kind's one-time keys",
                {
                    "200": {"description": "stored", "content": _json(ok_json)},
                    "409": error("a key id is already used for another key"),
                },
                request=SetKeysRequest,
                parameters=[identity_param],
            ),
            "get": operation(
                "How many one-time prekeys of each kind are left",
                {"200": answer("counts", PreKeyCount)},
            ),
        },
        "/v2/keys/{uuid}/{deviceId}": {
            "get": operation(
                "Take a prekey bundle of a device (or every device, *)",
                {
                    "200": answer("the bundle", PreKeyBundle),
                    "404": error("no such account or device"),
                    "422": error("not an account or device id"),
                },
                parameters=[uuid_param, bundle_device_param],
            )
        },
        "/v1/messages/{uuid}": {
            "put": operation(
                "Send one ciphertext per device of the recipient (a send of type-8"
                " decryption-error messages only may name some of the devices)",
                {
                    "200": answer("stored", SendResult),
                    "404": error("no such recipient"),
                    "409": error("missing or extra devices", MismatchedDevicesBody),
                    "410": error("devices registered again", StaleDevicesBody),
                },
                request=OutgoingMessageList,
                parameters=[uuid_param],
            )
        },
        "/v1/messages": {
            "get": operation(
                "The device's oldest stored messages (at most 100)",
                {"200": answer("a page of envelopes", MessagePage)},
            )
        },
        "/v1/messages/uuid/{guid}": {
            "delete": operation(
                "Acknowledge (delete) one of the device's messages",
                {
                    "204": answer("deleted"),
                    "404": error("not one of this device's messages"),
                    "422": error("not a message guid"),
                },
                parameters=[guid_param],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tigress-signal intermediary",
            "version": __version__,
            "description": _DESCRIPTION,
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
