"""signal-cli's error names (D-Bus) and error codes (JSON-RPC), turned into our exceptions.

This is the single boundary where what signal-cli answers becomes a
:class:`~tigress_signal.errors.SignalCliError`. Each converter is registered for the names or
codes it understands; anything else falls back to
:class:`~tigress_signal.errors.SignalCliFailure`, which keeps the name and the text, so an
error this module has never seen still reaches the user as one line with a hint.

What signal-cli 0.13 sends, and why the converters look at the text too:

* Over D-Bus a send that failed for one recipient is ``org.asamk.Signal.Error.Failure`` for an
  unregistered user or a rate limit alike; only the text tells them apart (``Unregistered user
  "<recipient>"``, ``Rate limit failure for "<recipient>"``, ``CAPTCHA proof required ... with
  challenge token "<token>"``). An untrusted identity has its own name.
* dbus-java names its own errors ``org.freedesktop.dbus.errors.*`` (not the ``DBus.Error``
  spelling of the reference implementation), and Java exceptions that signal-cli does not wrap
  come out as ``org.freedesktop.dbus.exceptions.DBusExecutionException``.
* Over JSON-RPC a send that failed carries the per-recipient results in ``error.data.response``,
  whose ``type`` is the precise reason (``UNREGISTERED_FAILURE``, ``IDENTITY_FAILURE``, ...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from tigress_signal.errors import (
    SignalCliAccountNotFound,
    SignalCliError,
    SignalCliFailure,
    SignalCliInvalidNumber,
    SignalCliRateLimited,
    SignalCliUnavailable,
    SignalCliUnregisteredUser,
    SignalCliUnsupported,
    SignalCliUntrustedIdentity,
)

log = logging.getLogger(__name__)

DbusConverter = Callable[[str, str], SignalCliError]
RpcConverter = Callable[[int, str, Mapping[str, Any] | None], SignalCliError]

_DBUS_CONVERTERS: dict[str, DbusConverter] = {}
_RPC_CONVERTERS: dict[int, RpcConverter] = {}

_QUOTED = re.compile(r'"([^"]*)"')
_CHALLENGE = re.compile(r'challenge token "([^"]+)"')
_WAIT_SECONDS = re.compile(r'wait "(\d+)" seconds')


def from_dbus_error(name: str, text: str) -> SignalCliError:
    """Our exception for a D-Bus error reply from signal-cli (or from the bus about it).

    Args:
        name: the D-Bus error name, e.g. ``org.asamk.Signal.Error.UntrustedIdentity``.
        text: the error's message text.
    """
    converter = _DBUS_CONVERTERS.get(name)
    if converter is None:
        log.debug("unmapped signal-cli D-Bus error %s", name)
        return SignalCliFailure(_summary(text) or name, error_name=name)
    return converter(name, text)


def from_jsonrpc_error(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    """Our exception for a JSON-RPC error object from signal-cli.

    Args:
        code: ``error.code``.
        message: ``error.message``.
        data: ``error.data`` when it is an object (send failures put the results there).
    """
    converter = _RPC_CONVERTERS.get(code)
    if converter is None:
        log.debug("unmapped signal-cli JSON-RPC error code %d", code)
        return SignalCliFailure(message or f"error {code}", error_name=f"jsonrpc:{code}")
    return converter(code, message, data)


def _on_dbus(*names: str) -> Callable[[DbusConverter], DbusConverter]:
    def register(converter: DbusConverter) -> DbusConverter:
        for name in names:
            _DBUS_CONVERTERS[name] = converter
        return converter

    return register


def _on_rpc(*codes: int) -> Callable[[RpcConverter], RpcConverter]:
    def register(converter: RpcConverter) -> RpcConverter:
        for code in codes:
            _RPC_CONVERTERS[code] = converter
        return converter

    return register


# -- D-Bus -----------------------------------------------------------------------------------


@_on_dbus("org.asamk.Signal.Error.UntrustedIdentity")
def _dbus_untrusted(name: str, text: str) -> SignalCliError:
    recipient = _first_quoted(text)
    return SignalCliUntrustedIdentity(
        f"signal-cli does not trust the identity key of {recipient or 'the recipient'}",
        recipient=recipient,
        error_name=name,
    )


@_on_dbus("org.asamk.Signal.Error.Failure", "org.asamk.SignalControl.Error.Failure")
def _dbus_failure(name: str, text: str) -> SignalCliError:
    # One name covers every per-recipient send failure; the text names the reason.
    recipient = _first_quoted(text)
    if "Unregistered user" in text:
        return SignalCliUnregisteredUser(
            f"{recipient or 'the recipient'} is not registered with Signal", error_name=name
        )
    if "Untrusted Identity" in text:
        return _dbus_untrusted(name, text)
    if "CAPTCHA proof required" in text or "Rate limit" in text:
        return _rate_limited(text, name)
    return SignalCliFailure(_summary(text) or "signal-cli reported a failure", error_name=name)


@_on_dbus("org.asamk.Signal.Error.InvalidNumber", "org.asamk.SignalControl.Error.InvalidNumber")
def _dbus_invalid_number(name: str, text: str) -> SignalCliError:
    return SignalCliInvalidNumber(_summary(text) or "invalid number", error_name=name)


@_on_dbus("org.asamk.Signal.Error.UnregisteredRecipient")
def _dbus_unregistered(name: str, text: str) -> SignalCliError:
    return SignalCliUnregisteredUser(_summary(text) or "unregistered recipient", error_name=name)


@_on_dbus("org.asamk.SignalControl.Error.RequiresCaptcha")
def _dbus_captcha(name: str, text: str) -> SignalCliError:
    return _rate_limited(text, name)


@_on_dbus(
    "org.freedesktop.dbus.errors.UnknownMethod",
    "org.freedesktop.dbus.errors.UnknownObject",
    "org.freedesktop.dbus.errors.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownInterface",
)
def _dbus_unsupported(name: str, text: str) -> SignalCliError:
    return SignalCliUnsupported(
        f"signal-cli does not offer this call ({_summary(text) or name})", error_name=name
    )


@_on_dbus(
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.Timeout",
)
def _dbus_unavailable(name: str, text: str) -> SignalCliError:
    return SignalCliUnavailable(
        f"the signal-cli daemon is not answering on D-Bus ({name.rsplit('.', 1)[-1]})",
        error_name=name,
    )


@_on_dbus("org.freedesktop.dbus.exceptions.DBusExecutionException")
def _dbus_java_exception(name: str, text: str) -> SignalCliError:
    return SignalCliFailure(
        f"signal-cli failed inside the call: {_summary(text) or 'no details'}",
        error_name=name,
        hint="signal-cli hit an internal error; see its log",
    )


# -- JSON-RPC --------------------------------------------------------------------------------


@_on_rpc(-1)
def _rpc_user_error(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    name = f"jsonrpc:{code}"
    failed = _failed_results(data)
    if failed:
        return _from_send_results(failed, message, name)
    if message.startswith(("Invalid phone number", "Invalid number", "Invalid account")):
        return SignalCliInvalidNumber(message, error_name=name)
    return SignalCliFailure(message or "signal-cli refused the request", error_name=name)


@_on_rpc(-3)
def _rpc_io_error(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    return SignalCliFailure(
        message or "signal-cli could not reach Signal",
        error_name=f"jsonrpc:{code}",
        hint="signal-cli could not reach Signal's servers; check its network and try again",
    )


@_on_rpc(-4)
def _rpc_untrusted(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    failed = _failed_results(data)
    recipient = _recipient_of(failed[0]) if failed else ""
    return SignalCliUntrustedIdentity(
        f"signal-cli does not trust the identity key of {recipient or 'the recipient'}",
        recipient=recipient,
        error_name=f"jsonrpc:{code}",
    )


@_on_rpc(-5)
def _rpc_rate_limited(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    return _rate_limited(message, f"jsonrpc:{code}")


@_on_rpc(-32602)
def _rpc_bad_params(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    name = f"jsonrpc:{code}"
    if "account" in message.lower():
        return SignalCliAccountNotFound(message, error_name=name)
    return SignalCliFailure(message or "invalid parameters", error_name=name)


@_on_rpc(-32601, -32600)
def _rpc_unsupported(code: int, message: str, data: Mapping[str, Any] | None) -> SignalCliError:
    return SignalCliUnsupported(
        f"signal-cli does not offer this call ({message or code})", error_name=f"jsonrpc:{code}"
    )


# -- shared ----------------------------------------------------------------------------------


def _from_send_results(failed: list[Mapping[str, Any]], message: str, name: str) -> SignalCliError:
    first = failed[0]
    recipient = _recipient_of(first)
    kind = str(first.get("type", ""))
    if kind == "UNREGISTERED_FAILURE":
        return SignalCliUnregisteredUser(
            f"{recipient or 'the recipient'} is not registered with Signal", error_name=name
        )
    if kind == "IDENTITY_FAILURE":
        return SignalCliUntrustedIdentity(
            f"signal-cli does not trust the identity key of {recipient or 'the recipient'}",
            recipient=recipient,
            error_name=name,
        )
    if kind in {"RATE_LIMIT_FAILURE", "PROOF_REQUIRED_FAILURE"}:
        token = first.get("token")
        wait = first.get("retryAfterSeconds")
        return SignalCliRateLimited(
            f"Signal rate-limits sending to {recipient or 'the recipient'}",
            challenge_token=str(token) if token else None,
            retry_after=float(wait) if isinstance(wait, int | float) else None,
            error_name=name,
        )
    return SignalCliFailure(
        f"{message or 'sending failed'} ({kind or 'unknown reason'} for {recipient or '?'})",
        error_name=name,
    )


def _failed_results(data: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not isinstance(data, Mapping):
        return []
    response = data.get("response")
    results = response.get("results") if isinstance(response, Mapping) else None
    if not isinstance(results, list):
        return []
    return [r for r in results if isinstance(r, Mapping) and r.get("type") != "SUCCESS"]


def _recipient_of(result: Mapping[str, Any]) -> str:
    address = result.get("recipientAddress")
    if not isinstance(address, Mapping):
        return ""
    return str(address.get("number") or address.get("uuid") or "")


def _rate_limited(text: str, name: str) -> SignalCliRateLimited:
    token = _CHALLENGE.search(text)
    wait = _WAIT_SECONDS.search(text)
    return SignalCliRateLimited(
        "Signal rate-limits this account" + (" and asks for a captcha" if token else ""),
        challenge_token=token.group(1) if token else None,
        retry_after=float(wait.group(1)) if wait else None,
        error_name=name,
    )


def _first_quoted(text: str) -> str:
    match = _QUOTED.search(text)
    return match.group(1) if match else ""


def _summary(text: str) -> str:
    # signal-cli's texts span several lines (a heading, then one line per recipient, then the
    # timestamp); one line is what a person needs.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3]).removesuffix(":").strip()
