"""The Tigress relay's configuration.

Every field has a default that runs a private relay on the loopback interface. A TOML file holds
the settings at its top level or in a ``[relay]`` table::

    [relay]
    host = "127.0.0.1"
    port = 8480
    database_url = "sqlite:////var/lib/tigress-signal/relay.db"
    max_lifetime_hours = 48

A relay that listens beyond loopback must speak TLS itself (``tls_certfile``/``tls_keyfile``)
or say that a TLS proxy stands in front of it (``behind_tls_proxy = true``): share links carry
capability URLs, and the drafts allow the relay API over TLS only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tigress_signal.errors import ConfigError
from tigress_signal.serving import read_settings

#: The cap on a mailbox's lifetime; the sample implementation's figure.
DEFAULT_MAX_LIFETIME_HOURS = 48.0
#: The lifetime of a mailbox whose creator gave no expiration.
DEFAULT_LIFETIME_HOURS = 24.0
#: Largest decoded payload: a 92 KiB transfer message, AES-GCM's IV and tag, and some room.
DEFAULT_MAX_PAYLOAD_BYTES = 128 * 1024
#: Largest request body: a maximum payload in base64 plus display information.
DEFAULT_MAX_BODY_BYTES = 256 * 1024
#: Largest title, description or image URL, in characters.
DEFAULT_MAX_DISPLAY_CHARS = 512


class RelayConfig(BaseModel):
    """Settings of one relay process.

    Attributes:
        host: the address to listen on; loopback unless the relay must be reachable.
        port: the TCP port (0 picks a free one, for tests).
        database_url: where mailboxes live (``sqlite:///...``; see
            :mod:`tigress_signal.storage.database`).
        public_url: the origin share links name (``https://relay.example``); empty: the
            address the relay listens on.
        tls_certfile: PEM certificate chain; with ``tls_keyfile`` the relay speaks HTTPS.
        tls_keyfile: the certificate's PEM private key.
        behind_tls_proxy: the relay listens beyond loopback without TLS because a TLS proxy
            in front of it does the TLS.
        default_lifetime_hours: lifetime of a mailbox created without an expiration.
        max_lifetime_hours: the cap on any mailbox's lifetime; later expirations are cut.
        sweep_interval_seconds: how often expired mailboxes are deleted from storage.
        max_payload_bytes: the largest payload ciphertext (IV, ciphertext and tag), decoded.
        max_display_chars: the largest title, description or image URL.
        max_body_bytes: the largest request body; bigger requests get 413.
        requests_per_minute: requests one client address may make per minute (0: no limit).
        burst: requests one address may make at once before the per-minute rate applies.
        misses_per_minute: requests naming an unknown mailbox one address may make per minute,
            which bounds guessing of mailbox ids (0: no limit).
        max_wait_seconds: the longest a read may wait for a newer payload (``Prefer: wait``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8480
    database_url: Annotated[str, Field(min_length=1)] = "sqlite:///relay.db"
    public_url: str = ""
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    behind_tls_proxy: bool = False
    default_lifetime_hours: Annotated[float, Field(gt=0)] = DEFAULT_LIFETIME_HOURS
    max_lifetime_hours: Annotated[float, Field(gt=0)] = DEFAULT_MAX_LIFETIME_HOURS
    sweep_interval_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_payload_bytes: Annotated[int, Field(ge=64)] = DEFAULT_MAX_PAYLOAD_BYTES
    max_display_chars: Annotated[int, Field(ge=16)] = DEFAULT_MAX_DISPLAY_CHARS
    max_body_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_BODY_BYTES
    requests_per_minute: Annotated[int, Field(ge=0)] = 600
    burst: Annotated[int, Field(ge=1)] = 60
    misses_per_minute: Annotated[int, Field(ge=0)] = 30
    max_wait_seconds: Annotated[float, Field(ge=0, le=300)] = 25.0

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        if not self.database_url.lower().startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ValueError("database_url must start with sqlite: or postgresql:")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if self.default_lifetime_hours > self.max_lifetime_hours:
            raise ValueError("default_lifetime_hours must not exceed max_lifetime_hours")
        # A payload must fit in a body, base64-encoded, or its 413 could never be reached.
        needed = (self.max_payload_bytes + 2) // 3 * 4 + 4 * self.max_display_chars + 1024
        if self.max_body_bytes < needed:
            raise ValueError(f"max_body_bytes must be at least {needed} for the payload limit")
        if not self.tls and not self.behind_tls_proxy and not _is_loopback(self.host):
            raise ValueError(
                "a relay listening beyond loopback needs tls_certfile and tls_keyfile, "
                "or behind_tls_proxy = true"
            )
        if self.public_url and not self.public_url.startswith(("https://", "http://")):
            raise ValueError("public_url must start with https:// (or http:// on loopback)")
        return self

    @property
    def tls(self) -> bool:
        """Whether the relay itself speaks HTTPS."""
        return self.tls_certfile is not None

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RelayConfig:
        """Build a configuration from a parsed TOML table (or any mapping).

        Raises:
            ConfigError: a value is missing, unknown or invalid; every problem is listed.
        """
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'relay'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(
                f"invalid relay configuration: {problems}", hint="fix the [relay] settings"
            ) from exc


def load_relay_config(
    path: Path | str | None = None, overrides: Mapping[str, object] | None = None
) -> RelayConfig:
    """Read the configuration from a TOML file (if any), then apply overrides.

    Args:
        path: a TOML file with the settings at its top level or in a ``[relay]`` table; None
            uses the defaults.
        overrides: values that win over the file's, e.g. from command-line options.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    values: dict[str, object] = {}
    if path is not None:
        values.update(read_settings(path, "relay"))
    values.update(overrides or {})
    return RelayConfig.from_mapping(values)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
