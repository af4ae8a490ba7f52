"""Bad input of every kind gets a 4xx JSON error from the intermediary, never a 500.

Each test sends a table of bad requests to one server and reports every case that got an
unexpected answer, so one run shows all of them. The log must hold no ERROR record either: the
catch-all turns an unexpected exception into a JSON 500 and logs it, and neither may happen.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from intermediary_fixtures import (
    NO_LIMIT,
    FakeVerifier,
    Registered,
    b64,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    ec_key,
    kem_key,
    prekey_json,
    raw_client,
    register,
    running_server,
    signed_json,
)
from tigress_signal.errors import BridgeUnavailable
from tigress_signal.intermediary.server import IntermediaryServer

Case = tuple[str, Any, set[int]]  # (description, body: bytes or JSON-able, allowed statuses)


@pytest.fixture
async def server(tmp_path: Path, caplog) -> AsyncIterator[IntermediaryServer]:
    caplog.set_level(logging.INFO)
    # Many creations from one address here; the limit has its own tests.
    async with running_server(tmp_path, account_creation_rate=NO_LIMIT) as running:
        yield running
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.fixture
async def device(server) -> AsyncIterator[Registered]:
    registered = await register(server.url, prekeys=2, pq_prekeys=2)
    yield registered
    await registered.client.aclose()


def _is_error_body(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        response.headers.get("content-type", "").startswith("application/json")
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("message"), str)
    )


async def _check(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    cases: list[Case],
    auth: tuple[str, str] | None = None,
) -> None:
    failures = []
    for description, body, allowed in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await http.request(
            method,
            path,
            content=content,
            auth=auth,
            headers={"Content-Type": "application/json"},
        )
        if response.status_code not in allowed or not _is_error_body(response):
            failures.append(f"{description}: {response.status_code} {response.text[:200]}")
    assert failures == []


def _account_body(**changes: Any) -> dict[str, Any]:
    identity = ec_key()
    body: dict[str, Any] = {
        "identityKey": b64(identity),
        "registrationId": 7,
        "signedPreKey": {"keyId": 1, "publicKey": b64(ec_key()), "signature": b64(bytes(64))},
        "pqLastResortPreKey": {
            "keyId": 1,
            "publicKey": b64(kem_key()),
            "signature": b64(bytes(64)),
        },
    }
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()
MALFORMED = {400}
INVALID = {422}


def _malformed_json_cases() -> list[Case]:
    return [
        ("empty body", b"", MALFORMED),
        ("truncated", b'{"identityKey": ', MALFORMED),
        ("not JSON", b"identityKey=abc", MALFORMED),
        ("not UTF-8", b'{"identityKey": "\xff\xfe"}', MALFORMED),
        ("trailing garbage", b"{} {}", MALFORMED),
        ("deep nesting", b"[" * 5000 + b"]" * 5000, MALFORMED | INVALID),
        ("top-level list", [], INVALID),
        ("top-level string", "x", INVALID),
        ("top-level null", None, INVALID),
    ]


async def test_account_creation_refuses_bad_bodies(server):
    good_signed = {"keyId": 1, "publicKey": b64(ec_key()), "signature": b64(bytes(64))}
    cases: list[Case] = [
        *_malformed_json_cases(),
        # Not standard JSON, but harmless: the parser may take them, the model never does.
        ("NaN", b'{"registrationId": NaN}', MALFORMED | INVALID),
        ("huge number", b'{"registrationId": 1e999999}', MALFORMED | INVALID),
        ("empty object", {}, INVALID),
        ("missing identityKey", _account_body(identityKey=_DROP), INVALID),
        ("missing registrationId", _account_body(registrationId=_DROP), INVALID),
        ("missing signedPreKey", _account_body(signedPreKey=_DROP), INVALID),
        ("missing pqLastResortPreKey", _account_body(pqLastResortPreKey=_DROP), INVALID),
        ("registrationId as string", _account_body(registrationId="7"), INVALID),
        ("registrationId as float", _account_body(registrationId=7.0), INVALID),
        ("registrationId as bool", _account_body(registrationId=True), INVALID),
        ("registrationId zero", _account_body(registrationId=0), INVALID),
        ("registrationId too big", _account_body(registrationId=0x4000), INVALID),
        ("registrationId huge", _account_body(registrationId=2**80), INVALID),
        ("identityKey as number", _account_body(identityKey=5), INVALID),
        ("identityKey null", _account_body(identityKey=None), INVALID),
        ("identityKey bad base64", _account_body(identityKey="!!!!"), INVALID),
        ("identityKey unpadded", _account_body(identityKey=b64(ec_key()).rstrip("=")), INVALID),
        ("identityKey url-safe", _account_body(identityKey="-_" * 22), INVALID),
        ("identityKey 32 bytes", _account_body(identityKey=b64(bytes(32))), INVALID),
        ("identityKey wrong type", _account_body(identityKey=b64(b"\x06" + bytes(32))), INVALID),
        ("identityKey with spaces", _account_body(identityKey=" " + b64(ec_key())), INVALID),
        ("signedPreKey as list", _account_body(signedPreKey=[good_signed]), INVALID),
        (
            "signedPreKey negative id",
            _account_body(signedPreKey={**good_signed, "keyId": -1}),
            INVALID,
        ),
        (
            "signedPreKey id 2^31",
            _account_body(signedPreKey={**good_signed, "keyId": 2**31}),
            INVALID,
        ),
        (
            "signedPreKey id as string",
            _account_body(signedPreKey={**good_signed, "keyId": "1"}),
            INVALID,
        ),
        (
            "short signature",
            _account_body(signedPreKey={**good_signed, "signature": b64(bytes(63))}),
            INVALID,
        ),
        (
            "signedPreKey is a Kyber key",
            _account_body(signedPreKey={**good_signed, "publicKey": b64(kem_key())}),
            INVALID,
        ),
        (
            "last resort is an EC key",
            _account_body(pqLastResortPreKey=good_signed),
            INVALID,
        ),
        (
            "last resort 1568 bytes",
            _account_body(
                pqLastResortPreKey={**good_signed, "publicKey": b64(b"\x08" + bytes(1567))}
            ),
            INVALID,
        ),
        ("valid shapes, signatures wrong", _account_body(), INVALID),
    ]
    async with raw_client(server.url) as http:
        await _check(http, "POST", "/v1/accounts", cases)


async def test_key_upload_refuses_bad_bodies(server, device):
    signed = signed_json(device.keys.signed_prekey(5))
    cases: list[Case] = [
        *_malformed_json_cases(),
        ("preKeys an object", {"preKeys": {"keyId": 1}}, INVALID),
        ("preKeys of strings", {"preKeys": ["a"]}, INVALID),
        ("preKey without publicKey", {"preKeys": [{"keyId": 1}]}, INVALID),
        (
            "preKey with Kyber key",
            {"preKeys": [{"keyId": 1, "publicKey": b64(kem_key())}]},
            INVALID,
        ),
        ("preKey id float", {"preKeys": [{"keyId": 1.5, "publicKey": b64(ec_key())}]}, INVALID),
        (
            "pqPreKeys without signature",
            {"pqPreKeys": [{"keyId": 1, "publicKey": b64(kem_key())}]},
            INVALID,
        ),
        ("pqPreKeys with EC keys", {"pqPreKeys": [signed]}, INVALID),
        ("signedPreKey a string", {"signedPreKey": "x"}, INVALID),
        ("signedPreKey bad base64", {"signedPreKey": {**signed, "publicKey": "%%%"}}, INVALID),
        (
            "101 preKeys",
            {"preKeys": [prekey_json(k) for k in device.keys.prekeys(1, 101)]},
            INVALID,
        ),
        (
            "bad signature in a list",
            {"pqPreKeys": [signed_json(device.keys.kyber_prekey(3, valid=False))]},
            INVALID,
        ),
    ]
    async with raw_client(server.url) as http:
        await _check(http, "PUT", "/v2/keys", cases, auth=device.auth)
    counts = await device.client.prekey_counts()
    assert (counts.count, counts.pq_count) == (2, 2)


def _message(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": 1,
        "destinationDeviceId": 1,
        "destinationRegistrationId": 4242,
        "content": b64(b"ciphertext"),
    }
    for key, value in changes.items():
        if value is _DROP:
            message.pop(key)
        else:
            message[key] = value
    return message


async def test_send_refuses_bad_bodies(server, device):
    cases: list[Case] = [
        *_malformed_json_cases(),
        ("no messages field", {"timestamp": 1}, INVALID),
        ("messages null", {"messages": None}, INVALID),
        ("messages an object", {"messages": _message()}, INVALID),
        ("type 2", {"messages": [_message(type=2)]}, INVALID),
        ("type 5", {"messages": [_message(type=5)]}, INVALID),
        ("type 7", {"messages": [_message(type=7)]}, INVALID),
        ("type as string", {"messages": [_message(type="1")]}, INVALID),
        ("type missing", {"messages": [_message(type=_DROP)]}, INVALID),
        ("device 0", {"messages": [_message(destinationDeviceId=0)]}, INVALID),
        ("device 128", {"messages": [_message(destinationDeviceId=128)]}, INVALID),
        ("device as string", {"messages": [_message(destinationDeviceId="1")]}, INVALID),
        ("registration id -1", {"messages": [_message(destinationRegistrationId=-1)]}, INVALID),
        ("content bad base64", {"messages": [_message(content="abc")]}, INVALID),
        ("content as list", {"messages": [_message(content=[1, 2])]}, INVALID),
        ("content missing", {"messages": [_message(content=_DROP)]}, INVALID),
        ("same device twice", {"messages": [_message(), _message()]}, INVALID),
        ("online as string", {"messages": [_message()], "online": "yes"}, INVALID),
        ("urgent null", {"messages": [_message()], "urgent": None}, INVALID),
        ("negative timestamp", {"messages": [_message()], "timestamp": -1}, INVALID),
        ("timestamp 2^64", {"messages": [_message()], "timestamp": 2**64}, INVALID),
        ("128 messages", {"messages": [_message(destinationDeviceId=1)] * 128}, INVALID),
    ]
    async with raw_client(server.url) as http:
        await _check(http, "PUT", f"/v1/messages/{device.uuid}", cases, auth=device.auth)
        await _check(
            http,
            "PUT",
            "/v1/messages/not-a-uuid",
            [("recipient not a UUID", {"messages": []}, INVALID)],
            auth=device.auth,
        )
    assert (await device.client.list_messages()).messages == []


async def test_unknown_routes_and_methods_answer_json(server, device):
    async with raw_client(server.url) as http:
        answers = {
            "unknown path": await http.get("/v3/nothing"),
            "root": await http.get("/"),
            "POST /v2/keys": await http.post("/v2/keys", auth=device.auth),
            "DELETE /v1/accounts": await http.delete("/v1/accounts"),
            "GET /v1/messages/{uuid}": await http.get(f"/v1/messages/{device.uuid}/x"),
            "HTTP GET on the WebSocket": await http.get("/v1/websocket/", auth=device.auth),
            "trailing slash": await http.get("/v1/accounts/whoami/", auth=device.auth),
        }
    for name, response in answers.items():
        assert response.status_code in (404, 405), name
        assert _is_error_body(response), name
    assert answers["POST /v2/keys"].status_code == 405
    assert "PUT" in answers["POST /v2/keys"].headers["allow"]


async def test_a_request_body_over_the_limit_is_413(tmp_path):
    async with (
        running_server(tmp_path, max_body_bytes=140 * 1024) as server,
        raw_client(server.url) as http,
    ):
        response = await http.post(
            "/v1/accounts",
            content=b"{" + b" " * (141 * 1024) + b"}",
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413 and _is_error_body(response)


async def test_an_unexpected_exception_is_a_logged_json_500(tmp_path, caplog):
    class BrokenVerifier(FakeVerifier):
        async def verify_signature(self, public_key, message, signature):
            raise RuntimeError("a bug")

    caplog.set_level(logging.INFO)
    async with (
        running_server(tmp_path, verifier=BrokenVerifier()) as server,
        raw_client(server.url) as http,
    ):
        response = await http.post("/v1/accounts", json=_account_body())
        health = await http.get("/health")
    assert response.status_code == 500
    assert response.json() == {"error": "internal", "message": "the server failed; see its log"}
    assert health.status_code == 200  # the server keeps serving
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


async def test_a_verifier_outage_is_503_not_500(tmp_path):
    class DownVerifier(FakeVerifier):
        async def verify_signature(self, public_key, message, signature):
            raise BridgeUnavailable("sidecar gone")

    async with (
        running_server(tmp_path, verifier=DownVerifier()) as server,
        raw_client(server.url) as http,
    ):
        response = await http.post("/v1/accounts", json=_account_body())
    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
    assert response.headers["retry-after"] == "5"
