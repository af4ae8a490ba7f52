"""Every error tigress-signal raises, in one tree.

Foreign exceptions (libsignal's, httpx's, sqlite3's, websockets') are converted to these at a
single boundary in the module that talks to the foreign component, with ``raise ... from exc``,
so a caller only ever needs to catch :class:`TigressSignalError` or one of its branches::

    TigressSignalError
    ├── ConfigError                      bad or missing configuration value
    ├── BridgeError                      the libsignal sidecar (bridge/libsignal.py)
    │   ├── BridgeUnavailable            sidecar not running, crashed mid-call, or would not start
    │   ├── BridgeProtocolError          sidecar answered something that is not our protocol
    │   └── SignalProtocolError          libsignal refused the operation
    │       ├── UntrustedIdentity        peer's identity key is not trusted (names the peer)
    │       ├── DuplicateMessage         message was already decrypted (replay or redelivery)
    │       ├── InvalidMessage           malformed, tampered or undecryptable message
    │       ├── NoSession                no session with that peer yet
    │       ├── UnknownPreKey            message names a prekey this wallet does not hold
    │       └── InvalidSignature         a prekey signature does not verify
    ├── StoreError                       the wallet's SQLite store (wallet/store.py)
    │   ├── StoreLocked                  another process has this wallet open
    │   └── StoreUnavailable             a database server cannot be reached (storage/)
    ├── DeviceLinkError                  linking a device from the wallet side (wallet/linking.py)
    │   ├── InvalidLinkRequest           a link request that is not ours, cut short or damaged
    │   └── InvalidLinkAnswer            a link answer damaged, for another request, or spent
    ├── ServerApiError                   the intermediary answered with an error (has .status)
    │   ├── AuthenticationFailed         401: wrong account id or password
    │   ├── NotFound                     404: no such account, device or message
    │   ├── MismatchedDevices            409: the device list of the recipient differs
    │   ├── StaleDevices                 410: a recipient device re-registered
    │   ├── PayloadTooLarge              413: a message is over the size limit
    │   ├── RateLimited                  429: slow down (has .retry_after)
    │   ├── InvalidLinkCode              403: a device link code is wrong, used or expired
    │   ├── DeviceLimitReached           409: the account has the most devices it may have
    │   └── PreKeyIdReused               409: an upload reuses a key id for other key material
    ├── SignalCliError                   signal-cli over D-Bus or JSON-RPC (bridge/signal_cli_*.py)
    │   ├── SignalCliUnavailable         no daemon on the bus or socket, or it went away mid-call
    │   ├── SignalCliUnsupported         the daemon lacks the interface or method we need
    │   ├── SignalCliAccountNotFound     the account is not in this daemon
    │   ├── SignalCliInvalidNumber       a phone number that is not E.164 (names the input)
    │   ├── SignalCliUnregisteredUser    the recipient has no Signal account
    │   ├── SignalCliUntrustedIdentity   the recipient's identity key changed and is not trusted
    │   ├── SignalCliRateLimited         Signal wants a pause or a captcha (has .challenge_token)
    │   └── SignalCliFailure             any other failure signal-cli reported (unknown names too)
    ├── ChannelError                     a CredentialChannel could not send or receive
    │   ├── ChannelClosed                the channel was closed
    │   └── UnknownPeer                  no such recipient on this channel
    ├── RelayError                       the Tigress relay and its client (relay/, tigress_relay)
    │   ├── RelayApiError                the relay answered with an error status (has .status)
    │   │   ├── ClaimRejected            401: the device claim is not bound to the mailbox
    │   │   ├── MailboxNotFound          404: no such mailbox (never was, deleted or expired)
    │   │   ├── MailboxTooLarge          413: a payload or display text over the relay's limit
    │   │   └── RelayRateLimited         429: slow down (has .retry_after)
    │   ├── InvalidShareLink             a share link that does not parse, or an untrusted relay
    │   └── PayloadRejected              a payload failed AES-GCM (tampered, replayed, reflected)
    ├── TrustError                       trusting a peer's identity key (wallet/trust.py)
    │   └── SafetyNumberMismatch         the digits given are not the peer's safety number
    ├── ShareError                       the share state machine (shares/)
    │   ├── UnknownShare                 no share with that id in this wallet
    │   ├── InvalidTransition            message does not fit the share's state
    │   └── ShareExpired                 the share's expiry has passed
    └── CredentialError                  a credential or endorsement (credentials/)
        ├── MalformedTransferMessage     a transfer message that does not parse
        └── EndorsementRejected          a digital-key endorsement does not verify
"""

