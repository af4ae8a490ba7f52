"""Helpers shared by the intermediary tests: a server on loopback, accounts, key material.

Most tests use :class:`FakeVerifier`, whose "signature" of a key is SHA-512 over the identity
key and the key, so that tests can make valid and invalid signatures without libsignal; the
tests in ``test_intermediary_libsignal.py`` use the real sidecar instead.

The server tests run on SQLite and on PostgreSQL: a test module imports the autouse fixture
:func:`database_url` (parametrized ``sqlite`` / ``postgresql``), and :func:`config_for` then
points the server at that test's database. PostgreSQL is a throwaway cluster started once per
test run on a free loopback port (:class:`tigress_signal.storage.throwaway.ThrowawayCluster`)
and stopped when the run ends, each test getting a fresh database in it; with
``TIGRESS_TEST_POSTGRES_URL`` set (a superuser URL of a server already running), that server is
used instead. PostgreSQL missing is an error, never a skip: ``scripts/setup.sh`` installs it.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tigress_signal.bridge.libsignal import BundlePreKey, BundleSignedPreKey
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.intermediary.signatures import SignatureVerifier
from tigress_signal.storage import Database
from tigress_signal.storage.throwaway import ThrowawayCluster

KIB = 1024
#: A rate limit setting that turns the limit off.
NO_LIMIT = {"burst": 0, "per_second": 1.0}
DIALECTS = ["sqlite", "postgresql"]

# -- databases ---------------------------------------------------------------------------------


class _Postgres:
    """The PostgreSQL server of this test run: started on first use, stopped at exit."""

    def __init__(self) -> None:
        self.cluster: ThrowawayCluster | None = None
        self.admin_url = os.environ.get("TIGRESS_TEST_POSTGRES_URL", "")
        self._names = itertools.count(1)

    def admin(self) -> str:
        if not self.admin_url:
            cluster = ThrowawayCluster()
            cluster.start()  # raises ConfigError (a test error, not a skip) if it cannot
            atexit.register(cluster.stop)
            self.cluster = cluster
            self.admin_url = cluster.url
        return self.admin_url

    async def new_database(self) -> str:
        admin = self.admin()
        name = f"tigress_test_{os.getpid()}_{next(self._names)}"
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return admin.rsplit("/", 1)[0] + "/" + name


POSTGRES = _Postgres()
_current: dict[str, str] = {}


@pytest.fixture(params=DIALECTS, autouse=True)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """This test's database: a SQLite file in ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'intermediary.db'}"
    else:
        url = await POSTGRES.new_database()
    _current["url"] = url
    yield url
    _current.pop("url", None)


def current_database_url(tmp_path: Path) -> str:
    """The URL :func:`database_url` chose, or a SQLite file in ``tmp_path`` without it."""
    return _current.get("url", f"sqlite:///{tmp_path / 'intermediary.db'}")


