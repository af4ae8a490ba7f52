"""What every endpoint of a running relay needs, made once per app in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from tigress_signal.relay.config import RelayConfig
from tigress_signal.relay.limits import RateLimiter
from tigress_signal.storage import Database


class MailboxWatch:
    """Wakes reads waiting for a newer payload of a mailbox (``Prefer: wait``).

    A waiter takes the mailbox's event *before* it reads the stored version, so an update
    that lands in between still wakes it. Only this process's updates wake a waiter; with
    several relay processes on one database, an update made elsewhere is seen when the wait
    ends.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self._closed = False

    def event(self, mailbox_id: str) -> asyncio.Event:
        """The event the next change of ``mailbox_id`` sets; register with :meth:`enter`."""
        event = self._events.setdefault(mailbox_id, asyncio.Event())
        if self._closed:
            event.set()
        return event

    def enter(self, mailbox_id: str) -> None:
        """Count a waiter of ``mailbox_id`` (pair with :meth:`leave`)."""
        self._waiters[mailbox_id] = self._waiters.get(mailbox_id, 0) + 1

    def leave(self, mailbox_id: str) -> None:
        """Uncount a waiter; the mailbox's event is dropped with its last waiter."""
        left = self._waiters.get(mailbox_id, 1) - 1
        if left > 0:
            self._waiters[mailbox_id] = left
            return
        self._waiters.pop(mailbox_id, None)
        self._events.pop(mailbox_id, None)

    def changed(self, mailbox_id: str) -> None:
        """A mailbox's payload changed or the mailbox went away: wake its waiters."""
        event = self._events.pop(mailbox_id, None)
        if event is not None:
            event.set()

    def close(self) -> None:
        """Wake every waiter now and from now on (the relay is stopping)."""
        self._closed = True
        for event in self._events.values():
            event.set()
        self._events.clear()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Wait for ``event`` for at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


@dataclass(slots=True)
class RelayContext:
    """The running relay's parts.

    Attributes:
        config: the configuration it was started with.
        db: its database, migrated.
        clock: the current time in seconds since the epoch (injectable for expiry tests).
        requests: the per-address limit on all requests.
        misses: the per-address limit on requests naming unknown mailboxes.
        watch: wakes long-polling reads.
    """

    config: RelayConfig
    db: Database
    clock: Callable[[], float]
    requests: RateLimiter
    misses: RateLimiter
    watch: MailboxWatch = field(default_factory=MailboxWatch)

    def public_base(self, connection: HTTPConnection) -> str:
        """The origin share links name: the configured one, else the one the client used."""
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        return f"{connection.url.scheme}://{connection.url.netloc}"


def context_of(connection: HTTPConnection) -> RelayContext:
    """The context of the app serving a request (set by the app's lifespan)."""
    context = getattr(connection.app.state, "relay", None)
    if not isinstance(context, RelayContext):
        raise RuntimeError("the relay app is not started (its lifespan did not run)")
    return context


def client_address(connection: HTTPConnection) -> str:
    """The address rate limits are kept for (only in memory)."""
    return connection.client.host if connection.client is not None else "unknown"
