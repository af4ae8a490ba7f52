"""Async client of the intermediary: one typed method per HTTP call, and a WebSocket session.

Example::

    async with IntermediaryClient("http://127.0.0.1:8443") as client:
        account = await client.create_account(
            identity_key=identity.public_key,
            registration_id=identity.registration_id,
            signed_prekey=signed.public(),
            pq_last_resort_prekey=last_resort.public(),
        )
        client.authenticate(account.uuid, account.device_id, account.password)
        await client.upload_keys(pre_keys=[k.public() for k in prekeys])
        async with client.connect_websocket() as stream:
            async for delivery in stream.deliveries():
                ...
                await delivery.acknowledge()

Error answers become :class:`~tigress_signal.errors.ServerApiError` subclasses by status (401
:class:`AuthenticationFailed`, 403 :class:`InvalidLinkCode` for a bad link code, 404
:class:`NotFound`, 409 :class:`MismatchedDevices` for a send, :class:`PreKeyIdReused` for a key
upload, :class:`DeviceLimitReached` for a link, 410 :class:`StaleDevices`, 413
:class:`PayloadTooLarge`, 429 :class:`RateLimited` with ``retry_after`` in seconds, others the
base class). A server that cannot be reached, or a WebSocket that drops, is a
:class:`~tigress_signal.errors.ChannelError` (:class:`ChannelClosed` for the latter). httpx and
websockets exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote

import httpx
import websockets.asyncio.client
import websockets.exceptions
from pydantic import BaseModel, ValidationError

from tigress_signal.bridge.libsignal import BundlePreKey, BundleSignedPreKey, PreKeyBundle
from tigress_signal.errors import (
    AuthenticationFailed,
    ChannelClosed,
    ChannelError,
    DeviceLimitReached,
    InvalidLinkCode,
    MismatchedDevices,
    NotFound,
    PayloadTooLarge,
    PreKeyIdReused,
    RateLimited,
    ServerApiError,
    StaleDevices,
)
from tigress_signal.intermediary.entities import (
    AccountCreated,
    AccountCreateRequest,
    DeviceInfo,
    DeviceLinked,
    DeviceList,
    Envelope,
    KemSignedPreKey,
    LinkCode,
    LinkDeviceRequest,
    MessagePage,
    OutgoingMessage,
    OutgoingMessageList,
    PreKey,
    PreKeyCount,
    SendResult,
    SetKeysRequest,
    SignedPreKey,
    WhoAmI,
)
from tigress_signal.intermediary.entities import PreKeyBundle as WirePreKeyBundle

__all__ = [
    "AccountBundle",
    "AccountCreated",
    "Delivery",
    "DeviceCredentials",
    "DeviceInfo",
    "DeviceLinked",
    "Envelope",
    "IntermediaryClient",
    "LinkCode",
    "MessagePage",
    "MessageStream",
    "OutgoingMessage",
    "PreKeyCount",
    "SendResult",
    "WhoAmI",
]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Largest WebSocket frame accepted from the server: a maximum-size message in base64 and JSON.
_WS_MAX_FRAME = 1024 * 1024
_MESSAGE_PATH = "/api/v1/message"
_QUEUE_EMPTY_PATH = "/api/v1/queue/empty"
_CLOSE_CONNECTED_ELSEWHERE = 4409

_ERRORS_BY_STATUS: dict[int, type[ServerApiError]] = {
    401: AuthenticationFailed,
    404: NotFound,
    409: MismatchedDevices,
    410: StaleDevices,
    413: PayloadTooLarge,
}
#: Errors told apart by the body's ``error`` code, where one status has several meanings.
_ERRORS_BY_CODE: dict[str, type[ServerApiError]] = {
    "invalid_link_code": InvalidLinkCode,
    "device_limit_reached": DeviceLimitReached,
    "prekey_id_reused": PreKeyIdReused,
}


class PublicPreKey(Protocol):
    """Anything with a one-time EC prekey's public parts (the bridge's ``BundlePreKey``)."""

    @property
    def key_id(self) -> int: ...

    @property
    def public_key(self) -> bytes: ...


class PublicSignedPreKey(PublicPreKey, Protocol):
    """Anything with a signed prekey's public parts (the bridge's ``BundleSignedPreKey``)."""

    @property
    def signature(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a device authenticates with.

    Attributes:
        uuid: the account id.
        device_id: the device.
        password: the device password (a secret; kept out of the repr).
    """

    uuid: str
    device_id: int
    password: str = field(repr=False)

    def authorization(self) -> str:
        """The ``Authorization`` header value."""
        user = f"{self.uuid}.{self.device_id}:{self.password}".encode()
        return "Basic " + base64.b64encode(user).decode("ascii")


