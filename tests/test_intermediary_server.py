"""Configuration, start-up and shutdown of the intermediary server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import httpx
import pytest

from intermediary_fixtures import FakeVerifier, config_for, raw_client
from tigress_signal.errors import ConfigError, StoreError
from tigress_signal.intermediary.config import IntermediaryConfig, load_intermediary_config
from tigress_signal.intermediary.server import IntermediaryServer, serve


def test_defaults_listen_on_loopback_with_signal_server_limits():
    config = IntermediaryConfig()
    assert config.host == "127.0.0.1"
    assert config.max_message_bytes == 96 * 1024
    assert config.max_unacknowledged == 256
    assert config.database_url.startswith("sqlite:///")


def test_invalid_values_are_config_errors_listing_every_problem():
    with pytest.raises(ConfigError) as caught:
        IntermediaryConfig.from_mapping({"port": 70000, "colour": "blue", "max_message_bytes": 0})
    text = str(caught.value)
    assert "port" in text and "colour" in text and "max_message_bytes" in text


def test_the_body_limit_must_hold_one_maximum_message():
    with pytest.raises(ConfigError, match="max_body_bytes"):
        IntermediaryConfig.from_mapping({"max_body_bytes": 100 * 1024})
    with pytest.raises(ConfigError, match="database_url"):
        IntermediaryConfig.from_mapping({"database_url": "mysql://x"})


def test_load_from_toml_with_overrides(tmp_path):
    table = tmp_path / "table.toml"
    table.write_text('[intermediary]\nport = 9000\ndatabase_url = "sqlite:///a.db"\n')
    flat = tmp_path / "flat.toml"
    flat.write_text("port = 9001\n")
    assert load_intermediary_config(table).port == 9000
    assert load_intermediary_config(table, {"port": 9002}).port == 9002
    assert load_intermediary_config(flat).port == 9001
    assert load_intermediary_config(None, {"host": "::1"}).host == "::1"


@pytest.mark.parametrize(
    ("name", "text"),
    [("missing.toml", None), ("broken.toml", "port = "), ("bad.toml", "intermediary = 5\n")],
)
def test_unreadable_config_files_are_config_errors(tmp_path, name, text):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError):
        load_intermediary_config(path)


async def test_a_port_in_use_is_a_config_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_for(tmp_path, port=port)
        with pytest.raises(ConfigError, match="cannot listen"):
            await serve(config, verifier=FakeVerifier())
        with pytest.raises(ConfigError):
            await IntermediaryServer(config, verifier=FakeVerifier()).start()


async def test_a_database_that_cannot_open_fails_the_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'missing-folder' / 'x.db'}"
    with pytest.raises(StoreError):
        await serve(config_for(tmp_path, database_url=url), verifier=FakeVerifier())
    with pytest.raises(StoreError):
        await IntermediaryServer(
            config_for(tmp_path, database_url=url), verifier=FakeVerifier()
        ).start()


async def test_serve_runs_until_sigterm_then_returns(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = config_for(tmp_path, port=port)
    task = asyncio.create_task(serve(config, verifier=FakeVerifier()))
    async with raw_client(f"http://127.0.0.1:{port}") as http:
        for _ in range(200):
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.025)
        else:
            pytest.fail("the server did not come up")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
        with pytest.raises(httpx.TransportError):
            await http.get("/health")
    # Our handler is gone again: the process's own SIGTERM handling is back.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_the_database_persists_across_restarts(tmp_path):
    async with IntermediaryServer(config_for(tmp_path), verifier=FakeVerifier()) as first:
        url_one = first.url
    async with IntermediaryServer(config_for(tmp_path), verifier=FakeVerifier()) as second:
        assert second.url.startswith("http://127.0.0.1:")
        async with raw_client(second.url) as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
    assert url_one.startswith("http://127.0.0.1:")
    assert "intermediary.db" in os.listdir(tmp_path)
