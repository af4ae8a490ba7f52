"""A transfer message written as Signal text: a line for people, then a block for wallets.

Over signal-cli a transfer message is an ordinary Signal text message, so a Signal app linked
to the same account shows it. Each message reads::

    Credential offer: Conference ticket
    -----BEGIN TIGRESS-SIGNAL TRANSFER v1-----
    part=1/1 share=5b0c...e1 sha256=9f86...08 size=812
    eyJ2ZXJzaW9uIjoxLCJtZXNzYWdlX2lkIjoi...
    -----END TIGRESS-SIGNAL TRANSFER-----

The first line is the summary the share logic wrote (never secret). The block's version is in
its first marker; the header gives the part number and count, the share id (read from the
transfer envelope only to label the parts, ``-`` if there is none), the SHA-256 and size of
the whole payload; the body is this part's slice of the payload in base64; the end marker shows
that nothing was cut off.

Signal refuses bodies over 2,000 bytes of UTF-8 (official clients drop longer ones even though
the send succeeds), so :func:`encode_parts` splits a payload into as many parts as needed, each
at most :data:`MAX_BODY_BYTES`. The receiver collects the parts of one payload by (sender, share
id, digest) and :func:`assemble` joins them, checking size and SHA-256.

Text without the begin marker is a person chatting: :func:`parse_part` returns None for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tigress_signal.errors import MalformedTransferMessage

#: Signal's limit on a text body, in UTF-8 bytes.
MAX_BODY_BYTES = 2000
#: The longest first line, in UTF-8 bytes; longer summaries are shortened.
MAX_SUMMARY_BYTES = 200
#: The most parts one payload may have (about 120 KiB of payload); more is refused both ways.
MAX_PARTS = 99
#: The block format version this module writes and reads.
FORMAT_VERSION = 1

_BEGIN = f"-----BEGIN TIGRESS-SIGNAL TRANSFER v{FORMAT_VERSION}-----"
_BEGIN_ANY = re.compile(r"^-----BEGIN TIGRESS-SIGNAL TRANSFER v(\d+)-----$")
_END = "-----END TIGRESS-SIGNAL TRANSFER-----"
_HEADER = re.compile(
    r"^part=(\d{1,2})/(\d{1,2}) share=([0-9a-f-]{36}|-) sha256=([0-9a-f]{64}) size=(\d{1,7})$"
)
_DEFAULT_SUMMARY = "Tigress-Signal credential transfer"


@dataclass(frozen=True, slots=True)
class TransferPart:
    """One part of a transfer message, as read from a Signal text.

    Attributes:
        index: this part's number, from 1.
        count: how many parts the payload has.
        share_id: the share the payload belongs to, or ``"-"``.
        digest: hex SHA-256 of the whole payload.
        size: length of the whole payload in bytes.
        data: this part's slice of the payload.
    """

    index: int
    count: int
    share_id: str
    digest: str
    size: int
    data: bytes

    def __repr__(self) -> str:
        return f"TransferPart({self.index}/{self.count}, share={self.share_id})"


def encode_parts(payload: bytes, summary: str = "") -> list[str]:
    """Write a payload as one or more Signal texts, each within :data:`MAX_BODY_BYTES`.

    Args:
        payload: the encoded transfer message.
        summary: the line a person sees; shortened to :data:`MAX_SUMMARY_BYTES`.

    Raises:
        MalformedTransferMessage: the payload would need more than :data:`MAX_PARTS` parts.
    """
    line = _summary_line(summary)
    share_id = _share_id_of(payload)
    digest = hashlib.sha256(payload).hexdigest()

    # The longest header and the part suffix of the first line are fixed-width enough to plan
    # every part with the same slice size.
    widest = _text(
        f"{line} (part 99/99)",
        f"part=99/99 share={share_id} sha256={digest} size={len(payload)}",
        "",
    )
    room = MAX_BODY_BYTES - len(widest.encode())
    slice_size = room // 4 * 3
    count = max(1, -(-len(payload) // slice_size))
    if count > MAX_PARTS:
        raise MalformedTransferMessage(
            f"a transfer message of {len(payload)} bytes needs {count} Signal messages;"
            f" at most {MAX_PARTS} are sent"
        )
    texts = []
    for index in range(count):
        chunk = payload[index * slice_size : (index + 1) * slice_size]
        first = line if count == 1 else f"{line} (part {index + 1}/{count})"
        header = f"part={index + 1}/{count} share={share_id} sha256={digest} size={len(payload)}"
        texts.append(_text(first, header, base64.b64encode(chunk).decode("ascii")))
    return texts


def parse_part(text: str) -> TransferPart | None:
    """Read a transfer part from a Signal text.

    Returns:
        The part, or None when the text is not ours (no begin marker).

    Raises:
        MalformedTransferMessage: the text has our marker but the block is damaged, cut off,
            or of a format version this module does not read.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _BEGIN_ANY.match(line.strip())), None)
    if start is None:
        return None
    version_match = _BEGIN_ANY.match(lines[start].strip())
    if version_match is None or int(version_match.group(1)) != FORMAT_VERSION:
        raise MalformedTransferMessage(
            "a transfer block of a format version this wallet does not read; update it"
        )
    block = [line.strip() for line in lines[start + 1 :]]
    if len(block) < 3 or _END not in block:
        raise MalformedTransferMessage("a transfer block without its end marker (cut off?)")
    header = _HEADER.match(block[0])
    if header is None:
        raise MalformedTransferMessage("a transfer block with an unreadable header")
    body = "".join(block[1 : block.index(_END)])
    try:
        data = base64.b64decode(body.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise MalformedTransferMessage("a transfer block whose body is not base64") from exc
    index, count = int(header.group(1)), int(header.group(2))
    if not 1 <= index <= count <= MAX_PARTS:
        raise MalformedTransferMessage(f"a transfer block numbered {index}/{count}")
    return TransferPart(
        index=index,
        count=count,
        share_id=header.group(3),
        digest=header.group(4),
        size=int(header.group(5)),
        data=data,
    )


def assemble(parts: Iterable[TransferPart]) -> bytes:
    """Join every part of one payload and check it is the payload that was sent.

    Raises:
        MalformedTransferMessage: parts are missing, disagree, or the joined bytes do not have
            the announced size and SHA-256.
    """
    ordered = sorted(parts, key=lambda part: part.index)
    if not ordered:
        raise MalformedTransferMessage("no parts to assemble")
    first = ordered[0]
    if [p.index for p in ordered] != list(range(1, first.count + 1)):
        raise MalformedTransferMessage("transfer message parts are missing or repeated")
    if any(
        (p.count, p.digest, p.size) != (first.count, first.digest, first.size) for p in ordered
    ):
        raise MalformedTransferMessage("transfer message parts of different messages")
    payload = b"".join(p.data for p in ordered)
    if len(payload) != first.size or hashlib.sha256(payload).hexdigest() != first.digest:
        raise MalformedTransferMessage("a transfer message failed its integrity check (SHA-256)")
    return payload


def _text(first_line: str, header: str, body: str) -> str:
    return "\n".join((first_line, _BEGIN, header, body, _END))


def _summary_line(summary: str) -> str:
    # One line of printable text: control characters (a newline included) would let a summary
    # pose as a block marker.
    line = "".join(c if c.isprintable() else " " for c in summary).strip() or _DEFAULT_SUMMARY
    encoded = line.encode("utf-8")
    if len(encoded) <= MAX_SUMMARY_BYTES:
        return line
    return encoded[: MAX_SUMMARY_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def _share_id_of(payload: bytes) -> str:
    # Only a label for the parts; a payload that is not a transfer envelope still travels.
    try:
        share_id = json.loads(payload)["body"]["share_id"]
    except (ValueError, TypeError, KeyError):
        return "-"
    text = str(share_id).lower()
    return text if re.fullmatch(r"[0-9a-f-]{36}", text) else "-"
