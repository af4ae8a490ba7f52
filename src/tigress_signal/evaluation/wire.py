"""A counting TCP proxy on loopback: what one party puts on the wire, measured the same way for
every channel.

Each party of the comparison talks to its server through its own :class:`CountingProxy`, so
the bytes, connections, HTTP requests and WebSocket frames it causes are counted where they
really travel, headers and framing included, whatever library made them (httpx for REST,
websockets for the intermediary's push channel). The proxy follows HTTP/1.1 far enough to
count requests and to notice a WebSocket upgrade, then counts WebSocket frames; if it ever
cannot follow a stream it keeps counting bytes and says so (``unparsed``).

It listens on 127.0.0.1 only and forwards only to the one loopback address it was given.

:class:`JsonRpcCountingProxy` does the same for newline-delimited JSON-RPC (signal-cli's
``daemon --socket``) between two UNIX sockets: it counts connections, bytes, requests that wait
for an answer, and notifications the daemon pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
#: Largest client-to-server byte record kept for the secret check (per proxy).
_MAX_KEPT_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class WireCounts:
    """Totals of one party's traffic.

    Attributes:
        connections: TCP connections opened (each costs a round trip before any request).
        bytes_sent: bytes from the party to the server.
        bytes_received: bytes from the server to the party.
        http_requests: HTTP requests (each waits for its answer: one round trip).
        ws_frames_sent: WebSocket frames from the party (acknowledgements; no waiting).
        ws_frames_received: WebSocket frames from the server (pushed messages).
        rpc_requests: JSON-RPC requests with an id (each waits for its answer: one round trip).
        rpc_notifications_received: JSON-RPC notifications from the server (pushed messages).
        unparsed: streams the proxy could not follow (counted in bytes only).
    """

    connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    http_requests: int = 0
    ws_frames_sent: int = 0
    ws_frames_received: int = 0
    rpc_requests: int = 0
    rpc_notifications_received: int = 0
    unparsed: int = 0

    @property
    def round_trips(self) -> int:
        """Times the party waited for the server: connection set-ups plus HTTP or JSON-RPC
        exchanges."""
        return self.connections + self.http_requests + self.rpc_requests

    @property
    def pushes(self) -> int:
        """Messages the server sent unasked: WebSocket frames or JSON-RPC notifications."""
        return self.ws_frames_received + self.rpc_notifications_received

    def copy(self) -> WireCounts:
        """A snapshot."""
        return WireCounts(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, earlier: WireCounts) -> WireCounts:
        """What happened since ``earlier``."""
        return WireCounts(
            **{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)}
        )

    def as_dict(self) -> dict[str, int]:
        """Plain numbers for the report, round trips included."""
        values = {f.name: int(getattr(self, f.name)) for f in fields(self)}
        values["round_trips"] = self.round_trips
        values["pushes"] = self.pushes
        return values


class CountingProxy:
    """Forwards 127.0.0.1:<port> to one loopback server and counts what passes.

    Args:
        target_host: the server's address (loopback).
        target_port: the server's port.
        keep_sent_bytes: keep a copy of everything the party sent (for the check that no
            secret ever left it); bounded.
    """

    def __init__(
        self, target_host: str, target_port: int, *, keep_sent_bytes: bool = False
    ) -> None:
        self._target = (target_host, target_port)
        self.counts = WireCounts()
        self.sent_bytes = bytearray() if keep_sent_bytes else None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Stop listening and cut the open connections."""
        if self._server is not None:
            self._server.close()
        # Closing the sockets ends both pumps of each connection by themselves; cancelling
        # the connection tasks instead makes asyncio log them as failed.
        for stream in list(self._streams):
            stream.close()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> CountingProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self.counts.connections += 1
        conversation = _HttpConversation(self.counts)
        self._streams.update((writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pump(reader, upstream_writer, conversation.client),
                self._pump(upstream_reader, writer, conversation.server),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for stream in (writer, upstream_writer):
                stream.close()
                self._streams.discard(stream)
            if task is not None:
                self._tasks.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, side: _Direction
    ) -> None:
        try:
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    break
                side.feed(data)
                keep = side.from_client and self.sent_bytes is not None
                if keep and len(self.sent_bytes or b"") + len(data) <= _MAX_KEPT_BYTES:
                    self.sent_bytes.extend(data)  # type: ignore[union-attr]
                sink.write(data)
                await sink.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if sink.can_write_eof():
                    sink.write_eof()


class _HttpConversation:
    """Both directions of one connection, and whether it became a WebSocket."""

    def __init__(self, counts: WireCounts) -> None:
        self.counts = counts
        self.websocket = False
        self.upgrade_asked = False
        self.client = _Direction(self, from_client=True)
        self.server = _Direction(self, from_client=False)


class _Direction:
    """One direction of a connection, parsed just far enough to count messages."""

    def __init__(self, conversation: _HttpConversation, *, from_client: bool) -> None:
        self.conversation = conversation
        self.from_client = from_client
        self.buffer = bytearray()
        self.skip = 0  # body bytes still to pass over
        self.chunked = False
        self.broken = False

    def feed(self, data: bytes) -> None:
        counts = self.conversation.counts
        if self.from_client:
            counts.bytes_sent += len(data)
        else:
            counts.bytes_received += len(data)
        if self.broken:
            return
        self.buffer.extend(data)
        try:
            while self._step():
                pass
        except ValueError:
            self.broken = True
            self.buffer.clear()
            counts.unparsed += 1
            log.debug("wire counter lost track of a stream; counting bytes only")

    def _step(self) -> bool:
        """Consume one unit from the buffer; False when more bytes are needed."""
        if self.skip:
            taken = min(self.skip, len(self.buffer))
            del self.buffer[:taken]
            self.skip -= taken
            return bool(self.buffer) and self.skip == 0
        if self.chunked:
            return self._chunk()
        if self.conversation.websocket:
            return self._frame()
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 1024 * 1024:
                raise ValueError("no end of headers")
            return False
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if self.from_client:
            self.conversation.counts.http_requests += 1
            if headers.get("upgrade", "").lower() == "websocket":
                self.conversation.upgrade_asked = True
        else:
            parts = head[0].split(" ")
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if status == 101 and self.conversation.upgrade_asked:
                self.conversation.websocket = True
                return bool(self.buffer)
            if 100 <= status < 200 or status in (204, 304):
                return bool(self.buffer)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self.chunked = True
        else:
            self.skip = int(headers.get("content-length", "0") or 0)
        return bool(self.buffer)

    def _chunk(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(bytes(self.buffer[:end]).split(b";")[0] or b"0", 16)
        if size == 0:
            # The last chunk, then trailers (none here) and an empty line.
            tail = self.buffer.find(b"\r\n\r\n")
            if tail < 0:
                return False
            del self.buffer[: tail + 4]
            self.chunked = False
            return bool(self.buffer)
        if len(self.buffer) < end + 2 + size + 2:
            return False
        del self.buffer[: end + 2 + size + 2]
        return bool(self.buffer)

    def _frame(self) -> bool:
        if len(self.buffer) < 2:
            return False
        masked = self.buffer[1] & 0x80
        length = self.buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(self.buffer) < 4:
                return False
            length = int.from_bytes(self.buffer[2:4], "big")
            offset = 4
        elif length == 127:
            if len(self.buffer) < 10:
                return False
            length = int.from_bytes(self.buffer[2:10], "big")
            offset = 10
        offset += 4 if masked else 0
        if len(self.buffer) < offset:
            return False
        if self.from_client:
            self.conversation.counts.ws_frames_sent += 1
        else:
            self.conversation.counts.ws_frames_received += 1
        taken = min(len(self.buffer), offset + length)
        self.skip = offset + length - taken
        del self.buffer[:taken]
        return bool(self.buffer) and self.skip == 0


class JsonRpcCountingProxy:
    """Forwards one UNIX socket to another and counts the JSON-RPC lines that pass.

    Args:
        listen_path: the socket the party connects to (created; removed on stop).
        target_path: the daemon's socket.
    """

    def __init__(self, listen_path: Path, target_path: Path) -> None:
        self.path = listen_path
        self._target = target_path
        self.counts = WireCounts()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen on :attr:`path`."""
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        """Stop listening, cut the open connections and remove the socket file."""
        if self._server is not None:
            self._server.close()
        for stream in list(self._streams):
            stream.close()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(
                str(self._target)
            )
        except OSError:
            writer.close()
            return
        self.counts.connections += 1
        self._streams.update((writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pump(reader, upstream_writer, from_client=True),
                self._pump(upstream_reader, writer, from_client=False),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for stream in (writer, upstream_writer):
                stream.close()
                self._streams.discard(stream)
            if task is not None:
                self._tasks.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        pending = bytearray()
        try:
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    break
                if from_client:
                    self.counts.bytes_sent += len(data)
                else:
                    self.counts.bytes_received += len(data)
                pending.extend(data)
                while (end := pending.find(b"\n")) >= 0:
                    self._count(bytes(pending[:end]), from_client=from_client)
                    del pending[: end + 1]
                sink.write(data)
                await sink.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if sink.can_write_eof():
                    sink.write_eof()

    def _count(self, line: bytes, *, from_client: bool) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except ValueError:
            self.counts.unparsed += 1
            return
        if not isinstance(message, dict):
            self.counts.unparsed += 1
        elif from_client and "method" in message and "id" in message:
            self.counts.rpc_requests += 1
        elif not from_client and "method" in message and "id" not in message:
            self.counts.rpc_notifications_received += 1
