"""Credentials: the transfer messages two wallets exchange, and the sample credential kinds.

* :mod:`.messages`: the pydantic models of offers, key signing and import requests,
  endorsements and answers, and their wire form (:func:`encode_transfer`,
  :func:`decode_transfer`).
* :mod:`.access_token`: the stateless sample kind, a venue's signed access token.
* :mod:`.digital_key`: the stateful sample kind, a key the receiver's device makes and the owner
  endorses; :mod:`.lock` is the reference lock that checks it.
* :mod:`.files`: credential files (SD-JWT VC, W3C VC, Apple Wallet pass, ...) offered byte for
  byte, and the published samples shipped in ``samples/``.
"""

from tigress_signal.credentials.access_token import (
    ACCESS_TOKEN_MEDIA_TYPE,
    AccessToken,
    AccessTokenIssuer,
    verify_access_token,
)
from tigress_signal.credentials.digital_key import (
    DIGITAL_KEY_MEDIA_TYPE,
    ChallengeResponse,
    DigitalKeyHolder,
    KeyOwner,
    verify_endorsement,
)
from tigress_signal.credentials.files import (
    OCTET_STREAM_MEDIA_TYPE,
    PKPASS_MEDIA_TYPE,
    SD_JWT_VC_MEDIA_TYPE,
    VC_LD_JSON_MEDIA_TYPE,
    VC_MEDIA_TYPE,
    guess_media_type,
    provisioning_from_file,
    sample_credential_files,
    write_credential_file,
)
from tigress_signal.credentials.lock import ReferenceLock
from tigress_signal.credentials.messages import (
    MAX_PROVISIONING_CONTENT_BYTES,
    MAX_TRANSFER_MESSAGE_BYTES,
    Accepted,
    Cancelled,
    Declined,
    Endorsement,
    KeyImportRequest,
    KeySigningRequest,
    Offer,
    ProvisioningInformation,
    Taken,
    TransferEnvelope,
    TransferMessage,
    decode_transfer,
    encode_transfer,
)

__all__ = [
    "ACCESS_TOKEN_MEDIA_TYPE",
    "DIGITAL_KEY_MEDIA_TYPE",
    "MAX_PROVISIONING_CONTENT_BYTES",
    "MAX_TRANSFER_MESSAGE_BYTES",
    "OCTET_STREAM_MEDIA_TYPE",
    "PKPASS_MEDIA_TYPE",
    "SD_JWT_VC_MEDIA_TYPE",
    "VC_LD_JSON_MEDIA_TYPE",
    "VC_MEDIA_TYPE",
    "Accepted",
    "AccessToken",
    "AccessTokenIssuer",
    "Cancelled",
    "ChallengeResponse",
    "Declined",
    "DigitalKeyHolder",
    "Endorsement",
    "KeyImportRequest",
    "KeyOwner",
    "KeySigningRequest",
    "Offer",
    "ProvisioningInformation",
    "ReferenceLock",
    "Taken",
    "TransferEnvelope",
    "TransferMessage",
    "decode_transfer",
    "encode_transfer",
    "guess_media_type",
    "provisioning_from_file",
    "sample_credential_files",
    "verify_access_token",
    "verify_endorsement",
    "write_credential_file",
]
