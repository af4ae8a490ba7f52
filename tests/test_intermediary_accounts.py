"""Accounts and authentication of the intermediary, over HTTP on a loopback socket."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intermediary_fixtures import (
    FakeVerifier,
    assert_error_body,
    b64,
    database_rows,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    new_keys,
    raw_client,
    register,
    running_server,
)
from tigress_signal.errors import AuthenticationFailed, ServerApiError
from tigress_signal.intermediary import auth
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.intermediary.server import IntermediaryServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IntermediaryServer]:
    async with running_server(tmp_path) as running:
        yield running


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_create_account_returns_uuid_device_1_and_a_strong_password(server):
    keys = new_keys()
    async with raw_client(server.url) as http:
        response = await http.post("/v1/accounts", json=keys.account_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"uuid", "deviceId", "password"}
    assert str(uuid.UUID(body["uuid"])) == body["uuid"]
    assert body["deviceId"] == 1
    # 192 random bits in URL-safe base64: 32 characters.
    assert (
        len(base64.urlsafe_b64decode(body["password"] + "=" * (-len(body["password"]) % 4))) >= 16
    )


async def test_each_account_gets_its_own_id_and_password(server):
    first = await register(server.url)
    second = await register(server.url)
    try:
        assert first.uuid != second.uuid
        assert first.password != second.password
    finally:
        await first.client.aclose()
        await second.client.aclose()


async def test_password_is_stored_only_as_a_salted_scrypt_hash(server, tmp_path):
    first = await register(server.url)
    second = await register(server.url)
    try:
        rows = await database_rows("SELECT account_uuid, password_hash FROM devices")
        stored = dict(rows)
        for device in (first, second):
            value = stored[device.uuid]
            assert device.password not in value
            assert b64(device.password.encode()) not in value
            scheme, log2_n, _, _, salt, digest = value.split("$")
            assert scheme == "scrypt" and int(log2_n) >= 14
            assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
        assert stored[first.uuid].split("$")[4] != stored[second.uuid].split("$")[4]
        # The password appears nowhere in the database file, in any table.
        if (tmp_path / "intermediary.db").exists():
            raw = (tmp_path / "intermediary.db").read_bytes()
            wal = tmp_path / "intermediary.db-wal"
            raw += wal.read_bytes() if wal.exists() else b""
            assert first.password.encode() not in raw
    finally:
        await first.client.aclose()
        await second.client.aclose()


async def test_whoami_accepts_uuid_dot_device_and_bare_uuid(server):
    device = await register(server.url)
    try:
        me = await device.client.whoami()
        assert (me.uuid, me.device_id) == (device.uuid, 1)
        async with raw_client(server.url) as http:
            bare = await http.get(
                "/v1/accounts/whoami", headers=basic(device.uuid, device.password)
            )
            upper = await http.get(
                "/v1/accounts/whoami", headers=basic(device.uuid.upper() + ".1", device.password)
            )
        assert bare.status_code == 200 and bare.json() == {"uuid": device.uuid, "deviceId": 1}
        assert upper.status_code == 200 and upper.json()["uuid"] == device.uuid
    finally:
        await device.client.aclose()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic"},
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        basic("not-a-uuid.1", "password"),
        basic(str(uuid.uuid4()) + ".1", "password"),
        basic(str(uuid.uuid4()) + ".1", ""),
        basic(str(uuid.uuid4()) + ".1", "x" * 10_000),
    ],
)
async def test_malformed_or_unknown_credentials_are_401(server, headers):
    async with raw_client(server.url) as http:
        response = await http.get("/v1/accounts/whoami", headers=headers)
    assert_error_body(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("suffix", [".0", ".2", ".128", ".-1", ".abc", ".1.1", ".²", ". 1", "."])
async def test_bad_or_unknown_device_in_user_name_is_401(server, suffix):
    device = await register(server.url)
    try:
        async with raw_client(server.url) as http:
            response = await http.get(
                "/v1/accounts/whoami", headers=basic(device.uuid + suffix, device.password)
            )
        assert_error_body(response, 401)
    finally:
        await device.client.aclose()


async def test_wrong_password_is_401_and_the_client_raises_authentication_failed(server):
    device = await register(server.url)
    try:
        async with raw_client(server.url) as http:
            response = await http.get(
                "/v1/accounts/whoami", headers=basic(device.uuid + ".1", device.password + "x")
            )
        assert_error_body(response, 401)
        impostor = IntermediaryClient(server.url)
        impostor.authenticate(device.uuid, 1, "wrong-password")
        with pytest.raises(AuthenticationFailed) as caught:
            await impostor.whoami()
        assert caught.value.status == 401
        await impostor.aclose()
    finally:
        await device.client.aclose()


async def test_a_client_without_credentials_refuses_before_sending(server):
    client = IntermediaryClient(server.url)
    with pytest.raises(AuthenticationFailed):
        await client.whoami()
    await client.aclose()


async def test_verified_passwords_are_remembered_and_wrong_ones_always_hashed(server, monkeypatch):
    device = await register(server.url)
    calls = []
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        calls.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    try:
        # Account creation already remembered the new password: no scrypt at all.
        for _ in range(5):
            await device.client.whoami()
        assert calls == []
        async with raw_client(server.url) as http:
            for _ in range(2):
                response = await http.get(
                    "/v1/accounts/whoami", headers=basic(device.uuid, "guess")
                )
                assert response.status_code == 401
        assert calls == ["guess", "guess"]
    finally:
        await device.client.aclose()


async def test_a_restarted_server_verifies_the_stored_hash(tmp_path):
    async with running_server(tmp_path) as first:
        device = await register(first.url)
        await device.client.aclose()
    async with running_server(tmp_path) as second:
        client = IntermediaryClient(second.url)
        client.authenticate(device.uuid, 1, device.password)
        assert (await client.whoami()).uuid == device.uuid
        client.authenticate(device.uuid, 1, device.password[:-1])
        with pytest.raises(AuthenticationFailed):
            await client.whoami()
        await client.aclose()


def test_password_hash_round_trip_and_unknown_formats():
    stored = auth.hash_password("secret")
    assert auth.verify_password("secret", stored)
    assert not auth.verify_password("secreT", stored)
    assert stored != auth.hash_password("secret")  # a fresh salt each time
    for bad in ["", "plain", "bcrypt$1$2$3$4$5", "scrypt$99$8$1$AAAA$AAAA", "scrypt$x$8$1$A$A"]:
        assert not auth.verify_password("secret", bad)


@pytest.mark.parametrize(
    ("valid_signed", "valid_kyber"), [(False, True), (True, False), (False, False)]
)
async def test_account_with_a_bad_signature_is_422_and_not_created(
    server, tmp_path, valid_signed, valid_kyber
):
    body = new_keys().account_body(valid_signed=valid_signed, valid_kyber=valid_kyber)
    async with raw_client(server.url) as http:
        response = await http.post("/v1/accounts", json=body)
    assert_error_body(response, 422, "invalid_signature")
    assert await database_rows("SELECT COUNT(*) FROM accounts") == [(0,)]


async def test_the_client_raises_server_api_error_for_a_bad_signature(server):
    keys = new_keys()
    client = IntermediaryClient(server.url)
    with pytest.raises(ServerApiError) as caught:
        await client.create_account(
            identity_key=keys.identity_key,
            registration_id=keys.registration_id,
            signed_prekey=keys.signed_prekey(valid=False),
            pq_last_resort_prekey=keys.kyber_prekey(),
        )
    assert caught.value.status == 422
    assert caught.value.body["error"] == "invalid_signature"
    await client.aclose()


async def test_signature_checks_of_one_request_run_concurrently(tmp_path):
    class SlowVerifier(FakeVerifier):
        def __init__(self) -> None:
            super().__init__()
            self.in_flight = 0
            self.most = 0

        async def verify_signature(self, public_key, message, signature):
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= 1
            return await super().verify_signature(public_key, message, signature)

    verifier = SlowVerifier()
    async with running_server(tmp_path, verifier=verifier) as server:
        device = await register(server.url, pq_prekeys=20)
        await device.client.aclose()
    assert verifier.most >= 10


async def test_each_request_is_logged_once_without_secrets(server, caplog):
    caplog.set_level(logging.INFO, logger="tigress_signal")
    device = await register(server.url, prekeys=2, pq_prekeys=2)
    try:
        await device.client.whoami()
        async with raw_client(server.url) as http:
            await http.get("/v1/accounts/whoami", headers=basic(device.uuid, "bad"))
    finally:
        await device.client.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "tigress_signal.intermediary.app"]
    requests = [line for line in lines if line.split(" ")[0] in ("GET", "POST", "PUT")]
    assert requests[0].startswith("POST /v1/accounts 200 ")
    assert requests[1].startswith("PUT /v2/keys 200 ")
    assert requests[2].startswith("GET /v1/accounts/whoami 200 ")
    assert requests[3].startswith("GET /v1/accounts/whoami 401 ")
    assert len(requests) == 4
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert device.password not in everything
    assert device.uuid not in "\n".join(requests)
    assert b64(device.keys.identity_key) not in everything