@dataclass(frozen=True, slots=True)
class AccountBundle:
    """A peer's prekey bundles, one per device, in the form libsignal takes them.

    Attributes:
        identity_key: the account's identity public key.
        devices: one bundle per device, for ``LibsignalBridge.process_prekey_bundle``.
    """

    identity_key: bytes
    devices: tuple[PreKeyBundle, ...]


class IntermediaryClient:
    """An HTTP client of one intermediary, acting as one device once authenticated.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8443``.
        credentials: the device's credentials, or None until :meth:`authenticate`.
        timeout: seconds for each HTTP call.
        transport: an httpx transport to use instead of the network (tests).
        keepalive: seconds between WebSocket pings, and how long an answer may take.
    """

    def __init__(
        self,
        base_url: str,
        *,
        credentials: DeviceCredentials | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        keepalive: float = 20.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self._timeout = timeout
        self._keepalive = keepalive
        # trust_env=False: the server is named explicitly; proxy variables of the
        # environment must not redirect wallet traffic elsewhere.
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, trust_env=False
        )

    def authenticate(self, account_id: str, device_id: int, password: str) -> None:
        """Use these credentials for the calls that follow."""
        self.credentials = DeviceCredentials(account_id, device_id, password)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def __aenter__(self) -> IntermediaryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- accounts ------------------------------------------------------------------------------

    async def create_account(
        self,
        *,
        identity_key: bytes,
        registration_id: int,
        signed_prekey: PublicSignedPreKey,
        pq_last_resort_prekey: PublicSignedPreKey,
    ) -> AccountCreated:
        """``POST /v1/accounts``: register an identity; returns the new device's credentials.

        The client does not start using them by itself: call :meth:`authenticate`.

        Raises:
            ServerApiError: 422 when a signature does not verify or a field is invalid.
            ChannelError: the server cannot be reached.
        """
        body = AccountCreateRequest(
            identity_key=identity_key,
            registration_id=registration_id,
            signed_pre_key=_signed(signed_prekey),
            pq_last_resort_pre_key=_kem(pq_last_resort_prekey),
        )
        response = await self._call("POST", "/v1/accounts", body=body, authenticated=False)
        return _parse(response, AccountCreated)

    async def replace_identity(
        self,
        *,
        identity_key: bytes,
        registration_id: int,
        signed_prekey: PublicSignedPreKey,
        pq_last_resort_prekey: PublicSignedPreKey,
    ) -> AccountCreated:
        """``PUT /v1/accounts/identity``: register this account again with a new identity.

        Needs the primary device's credentials. The answer holds the device's new password;
        the old one stops working, so call :meth:`authenticate` with the new one.

        Raises:
            ServerApiError: 403 from a linked device, 422 when a signature does not verify.
            ChannelError: the server cannot be reached.
        """
        body = AccountCreateRequest(
            identity_key=identity_key,
            registration_id=registration_id,
            signed_pre_key=_signed(signed_prekey),
            pq_last_resort_pre_key=_kem(pq_last_resort_prekey),
        )
        response = await self._call("PUT", "/v1/accounts/identity", body=body)
        return _parse(response, AccountCreated)

    async def whoami(self) -> WhoAmI:
        """``GET /v1/accounts/whoami``: the account and device the credentials prove.

        Raises:
            AuthenticationFailed: the credentials are wrong.
        """
        return _parse(await self._call("GET", "/v1/accounts/whoami"), WhoAmI)

    # -- devices -------------------------------------------------------------------------------

    async def issue_link_code(self) -> LinkCode:
        """``POST /v1/devices/provisioning/code``: a one-time code to link a new device.

        Returns:
            The code (``verification_code``) and when it expires (``expires_at``, ms).

        Raises:
            AuthenticationFailed: the credentials are wrong.
        """
        return _parse(await self._call("POST", "/v1/devices/provisioning/code"), LinkCode)

    async def link_device(
        self,
        *,
        verification_code: str,
        registration_id: int,
        signed_prekey: PublicSignedPreKey,
        pq_last_resort_prekey: PublicSignedPreKey,
    ) -> DeviceLinked:
        """``PUT /v1/devices/link``: add this (new) device to the account that issued the code.

        The keys must be signed by the account's identity key. Needs no credentials; the
        client does not start using the returned ones by itself: call :meth:`authenticate`.

        Raises:
            InvalidLinkCode: the code is wrong, used or expired.
            DeviceLimitReached: the account has as many devices as it may.
            ServerApiError: 422 when a signature does not verify or a field is invalid.
        """
        body = LinkDeviceRequest(
            verification_code=verification_code,
            registration_id=registration_id,
            signed_pre_key=_signed(signed_prekey),
            pq_last_resort_pre_key=_kem(pq_last_resort_prekey),
        )
        response = await self._call("PUT", "/v1/devices/link", body=body, authenticated=False)
        return _parse(response, DeviceLinked)

    async def list_devices(self) -> list[DeviceInfo]:
        """``GET /v1/devices``: this account's devices (``id``, ``registration_id``)."""
        return list(_parse(await self._call("GET", "/v1/devices"), DeviceList).devices)

    async def remove_device(self, device_id: int) -> None:
        """``DELETE /v1/devices/{deviceId}``: remove a device (itself, or any from device 1).

        Raises:
            NotFound: no such device.
            ServerApiError: 403 when this device may not remove it.
        """
        await self._call("DELETE", f"/v1/devices/{int(device_id)}")

    # -- keys ----------------------------------------------------------------------------------

    async def upload_keys(
        self,
        *,
        pre_keys: Sequence[PublicPreKey] | None = None,
        signed_prekey: PublicSignedPreKey | None = None,
        pq_pre_keys: Sequence[PublicSignedPreKey] | None = None,
        pq_last_resort_prekey: PublicSignedPreKey | None = None,
    ) -> None:
        """``PUT /v2/keys``: a non-empty list replaces that kind's one-time keys.

        A key id may be sent again with the same key (a retry); a one-time key the server
        already handed out is then not offered again.

        Raises:
            PreKeyIdReused: a key id is known to the server with other key material.
            ServerApiError: 422 when a signature does not verify or a list is too long.
        """
        body = SetKeysRequest(
            pre_keys=None
            if pre_keys is None
            else [PreKey(key_id=k.key_id, public_key=k.public_key) for k in pre_keys],
            signed_pre_key=None if signed_prekey is None else _signed(signed_prekey),
            pq_pre_keys=None if pq_pre_keys is None else [_kem(k) for k in pq_pre_keys],
            pq_last_resort_pre_key=None
            if pq_last_resort_prekey is None
            else _kem(pq_last_resort_prekey),
        )
        await self._call("PUT", "/v2/keys", body=body)

    async def prekey_counts(self) -> PreKeyCount:
        """``GET /v2/keys``: one-time EC (``count``) and Kyber (``pq_count``) keys left.

        Also ``signed_pre_key_id`` and ``pq_last_resort_pre_key_id``: the signed and
        last-resort keys the server hands out now (None from servers that do not say).
        """
        return _parse(await self._call("GET", "/v2/keys"), PreKeyCount)

    async def fetch_bundle(
        self, account_id: str, device_id: int | Literal["*"] = "*"
    ) -> AccountBundle:
        """``GET /v2/keys/{uuid}/{deviceId}``: take a prekey bundle of a peer's device(s).

        Each call consumes one one-time EC and one one-time Kyber key per device.

        Raises:
            NotFound: no such account or device.
            RateLimited: too many fetches for this account; wait ``retry_after`` seconds.
        """
        response = await self._call("GET", f"/v2/keys/{_segment(account_id)}/{device_id}")
        wire = _parse(response, WirePreKeyBundle)
        return AccountBundle(
            identity_key=wire.identity_key,
            devices=tuple(
                PreKeyBundle(
                    registration_id=d.registration_id,
                    device_id=d.device_id,
                    identity_key=wire.identity_key,
                    signed_prekey=BundleSignedPreKey(
                        d.signed_pre_key.key_id,
                        d.signed_pre_key.public_key,
                        d.signed_pre_key.signature,
                    ),
                    pq_prekey=BundleSignedPreKey(
                        d.pq_pre_key.key_id, d.pq_pre_key.public_key, d.pq_pre_key.signature
                    ),
                    prekey=None
                    if d.pre_key is None
                    else BundlePreKey(d.pre_key.key_id, d.pre_key.public_key),
                )
                for d in wire.devices
            ),
        )

    # -- messages ------------------------------------------------------------------------------

    async def send_messages(
        self,
        destination: str,
        messages: Sequence[OutgoingMessage],
        *,
        online: bool = False,
        urgent: bool = True,
        timestamp: int | None = None,
    ) -> SendResult:
        """``PUT /v1/messages/{uuid}``: one ciphertext per device of the recipient.

        Args:
            destination: the recipient's account id.
            messages: one per recipient device.
            online: deliver only to a device connected right now; never store.
            urgent: passed on to the recipient.
            timestamp: the sender's timestamp in ms; default now.

        Raises:
            NotFound: no such recipient.
            MismatchedDevices: devices are missing or extra (see its properties).
            StaleDevices: devices registered again (see its property).
            PayloadTooLarge: a content is over the server's limit.
            RateLimited: too many sends to this recipient, or its queue is full
                (``body["error"] == "recipient_queue_full"``); wait ``retry_after`` seconds.
        """
        body = OutgoingMessageList(
            messages=list(messages),
            online=online,
            urgent=urgent,
            timestamp=_now_ms() if timestamp is None else timestamp,
        )
        response = await self._call("PUT", f"/v1/messages/{_segment(destination)}", body=body)
        return _parse(response, SendResult)

    async def send_message(
        self, destination: str, message: OutgoingMessage, **options: Any
    ) -> SendResult:
        """:meth:`send_messages` for a recipient with one device."""
        return await self.send_messages(destination, [message], **options)

    async def list_messages(self) -> MessagePage:
        """``GET /v1/messages``: the device's oldest stored messages (at most 100)."""
        return _parse(await self._call("GET", "/v1/messages"), MessagePage)

    async def list_all_messages(self) -> list[Envelope]:
        """The stored messages the server lists now, oldest first.

        Note:
            The server lists the oldest 100 until some are acknowledged, so this is at most
            100 messages; ``list_messages().more`` tells whether more are waiting. Over the
            WebSocket the whole backlog is delivered before ``queue/empty``.
        """
        page = await self.list_messages()
        return list(page.messages)

    async def acknowledge(self, guid: str) -> None:
        """``DELETE /v1/messages/uuid/{guid}``: delete a delivered message.

        Raises:
            NotFound: it is not (or no longer) stored for this device.
        """
        await self._call("DELETE", f"/v1/messages/uuid/{_segment(guid)}")

    # -- WebSocket -----------------------------------------------------------------------------

    @asynccontextmanager
    async def connect_websocket(self) -> AsyncIterator[MessageStream]:
        """Open the device's WebSocket; closed when the block ends.

        Raises:
            AuthenticationFailed: the credentials are wrong.
            ChannelError: the server cannot be reached.
        """
        credentials = self._require_credentials()
        url = "ws" + self.base_url.removeprefix("http") + "/v1/websocket/"
        try:
            connection = await websockets.asyncio.client.connect(
                url,
                additional_headers={"Authorization": credentials.authorization()},
                open_timeout=self._timeout,
                # A ping every `keepalive` seconds that must be answered within as long: a
                # half-open connection (a server that stopped answering without closing TCP)
                # is noticed and the caller reconnects, instead of waiting forever.
                ping_interval=self._keepalive,
                ping_timeout=self._keepalive,
                close_timeout=self._keepalive,
                max_size=_WS_MAX_FRAME,
                proxy=None,
            )
        except websockets.exceptions.InvalidStatus as exc:
            status = exc.response.status_code
            raise _error_for(status, _json_object(exc.response.body), "WebSocket upgrade") from exc
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise ChannelError(
                f"cannot open a WebSocket to {self.base_url}: {exc}",
                hint="check that the intermediary is running at that address",
            ) from exc
        stream = MessageStream(connection)
        try:
            yield stream
        finally:
            await stream.close()

    # -- internals -----------------------------------------------------------------------------

    def _require_credentials(self) -> DeviceCredentials:
        if self.credentials is None:
            raise AuthenticationFailed(
                "no credentials: call authenticate() first", status=401, body={}
            )
        return self.credentials

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        authenticated: bool = True,
    ) -> httpx.Response:
        headers = {"Accept": "application/json"}
        if authenticated:
            headers["Authorization"] = self._require_credentials().authorization()
        content = None
        if body is not None:
            content = body.model_dump_json(by_alias=True).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise ChannelError(
                f"{method} {path} to {self.base_url} failed: {exc!r}",
                hint="check that the intermediary is running at that address",
            ) from exc
        if response.status_code >= 400:
            raise _error_for(
                response.status_code,
                _json_object(response.content),
                f"{method} {path}",
                retry_after=response.headers.get("retry-after"),
            )
        return response


