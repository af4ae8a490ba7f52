"""Fault injection: named points where a test can make this process die on the spot.

Set ``TIGRESS_SIGNAL_CRASH_AT`` to a point's name, optionally followed by ``:`` and a transfer
message type (``receive:committed:key_import_request``), and the process sends itself SIGKILL
when it reaches that point: no cleanup, no flush, as in a power cut of the process. Tests use it
to show that a crash at any step neither loses nor repeats a credential.

The points:

* ``receive:decrypted`` — a message is decrypted, nothing about it is stored yet;
* ``receive:committed`` — its effect is stored, the server has not been told;
* ``receive:acknowledged`` — the server deleted it, the reply is not sent yet.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_ENV = "TIGRESS_SIGNAL_CRASH_AT"


def crash_point(name: str, detail: str = "") -> None:
    """Die here with SIGKILL if ``TIGRESS_SIGNAL_CRASH_AT`` names this point (and detail)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    if wanted == name or (detail and wanted == f"{name}:{detail}"):
        log.warning("fault injection: killing this process at %s", wanted)
        os.kill(os.getpid(), signal.SIGKILL)
