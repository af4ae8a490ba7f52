"""The intermediary server's configuration.

Every field has a default that runs a private server on the loopback interface. A TOML file
holds the settings at its top level or in an ``[intermediary]`` table::

    [intermediary]
    host = "127.0.0.1"
    port = 8443
    database_url = "sqlite:////var/lib/tigress-signal/intermediary.db"
    max_message_bytes = 98304
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tigress_signal.errors import ConfigError

#: Signal-Server's limit on one message's ``content`` (``MessageSender.MAX_MESSAGE_SIZE``).
DEFAULT_MAX_MESSAGE_BYTES = 96 * 1024
#: Largest request body: room for a few devices' maximum-size messages in base64.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: Deliveries a WebSocket may have outstanding (sent, not answered), as in Signal-Server.
DEFAULT_MAX_UNACKNOWLEDGED = 256


class IntermediaryConfig(BaseModel):
    """Settings of one intermediary server process.

    Attributes:
        host: the address to listen on; loopback unless the server must be reachable.
        port: the TCP port (0 picks a free one, for tests).
        database_url: where accounts, keys and messages live (``sqlite:///...``; see
            :mod:`tigress_signal.storage.database`).
        max_message_bytes: the largest ``content`` of one message, after base64 decoding.
        max_body_bytes: the largest request body; bigger requests get 413.
        max_unacknowledged: deliveries a WebSocket may have outstanding at once.
        auth_cache_size: how many verified device passwords are remembered (see
            :mod:`tigress_signal.intermediary.auth`).
        kdf_concurrency: how many password hashes may be computed at once.
        node: the Node.js executable for the libsignal sidecar (None: the bridge's default).
        sidecar: the sidecar script (None: the bridge's default).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8443
    database_url: Annotated[str, Field(min_length=1)] = "sqlite:///intermediary.db"
    max_message_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_MESSAGE_BYTES
    max_body_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_BODY_BYTES
    max_unacknowledged: Annotated[int, Field(ge=1, le=10_000)] = DEFAULT_MAX_UNACKNOWLEDGED
    auth_cache_size: Annotated[int, Field(ge=0)] = 10_000
    kdf_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    node: str | None = None
    sidecar: str | None = None

    @model_validator(mode="after")
    def _body_holds_a_message(self) -> IntermediaryConfig:
        # A maximum-size message must fit in a body, base64-encoded, or the 413 for a too
        # large message could never be reached.
        needed = (self.max_message_bytes + 2) // 3 * 4 + 1024
        if self.max_body_bytes < needed:
            raise ValueError(
                f"max_body_bytes must be at least {needed} to carry one message of "
                f"max_message_bytes={self.max_message_bytes}"
            )
        if not self.database_url.lower().startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ValueError("database_url must start with sqlite: or postgresql:")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> IntermediaryConfig:
        """Build a configuration from a parsed TOML table (or any mapping).

        Raises:
            ConfigError: a value is missing, unknown or invalid; every problem is listed.
        """
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'intermediary'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(
                f"invalid intermediary configuration: {problems}",
                hint="fix the [intermediary] settings",
            ) from exc


def load_intermediary_config(
    path: Path | str | None = None, overrides: Mapping[str, object] | None = None
) -> IntermediaryConfig:
    """Read the configuration from a TOML file (if any), then apply overrides.

    Args:
        path: a TOML file with the settings at its top level or in an ``[intermediary]``
            table; None uses the defaults.
        overrides: values that win over the file's, e.g. from command-line options.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    values: dict[str, object] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as file:
                document = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        table = document.get("intermediary", document)
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [intermediary] must be a table")
        values.update(table)
    values.update(overrides or {})
    return IntermediaryConfig.from_mapping(values)
