"""The intermediary client's error boundary: every answer and failure becomes one of ours.

These tests use an in-memory httpx transport that answers what each case needs; the other
intermediary tests run the client against the real server.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tigress_signal.errors import (
    AuthenticationFailed,
    ChannelError,
    MismatchedDevices,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerApiError,
    StaleDevices,
    TigressSignalError,
)
from tigress_signal.intermediary.client import DeviceCredentials, IntermediaryClient

ACCOUNT = "6f1c1d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f"


def client_answering(
    status: int, body: bytes | dict[str, object], headers: dict[str, str] | None = None
) -> IntermediaryClient:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers)

    return IntermediaryClient(
        "http://127.0.0.1:1",
        credentials=DeviceCredentials(ACCOUNT, 1, "pw"),
        transport=httpx.MockTransport(answer),
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, AuthenticationFailed),
        (403, ServerApiError),
        (404, NotFound),
        (409, MismatchedDevices),
        (410, StaleDevices),
        (413, PayloadTooLarge),
        (422, ServerApiError),
        (429, RateLimited),
        (500, ServerApiError),
        (503, ServerApiError),
    ],
)
async def test_error_statuses_map_to_our_classes(status, error):
    client = client_answering(status, {"error": "x", "message": "told you"})
    with pytest.raises(error) as caught:
        await client.whoami()
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.body == {"error": "x", "message": "told you"}
    assert "told you" in str(caught.value)
    await client.aclose()


async def test_the_409_and_410_bodies_are_readable():
    client = client_answering(409, {"missingDevices": [2], "extraDevices": [3, 4]})
    with pytest.raises(MismatchedDevices) as mismatched:
        await client.send_messages(ACCOUNT, [])
    assert mismatched.value.missing_devices == [2]
    assert mismatched.value.extra_devices == [3, 4]
    await client.aclose()
    client = client_answering(410, {"staleDevices": [1]})
    with pytest.raises(StaleDevices) as stale:
        await client.send_messages(ACCOUNT, [])
    assert stale.value.stale_devices == [1]
    await client.aclose()


async def test_retry_after_is_read_from_a_429():
    client = client_answering(429, {}, headers={"Retry-After": "7"})
    with pytest.raises(RateLimited) as caught:
        await client.prekey_counts()
    assert caught.value.retry_after == 7.0
    await client.aclose()


@pytest.mark.parametrize("body", [b"", b"<html>oops</html>", b"[1, 2]", b'{"count": "x"}'])
async def test_an_answer_that_does_not_parse_is_a_server_api_error(body):
    client = client_answering(200, body)
    with pytest.raises(ServerApiError):
        await client.prekey_counts()
    await client.aclose()
    error_client = client_answering(500, body)
    with pytest.raises(ServerApiError) as caught:
        await error_client.prekey_counts()
    assert caught.value.body == (json.loads(body) if body.startswith(b"{") else {})
    await error_client.aclose()


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("garbage"),
    ],
)
async def test_transport_failures_are_channel_errors(failure):
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    client = IntermediaryClient(
        "http://127.0.0.1:1",
        credentials=DeviceCredentials(ACCOUNT, 1, "pw"),
        transport=httpx.MockTransport(fail),
    )
    with pytest.raises(ChannelError) as caught:
        await client.whoami()
    assert caught.value.__cause__ is failure
    assert isinstance(caught.value, TigressSignalError)
    await client.aclose()


async def test_ids_from_callers_stay_one_path_segment():
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"error": "not_found", "message": "no"})

    client = IntermediaryClient(
        "http://127.0.0.1:1",
        credentials=DeviceCredentials(ACCOUNT, 1, "pw"),
        transport=httpx.MockTransport(record),
    )
    with pytest.raises(NotFound):
        await client.fetch_bundle("../accounts/whoami")
    with pytest.raises(NotFound):
        await client.acknowledge("a/b")
    assert seen == ["/v2/keys/..%2Faccounts%2Fwhoami/*", "/v1/messages/uuid/a%2Fb"]
    await client.aclose()


def test_credentials_keep_the_password_out_of_their_repr():
    credentials = DeviceCredentials(ACCOUNT, 1, "s3cret")
    assert "s3cret" not in repr(credentials)
    assert credentials.authorization().startswith("Basic ")