from __future__ import annotations


class TigressSignalError(Exception):
    """Root of every error raised by tigress-signal.

    Attributes:
        hint: one line telling a person what to do about it, or an empty string.
        stored_share: set when the failure came after a new share was stored: the share's id.
            Its message waits in the outbox and goes out once the cause is gone (the server
            is back, the peer's key is trusted), so offering again would offer twice.
    """

    hint: str = ""
    stored_share: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def user_message(self) -> str:
        """The error as one line for a person: what went wrong, then what to do."""
        text = str(self)
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(TigressSignalError):
    """A configuration value is missing or invalid."""


# -- libsignal sidecar ---------------------------------------------------------------------


class BridgeError(TigressSignalError):
    """The libsignal sidecar failed."""


class BridgeUnavailable(BridgeError):
    """The sidecar is not running, would not start, or died while a call was in flight."""

    hint = "check that Node.js 20+ is installed and run the setup (make setup)"


class BridgeProtocolError(BridgeError):
    """The sidecar sent something that is not a well-formed answer of our protocol."""


class SignalProtocolError(BridgeError):
    """libsignal refused an operation.

    Attributes:
        operation: the sidecar method that failed.
        libsignal_code: libsignal's numeric error code, when it gave one.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        libsignal_code: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.operation = operation
        self.libsignal_code = libsignal_code


class UntrustedIdentity(SignalProtocolError):
    """The peer's identity key is not trusted for this direction.

    Attributes:
        peer: the peer's account id (the protocol address name).
        identity_key: the refused identity public key, when the sidecar named it (a public
            key, safe to store and show as a safety number).
    """

    hint = "compare safety numbers with the peer, then trust the new key"

    def __init__(
        self, message: str, *, peer: str, identity_key: bytes | None = None, **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.peer = peer
        self.identity_key = identity_key


class DuplicateMessage(SignalProtocolError):
    """The message was already decrypted once (a replay or a redelivery)."""


class InvalidMessage(SignalProtocolError):
    """The message is malformed, tampered with, or not decryptable with the session."""


class NoSession(SignalProtocolError):
    """There is no session with this peer yet."""


class UnknownPreKey(SignalProtocolError):
    """The message names a one-time, signed or Kyber prekey that this wallet does not hold."""


class InvalidSignature(SignalProtocolError):
    """A signed prekey or Kyber prekey signature does not verify against the identity key."""


# -- wallet store ----------------------------------------------------------------------------


class StoreError(TigressSignalError):
    """The wallet store failed to read or write."""


class StoreLocked(StoreError):
    """Another process has this wallet open."""

    hint = "stop the other tigress-signal process using this wallet folder"


class StoreUnavailable(StoreError):
    """A database server (PostgreSQL) cannot be reached right now; trying later may work."""


# -- intermediary HTTP API (client side) -----------------------------------------------------


class ServerApiError(TigressSignalError):
    """The intermediary answered with an error status.

    Attributes:
        status: the HTTP status code.
        body: the decoded JSON error body (empty if there was none).
    """

    def __init__(
        self, message: str, *, status: int, body: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


class AuthenticationFailed(ServerApiError):
    """401: the account id or device password is wrong."""

    hint = (
        "this device was removed from its account, or the wallet's account id or password is"
        " wrong; link a removed device again from a new folder with 'wallet link-request'"
    )


class NotFound(ServerApiError):
    """404: no such account, device or message."""


class MismatchedDevices(ServerApiError):
    """409: the message list does not match the recipient's devices."""

    @property
    def missing_devices(self) -> list[int]:
        """Device ids the sender must add."""
        return [int(d) for d in self.body.get("missingDevices", []) or []]  # type: ignore[attr-defined]

    @property
    def extra_devices(self) -> list[int]:
        """Device ids the sender must drop."""
        return [int(d) for d in self.body.get("extraDevices", []) or []]  # type: ignore[attr-defined]


