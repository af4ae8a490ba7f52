"""The link request and link answer on their own: what is sealed comes out, what is changed on
the way or meant for another request does not.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest

from tigress_signal.errors import InvalidLinkAnswer
from tigress_signal.wallet.linking import (
    ANSWER_PREFIX,
    LinkSecrets,
    make_link_request,
    open_link_answer,
    parse_link_request,
    request_of,
    seal_link_answer,
)

SECRETS = LinkSecrets(
    server_url="http://127.0.0.1:8443",
    account_id="5b0c9d4e-1111-4222-8333-944445555666",
    identity_key_pair=b"\x0a" + bytes(range(70)),
    identity_public_key=b"\x05" + bytes(32),
    link_code="one-time-code",
    code_expires_at=1_900_000_000_000,
    trust_policy="verify",
)


def raw(answer: str) -> bytearray:
    body = answer.removeprefix(ANSWER_PREFIX)
    return bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def text(data: bytes | bytearray) -> str:
    return ANSWER_PREFIX + base64.urlsafe_b64encode(bytes(data)).decode().rstrip("=")


def test_the_answer_opens_with_the_request_key_only():
    line, private_pem, check_code = make_link_request()
    assert request_of(private_pem) == (line, check_code)
    answer = seal_link_answer(parse_link_request(line), SECRETS)
    assert open_link_answer(answer, private_pem) == SECRETS
    # Nothing secret travels in clear.
    assert SECRETS.identity_key_pair not in raw(answer)
    assert SECRETS.link_code.encode() not in raw(answer)
    _, other_pem, _ = make_link_request()
    with pytest.raises(InvalidLinkAnswer, match="made for another link request"):
        open_link_answer(answer, other_pem)


@pytest.mark.parametrize(
    ("offset", "words"),
    [
        (0, "made for another link request"),  # the request fingerprint
        (8 + 40, "not a P-256 point|does not decrypt"),  # the ephemeral public key
        (8 + 65 + 3, "does not decrypt"),  # the nonce
        (8 + 65 + 12 + 5, "does not decrypt"),  # the ciphertext
        (-1, "does not decrypt"),  # the tag
    ],
)
def test_a_changed_byte_anywhere_is_refused(offset, words):
    line, private_pem, _ = make_link_request()
    data = raw(seal_link_answer(parse_link_request(line), SECRETS))
    data[offset] ^= 0x01
    with pytest.raises(InvalidLinkAnswer, match=words):
        open_link_answer(text(data), private_pem)


def test_an_answer_with_an_unknown_trust_policy_is_refused():
    line, private_pem, _ = make_link_request()
    odd = dataclasses.replace(SECRETS, trust_policy="x")
    with pytest.raises(InvalidLinkAnswer, match="unknown trust policy"):
        open_link_answer(seal_link_answer(parse_link_request(line), odd), private_pem)


def test_secrets_are_not_printed():
    shown = repr(SECRETS)
    assert "one-time-code" not in shown
    assert repr(SECRETS.identity_key_pair) not in shown
