"""Both transfers with the intermediary and two wallets as separate OS processes on loopback.

Everything goes through the ``tigress-signal`` command line, as an integration script would use
it: one ``serve`` process, and one short-lived process per wallet command.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SAMPLES = (
    Path(__file__).resolve().parents[1] / "src" / "tigress_signal" / "credentials" / "samples"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run one ``tigress-signal`` command in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "tigress_signal", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str, **kwargs) -> str:
    result = cli(*args, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result.stdout.strip()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tigress_signal",
            "serve",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{tmp_path / 'intermediary.sqlite3'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "intermediary did not start"
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass
class Wallets:
    alice: Path
    bob: Path
    alice_id: str
    bob_id: str


@pytest.fixture
def wallets(server: str, tmp_path: Path) -> Wallets:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    alice_id = ok("wallet", "init", str(alice), "--server", server)
    bob_id = ok("wallet", "init", str(bob), "--server", server)
    assert alice_id != bob_id
    return Wallets(alice, bob, alice_id, bob_id)


def _offered_share(wallet: Path) -> str:
    """The share id of the single received offer listed by ``inbox``."""
    lines = [
        line for line in ok("inbox", "--wallet", str(wallet)).splitlines() if "receiver" in line
    ]
    assert len(lines) == 1, lines
    return lines[0].split()[0]


@pytest.mark.parametrize(
    ("sample", "media_type"),
    [
        ("sd-jwt-vc-identity-credential.sd-jwt", "application/dc+sd-jwt"),
        ("vcdm2-alumni-credential.json", None),
    ],
)
def test_stateless_file_share_across_processes(
    wallets: Wallets, tmp_path: Path, sample, media_type
):
    original = (SAMPLES / sample).read_bytes()
    args = ["share", "--wallet", str(wallets.alice), "--to", wallets.bob_id]
    args += ["--file", str(SAMPLES / sample), "--title", "A published credential"]
    if media_type:
        args += ["--media-type", media_type]
    share_id = ok(*args)

    assert _offered_share(wallets.bob) == share_id
    assert ok("accept", "--wallet", str(wallets.bob), share_id) == "accepted"
    exported = tmp_path / "exported"
    ok("export", "--wallet", str(wallets.bob), share_id, "--out", str(exported))
    assert exported.read_bytes() == original
    assert exported.stat().st_mode & 0o777 == 0o600
    # An existing file is not replaced unless asked; a folder is not a file.
    exported.write_bytes(b"mine")
    again = cli("export", "--wallet", str(wallets.bob), share_id, "--out", str(exported))
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert exported.read_bytes() == b"mine"
    ok("export", "--wallet", str(wallets.bob), share_id, "--out", str(exported), "--force")
    assert exported.read_bytes() == original
    into_folder = cli("export", "--wallet", str(wallets.bob), share_id, "--out", str(tmp_path))
    assert into_folder.returncode == 1
    assert "is a folder" in into_folder.stderr

    inbox = ok("inbox", "--wallet", str(wallets.alice))
    assert f"{share_id} sender" in inbox
    assert "accepted" in inbox.split(share_id)[1].splitlines()[0]


def test_stateful_digital_key_across_processes(wallets: Wallets):
    share_id = ok(
        "share",
        "--wallet",
        str(wallets.alice),
        "--to",
        wallets.bob_id,
        "--digital-key",
        "front-door",
        "--title",
        "Front door",
    )
    assert _offered_share(wallets.bob) == share_id
    # Bob's accept sends the key signing request and waits for the endorsement, which Alice's
    # wallet produces when it processes its messages.
    bob = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tigress_signal",
            "accept",
            "--wallet",
            str(wallets.bob),
            share_id,
            "--wait",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while bob.poll() is None and time.monotonic() < deadline:
            ok("sync", "--wallet", str(wallets.alice), "--idle", "1")
        out, err = bob.communicate(timeout=60)
    finally:
        if bob.poll() is None:
            bob.kill()
    assert bob.returncode == 0, out + err
    assert out.strip() == "accepted"
    ok("sync", "--wallet", str(wallets.alice), "--idle", "1")
    assert (
        "accepted"
        in ok("inbox", "--wallet", str(wallets.alice)).split(share_id)[1].splitlines()[0]
    )

    alice_sees = ok("safety-number", "--wallet", str(wallets.alice), wallets.bob_id, "--no-qr")
    bob_sees = ok("safety-number", "--wallet", str(wallets.bob), wallets.alice_id)
    assert len(alice_sees.replace(" ", "").replace("\n", "")) == 60
    assert bob_sees.startswith(alice_sees)  # Bob's also has the QR code after the digits

    owner_key = ok("lock", "owner-key", "--wallet", str(wallets.alice), "front-door")
    assert ok("lock", "try", "--wallet", str(wallets.bob), share_id, "--owner-key", owner_key) == (
        "lock front-door: unlocked"
    )
    # The lock refuses the key under another owner's public key.
    # Bob's wallet never offered keys to the front door: it has no owner key to show.
    assert cli("lock", "owner-key", "--wallet", str(wallets.bob), "front-door").returncode == 1
    other = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        .hex()
    )
    refused = cli("lock", "try", "--wallet", str(wallets.bob), share_id, "--owner-key", other)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error:")


def _state_of(wallet: Path, share_id: str) -> str:
    line = ok("inbox", "--wallet", str(wallet), "--idle", "1").split(share_id)[1].splitlines()[0]
    return line.split()[2]


# Every fault-injection point, each hit while Bob's wallet takes its part in a digital-key
# share: either while it accepts (the user's action seals and stores the key signing request)
# or while it processes Alice's endorsement (the key is stored and "accepted" sealed).
CRASHES = [
    ("accept", "send:sealed:accept"),
    ("accept", "send:committed:accept"),
    ("accept", "send:delivered"),
    ("sync", "receive:decrypted:key_import_request"),
    ("sync", "send:sealed:key_import_request"),
    ("sync", "receive:committed:key_import_request"),
    ("sync", "receive:acknowledged:key_import_request"),
]


@pytest.mark.parametrize(("command", "crash_at"), CRASHES)
def test_a_crash_at_any_step_neither_loses_nor_repeats_the_key(
    wallets: Wallets, command: str, crash_at: str
):
    share_id = ok(
        "share", "--wallet", str(wallets.alice), "--to", wallets.bob_id,
        "--digital-key", "garage", "--title", "Garage",
    )  # fmt: skip
    assert _offered_share(wallets.bob) == share_id
    crash = {"TIGRESS_SIGNAL_CRASH_AT": crash_at}

    if command == "accept":
        crashed = cli("accept", "--wallet", str(wallets.bob), share_id, "--wait", "0", env=crash)
        assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
        if _state_of(wallets.bob, share_id) == "offered":
            # Killed before anything was stored: the user's accept simply did not happen.
            assert crash_at == "send:sealed:accept"
            ok("accept", "--wallet", str(wallets.bob), share_id, "--wait", "0")
        ok("sync", "--wallet", str(wallets.bob), "--idle", "1")  # deliver what is queued
        ok("sync", "--wallet", str(wallets.alice), "--idle", "1")  # Alice endorses
        ok("sync", "--wallet", str(wallets.bob), "--idle", "1.5")
    else:
        ok("accept", "--wallet", str(wallets.bob), share_id, "--wait", "0")
        ok("sync", "--wallet", str(wallets.alice), "--idle", "1")  # Alice endorses
        crashed = cli("sync", "--wallet", str(wallets.bob), "--idle", "3", env=crash)
        assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
        # After the restart what was not acknowledged is delivered again.
        ok("sync", "--wallet", str(wallets.bob), "--idle", "1.5")

    # The key is in Bob's wallet exactly once, and both sides agree the share is done.
    inbox = ok("inbox", "--wallet", str(wallets.bob))
    credentials = [line for line in inbox.splitlines() if line.startswith("credential ")]
    assert len(credentials) == 1, inbox
    assert share_id in credentials[0]
    assert _state_of(wallets.bob, share_id) == "accepted"
    ok("sync", "--wallet", str(wallets.alice), "--idle", "1.5")
    assert _state_of(wallets.alice, share_id) == "accepted"
    owner_key = ok("lock", "owner-key", "--wallet", str(wallets.alice), "garage")
    ok("lock", "try", "--wallet", str(wallets.bob), share_id, "--owner-key", owner_key)
    # Nothing is left waiting to be sent on either side.
    for folder in (wallets.alice, wallets.bob):
        with sqlite3.connect(folder / "wallet.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


def test_unknown_peer_gives_one_line_error(wallets: Wallets):
    result = cli(
        "share",
        "--wallet",
        str(wallets.alice),
        "--to",
        "00000000-0000-4000-8000-000000000000",
        "--access-token",
        "room 1",
        "--title",
        "Nobody",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr
