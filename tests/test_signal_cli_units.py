"""Parts of the signal-cli channel that need no daemon: text format, numbers, errors, config."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tigress_signal.adapters.text_format import (
    MAX_BODY_BYTES,
    assemble,
    encode_parts,
    parse_part,
)
from tigress_signal.bridge.signal_cli_client import ReceivedText, normalise_recipient
from tigress_signal.bridge.signal_cli_errors import from_dbus_error, from_jsonrpc_error
from tigress_signal.bridge.signal_cli_jsonrpc import SignalCliJsonRpcClient
from tigress_signal.errors import (
    ConfigError,
    MalformedTransferMessage,
    SignalCliAccountNotFound,
    SignalCliFailure,
    SignalCliInvalidNumber,
    SignalCliRateLimited,
    SignalCliUnavailable,
    SignalCliUnregisteredUser,
    SignalCliUnsupported,
    SignalCliUntrustedIdentity,
)
from tigress_signal.wallet.config import parse_config
from tigress_signal.wallet.wallet import signal_cli_client


def envelope(size: int) -> bytes:
    share_id = str(uuid.uuid4())
    body = {"share_id": share_id, "type": "offer", "pad": "x" * size}
    return json.dumps({"version": 1, "body": body}).encode()


# -- text format -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 1400, 2047, 2048, 2049, 10_000, 64 * 1024])
def test_every_part_fits_and_the_whole_comes_back(size: int) -> None:
    payload = envelope(size)
    texts = encode_parts(payload, "Credential offer: Room 12")
    assert all(len(t.encode("utf-8")) <= MAX_BODY_BYTES for t in texts)
    assert all(t.startswith("Credential offer: Room 12") for t in texts)
    parts = [parse_part(t) for t in reversed(texts)]  # any order
    assert all(p is not None for p in parts)
    assert assemble(p for p in parts if p is not None) == payload


def test_a_long_emoji_summary_is_shortened_on_a_character_boundary() -> None:
    texts = encode_parts(envelope(100), "🔑" * 700)
    first_line = texts[0].split("\n", 1)[0]
    assert len(first_line.encode()) <= 200
    assert first_line.endswith("...")
    assert len(texts[0].encode()) <= MAX_BODY_BYTES


def test_a_summary_cannot_forge_a_block() -> None:
    (text,) = encode_parts(b"payload", "x\n-----END TIGRESS-SIGNAL TRANSFER-----\nboo")
    assert text.count("\n") == 4
    part = parse_part(text)
    assert part is not None and assemble([part]) == b"payload"


@given(st.text(max_size=300))
def test_text_that_is_not_ours_is_ignored(text: str) -> None:
    assert parse_part(text.replace("-----BEGIN", "")) is None


def test_damage_is_caught() -> None:
    payload = envelope(5000)
    texts = encode_parts(payload)
    parts = [parse_part(t) for t in texts]
    with pytest.raises(MalformedTransferMessage, match="missing"):
        assemble(p for p in parts[1:] if p is not None)
    # A body changed in transit (U+FFFD from a bad locale, say) fails the digest.
    tampered = texts[0].replace(texts[0].split("\n")[3][:8], "AAAAAAAA", 1)
    with pytest.raises(MalformedTransferMessage, match="integrity"):
        assemble([p for p in [parse_part(tampered), *parts[1:]] if p is not None])
    with pytest.raises(MalformedTransferMessage, match="end marker"):
        parse_part(texts[0][:-40])
    with pytest.raises(MalformedTransferMessage, match="version"):
        parse_part(texts[0].replace("TRANSFER v1", "TRANSFER v9"))


def test_the_parts_carry_the_share_id_and_digest() -> None:
    payload = envelope(10)
    part = parse_part(encode_parts(payload)[0])
    assert part is not None
    assert part.share_id == json.loads(payload)["body"]["share_id"]
    assert part.digest == hashlib.sha256(payload).hexdigest()
    assert parse_part(encode_parts(b"not json")[0]).share_id == "-"  # type: ignore[union-attr]


def test_a_payload_too_long_for_signal_is_refused() -> None:
    with pytest.raises(MalformedTransferMessage, match="at most"):
        encode_parts(b"x" * 200_000)


# -- recipients ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_text", "expected"),
    [
        ("+49 170 1234567", "+491701234567"),
        ("0049 170-1234567", "+491701234567"),
        ("+49\u00a0(170) 123.4567", "+491701234567"),
        ("\uff0b" + "".join(chr(0xFF10 + int(d)) for d in "491701234567"), "+491701234567"),
        ("AAAAAAAA-aaaa-4aaa-8aaa-aaaaaaaaaaaa", "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"),
    ],
)
def test_recipients_are_normalised(given_text: str, expected: str) -> None:
    assert normalise_recipient(given_text) == expected


@pytest.mark.parametrize(
    "bad", ["491701234567", "0170 1234567", "+49 170 12345🙂", "+0 170 1234567", "", "+12"]
)
def test_bad_recipients_are_refused(bad: str) -> None:
    with pytest.raises(SignalCliInvalidNumber):
        normalise_recipient(bad)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "org.asamk.Signal.Error.UntrustedIdentity",
            'Untrusted identity: \nFailed to send message:\nUntrusted Identity for "+1555"\n17',
            SignalCliUntrustedIdentity,
        ),
        (
            "org.asamk.Signal.Error.Failure",
            'Failure: \nFailed to send message:\nUnregistered user "+1555"\n17',
            SignalCliUnregisteredUser,
        ),
        (
            "org.asamk.Signal.Error.Failure",
            'Failure: \nFailed to send message:\nRate limit failure for "+1555"\n17',
            SignalCliRateLimited,
        ),
        ("org.asamk.Signal.Error.InvalidNumber", "Invalid number: x", SignalCliInvalidNumber),
        ("org.freedesktop.dbus.errors.UnknownMethod", "no such", SignalCliUnsupported),
        ("org.freedesktop.DBus.Error.ServiceUnknown", "gone", SignalCliUnavailable),
        ("org.freedesktop.dbus.exceptions.DBusExecutionException", "npe", SignalCliFailure),
        ("org.example.Never.Seen", "what", SignalCliFailure),
    ],
)
def test_dbus_error_names_become_our_errors(name: str, text: str, expected: type) -> None:
    error = from_dbus_error(name, text)
    assert type(error) is expected
    assert error.error_name == name
    assert error.hint
    assert "\n" not in error.user_message()


def test_a_captcha_challenge_token_is_kept() -> None:
    text = (
        'Failure: CAPTCHA proof required for sending to "+1555", available options'
        ' "[RECAPTCHA]" with challenge token "tok-123", or wait "86400" seconds.'
    )
    error = from_dbus_error("org.asamk.Signal.Error.Failure", text)
    assert isinstance(error, SignalCliRateLimited)
    assert error.challenge_token == "tok-123"
    assert error.retry_after == 86400


def _results(kind: str) -> dict[str, object]:
    address = {"uuid": None, "number": "+1555", "username": None}
    return {"response": {"timestamp": 1, "results": [{"recipientAddress": address, "type": kind}]}}


@pytest.mark.parametrize(
    ("code", "message", "data", "expected"),
    [
        (-4, "untrusted", _results("IDENTITY_FAILURE"), SignalCliUntrustedIdentity),
        (-5, "rate limited", _results("RATE_LIMIT_FAILURE"), SignalCliRateLimited),
        (
            -1,
            "Failed to send message",
            _results("UNREGISTERED_FAILURE"),
            SignalCliUnregisteredUser,
        ),
        (-1, "Invalid phone number 'x': No valid characters found.", None, SignalCliInvalidNumber),
        (-3, "Link request error: Connection closed!", None, SignalCliFailure),
        (-32602, "Specified account does not exist", None, SignalCliAccountNotFound),
        (-32601, "Method not implemented", None, SignalCliUnsupported),
        (-99, "never seen", None, SignalCliFailure),
    ],
)
def test_jsonrpc_codes_become_our_errors(
    code: int, message: str, data: dict[str, object] | None, expected: type
) -> None:
    error = from_jsonrpc_error(code, message, data)
    assert type(error) is expected
    assert error.hint


# -- configuration ---------------------------------------------------------------------------


def test_signal_cli_wallet_configuration() -> None:
    config = parse_config(
        {
            "channel": "signal-cli-jsonrpc",
            "signal_cli": {"account": "+49 151 1234 5678", "tcp": "127.0.0.1:7583"},
        },
        source="wallet.toml",
    )
    assert config.signal_cli is not None and config.signal_cli.account == "+4915112345678"
    assert isinstance(signal_cli_client(config), SignalCliJsonRpcClient)
    again = parse_config(_toml(config.to_toml()), source="again")
    assert again == config


def _toml(text: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"channel": "signal-cli-dbus"}, "needs a \\[signal_cli\\] section"),
        ({"channel": "signal-cli-dbus", "signal_cli": {"account": "12345"}}, "E.164"),
        (
            {
                "channel": "signal-cli-jsonrpc",
                "signal_cli": {"account": "+15555550100", "socket": "/a", "tcp": "::1:1"},
            },
            "at most one",
        ),
    ],
)
def test_bad_signal_cli_configuration(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(raw, source="wallet.toml")


def test_jsonrpc_over_tcp_is_for_loopback_only() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        SignalCliJsonRpcClient.tcp_loopback("192.0.2.1", 7583)
    config = parse_config(
        {
            "channel": "signal-cli-jsonrpc",
            "signal_cli": {"account": "+15555550100", "tcp": "10.0.0.1:7583"},
        },
        source="wallet.toml",
    )
    with pytest.raises(ConfigError, match="loopback"):
        signal_cli_client(config)


# -- JSON-RPC notifications ------------------------------------------------------------------


def _notification(params: dict[str, object]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": "receive", "params": params}).encode()


def _envelope(**data: object) -> dict[str, object]:
    return {
        "source": "+15555550100",
        "sourceNumber": "+15555550100",
        "sourceUuid": "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
        "sourceDevice": 1,
        "timestamp": 1700000000001,
        "dataMessage": {"timestamp": 1700000000001, "message": "hello", **data},
    }


async def test_receive_notifications_in_both_modes() -> None:
    import asyncio

    client = SignalCliJsonRpcClient.unix("/nonexistent")
    manual: asyncio.Queue[ReceivedText | None] = asyncio.Queue()
    automatic: asyncio.Queue[ReceivedText | None] = asyncio.Queue()
    client._subscriptions[3] = ("+15555550123", manual)
    client._subscriptions[4] = ("+15555550199", automatic)

    # Manual mode: wrapped, addressed by subscription id.
    client._dispatch(
        _notification(
            {"subscription": 3, "result": {"envelope": _envelope(), "account": "+15555550123"}}
        )
    )
    # Automatic mode: bare, addressed by account.
    client._dispatch(_notification({"envelope": _envelope(), "account": "+15555550199"}))
    # Not for the wallet: group messages, reactions, undecryptable messages.
    group = _envelope(groupInfo={"groupId": "AQ==", "type": "DELIVER"})
    client._dispatch(_notification({"envelope": group, "account": "+15555550199"}))
    client._dispatch(
        _notification({"envelope": _envelope(message=None), "account": "+15555550199"})
    )
    failed = {
        "envelope": {"source": "+15555550100", "timestamp": 1},
        "exception": {"message": "Untrusted identity", "type": "UntrustedIdentityException"},
        "account": "+15555550199",
    }
    client._dispatch(_notification(failed))

    first = manual.get_nowait()
    second = automatic.get_nowait()
    assert first == ReceivedText(
        "+15555550123",
        "+15555550100",
        "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
        1700000000001,
        "hello",
    )
    assert second is not None and second.account == "+15555550199"
    assert manual.empty() and automatic.empty()


async def test_answers_are_matched_by_id_even_in_a_batch() -> None:
    import asyncio

    client = SignalCliJsonRpcClient.unix("/nonexistent")
    loop = asyncio.get_running_loop()
    one, two = loop.create_future(), loop.create_future()
    client._pending.update({1: one, 2: two})
    client._dispatch(
        json.dumps(
            [
                {"jsonrpc": "2.0", "result": {"version": "0.13.19"}, "id": 2},
                {"jsonrpc": "2.0", "error": {"code": -4, "message": "x", "data": None}, "id": 1},
            ]
        ).encode()
    )
    assert two.result() == {"version": "0.13.19"}
    assert isinstance(one.exception(), SignalCliUntrustedIdentity)
