"""The wallet configuration file: parsing and one clear message per bad value."""

from __future__ import annotations

import pytest

from tigress_signal.errors import ConfigError
from tigress_signal.wallet.config import (
    SelfHostedSettings,
    WalletConfig,
    load_wallet_config,
    save_wallet_config,
)


def test_round_trip(tmp_path):
    config = WalletConfig(
        trust_policy="always",
        selfhosted=SelfHostedSettings.model_validate({"server_url": "http://127.0.0.1:8443/"}),
    )
    save_wallet_config(tmp_path, config)
    loaded = load_wallet_config(tmp_path)
    assert loaded == config
    assert loaded.server_url() == "http://127.0.0.1:8443"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_wallet_config(tmp_path)


def test_not_toml(tmp_path):
    (tmp_path / "wallet.toml").write_text("channel = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_wallet_config(tmp_path)


def test_each_bad_value_is_named(tmp_path):
    (tmp_path / "wallet.toml").write_text(
        'channel = "carrier-pigeon"\ntrust_policy = "maybe"\ncolour = 3\n'
        '[selfhosted]\nserver_url = "not a url"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_wallet_config(tmp_path)
    lines = str(caught.value).splitlines()
    named = {line.split(": ")[1] for line in lines}
    assert named == {"channel", "trust_policy", "colour", "selfhosted.server_url"}


def test_server_url_required_for_selfhosted():
    with pytest.raises(ConfigError, match="server_url is missing"):
        WalletConfig().server_url()


def test_resend_settings_round_trip_and_bad_values_are_named(tmp_path):
    config = WalletConfig(
        selfhosted=SelfHostedSettings.model_validate(
            {"server_url": "http://127.0.0.1:8443", "resend_log_seconds": 0, "max_resends": 5}
        )
    )
    save_wallet_config(tmp_path, config)
    assert load_wallet_config(tmp_path) == config

    (tmp_path / "wallet.toml").write_text(
        '[selfhosted]\nserver_url = "http://127.0.0.1:8443"\n'
        "resend_log_seconds = -1\nmax_resends = 11\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_wallet_config(tmp_path)
    named = {line.split(": ")[1] for line in str(caught.value).splitlines()}
    assert named == {"selfhosted.resend_log_seconds", "selfhosted.max_resends"}