class StaleDevices(ServerApiError):
    """410: some recipient devices re-registered (their registration id changed)."""

    @property
    def stale_devices(self) -> list[int]:
        """Device ids whose sessions must be rebuilt."""
        return [int(d) for d in self.body.get("staleDevices", []) or []]  # type: ignore[attr-defined]


class PayloadTooLarge(ServerApiError):
    """413: a message is larger than the server accepts."""


class RateLimited(ServerApiError):
    """429: too many requests.

    Attributes:
        retry_after: seconds to wait before trying again, if the server said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        body: dict[str, object] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


# -- signal-cli (client side) ---------------------------------------------------------------


class SignalCliError(TigressSignalError):
    """signal-cli refused a call or could not be reached.

    Attributes:
        error_name: the D-Bus error name or ``jsonrpc:<code>`` signal-cli answered with, or an
            empty string when the error was found on our side.
    """

    def __init__(self, message: str, *, error_name: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.error_name = error_name


class SignalCliUnavailable(SignalCliError):
    """No signal-cli daemon answers on the bus or socket, or it went away during a call."""

    hint = "start it with 'tigress-signal signal-cli start'; signal-cli needs Java 21+"


class SignalCliUnsupported(SignalCliError):
    """The daemon does not offer the interface or method this client needs."""

    hint = "use signal-cli 0.13.x started with 'daemon --dbus' and/or '--socket'"


class SignalCliAccountNotFound(SignalCliError):
    """The configured account is not one of the daemon's accounts."""

    hint = "list the daemon's accounts with 'tigress-signal signal-cli accounts', or link one"


class SignalCliInvalidNumber(SignalCliError):
    """A phone number that cannot be read as E.164 (or a malformed ACI UUID)."""

    hint = "write the number in international form, e.g. +4915112345678"


class SignalCliUnregisteredUser(SignalCliError):
    """The recipient has no Signal account."""

    hint = "check the number; the receiver must have Signal installed"


class SignalCliUntrustedIdentity(SignalCliError):
    """The recipient's identity key changed and signal-cli does not trust the new one.

    Attributes:
        recipient: the recipient the send was for.
    """

    hint = "compare safety numbers with the receiver, then trust the new key in signal-cli"

    def __init__(self, message: str, *, recipient: str = "", **kwargs: str) -> None:
        super().__init__(message, **kwargs)
        self.recipient = recipient


class SignalCliRateLimited(SignalCliError):
    """Signal's servers want the account to slow down, or to prove it is human.

    Attributes:
        challenge_token: the token to answer with a captcha (``submitRateLimitChallenge``),
            when Signal gave one.
        retry_after: seconds to wait, when Signal said.
    """

    hint = "wait before sending again, or solve the captcha and submit the challenge token"

    def __init__(
        self,
        message: str,
        *,
        challenge_token: str | None = None,
        retry_after: float | None = None,
        **kwargs: str,
    ) -> None:
        super().__init__(message, **kwargs)
        self.challenge_token = challenge_token
        self.retry_after = retry_after


class SignalCliFailure(SignalCliError):
    """Any other failure signal-cli reported, including error names this client does not know."""

    hint = "see the signal-cli daemon's log for details"


class InvalidLinkCode(ServerApiError):
    """403: the device link code is wrong, was used already, or expired."""

    hint = "ask an existing device of the account for a new link code"


