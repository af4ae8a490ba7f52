"""Credential files offered as they are: read a file into provisioning information, byte for byte.

A wallet that already holds a credential as a file (an SD-JWT VC, a W3C verifiable credential,
an Apple Wallet pass, one of our access tokens) offers exactly those bytes in a stateless share;
the receiver gets the same bytes back. The media type is given by the caller or guessed: first
from the content, when it is recognisably one of the kinds below, then from the file extension,
and otherwise ``application/octet-stream``.

=====================================================  =====================================
media type                                             recognised by
=====================================================  =====================================
``application/dc+sd-jwt`` (SD-JWT VC)                  an SD-JWT whose header ``typ`` is
                                                       ``dc+sd-jwt`` (or the older
                                                       ``vc+sd-jwt``)
``application/vc`` (W3C VC Data Model 2.0)             JSON whose ``@context`` starts with
                                                       the VCDM 2.0 context; extension ``.vc``
``application/vnd.apple.pkpass``                       a ZIP archive holding ``pass.json``;
                                                       extension ``.pkpass``
``application/vnd.tigress-signal.access-token+json``   our access token's ``format`` field
=====================================================  =====================================

``application/vc`` is the type the W3C registered with IANA for VCDM 2.0 (July 2024), with file
extension ``.vc``; ``application/vc+ld+json`` is the name drafts used before that. Both are
accepted when given; the guess says ``application/vc``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import zipfile
from pathlib import Path

from pydantic import ValidationError

from tigress_signal.credentials.access_token import ACCESS_TOKEN_FORMAT, ACCESS_TOKEN_MEDIA_TYPE
from tigress_signal.credentials.messages import (
    MAX_PROVISIONING_CONTENT_BYTES,
    ProvisioningInformation,
    describe_validation_error,
)
from tigress_signal.errors import CredentialError

SD_JWT_VC_MEDIA_TYPE = "application/dc+sd-jwt"
VC_MEDIA_TYPE = "application/vc"
VC_LD_JSON_MEDIA_TYPE = "application/vc+ld+json"
PKPASS_MEDIA_TYPE = "application/vnd.apple.pkpass"
OCTET_STREAM_MEDIA_TYPE = "application/octet-stream"

_VCDM2_CONTEXT = "https://www.w3.org/ns/credentials/v2"
_SD_JWT_TYPS = frozenset({"dc+sd-jwt", "vc+sd-jwt"})
_EXTENSIONS = {".pkpass": PKPASS_MEDIA_TYPE, ".vc": VC_MEDIA_TYPE}
_SD_JWT_RE = re.compile(rb"([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+~[A-Za-z0-9_~.-]*")
_SAMPLES = Path(__file__).with_name("samples")


def provisioning_from_file(
    path: str | os.PathLike[str],
    *,
    media_type: str | None = None,
    filename: str | None = None,
) -> ProvisioningInformation:
    """Read a credential file into provisioning information, its bytes unchanged.

    Args:
        path: the credential file.
        media_type: the content's media type; guessed with :func:`guess_media_type` if not given.
        filename: the name suggested to the receiver; the file's own name if not given.

    Returns:
        Provisioning information whose ``content`` is exactly the file's bytes.

    Raises:
        CredentialError: the file cannot be read, is empty or larger than 64 KiB, or the media
            type or file name is not acceptable.
    """
    source = Path(path)
    try:
        with source.open("rb") as file:
            content = file.read(MAX_PROVISIONING_CONTENT_BYTES + 1)
    except OSError as exc:
        raise CredentialError(
            f"cannot read credential file {source}: {exc.strerror or exc}"
        ) from exc
    if len(content) > MAX_PROVISIONING_CONTENT_BYTES:
        raise CredentialError(
            f"credential file {source} is larger than {MAX_PROVISIONING_CONTENT_BYTES} bytes, "
            "the most provisioning information holds"
        )
    if not content:
        raise CredentialError(f"credential file {source} is empty")
    try:
        return ProvisioningInformation(
            media_type=media_type or guess_media_type(content, source.name),
            content=content,
            filename=source.name if filename is None else filename,
        )
    except ValidationError as exc:
        raise CredentialError(f"cannot offer {source}: {describe_validation_error(exc)}") from exc


def write_credential_file(
    info: ProvisioningInformation, directory: str | os.PathLike[str]
) -> Path:
    """Save received provisioning content as a file, byte for byte, never overwriting one.

    Args:
        info: the provisioning information received.
        directory: the folder to write into; the file is named ``info.filename``, or
            ``credential`` when the sender suggested none.

    Returns:
        The path written.

    Raises:
        CredentialError: a file of that name already exists or cannot be written.
    """
    target = Path(directory) / (info.filename or "credential")
    try:
        with target.open("xb") as file:
            file.write(info.content)
    except FileExistsError as exc:
        raise CredentialError(
            f"{target} already exists; not overwriting it",
            hint="choose another folder or move the existing file",
        ) from exc
    except OSError as exc:
        raise CredentialError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


def guess_media_type(content: bytes, filename: str | None = None) -> str:
    """Guess a credential's media type from its content, then from its file name.

    Args:
        content: the credential's bytes.
        filename: its file name, if known; only the extension is used.

    Returns:
        One of the media types in this module's table, or ``application/octet-stream``.
    """
    by_content = _sniff(content)
    if by_content is not None:
        return by_content
    if filename is not None:
        return _EXTENSIONS.get(Path(filename).suffix.lower(), OCTET_STREAM_MEDIA_TYPE)
    return OCTET_STREAM_MEDIA_TYPE


def sample_credential_files() -> list[Path]:
    """The published sample credentials shipped with the package (see samples/PROVENANCE.md)."""
    return sorted(p for p in _SAMPLES.iterdir() if p.is_file() and p.name != "PROVENANCE.md")


def _sniff(content: bytes) -> str | None:
    if content.startswith(b"PK\x03\x04"):
        return PKPASS_MEDIA_TYPE if _is_pkpass(content) else None
    stripped = content.strip()
    if stripped.startswith(b"{"):
        return _sniff_json(stripped)
    match = _SD_JWT_RE.fullmatch(stripped)
    if match is not None and _jwt_header_typ(match.group(1)) in _SD_JWT_TYPS:
        return SD_JWT_VC_MEDIA_TYPE
    return None


def _is_pkpass(content: bytes) -> bool:
    # Only the archive's directory is read; nothing is decompressed.
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            return "pass.json" in archive.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return False


def _sniff_json(content: bytes) -> str | None:
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if document.get("format") == ACCESS_TOKEN_FORMAT:
        return ACCESS_TOKEN_MEDIA_TYPE
    context = document.get("@context")
    if isinstance(context, list) and context and context[0] == _VCDM2_CONTEXT:
        return VC_MEDIA_TYPE
    return None


def _jwt_header_typ(encoded_header: bytes) -> object:
    try:
        header = json.loads(
            base64.urlsafe_b64decode(encoded_header + b"=" * (-len(encoded_header) % 4))
        )
    except (ValueError, binascii.Error, RecursionError):
        return None
    return header.get("typ") if isinstance(header, dict) else None
