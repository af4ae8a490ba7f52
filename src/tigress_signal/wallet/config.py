"""A wallet's configuration: which channel carries its transfers, and how it trusts peers.

It lives in ``wallet.toml`` inside the wallet folder, for example::

    channel = "selfhosted"          # the CredentialChannel this wallet uses
    trust_policy = "tofu"           # tofu | always | verify

    [selfhosted]
    server_url = "http://127.0.0.1:8443"
    prekey_rotation_days = 2        # replace the signed and last-resort prekeys this often
    prekey_grace_days = 35          # keep replaced keys this long (>= the server's retention)

A wallet whose Signal account lives in signal-cli names the daemon instead::

    channel = "signal-cli-jsonrpc"  # or "signal-cli-dbus"

    [signal_cli]
    account = "+4915112345678"      # the wallet's Signal account in that daemon
    socket = "/run/user/1000/signal-cli/socket"   # JSON-RPC: socket, tcp or command
    # tcp = "127.0.0.1:7583"
    # bus_address = "unix:path=/run/user/1000/bus" # D-Bus: default is the session bus

Every value is checked when the file is read; each bad value gets its own line in the error.
"""

from __future__ import annotations

import json
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)

from tigress_signal.bridge.signal_cli_client import normalise_recipient
from tigress_signal.errors import ConfigError, SignalCliInvalidNumber
from tigress_signal.wallet.rotation import RotationPolicy

CONFIG_NAME = "wallet.toml"
#: Signal's own clients replace these keys about every two days: short enough that a stolen
#: signed prekey soon stops mattering, long enough that rotation costs next to nothing.
DEFAULT_ROTATION_DAYS = 2.0
#: The intermediary keeps undelivered messages 30 days by default; five more days cover a
#: sender that fetched a bundle just before a rotation and sent its message a little later.
DEFAULT_GRACE_DAYS = 35.0

TrustPolicy = Literal["tofu", "always", "verify"]
ChannelName = Literal["selfhosted", "signal-cli-dbus", "signal-cli-jsonrpc"]
SIGNAL_CLI_CHANNELS = ("signal-cli-dbus", "signal-cli-jsonrpc")


class SelfHostedSettings(BaseModel):
    """Settings of the self-hosted intermediary channel.

    Attributes:
        server_url: the intermediary's base URL.
        keepalive_seconds: how often the wallet pings its WebSocket, and how long an answer
            may take before the connection counts as dead and is opened again.
        resend_log_seconds: how long a sent transfer message is kept, in plaintext, so that
            it can be sent again on a new session when the peer could not decrypt it; 0 keeps
            none (and nothing is ever resent). Keep it short: see
            :mod:`tigress_signal.wallet.send_log`.
        max_resends: how often one message is sent again at most, so that a peer reporting
            errors over and over cannot make the wallet loop.
        prekey_rotation_days: how often the signed prekey and the last-resort Kyber prekey
            are replaced (checked whenever the wallet connects).
        prekey_grace_days: how long a replaced key's private half is kept; keep it at least
            as long as the intermediary keeps undelivered messages (30 days by default), or a
            first message made from an older bundle may no longer decrypt.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_url: HttpUrl
    keepalive_seconds: Annotated[float, Field(gt=0, le=3600)] = 20.0
    resend_log_seconds: Annotated[int, Field(ge=0, le=7 * 24 * 3600)] = 3600
    max_resends: Annotated[int, Field(ge=0, le=10)] = 2
    prekey_rotation_days: Annotated[float, Field(ge=0.01, le=365)] = DEFAULT_ROTATION_DAYS
    prekey_grace_days: Annotated[float, Field(ge=1, le=3650)] = DEFAULT_GRACE_DAYS

    def rotation_policy(self) -> RotationPolicy:
        """The rotation interval and grace period as a policy."""
        return RotationPolicy(
            interval=timedelta(days=self.prekey_rotation_days),
            grace=timedelta(days=self.prekey_grace_days),
        )


class SignalCliSettings(BaseModel):
    """Settings of the signal-cli channels.

    Attributes:
        account: the wallet's Signal account in the daemon, in E.164 form.
        bus_address: D-Bus: the bus the daemon is on; None means the session bus.
        bus_name: D-Bus: the daemon's well-known name (``--bus-name``).
        socket: JSON-RPC: the daemon's UNIX socket (``daemon --socket``).
        tcp: JSON-RPC: ``host:port`` of ``daemon --tcp``, on loopback only.
        command: JSON-RPC: a command that speaks JSON-RPC on stdio (``signal-cli ... jsonRpc``).
        call_timeout: seconds to wait for signal-cli to answer one call.

    With none of ``socket``, ``tcp`` and ``command``, JSON-RPC uses signal-cli's own default
    socket, ``$XDG_RUNTIME_DIR/signal-cli/socket``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str
    bus_address: str | None = None
    bus_name: str = "org.asamk.Signal"
    socket: Path | None = None
    tcp: str | None = None
    command: list[str] | None = None
    call_timeout: float = 60.0

    @field_validator("account")
    @classmethod
    def _e164(cls, value: str) -> str:
        try:
            number = normalise_recipient(value)
        except SignalCliInvalidNumber:
            number = ""
        if not number.startswith("+"):
            raise ValueError("must be a phone number in E.164 form, e.g. +4915112345678")
        return number

    @model_validator(mode="after")
    def _one_endpoint(self) -> SignalCliSettings:
        if sum(x is not None for x in (self.socket, self.tcp, self.command)) > 1:
            raise ValueError("give at most one of socket, tcp and command")
        return self