class DeviceLimitReached(ServerApiError):
    """409: the account already has as many devices as the server allows."""

    hint = "remove a device of the account first"


class PreKeyIdReused(ServerApiError):
    """409: a prekey upload reuses a key id the server knows with other key material."""

    @property
    def reused(self) -> list[tuple[str, int]]:
        """(field, key id) of each reused id, e.g. ``("preKeys", 7)``."""
        entries = self.body.get("reused", [])
        if not isinstance(entries, list):
            return []
        return [
            (str(e.get("field")), int(e.get("keyId", -1))) for e in entries if isinstance(e, dict)
        ]


# -- linking devices ---------------------------------------------------------------------------


class DeviceLinkError(TigressSignalError):
    """Linking a new device to a wallet's account from the wallet side failed."""


class InvalidLinkRequest(DeviceLinkError):
    """A link request that is not one, was cut short when copied, or is damaged."""

    hint = "copy the whole line 'wallet link-request' printed on the new device"


class InvalidLinkAnswer(DeviceLinkError):
    """A link answer that is damaged, was made for another request, expired, or was used."""

    hint = "run 'wallet link' on the existing device again and paste its new answer"


# -- channels --------------------------------------------------------------------------------


class ChannelError(TigressSignalError):
    """A CredentialChannel could not send or receive."""


class ChannelClosed(ChannelError):
    """The channel was closed."""


class UnknownPeer(ChannelError):
    """The recipient does not exist on this channel (e.g. no such account)."""

    hint = "check the receiver's account id"


# -- Tigress relay ---------------------------------------------------------------------------


class RelayError(TigressSignalError):
    """The Tigress mailbox relay, or a client of it, failed."""


class RelayApiError(RelayError):
    """The relay answered with an error status.

    Attributes:
        status: the HTTP status code.
        code: the relay's short error code (``"not_found"`` ...), or an empty string.
    """

    def __init__(self, message: str, *, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ClaimRejected(RelayApiError):
    """401: the device claim is not one of the two bound to the mailbox."""


class MailboxNotFound(RelayApiError):
    """404: the mailbox does not exist, was deleted, or has expired."""


class MailboxTooLarge(RelayApiError):
    """413: a payload or display text is larger than the relay accepts."""


class RelayRateLimited(RelayApiError):
    """429: too many requests from this address.

    Attributes:
        retry_after: seconds to wait before trying again, if the relay said.
    """

    def __init__(
        self, message: str, *, status: int = 429, code: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class InvalidShareLink(RelayError):
    """A share link does not parse, lacks its secret, or names a relay that is not trusted."""

    hint = "ask the sender for the complete link, including the part after '#'"


class PayloadRejected(RelayError):
    """A mailbox payload did not authenticate under the share's secret.

    In the hardened mode this is also what a payload replayed from earlier in the exchange, or
    reflected back to its writer, looks like: its associated data names another position.
    """


# -- trust -----------------------------------------------------------------------------------


class TrustError(TigressSignalError):
    """Trusting a peer's identity key failed; nothing was stored."""


class SafetyNumberMismatch(TrustError):
    """The digits given are not the safety number of this wallet and the peer's newest key."""

    hint = (
        "compare the numbers again in person; if they really differ, do not trust this key"
        " (someone may be in the middle)"
    )


# -- shares ----------------------------------------------------------------------------------


class ShareError(TigressSignalError):
    """The share state machine refused something."""


class UnknownShare(ShareError):
    """No share with that id exists in this wallet."""


class InvalidTransition(ShareError):
    """A message or action does not fit the share's current state."""


class ShareExpired(ShareError):
    """The share's expiry time has passed."""


# -- credentials -----------------------------------------------------------------------------


class CredentialError(TigressSignalError):
    """A credential, endorsement or transfer message is not acceptable."""


class MalformedTransferMessage(CredentialError):
    """A decrypted transfer message does not parse as one of ours."""


class EndorsementRejected(CredentialError):
    """A digital-key endorsement or challenge response does not verify."""
