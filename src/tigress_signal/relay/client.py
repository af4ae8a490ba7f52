"""Async client of a Tigress relay, and the share link that names a mailbox and its secret.

A share link is ``https://relay.example/v1/m/<mailbox id>?v=<vertical>#<secret>``. The secret
(the AES key, base64url without padding) is in the fragment, which HTTP clients never send;
:class:`RelayClient` goes further and only ever builds request URLs from a mailbox id, so no
part of a link but the relay's origin and the mailbox id can reach the relay.

Every mutating call carries a fresh ``Mailbox-Request-ID`` and is retried once with the same id
when the connection fails before an answer arrives; the relay answers such a repeat with 201
and does nothing twice. Error answers become :class:`~tigress_signal.errors.RelayApiError`
subclasses by status; a relay that cannot be reached is a :class:`ChannelError`. httpx
exceptions never leave this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from tigress_signal.errors import (
    ChannelError,
    ClaimRejected,
    InvalidShareLink,
    MailboxNotFound,
    MailboxTooLarge,
    RelayApiError,
    RelayRateLimited,
)
from tigress_signal.relay.entities import (
    ATTESTATION_HEADER,
    DEVICE_CLAIM_HEADER,
    KNOWN_VERSION_HEADER,
    REQUEST_ID_HEADER,
    VERSION_HEADER,
    CreateMailboxRequest,
    CreateMailboxResponse,
    DisplayInformation,
    MailboxConfiguration,
    NotificationToken,
    Payload,
    ReadMailboxResponse,
    UpdateMailboxRequest,
    UpdateMailboxResponse,
)

__all__ = [
    "CreatedMailbox",
    "MailboxContent",
    "RelayClient",
    "ShareLink",
    "relay_origin",
]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

Vertical = Literal["a", "h", "c"]
_LINK_PATH = re.compile(
    r"/v1/m/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
)
_ERRORS_BY_STATUS: dict[int, type[RelayApiError]] = {
    401: ClaimRejected,
    404: MailboxNotFound,
    413: MailboxTooLarge,
}
_AES_KEY_SIZES = (16, 32)


@dataclass(frozen=True, slots=True)
class ShareLink:
    """A parsed share link.

    Attributes:
        origin: the relay's origin, ``scheme://host[:port]``.
        mailbox_id: the mailbox the link names.
        secret: the AES key from the fragment (kept out of the repr).
        vertical: the credential vertical of the ``v`` query (``a`` when absent).
    """

    origin: str
    mailbox_id: str
    secret: bytes = field(repr=False)
    vertical: Vertical = "a"

    @classmethod
    def parse(cls, link: str) -> ShareLink:
        """Read a share link.

        Raises:
            InvalidShareLink: it is not a relay mailbox link, or its secret is missing or is
                not a 128- or 256-bit key.
        """
        parts = urlsplit(link.strip())
        match = _LINK_PATH.fullmatch(parts.path)
        if parts.scheme not in ("https", "http") or not parts.netloc or match is None:
            raise InvalidShareLink("this is not a relay share link (https://HOST/v1/m/ID#KEY)")
        if not parts.fragment:
            raise InvalidShareLink("the share link has no secret after '#'")
        secret = _decode_secret(unquote(parts.fragment))
        vertical: Vertical = "a"
        for item in parts.query.split("&"):
            name, _, value = item.partition("=")
            if name == "v" and value in ("a", "h", "c"):
                vertical = value  # type: ignore[assignment]
        return cls(relay_origin(link), match.group(1).lower(), secret, vertical)

    @property
    def url(self) -> str:
        """The complete link, secret included: for the out-of-band channel only."""
        key = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode("ascii")
        return f"{self.origin}/v1/m/{self.mailbox_id}?v={self.vertical}#{key}"

    @property
    def public_url(self) -> str:
        """The link without query and fragment: what may be shown or fetched for a preview."""
        return f"{self.origin}/v1/m/{self.mailbox_id}"


@dataclass(frozen=True, slots=True)
class CreatedMailbox:
    """A new mailbox.

    Attributes:
        mailbox_id: the relay's id of it.
        url_link: the link the relay gave, without fragment.
        version: the stored payload's version (1), when the relay says it.
        repeated: the relay answered 201: this create had already been processed.
    """

    mailbox_id: str
    url_link: str
    version: int | None
    repeated: bool


@dataclass(frozen=True, slots=True)
class MailboxContent:
    """What a read returns.

    Attributes:
        payload: the current payload.
        display: the public display information.
        expiration: when the mailbox expires.
        version: the payload's version, when the relay says it.
    """

    payload: Payload
    display: DisplayInformation
    expiration: datetime
    version: int | None


class RelayClient:
    """An HTTP client of one relay.

    Args:
        base_url: the relay's origin, e.g. ``https://relay.example`` (a path is ignored).
        timeout: seconds for each call, on top of any ``wait`` a read asks for.
        transport: an httpx transport to use instead of the network (tests, measurements).
        verify: TLS verification: True, False, or a CA bundle path / SSL context.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | str = True,
    ) -> None:
        self.base_url = relay_origin(base_url)
        self._timeout = timeout
        # trust_env=False: the relay is named explicitly; proxy variables must not send
        # mailbox traffic elsewhere.
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            trust_env=False,
            verify=verify,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def create_mailbox(
        self,
        claim: str,
        payload: Payload,
        display: DisplayInformation,
        *,
        expiration: datetime | None = None,
        access_rights: str = "RWD",
        notification_token: NotificationToken | None = None,
        attestation: str | None = None,
        request_id: str | None = None,
    ) -> CreatedMailbox:
        """``POST /v1/m``: create a mailbox holding ``payload``, bound to ``claim``.

        Raises:
            RelayApiError: the relay refused (400 malformed, 413 too large, 429 ...).
            ChannelError: the relay cannot be reached.
        """
        body = CreateMailboxRequest(
            payload=payload,
            display_information=display,
            notification_token=notification_token,
            mailbox_configuration=None
            if expiration is None
            else MailboxConfiguration(access_rights=access_rights, expiration=expiration),
        )
        headers = {DEVICE_CLAIM_HEADER: claim}
        if attestation is not None:
            headers[ATTESTATION_HEADER] = attestation
        response = await self._call(
            "POST", "/v1/m", body=body, headers=headers, request_id=request_id
        )
        created = _parse(response, CreateMailboxResponse)
        match = _LINK_PATH.search(urlsplit(created.url_link).path)
        if match is None:
            raise RelayApiError(
                "the relay's urlLink names no mailbox", status=response.status_code
            )
        return CreatedMailbox(
            mailbox_id=match.group(1).lower(),
            url_link=created.url_link,
            version=_version(response),
            repeated=response.status_code == 201,
        )

    async def read_mailbox(
        self,
        mailbox_id: str,
        claim: str,
        *,
        known_version: int | None = None,
        wait: float = 0.0,
    ) -> MailboxContent | None:
        """``POST /v1/m/{id}``: the current content; binds ``claim`` if it is the first new one.

        Args:
            mailbox_id: the mailbox.
            claim: this device's claim for it.
            known_version: the version this device already has; with ``wait`` the relay
                holds the answer until a newer one is stored.
            wait: seconds the relay may hold the answer.

        Returns:
            The content, or None when the relay waited and nothing newer arrived.

        Raises:
            ClaimRejected: another device is bound as the recipient.
            MailboxNotFound: no such mailbox (any more).
        """
        headers = {DEVICE_CLAIM_HEADER: claim}
        if known_version is not None:
            headers[KNOWN_VERSION_HEADER] = str(known_version)
        if wait > 0:
            headers["Prefer"] = f"wait={wait:g}"
        response = await self._call(
            "POST",
            _mailbox_path(mailbox_id),
            headers=headers,
            idempotent=False,
            extra_timeout=wait,
        )
        if response.status_code == 204:
            return None
        content = _parse(response, ReadMailboxResponse)
        return MailboxContent(
            payload=content.payload,
            display=content.display_information,
            expiration=content.expiration,
            version=_version(response),
        )

    async def update_mailbox(
        self,
        mailbox_id: str,
        claim: str,
        payload: Payload,
        *,
        attestation: str | None = None,
        request_id: str | None = None,
    ) -> int | None:
        """``PUT /v1/m/{id}``: replace the stored payload; returns its new version.

        Raises:
            ClaimRejected: the claim is not bound to the mailbox.
            MailboxNotFound: no such mailbox (any more).
        """
        headers = {DEVICE_CLAIM_HEADER: claim}
        if attestation is not None:
            headers[ATTESTATION_HEADER] = attestation
        response = await self._call(
            "PUT",
            _mailbox_path(mailbox_id),
            body=UpdateMailboxRequest(payload=payload),
            headers=headers,
            request_id=request_id,
        )
        _parse(response, UpdateMailboxResponse)
        return _version(response)

    async def delete_mailbox(
        self, mailbox_id: str, claim: str, *, request_id: str | None = None
    ) -> None:
        """``DELETE /v1/m/{id}``.

        Raises:
            ClaimRejected: the claim is not bound to the mailbox.
            MailboxNotFound: no such mailbox (any more), also for a repeated delete.
        """
        await self._call(
            "DELETE",
            _mailbox_path(mailbox_id),
            headers={DEVICE_CLAIM_HEADER: claim},
            request_id=request_id,
        )

    async def relinquish_mailbox(
        self, mailbox_id: str, claim: str, *, request_id: str | None = None
    ) -> None:
        """``PATCH /v1/m/{id}``: unbind this device, the recipient, from the mailbox.

        Raises:
            ClaimRejected: the claim is not the bound recipient's.
            MailboxNotFound: no such mailbox (any more).
        """
        await self._call(
            "PATCH",
            _mailbox_path(mailbox_id),
            headers={DEVICE_CLAIM_HEADER: claim},
            request_id=request_id,
        )

    async def preview(self, mailbox_id: str) -> str:
        """``GET /v1/m/{id}``: the public preview page's HTML.

        Raises:
            MailboxNotFound: no such mailbox (any more).
        """
        response = await self._call("GET", _mailbox_path(mailbox_id), idempotent=False)
        return response.text

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
        idempotent: bool = True,
        extra_timeout: float = 0.0,
    ) -> httpx.Response:
        sent = {"Accept": "application/json", **(headers or {})}
        if idempotent:
            sent[REQUEST_ID_HEADER] = request_id or str(uuid.uuid4())
        content = None
        if body is not None:
            content = body.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")
            sent["Content-Type"] = "application/json"
        timeout = self._timeout + extra_timeout
        # A request whose answer was lost is sent again with the same request id; the relay
        # recognises the repeat. Reads change nothing but the first binding, which is
        # idempotent too, so they are retried the same way.
        for attempt in (1, 2):
            try:
                response = await self._http.request(
                    method, path, content=content, headers=sent, timeout=timeout
                )
                break
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise ChannelError(
                        f"{method} {_template(path)} to {self.base_url} failed: {exc!r}",
                        hint="check that the relay is running at that address",
                    ) from exc
                logger.info("%s %s failed (%r); retrying once", method, _template(path), exc)
            except httpx.HTTPError as exc:
                raise ChannelError(
                    f"{method} {_template(path)} to {self.base_url} failed: {exc!r}"
                ) from exc
        if response.status_code >= 400:
            raise _error_for(response, f"{method} {_template(path)}")
        return response


