"""Prometheus metrics of one intermediary app.

Request counts and latency by method, route template and status are counted as requests end;
queue depths and prekey pool sizes are read from the database at each scrape (one query per
family), so they are the same whichever process is scraped. Each app has its own registry, so
several apps in one process (tests) do not share counters.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tigress_signal.storage import Database

logger = logging.getLogger(__name__)

#: Latency buckets in seconds: from a cached read to a slow signature check.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: A device "runs low" on one-time keys below this many (what wallets refill at).
LOW_PREKEYS = 10


class Metrics:
    """The metrics of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "tigress_http_requests",
            "HTTP requests and WebSocket sessions handled",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "tigress_http_request_duration_seconds",
            "Time to answer an HTTP request (WebSockets excluded)",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.websockets = Gauge(
            "tigress_websocket_connections", "WebSockets open to this process", registry=registry
        )
        self.messages_stored = Counter(
            "tigress_messages_stored", "Messages stored for delivery", registry=registry
        )
        self.messages_acknowledged = Counter(
            "tigress_messages_acknowledged",
            "Messages deleted after their device acknowledged them",
            registry=registry,
        )
        self.messages_expired = Counter(
            "tigress_messages_expired",
            "Undelivered messages deleted by the retention sweep",
            registry=registry,
        )
        self.rate_limited = Counter(
            "tigress_rate_limited",
            "Requests refused by a rate limit or a full queue",
            ["limit"],
            registry=registry,
        )
        self.queued_messages = Gauge(
            "tigress_queued_messages",
            "Messages stored and not yet acknowledged",
            registry=registry,
        )
        self.queued_devices = Gauge(
            "tigress_queued_devices", "Devices with at least one stored message", registry=registry
        )
        self.max_queue_depth = Gauge(
            "tigress_queue_depth_max", "Stored messages of the deepest queue", registry=registry
        )
        self.prekeys = Gauge(
            "tigress_prekeys_available",
            "One-time prekeys held for all devices, by kind (ec, kem)",
            ["kind"],
            registry=registry,
        )
        self.devices_low = Gauge(
            "tigress_devices_low_on_prekeys",
            f"Devices with fewer than {LOW_PREKEYS} one-time prekeys of a kind",
            ["kind"],
            registry=registry,
        )
        self.devices = Gauge("tigress_devices", "Registered devices", registry=registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request or WebSocket session."""
        self.requests.labels(method, route, str(status)).inc()
        if method != "WEBSOCKET":
            self.latency.labels(method, route).observe(seconds)

    async def refresh_from(self, db: Database) -> None:
        """Read the queue and prekey figures from the database.

        Raises:
            StoreError: the database could not be read.
        """
        async with db.transaction() as conn:
            queues = await conn.fetchrow(
                "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(MAX(n), 0) FROM"
                " (SELECT COUNT(*) AS n FROM messages GROUP BY account_uuid, device_id) q"
            )
            devices = int(await conn.fetchval("SELECT COUNT(*) FROM devices"))
            for kind, table in (("ec", "one_time_prekeys"), ("kem", "one_time_pq_prekeys")):
                total = await conn.fetchval(f"SELECT COUNT(*) FROM {table}")  # noqa: S608
                # Devices at or above the threshold; the rest are low (including none).
                stocked = await conn.fetchval(
                    f"SELECT COUNT(*) FROM (SELECT 1 FROM {table}"  # noqa: S608 - fixed names
                    " GROUP BY account_uuid, device_id HAVING COUNT(*) >= $1) s",
                    LOW_PREKEYS,
                )
                self.prekeys.labels(kind).set(int(total))
                self.devices_low.labels(kind).set(devices - int(stocked))
        assert queues is not None
        self.queued_devices.set(int(queues[0]))
        self.queued_messages.set(int(queues[1]))
        self.max_queue_depth.set(int(queues[2]))
        self.devices.set(devices)
