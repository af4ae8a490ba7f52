"""The example configuration files in config/ stay valid as the settings change."""

from __future__ import annotations

import shutil
from pathlib import Path

from tigress_signal.intermediary.config import load_intermediary_config
from tigress_signal.wallet.config import load_wallet_config

CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_intermediary_example_loads():
    config = load_intermediary_config(CONFIG / "intermediary.toml")
    assert config.host == "127.0.0.1"
    assert config.max_message_bytes == 96 * 1024


def test_wallet_example_loads(tmp_path: Path):
    shutil.copy(CONFIG / "wallet.toml", tmp_path / "wallet.toml")
    config = load_wallet_config(tmp_path)
    assert config.channel == "selfhosted"
    assert config.server_url() == "http://127.0.0.1:8443"