class MessageStream:
    """An open WebSocket of this device: pushed messages in, acknowledgements out.

    Attributes:
        queue_empty: set once the server said the stored backlog was fully delivered, at the
            point of the stream where it said so (every earlier delivery was yielded first).
        close_code: the close code once the connection ended (4409: connected elsewhere).
    """

    def __init__(self, connection: websockets.asyncio.client.ClientConnection) -> None:
        self._connection = connection
        self.queue_empty = asyncio.Event()
        self.close_code: int | None = None

    async def deliveries(self, stop: asyncio.Event | None = None) -> AsyncIterator[Delivery]:
        """Yield pushed messages until ``stop`` is set.

        Raises:
            ChannelClosed: the connection ended (also when the server closed it normally;
                ``close_code`` tells why).
        """
        while True:
            delivery = await self.receive(stop)
            if delivery is None:
                return
            yield delivery

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self.deliveries()

    async def receive(self, stop: asyncio.Event | None = None) -> Delivery | None:
        """The next pushed message, or None once ``stop`` is set.

        Raises:
            ChannelClosed: the connection ended.
        """
        while True:
            text = await self._next_text(stop)
            if text is None:
                return None
            delivery = self._on_frame(text)
            if delivery is not None:
                return delivery

    async def acknowledge(self, delivery_id: int) -> None:
        """Answer a delivery with 200: the server deletes the message.

        Raises:
            ChannelClosed: the connection ended; the message stays stored.
        """
        await self._respond(delivery_id, 200)

    async def reject(self, delivery_id: int, status: int = 500) -> None:
        """Answer a delivery with an error status: the message stays stored.

        Raises:
            ChannelClosed: the connection ended.
        """
        await self._respond(delivery_id, status)

    async def close(self) -> None:
        """Close the connection (normal closure)."""
        await self._connection.close()
        if self.close_code is None:
            self.close_code = self._connection.close_code

    async def _respond(self, delivery_id: int, status: int) -> None:
        frame = {"type": "response", "id": delivery_id, "status": status}
        try:
            await self._connection.send(json.dumps(frame, separators=(",", ":")))
        except websockets.exceptions.ConnectionClosed as exc:
            raise self._closed(exc) from exc

    async def _next_text(self, stop: asyncio.Event | None) -> str | None:
        receiving = asyncio.ensure_future(self._connection.recv())
        if stop is None:
            waiting: set[asyncio.Future[Any]] = {receiving}
        else:
            waiting = {receiving, asyncio.ensure_future(stop.wait())}
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # recv() is safe to cancel: an unread frame stays queued for the next call.
            for future in waiting:
                future.cancel()
        if receiving not in done:
            return None
        try:
            data = receiving.result()
        except websockets.exceptions.ConnectionClosed as exc:
            raise self._closed(exc) from exc
        if isinstance(data, bytes):
            return data.decode("utf-8", errors="replace")
        return data

    def _on_frame(self, text: str) -> Delivery | None:
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):  # nesting too deep is not JSON we take
            logger.warning("the intermediary sent a WebSocket frame that is not JSON")
            return None
        if not isinstance(frame, dict) or frame.get("type") != "request":
            return None
        path = frame.get("path")
        if path == _QUEUE_EMPTY_PATH:
            self.queue_empty.set()
            return None
        if path != _MESSAGE_PATH or type(frame.get("id")) is not int:
            logger.warning("the intermediary sent an unknown WebSocket request")
            return None
        try:
            envelope = Envelope.model_validate(frame.get("body"))
        except ValidationError:
            logger.warning("the intermediary sent an envelope that does not parse")
            return None
        return Delivery(id=frame["id"], envelope=envelope, stream=self)

    def _closed(self, exc: websockets.exceptions.ConnectionClosed) -> ChannelClosed:
        code = exc.rcvd.code if exc.rcvd is not None else None
        self.close_code = code
        if code == _CLOSE_CONNECTED_ELSEWHERE:
            return ChannelClosed(
                "the intermediary closed this WebSocket: the device connected elsewhere (4409)",
                hint="another process is receiving for this wallet",
            )
        return ChannelClosed(f"the WebSocket to the intermediary closed (code {code})")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message pushed over the WebSocket.

    Attributes:
        id: the delivery's request id, to acknowledge it by.
        envelope: the message.
    """

    id: int
    envelope: Envelope
    stream: MessageStream = field(repr=False)

    async def acknowledge(self) -> None:
        """Tell the server the message is processed; it deletes it.

        Raises:
            ChannelClosed: the connection ended; the message stays stored.
        """
        await self.stream.acknowledge(self.id)


def _signed(key: PublicSignedPreKey) -> SignedPreKey:
    return SignedPreKey(key_id=key.key_id, public_key=key.public_key, signature=key.signature)


def _kem(key: PublicSignedPreKey) -> KemSignedPreKey:
    return KemSignedPreKey(key_id=key.key_id, public_key=key.public_key, signature=key.signature)


def _parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ServerApiError(
            f"{response.request.method} {response.request.url.path}: the intermediary's answer "
            f"does not parse as {model.__name__}",
            status=response.status_code,
        ) from exc


def _json_object(content: bytes | bytearray) -> dict[str, object]:
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _error_for(
    status: int, body: dict[str, object], what: str, *, retry_after: str | None = None
) -> ServerApiError:
    reason = body.get("message") or body.get("error") or "no details"
    message = f"{what}: the intermediary answered {status} ({reason})"
    seconds: float | None = None
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    if status == 429:
        return RateLimited(message, status=status, body=body, retry_after=seconds)
    code = body.get("error")
    cls = _ERRORS_BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _ERRORS_BY_STATUS.get(status, ServerApiError)
    return cls(message, status=status, body=body)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _segment(text: str) -> str:
    """A path segment: ids from callers must not add segments or dots to the path."""
    return quote(text, safe="")