class WalletConfig(BaseModel):
    """A wallet's configuration file.

    Attributes:
        channel: which CredentialChannel carries this wallet's transfers.
        trust_policy: when a peer's identity key is trusted: on first use, a changed key
            only after ``trust`` (``tofu``), ``always``, or for sending only once verified
            with ``trust`` (``verify``). Applies to the self-hosted channel; signal-cli keeps
            its own trust setting.
        selfhosted: settings of the self-hosted channel.
        signal_cli: settings of the signal-cli channels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: ChannelName = "selfhosted"
    trust_policy: TrustPolicy = "tofu"
    selfhosted: SelfHostedSettings | None = None
    signal_cli: SignalCliSettings | None = None

    @model_validator(mode="after")
    def _settings_for_channel(self) -> WalletConfig:
        if self.channel in SIGNAL_CLI_CHANNELS and self.signal_cli is None:
            raise ValueError(f"channel {self.channel!r} needs a [signal_cli] section")
        return self

    def server_url(self) -> str:
        """The intermediary's base URL, without a trailing slash.

        Raises:
            ConfigError: the self-hosted channel has no server URL configured.
        """
        if self.selfhosted is None:
            raise ConfigError("wallet.toml: [selfhosted] server_url is missing")
        return str(self.selfhosted.server_url).rstrip("/")

    def rotation_policy(self) -> RotationPolicy:
        """When the self-hosted channel's signed and last-resort keys are replaced."""
        settings = self.selfhosted
        if settings is None:
            return RotationPolicy(
                timedelta(days=DEFAULT_ROTATION_DAYS), timedelta(days=DEFAULT_GRACE_DAYS)
            )
        return settings.rotation_policy()

    def keepalive(self) -> float:
        """Seconds between the self-hosted channel's WebSocket pings."""
        return 20.0 if self.selfhosted is None else self.selfhosted.keepalive_seconds

    def to_toml(self) -> str:
        """The configuration as the text of a ``wallet.toml``."""
        lines = [f'channel = "{self.channel}"', f'trust_policy = "{self.trust_policy}"']
        if self.selfhosted is not None:
            lines += [
                "",
                "[selfhosted]",
                f'server_url = "{self.server_url()}"',
                f"keepalive_seconds = {self.selfhosted.keepalive_seconds}",
                f"resend_log_seconds = {self.selfhosted.resend_log_seconds}",
                f"max_resends = {self.selfhosted.max_resends}",
                f"prekey_rotation_days = {self.selfhosted.prekey_rotation_days}",
                f"prekey_grace_days = {self.selfhosted.prekey_grace_days}",
            ]
        if self.signal_cli is not None:
            lines += ["", "[signal_cli]"]
            for key, value in self.signal_cli.model_dump(exclude_none=True).items():
                # JSON strings and lists of strings are valid TOML values.
                text = json.dumps(str(value) if isinstance(value, Path) else value)
                lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"


def selfhosted_settings(server_url: str) -> SelfHostedSettings:
    """Settings for an intermediary at ``server_url``, checked.

    Raises:
        ConfigError: the URL is not an http(s) URL of a server, or carries a user name or
            password (the wallet's own credentials are the only ones it sends).
    """
    try:
        settings = SelfHostedSettings.model_validate({"server_url": server_url})
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"] if exc.errors() else "invalid"
        raise ConfigError(f"server URL {server_url!r}: {reason}") from None
    if settings.server_url.username or settings.server_url.password:
        raise ConfigError(f"server URL {server_url!r}: leave out the user name and password")
    return settings


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