async def database_rows(sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Read the server's database directly (SQLite's WAL or PostgreSQL let us, while it runs)."""
    db = await Database.open(_current["url"])
    try:
        return [
            tuple(row[i] for i in range(len(list(row.keys()))))
            for row in await db.fetch(sql, *params)
        ]
    finally:
        await db.close()


class FakeVerifier:
    """A stand-in for libsignal: a signature is valid when it is SHA-512(identity || key)."""

    def __init__(self) -> None:
        self.calls = 0

    async def verify_signature(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        self.calls += 1
        return signature == fake_sign(public_key, message)


def fake_sign(identity_key: bytes, public_key: bytes) -> bytes:
    """The signature :class:`FakeVerifier` accepts."""
    return hashlib.sha512(identity_key + public_key).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ec_key() -> bytes:
    return b"\x05" + os.urandom(32)


def kem_key() -> bytes:
    return b"\x08" + os.urandom(1568)


@dataclass
class FakeKeys:
    """An identity and keys signed for :class:`FakeVerifier`."""

    identity_key: bytes
    registration_id: int

    def signed_prekey(self, key_id: int = 1, *, valid: bool = True) -> BundleSignedPreKey:
        public = ec_key()
        signature = fake_sign(self.identity_key, public) if valid else bytes(64)
        return BundleSignedPreKey(key_id, public, signature)

    def kyber_prekey(self, key_id: int = 1, *, valid: bool = True) -> BundleSignedPreKey:
        public = kem_key()
        signature = fake_sign(self.identity_key, public) if valid else bytes(64)
        return BundleSignedPreKey(key_id, public, signature)

    def prekeys(self, first: int, count: int) -> list[BundlePreKey]:
        return [BundlePreKey(first + i, ec_key()) for i in range(count)]

    def kyber_prekeys(self, first: int, count: int) -> list[BundleSignedPreKey]:
        return [self.kyber_prekey(first + i) for i in range(count)]

    def account_body(self, *, valid_signed: bool = True, valid_kyber: bool = True) -> Any:
        """A ``POST /v1/accounts`` body as JSON-ready data."""
        signed = self.signed_prekey(valid=valid_signed)
        kyber = self.kyber_prekey(valid=valid_kyber)
        return {
            "identityKey": b64(self.identity_key),
            "registrationId": self.registration_id,
            "signedPreKey": signed_json(signed),
            "pqLastResortPreKey": signed_json(kyber),
        }


def new_keys(registration_id: int = 4242) -> FakeKeys:
    return FakeKeys(ec_key(), registration_id)


def signed_json(key: BundleSignedPreKey) -> dict[str, Any]:
    return {"keyId": key.key_id, "publicKey": b64(key.public_key), "signature": b64(key.signature)}


def prekey_json(key: BundlePreKey) -> dict[str, Any]:
    return {"keyId": key.key_id, "publicKey": b64(key.public_key)}


def config_for(tmp_path: Path, **overrides: Any) -> IntermediaryConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "database_url": current_database_url(tmp_path),
        # Tests check many wrong passwords; one scrypt at a time is plenty.
        "kdf_concurrency": 1,
    }
    values.update(overrides)
    return IntermediaryConfig(**values)


@asynccontextmanager
async def running_server(
    tmp_path: Path, *, verifier: SignatureVerifier | None = None, **overrides: Any
) -> AsyncIterator[IntermediaryServer]:
    """An intermediary served by uvicorn on a free 127.0.0.1 port, stopped afterwards."""
    config = config_for(tmp_path, **overrides)
    checker = FakeVerifier() if verifier is None else verifier
    async with IntermediaryServer(config, verifier=checker) as server:
        yield server


@dataclass
class Registered:
    """A registered device: its keys and a client authenticated as it."""

    keys: FakeKeys
    client: IntermediaryClient
    uuid: str
    device_id: int
    password: str

    @property
    def auth(self) -> tuple[str, str]:
        """httpx's Basic auth pair."""
        return (f"{self.uuid}.{self.device_id}", self.password)


async def register(server_url: str, *, prekeys: int = 0, pq_prekeys: int = 0) -> Registered:
    """Create an account with fake keys and upload one-time keys; the caller closes the client."""
    keys = new_keys()
    client = IntermediaryClient(server_url)
    try:
        created = await client.create_account(
            identity_key=keys.identity_key,
            registration_id=keys.registration_id,
            signed_prekey=keys.signed_prekey(),
            pq_last_resort_prekey=keys.kyber_prekey(key_id=999),
        )
        client.authenticate(created.uuid, created.device_id, created.password)
        if prekeys or pq_prekeys:
            await client.upload_keys(
                pre_keys=keys.prekeys(1, prekeys) if prekeys else None,
                pq_pre_keys=keys.kyber_prekeys(1, pq_prekeys) if pq_prekeys else None,
            )
    except BaseException:
        await client.aclose()
        raise
    return Registered(keys, client, created.uuid, created.device_id, created.password)


async def link(server_url: str, primary: Registered, registration_id: int = 5151) -> Registered:
    """Link a new device to ``primary``'s account; the caller closes the new client."""
    code = await primary.client.issue_link_code()
    keys = FakeKeys(primary.keys.identity_key, registration_id)
    client = IntermediaryClient(server_url)
    try:
        linked = await client.link_device(
            verification_code=code.verification_code,
            registration_id=registration_id,
            signed_prekey=keys.signed_prekey(),
            pq_last_resort_prekey=keys.kyber_prekey(key_id=999),
        )
    except BaseException:
        await client.aclose()
        raise
    client.authenticate(linked.uuid, linked.device_id, linked.password)
    return Registered(keys, client, linked.uuid, linked.device_id, linked.password)


async def database_execute(sql: str, *params: object) -> int:
    """Change the server's database directly (to age rows, for instance)."""
    db = await Database.open(_current["url"])
    try:
        return await db.execute(sql, *params)
    finally:
        await db.close()


def raw_client(server_url: str) -> httpx.AsyncClient:
    """A plain httpx client for wire-level checks."""
    return httpx.AsyncClient(base_url=server_url, trust_env=False, timeout=30.0)


def assert_error_body(response: httpx.Response, status: int, error: str | None = None) -> None:
    """The answer has ``status`` and a JSON error body (of code ``error`` when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("message"), str) and body["message"]
    if error is not None:
        assert body["error"] == error, body
