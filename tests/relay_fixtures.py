"""Helpers shared by the relay tests: a relay on loopback with a clock the test moves."""

from __future__ import annotations

import base64
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from tigress_signal.relay.config import RelayConfig
from tigress_signal.relay.server import RelayServer


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def running_relay(
    tmp_path: Path, clock: Callable[[], float] | None = None, **settings: Any
) -> AsyncIterator[RelayServer]:
    values: dict[str, Any] = {
        "port": 0,
        "database_url": f"sqlite:///{tmp_path / 'relay.db'}",
        "requests_per_minute": 0,
        "misses_per_minute": 0,
    }
    values.update(settings)
    config = RelayConfig(**values)
    server = RelayServer(config, clock=clock or Clock())
    async with server:
        yield server


def payload(size: int = 64) -> dict[str, str]:
    return {"type": "AEAD_AES_256_GCM", "data": base64.b64encode(os.urandom(size)).decode()}


def create_body(
    expiration: str | None = None, rights: str = "RWD", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "payload": payload(),
        "displayInformation": {
            "title": "Room 1207",
            "description": "A hotel key",
            "imageURL": "https://img.example/key.png",
        },
    }
    if expiration is not None:
        body["mailboxConfiguration"] = {"accessRights": rights, "expiration": expiration}
    body.update(extra)
    return body


def headers(claim: str | None = None, request_id: str | None = None) -> dict[str, str]:
    result = {"Mailbox-Request-ID": request_id or str(uuid.uuid4())}
    if claim is not None:
        result["Mailbox-Device-Claim"] = claim
    return result


def new_claim() -> str:
    return str(uuid.uuid4())


async def create(http: httpx.AsyncClient, claim: str, **kwargs: Any) -> str:
    response = await http.post("/v1/m", json=create_body(**kwargs), headers=headers(claim))
    assert response.status_code == 200, response.text
    return str(response.json()["urlLink"]).rsplit("/", 1)[1]


def rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()
