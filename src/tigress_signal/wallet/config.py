"""A wallet's configuration: which channel carries its transfers, and how it trusts peers.

It lives in ``wallet.toml`` inside the wallet folder, for example::

    channel = "selfhosted"          # the CredentialChannel this wallet uses
    trust_policy = "tofu"           # tofu | always | verify

    [selfhosted]
    server_url = "http://127.0.0.1:8443"

Every value is checked when the file is read; each bad value gets its own line in the error.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, HttpUrl, ValidationError

from tigress_signal.errors import ConfigError

CONFIG_NAME = "wallet.toml"

TrustPolicy = Literal["tofu", "always", "verify"]


class SelfHostedSettings(BaseModel):
    """Settings of the self-hosted intermediary channel.

    Attributes:
        server_url: the intermediary's base URL.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_url: HttpUrl


class WalletConfig(BaseModel):
    """A wallet's configuration file.

    Attributes:
        channel: which CredentialChannel carries this wallet's transfers.
        trust_policy: when a peer's identity key is trusted for sending: on first use
            (``tofu``), ``always``, or only once verified (``verify``).
        selfhosted: settings of the self-hosted channel.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: Literal["selfhosted"] = "selfhosted"
    trust_policy: TrustPolicy = "tofu"
    selfhosted: SelfHostedSettings | None = None

    def server_url(self) -> str:
        """The intermediary's base URL, without a trailing slash.

        Raises:
            ConfigError: the self-hosted channel has no server URL configured.
        """
        if self.selfhosted is None:
            raise ConfigError("wallet.toml: [selfhosted] server_url is missing")
        return str(self.selfhosted.server_url).rstrip("/")

    def to_toml(self) -> str:
        """The configuration as the text of a ``wallet.toml``."""
        lines = [f'channel = "{self.channel}"', f'trust_policy = "{self.trust_policy}"']
        if self.selfhosted is not None:
            lines += ["", "[selfhosted]", f'server_url = "{self.server_url()}"']
        return "\n".join(lines) + "\n"


def load_wallet_config(folder: Path) -> WalletConfig:
    """Read and check ``wallet.toml`` in a wallet folder.

    Raises:
        ConfigError: the file is missing, is not TOML, or has bad values (all are listed).
    """
    path = folder / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; create the wallet with 'wallet init'") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, object], *, source: str) -> WalletConfig:
    """Check a decoded configuration.

    Raises:
        ConfigError: one line per bad value, naming the key.
    """
    try:
        return WalletConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"{source}: {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError("\n".join(problems)) from None


def save_wallet_config(folder: Path, config: WalletConfig) -> None:
    """Write ``wallet.toml`` into a wallet folder."""
    (folder / CONFIG_NAME).write_text(config.to_toml(), encoding="utf-8")
