"""Client of signal-cli's JSON-RPC interface, over a UNIX socket, TCP on loopback, or stdio.

signal-cli speaks newline-delimited JSON-RPC 2.0 on ``daemon --socket`` and ``daemon --tcp``,
and on stdin/stdout with ``jsonRpc``. Facts this client is built on:

* Requests run concurrently inside signal-cli and answers come back out of order, so every
  request gets its own id and its future is resolved by id, never by position.
* Incoming messages are ``receive`` notifications. In manual receive mode (how we start the
  daemon) nothing is received until ``subscribeReceive``, whose result is a subscription id; the
  notification's params are then ``{"subscription": id, "result": {"envelope", "account"}}``.
  In automatic mode they are ``{"envelope", "account"}``; both are understood.
* A subscription belongs to the connection: when the connection ends signal-cli stops taking
  messages for it, so they wait at Signal's servers until we are back.
* A failed send answers with an error whose ``data.response.results`` hold the per-recipient
  results; codes -1 (user error), -3 (I/O), -4 (untrusted identity), -5 (rate limit).

TCP is only allowed to a loopback address: the socket is not authenticated, so anyone who can
reach it can send as the account.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tigress_signal.bridge.signal_cli_client import ReceivedText, SendReceipt
from tigress_signal.bridge.signal_cli_errors import from_jsonrpc_error
from tigress_signal.errors import (
    ConfigError,
    SignalCliError,
    SignalCliFailure,
    SignalCliUnavailable,
)

log = logging.getLogger(__name__)

#: Seconds to wait for any one answer; a send through Signal's servers can take a while.
DEFAULT_CALL_TIMEOUT = 60.0
#: The longest line read from signal-cli (an identity list can be long).
_LINE_LIMIT = 16 * 1024 * 1024


class SignalCliJsonRpcClient:
    """A connection to signal-cli's JSON-RPC interface.

    Use :meth:`unix`, :meth:`tcp` or :meth:`stdio` to make one, then :meth:`connect`.

    Args:
        unix_path: a UNIX socket to connect to, or
        tcp: ``(host, port)`` on loopback, or
        command: a command line that speaks JSON-RPC on stdio (``signal-cli ... jsonRpc``).
        command_env: the command's environment (default: ours, with a UTF-8 locale).
        call_timeout: seconds to wait for any one answer.
    """

    transport = "jsonrpc"

    def __init__(
        self,
        *,
        unix_path: Path | None = None,
        tcp: tuple[str, int] | None = None,
        command: Sequence[str] | None = None,
        command_env: Mapping[str, str] | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        if sum(x is not None for x in (unix_path, tcp, command)) != 1:
            raise ConfigError("give exactly one of a UNIX socket, a TCP address or a command")
        if tcp is not None:
            _check_loopback(tcp[0])
        self._unix_path = unix_path
        self._tcp = tcp
        self._command = list(command) if command is not None else None
        self._command_env = dict(command_env) if command_env is not None else None
        self._call_timeout = call_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # Subscription id -> (account, queue); plus one queue per account for automatic mode.
        self._subscriptions: dict[int, tuple[str, asyncio.Queue[ReceivedText | None]]] = {}
        self._closed = False

    @classmethod
    def unix(
        cls, path: Path | str, call_timeout: float = DEFAULT_CALL_TIMEOUT
    ) -> SignalCliJsonRpcClient:
        """A client of ``daemon --socket PATH``."""
        return cls(unix_path=Path(path), call_timeout=call_timeout)

    @classmethod
    def tcp_loopback(
        cls, host: str, port: int, call_timeout: float = DEFAULT_CALL_TIMEOUT
    ) -> SignalCliJsonRpcClient:
        """A client of ``daemon --tcp HOST:PORT``; the host must be a loopback address."""
        return cls(tcp=(host, port), call_timeout=call_timeout)

    @classmethod
    def stdio(
        cls,
        command: Sequence[str],
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> SignalCliJsonRpcClient:
        """A client that runs ``command`` (``signal-cli ... jsonRpc``) and talks on its stdio."""
        return cls(command=command, command_env=env, call_timeout=call_timeout)

    # -- connection -----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection (again, after it was lost).

        Raises:
            SignalCliUnavailable: nothing listens there, or the command would not start.
        """
        await self._disconnect()
        try:
            if self._unix_path is not None:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self._unix_path), limit=_LINE_LIMIT
                )
            elif self._tcp is not None:
                self._reader, self._writer = await asyncio.open_connection(
                    *self._tcp, limit=_LINE_LIMIT
                )
            else:
                assert self._command is not None
                self._process = await asyncio.create_subprocess_exec(
                    *self._command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                    limit=_LINE_LIMIT,
                    env=self._command_env
                    or {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
                )
                assert self._process.stdout is not None and self._process.stdin is not None
                self._reader = self._process.stdout
                self._writer = self._process.stdin
        except OSError as exc:
            raise SignalCliUnavailable(
                f"cannot reach signal-cli's JSON-RPC at {self._where()}: {exc}"
            ) from exc
        self._read_task = asyncio.create_task(self._read_loop(), name="signal-cli JSON-RPC")
        log.info("connected to signal-cli's JSON-RPC at %s", self._where())

    async def close(self) -> None:
        """Close the connection; subscriptions end with it."""
        self._closed = True
        await self._disconnect()

    async def _disconnect(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
            self._read_task = None
        self._lost(SignalCliUnavailable("the connection to signal-cli was closed"))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), 10.0)
            self._process = None

    # -- calls ----------------------------------------------------------------------------------

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """One JSON-RPC request; returns its result.

        Raises:
            SignalCliError: signal-cli answered with an error (a leaf for the reason).
            SignalCliUnavailable: the connection is down or the answer did not come in time.
        """
        if self._writer is None:
            raise SignalCliUnavailable("not connected to signal-cli's JSON-RPC")
        request_id = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params:
            request["params"] = dict(params)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n")
            await self._writer.drain()
            return await asyncio.wait_for(future, self._call_timeout)
        except TimeoutError as exc:
            raise SignalCliUnavailable(
                f"signal-cli did not answer {method} within {self._call_timeout:.0f} s"
            ) from exc
        except OSError as exc:
            raise SignalCliUnavailable(f"the JSON-RPC connection failed: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)

    async def version(self) -> str:
        """signal-cli's version."""
        result = await self.call("version")
        return str(result.get("version", "")) if isinstance(result, dict) else str(result)

    async def list_accounts(self) -> list[str]:
        """The daemon's accounts (E.164)."""
        result = await self.call("listAccounts")
        return [str(a["number"]) for a in result if isinstance(a, dict) and "number" in a]

    async def send_text(self, account: str, recipient: str, text: str) -> SendReceipt:
        """Send a text; returns the timestamp and the recipient's addresses.

        Raises:
            SignalCliError: a leaf for the reason (untrusted identity, unregistered user, ...).
        """
        result = await self.call(
            "send", {"account": account, "recipient": [recipient], "message": text}
        )
        if not isinstance(result, dict) or "timestamp" not in result:
            raise SignalCliFailure("signal-cli answered a send without a timestamp")
        results = [r for r in result.get("results") or [] if isinstance(r, dict)]
        failed = [r for r in results if r.get("type") != "SUCCESS"]
        if failed:
            # Older releases answered partial failures as a result; read them like errors.
            raise from_jsonrpc_error(-1, "Failed to send message", {"response": result})
        address = results[0].get("recipientAddress") if results else None
        address = address if isinstance(address, dict) else {}
        return SendReceipt(
            timestamp=int(result["timestamp"]),
            recipient_number=address.get("number"),
            recipient_uuid=address.get("uuid"),
        )

    async def receive(self, account: str) -> AsyncGenerator[ReceivedText, None]:
        """Subscribe to ``account``'s messages on this connection and yield its 1:1 texts.

        Raises:
            SignalCliUnavailable: the connection was lost (connect and call again).
        """
        queue: asyncio.Queue[ReceivedText | None] = asyncio.Queue()
        subscription = await self.call("subscribeReceive", {"account": account})
        self._subscriptions[int(subscription)] = (account, queue)
        log.info("subscribed to %s's messages over JSON-RPC", account)
        while True:
            item = await queue.get()
            if item is None:
                if self._closed:
                    return
                raise SignalCliUnavailable("the JSON-RPC connection to signal-cli was lost")
            yield item

    # -- internals ------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._reader is not None
        error: SignalCliError = SignalCliUnavailable("signal-cli closed the JSON-RPC connection")
        try:
            while line := await self._reader.readline():
                self._dispatch(line)
        except (OSError, ValueError) as exc:
            # ValueError: a line over the limit; the stream cannot be resynchronised.
            error = SignalCliUnavailable(f"the JSON-RPC connection failed: {exc}")
        self._lost(error)

    def _lost(self, error: SignalCliError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for _account, queue in self._subscriptions.values():
            queue.put_nowait(None)
        self._subscriptions.clear()

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            log.warning("signal-cli sent a line that is not JSON (%d bytes)", len(line))
            return
        if isinstance(message, list):  # a batch answer
            for item in message:
                self._dispatch(json.dumps(item).encode())
            return
        if not isinstance(message, dict):
            return
        if "method" in message:
            if message["method"] == "receive":
                self._on_receive(message.get("params"))
            return
        request_id = message.get("id")
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is None or future.done():
            log.debug("an answer for no pending request (id %r)", message.get("id"))
            return
        error = message.get("error")
        if isinstance(error, dict):
            data = error.get("data")
            future.set_exception(
                from_jsonrpc_error(
                    int(error.get("code", 0)),
                    str(error.get("message", "")),
                    data if isinstance(data, dict) else None,
                )
            )
        else:
            future.set_result(message.get("result"))

    def _on_receive(self, params: object) -> None:
        if not isinstance(params, dict):
            return
        subscription = params.get("subscription")
        body = params.get("result") if "subscription" in params else params
        if not isinstance(body, dict):
            return
        account = str(body.get("account", ""))
        if subscription is not None:
            entry = (
                self._subscriptions.get(subscription) if isinstance(subscription, int) else None
            )
            targets = [entry[1]] if entry is not None else []
        else:
            # Automatic receive mode: no subscription id, the account says whose it is.
            targets = [q for a, q in self._subscriptions.values() if a == account]
        received = _parse_envelope(account, body)
        if received is None:
            return
        for queue in targets:
            queue.put_nowait(received)

    def _where(self) -> str:
        if self._unix_path is not None:
            return str(self._unix_path)
        if self._tcp is not None:
            return f"{self._tcp[0]}:{self._tcp[1]}"
        return "stdio"


def _parse_envelope(account: str, body: Mapping[str, Any]) -> ReceivedText | None:
    envelope = body.get("envelope")
    if not isinstance(envelope, dict):
        return None
    if "exception" in body:
        # e.g. a message from a sender whose new identity key is not trusted: signal-cli could
        # not decrypt it, and no text reaches us.
        problem = body["exception"] if isinstance(body["exception"], dict) else {}
        log.warning("signal-cli could not read a message for %s: %s", account, problem.get("type"))
        return None
    data = envelope.get("dataMessage")
    if not isinstance(data, dict) or data.get("groupInfo"):
        return None  # receipts, typing, sync and group messages are not transfers
    text = data.get("message")
    sender = envelope.get("sourceNumber") or envelope.get("sourceUuid") or envelope.get("source")
    if not isinstance(text, str) or not text or not sender:
        return None
    uuid_value = envelope.get("sourceUuid")
    return ReceivedText(
        account=account,
        sender=str(sender),
        sender_uuid=str(uuid_value) if uuid_value else None,
        timestamp=int(envelope.get("timestamp") or data.get("timestamp") or 0),
        text=text,
    )


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"signal-cli's JSON-RPC over TCP is unauthenticated; {host!r} is not a loopback"
            " address (use 127.0.0.1 or ::1, or a UNIX socket)"
        )