def relay_origin(url: str) -> str:
    """The ``scheme://host[:port]`` of a relay URL or share link.

    Raises:
        InvalidShareLink: it is not an http(s) URL.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.netloc:
        # Never the fragment in an error text: it is the secret.
        shown = url.partition("#")[0]
        raise InvalidShareLink(f"{shown!r} is not a relay URL (https://HOST[:PORT])")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _mailbox_path(mailbox_id: str) -> str:
    # Only a well-formed id may become a path segment: nothing else from a link reaches it.
    if not _LINK_PATH.fullmatch(f"/v1/m/{mailbox_id}"):
        raise InvalidShareLink("a mailbox id must be a UUID")
    return f"/v1/m/{mailbox_id}"


def _template(path: str) -> str:
    return "/v1/m/{id}" if path.startswith("/v1/m/") else path


def _version(response: httpx.Response) -> int | None:
    text = response.headers.get(VERSION_HEADER)
    return int(text) if text is not None and text.isdigit() else None


def _decode_secret(text: str) -> bytes:
    # base64url without padding is what this project writes; standard base64 (the drafts'
    # example) is read too.
    padded = text + "=" * (-len(text) % 4)
    try:
        secret = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidShareLink("the secret in the share link is not base64") from None
    if len(secret) not in _AES_KEY_SIZES:
        raise InvalidShareLink("the secret in the share link is not a 128- or 256-bit key")
    return secret


def _parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise RelayApiError(
            f"the relay's answer does not parse as {model.__name__}",
            status=response.status_code,
        ) from exc


def _error_for(response: httpx.Response, what: str) -> RelayApiError:
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error", ""))
    reason = body.get("message") or code or "no details"
    message = f"{what}: the relay answered {response.status_code} ({reason})"
    if response.status_code == 429:
        retry = response.headers.get("retry-after")
        seconds = float(retry) if retry is not None and retry.isdigit() else None
        return RelayRateLimited(message, code=code, retry_after=seconds)
    cls = _ERRORS_BY_STATUS.get(response.status_code, RelayApiError)
    return cls(message, status=response.status_code, code=code)
