"""The intermediary server's configuration: where it listens, its database, and every limit.

Every field has a default that runs a private server on the loopback interface with limits
meant for a real deployment. A TOML file holds the settings at its top level or in an
``[intermediary]`` table; each rate limit is a sub-table with ``burst`` and ``per_second``::

    [intermediary]
    host = "127.0.0.1"
    port = 8443
    database_url = "postgresql://tigress@127.0.0.1:5432/tigress"
    message_retention_seconds = 2592000

    [intermediary.message_rate]
    burst = 60
    per_second = 1.0

The configuration is checked when it is loaded, before the server starts; a bad file is one
:class:`~tigress_signal.errors.ConfigError` whose message names every bad value on its own line.

Limits and why these defaults (the Signal-Server figures are its ``RateLimiters`` defaults):

* ``max_message_bytes`` 96 KiB per ciphertext, Signal-Server's ``MAX_MESSAGE_SIZE``.
* ``message_retention_seconds`` 30 days: an undelivered message is deleted after it, like
  Signal-Server's queues. Wallets keep old signed and last-resort keys at least this long.
* ``max_queued_messages`` 1,000 and ``max_queued_bytes`` 32 MiB per recipient device: a wallet
  receives a handful of transfer messages, so a full queue means a device that went away or a
  flood; the sender gets 429 until the device drains it or the messages expire.
* ``message_rate`` 60 at once, then 1 per second, per (sender account, recipient account) pair:
  Signal-Server's ``messages`` limit.
* ``bundle_fetch_rate`` 10 at once, then one a minute, per (requester account, target account):
  each fetch takes one-time keys, so a stranger must not drain a pool (Signal-Server allows 6
  and one per 10 minutes per target device; a wallet here may set up sessions with several
  devices of one account at once, hence a little more).
* ``address_rate`` 600 at once, then 50 per second, per client address, over every request:
  a backstop against one host flooding the server; high enough for a busy proxy-less client.
  Behind a reverse proxy, list it in ``forwarded_allow_ips`` so the real client address is used.
* ``account_creation_rate`` 20 at once, then one every 3 minutes, per client address:
  registration is open and each account costs a password hash and a signature check.
* ``device_link_rate`` 10 at once, then one a minute, per client address, for linking attempts
  (link codes are 128-bit random, so this guards the hashing cost, not guessing).
* ``max_devices_per_account`` 6 (a primary and five linked devices, as Signal).
* ``link_code_ttl_seconds`` 10 minutes: long enough to carry a code to the new device.

Rate limits are kept in each process's memory: with several server processes a client that
spreads its requests over them gets up to that many times the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tigress_signal.errors import ConfigError
from tigress_signal.serving import read_settings
from tigress_signal.storage.database import check_postgres_url

#: Signal-Server's limit on one message's ``content`` (``MessageSender.MAX_MESSAGE_SIZE``).
DEFAULT_MAX_MESSAGE_BYTES = 96 * 1024
#: Largest request body: room for a few devices' maximum-size messages in base64.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: Deliveries a WebSocket may have outstanding (sent, not answered), as in Signal-Server.
DEFAULT_MAX_UNACKNOWLEDGED = 256
#: How long an undelivered message is kept (30 days).
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600


class RateLimit(BaseModel):
    """A token bucket: ``burst`` requests at once, refilled at ``per_second``.

    Attributes:
        burst: how many requests may come at once (the bucket's size); 0 disables the limit.
        per_second: how fast the bucket refills, in requests per second.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    burst: Annotated[int, Field(ge=0, le=1_000_000)]
    per_second: Annotated[float, Field(gt=0, le=1_000_000)]

    @property
    def enabled(self) -> bool:
        """Whether the limit applies at all."""
        return self.burst > 0


class IntermediaryConfig(BaseModel):
    """Settings of one intermediary server process (see the module docstring for the limits).

    Attributes:
        host: the address to listen on; loopback unless the server must be reachable.
        port: the TCP port (0 picks a free one, for tests).
        database_url: where accounts, keys and messages live (``sqlite:///...`` for one
            process, ``postgresql://...`` for one or several; see
            :mod:`tigress_signal.storage.database`).
        database_pool_size: PostgreSQL connections this process keeps at most.
        max_message_bytes: the largest ``content`` of one message, after base64 decoding.
        max_body_bytes: the largest request body; bigger requests get 413.
        max_unacknowledged: deliveries a WebSocket may have outstanding at once.
        auth_cache_size: how many verified device passwords are remembered (see
            :mod:`tigress_signal.intermediary.auth`).
        kdf_concurrency: how many password hashes may be computed at once.
        message_retention_seconds: an undelivered message is deleted this long after it
            was stored.
        max_queued_messages: messages one device may have waiting; more are refused (429).
        max_queued_bytes: bytes of ciphertext one device may have waiting (429 beyond).
        queue_full_retry_after_seconds: the ``Retry-After`` of a send refused for a full queue.
        sweep_interval_seconds: how often expired messages, link codes and old key ids are
            deleted, and this process's heartbeat is written.
        max_devices_per_account: devices one account may have, the first included.
        link_code_ttl_seconds: how long a device link code can be used.
        message_rate: sends per (sender account, recipient account).
        bundle_fetch_rate: prekey bundle fetches per (requester account, target account).
        address_rate: requests per client address (health and metrics excluded).
        account_creation_rate: account creations per client address.
        device_link_rate: device link attempts per client address.
        rate_limiter_keys: how many keys each rate limit remembers (oldest forgotten first).
        forwarded_allow_ips: addresses of reverse proxies whose ``X-Forwarded-For`` names the
            client; empty: the TCP peer is the client.
        metrics_enabled: serve Prometheus metrics at ``/metrics``.
        node: the Node.js executable for the libsignal sidecar (None: the bridge's default).
        sidecar: the sidecar script (None: the bridge's default).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8443
    database_url: Annotated[str, Field(min_length=1)] = "sqlite:///intermediary.db"
    database_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    max_message_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_MESSAGE_BYTES
    max_body_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_BODY_BYTES
    max_unacknowledged: Annotated[int, Field(ge=1, le=10_000)] = DEFAULT_MAX_UNACKNOWLEDGED
    auth_cache_size: Annotated[int, Field(ge=0)] = 10_000
    kdf_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    message_retention_seconds: Annotated[int, Field(ge=60, le=365 * 24 * 3600)] = (
        DEFAULT_RETENTION_SECONDS
    )
    max_queued_messages: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    max_queued_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    queue_full_retry_after_seconds: Annotated[int, Field(ge=1, le=86_400)] = 300
    sweep_interval_seconds: Annotated[float, Field(ge=0.05, le=86_400)] = 600.0
    max_devices_per_account: Annotated[int, Field(ge=1, le=127)] = 6
    link_code_ttl_seconds: Annotated[int, Field(ge=10, le=86_400)] = 600
    message_rate: RateLimit = RateLimit(burst=60, per_second=1.0)
    bundle_fetch_rate: RateLimit = RateLimit(burst=10, per_second=1 / 60)
    address_rate: RateLimit = RateLimit(burst=600, per_second=50.0)
    account_creation_rate: RateLimit = RateLimit(burst=20, per_second=1 / 180)
    device_link_rate: RateLimit = RateLimit(burst=10, per_second=1 / 60)
    rate_limiter_keys: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    forwarded_allow_ips: list[str] = Field(default_factory=list)
    metrics_enabled: bool = True
    node: str | None = None
    sidecar: str | None = None

    @field_validator("database_url")
    @classmethod
    def _readable_database_url(cls, value: str) -> str:
        scheme = value.partition(":")[0].lower()
        if scheme == "sqlite":
            if value not in ("sqlite://", "sqlite:///:memory:") and (
                not value.startswith("sqlite:///") or len(value) == len("sqlite:///")
            ):
                raise ValueError("write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        elif scheme in ("postgresql", "postgres"):
            try:
                check_postgres_url(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        else:
            raise ValueError("database_url must start with sqlite: or postgresql:")
        return value

    @field_validator("max_body_bytes")
    @classmethod
    def _body_holds_a_message(cls, value: int, info: ValidationInfo) -> int:
        # A maximum-size message must fit in a body, base64-encoded, or the 413 for a too
        # large message could never be reached.
        data = info.data
        message = data.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        needed = (message + 2) // 3 * 4 + 1024
        if value < needed:
            raise ValueError(
                f"must be at least {needed} to carry one message of max_message_bytes={message}"
            )
        return value

    @field_validator("max_queued_bytes")
    @classmethod
    def _queue_holds_a_message(cls, value: int, info: ValidationInfo) -> int:
        data = info.data
        message = data.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        if value < message:
            raise ValueError(f"must be at least max_message_bytes ({message})")
        return value

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> IntermediaryConfig:
        """Build a configuration from a parsed TOML table (or any mapping).

        Raises:
            ConfigError: a value is missing, unknown or invalid; every problem is listed on
                its own line, named by its setting.
        """
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = "\n".join(
                f"  {'.'.join(str(p) for p in err['loc']) or 'intermediary'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(
                f"invalid intermediary configuration:\n{problems}",
                hint="fix these [intermediary] settings",
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
        values.update(read_settings(path, "intermediary"))
    values.update(overrides or {})
    return IntermediaryConfig.from_mapping(values)
