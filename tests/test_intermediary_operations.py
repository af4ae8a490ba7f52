"""Operations: health, readiness, Prometheus metrics, graceful shutdown, start-up validation."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from intermediary_fixtures import (
    FakeVerifier,
    Registered,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    raw_client,
    register,
    running_server,
)
from tigress_signal.errors import ChannelClosed, ConfigError
from tigress_signal.intermediary.app import begin_draining
from tigress_signal.intermediary.client import OutgoingMessage
from tigress_signal.intermediary.config import IntermediaryConfig

WAIT = 5.0


def message_for(device: Registered) -> OutgoingMessage:
    return OutgoingMessage(
        type=1,
        destination_device_id=1,
        destination_registration_id=device.keys.registration_id,
        content=b"x",
    )


async def test_health_and_readiness(tmp_path, database_url):  # noqa: F811 - the fixture
    async with running_server(tmp_path) as server, raw_client(server.url) as http:
        health = await http.get("/health")
        ready = await http.get("/ready")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert ready.status_code == 200
        assert ready.json()["database"] == database_url.partition(":")[0]
        begin_draining(server.app)
        draining = await http.get("/ready")
        assert draining.status_code == 503 and draining.headers["retry-after"] == "5"
        assert draining.json()["checks"] == ["shutting down"]
        assert (await http.get("/health")).status_code == 200


async def test_metrics_count_requests_queues_and_prekey_pools(tmp_path):
    async with running_server(tmp_path) as server:
        alice = await register(server.url)
        bob = await register(server.url, prekeys=4, pq_prekeys=2)
        try:
            for _ in range(3):
                await alice.client.send_message(bob.uuid, message_for(bob))
            async with raw_client(server.url) as http:
                answer = await http.get("/metrics")
        finally:
            await alice.client.aclose()
            await bob.client.aclose()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    expected = [
        'tigress_http_requests_total{method="PUT",route="/v1/messages/{uuid}",status="200"} 3.0',
        'tigress_http_requests_total{method="POST",route="/v1/accounts",status="200"} 2.0',
        "tigress_http_request_duration_seconds_count"
        '{method="PUT",route="/v1/messages/{uuid}"} 3.0',
        "tigress_queued_messages 3.0",
        "tigress_queue_depth_max 3.0",
        "tigress_queued_devices 1.0",
        "tigress_messages_stored_total 3.0",
        'tigress_prekeys_available{kind="ec"} 4.0',
        'tigress_prekeys_available{kind="kem"} 2.0',
        'tigress_devices_low_on_prekeys{kind="ec"} 2.0',
        "tigress_devices 2.0",
        "tigress_websocket_connections 0.0",
    ]
    for line in expected:
        assert line in text, line
    # Ids never appear in metrics: routes are templates.
    assert bob.uuid not in text and alice.uuid not in text


async def test_metrics_can_be_disabled(tmp_path):
    async with (
        running_server(tmp_path, metrics_enabled=False) as server,
        raw_client(server.url) as http,
    ):
        assert (await http.get("/metrics")).status_code == 404


class SlowVerifier(FakeVerifier):
    """Signature checks that take a while, to have a request in flight at shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def verify_signature(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        self.entered.set()
        await asyncio.sleep(1.0)
        return await super().verify_signature(public_key, message, signature)


async def test_shutdown_finishes_requests_in_flight_and_closes_websockets_with_1012(tmp_path):
    verifier = SlowVerifier()
    async with running_server(tmp_path, verifier=verifier) as server:
        bob = await register(server.url)  # slow, but before the shutdown
        verifier.entered.clear()
        try:
            async with bob.client.connect_websocket() as stream:
                in_flight = asyncio.create_task(
                    bob.client.upload_keys(signed_prekey=bob.keys.signed_prekey(7))
                )
                await asyncio.wait_for(verifier.entered.wait(), WAIT)
                await server.stop()
                await asyncio.wait_for(in_flight, WAIT)  # answered 200, not cut off
                with pytest.raises(ChannelClosed):
                    await asyncio.wait_for(stream.receive(), WAIT)
                assert stream.close_code == 1012
        finally:
            await bob.client.aclose()


def test_every_bad_value_is_named_on_its_own_line():
    with pytest.raises(ConfigError) as caught:
        IntermediaryConfig.from_mapping(
            {
                "port": -1,
                "message_retention_seconds": 5,
                "database_url": "postgresql://host:notaport/db",
                "message_rate": {"burst": 1},
                "max_queued_bytes": 10,
            }
        )
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid intermediary configuration:"
    named = [line.strip().split(":")[0] for line in lines[1:]]
    assert named == [
        "port",
        "database_url",
        "message_retention_seconds",
        "max_queued_bytes",
        "message_rate.per_second",
    ]


def test_serve_refuses_a_bad_configuration_with_one_clear_error_and_no_traceback(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[intermediary]\nport = 99999\nmax_queued_messages = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "tigress_signal", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "port:" in result.stderr and "max_queued_messages:" in result.stderr
