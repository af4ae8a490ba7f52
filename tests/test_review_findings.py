"""Findings of the review of device linking, first-device-wins shares and the CLI.

Each test names a defect the review found (or a hostile input it tried), and fails when that
behaviour comes back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from test_cli_input import cli, refused
from test_share_service import WAIT, receiving, send_raw, settle, token
from test_transfer_processes import ok, server
from tigress_signal.credentials import KeyImportRequest, Taken
from tigress_signal.errors import (
    ConfigError,
    DeviceLinkError,
    StoreError,
    StoreLocked,
    UnknownShare,
)
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.service import DigitalKeyTerms
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet import wallet as wallet_module
from tigress_signal.wallet.linking import (
    LinkSecrets,
    make_link_request,
    open_link_answer,
    parse_link_request,
    seal_link_answer,
)
from tigress_signal.wallet.store import WalletStore
from tigress_signal.wallet.wallet import Wallet

__all__ = ["server"]  # the fixture is used by name below


@pytest.fixture
async def people(tmp_path: Path) -> AsyncIterator[tuple[Wallet, Wallet, Wallet]]:
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        carol = await Wallet.create(tmp_path / "carol", server.url)
        async with alice, bob, carol, receiving(alice), receiving(bob), receiving(carol):
            yield alice, bob, carol


# -- hostile Taken and KeyImportRequest from peers -------------------------------------------


async def test_taken_from_someone_other_than_the_sender_moves_nothing(people, caplog):
    alice, bob, carol = people
    caplog.set_level(logging.WARNING, logger="tigress_signal.shares.service")
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)

    # Carol knows the share id and claims another device of Bob's took it.
    await send_raw(carol, bob, Taken(share_id=uuid.UUID(share.share_id), device_id=2))
    # And a Taken for a share nobody has.
    await send_raw(carol, bob, Taken(share_id=uuid.uuid4(), device_id=2))
    await settle(bob)
    assert bob.shares.share(share.share_id).state is ShareState.OFFERED
    assert sum("refused taken" in r.getMessage() for r in caplog.records) == 2

    # The loop goes on, and Bob still redeems the share.
    await bob.shares.accept(share.share_id)
    await alice.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    assert len(bob.shares.credentials()) == 1


async def test_taken_sent_to_the_sender_moves_nothing(people, caplog):
    alice, bob, _ = people
    caplog.set_level(logging.WARNING, logger="tigress_signal.shares.service")
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await send_raw(bob, alice, Taken(share_id=uuid.UUID(share.share_id), device_id=1))
    await settle(alice)
    assert alice.shares.share(share.share_id).state is ShareState.OFFERED
    assert alice.shares.share(share.share_id).answered_by_device is None


async def test_taken_naming_this_device_changes_nothing(people):
    alice, bob, _ = people
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await send_raw(alice, bob, Taken(share_id=uuid.UUID(share.share_id), device_id=1))
    await settle(bob)
    assert bob.shares.share(share.share_id).state is ShareState.OFFERED


async def test_a_stateful_key_already_stored_is_not_dropped_by_a_late_taken(people):
    alice, bob, _ = people
    now = datetime.now(UTC)
    terms = DigitalKeyTerms("door-1", ("unlock",), now, now + timedelta(days=1))
    share = await alice.shares.offer_digital_key(bob.account_id, terms, title="Door")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await bob.shares.accept(share.share_id)
    await bob.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
    sid = uuid.UUID(share.share_id)
    await send_raw(alice, bob, Taken(share_id=sid, device_id=5))
    endorsement = bob.shares.digital_key(share.share_id).endorsement
    late = KeyImportRequest(share_id=sid, endorsement=endorsement, device_id=7)
    await send_raw(alice, bob, late)
    await settle(bob)
    assert bob.shares.share(share.share_id).state is ShareState.ACCEPTED
    assert len(bob.shares.credentials()) == 1


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["\u00b2", "\u0661", "\u06f3", "1\u0662"])
def test_remove_device_takes_ascii_digits_only(text, tmp_path):
    # A superscript two passes str.isdigit() but not int(), so argparse printed its own message
    # naming the private parser function; an Arabic-Indic one was taken as device 1.
    result = cli("wallet", "remove-device", "--wallet", str(tmp_path / "w"), text)
    refused(result, 2, "is not a device id (1 to 127)")
    assert "_device_id" not in result.stderr


def test_a_removed_device_says_so_and_fails(server, tmp_path):
    # A device removed from its account got 401 on every reconnect; inbox logged a warning per
    # retry, then printed "no shares" and exited 0 as if all were well.
    phone, tablet = tmp_path / "phone", tmp_path / "tablet"
    ok("wallet", "init", str(phone), "--server", server)
    request = ok("wallet", "link-request", str(tablet))
    answer = ok("wallet", "link", "--wallet", str(phone), request)
    ok("wallet", "link-finish", str(tablet), answer)
    ok("wallet", "remove-device", "--wallet", str(phone), "2")
    for command in (["inbox"], ["sync"], ["wallet", "devices"]):
        result = cli(*command, "--wallet", str(tablet))
        refused(result, 1, "removed from its account")
        assert "no shares" not in result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- link requests and answers ---------------------------------------------------------------


async def test_link_finish_on_a_registered_wallet_says_what_the_folder_is(tmp_path):
    # It said "alice is already linked to an account", though alice was never linked.
    config = IntermediaryConfig(port=0, database_url=f"sqlite:///{tmp_path / 'server.db'}")
    async with IntermediaryServer(config) as server:
        async with await Wallet.create(tmp_path / "alice", server.url) as alice:
            request = await Wallet.link_request(tmp_path / "tablet")
            answer = (await alice.answer_link(request.line)).line
        with pytest.raises(StoreError, match="holds a registered wallet") as caught:
            await Wallet.finish_link(tmp_path / "alice", answer)
        assert "already linked" not in str(caught.value)
        assert "wallet link-request" in caught.value.user_message()


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_link_request, "tslink1-req."),
        (parse_link_request, "tslink1-req.   "),
        (lambda text: open_link_answer(text, make_link_request()[1]), "tslink1-ans."),
    ],
)
def test_a_prefix_alone_is_called_cut_short(parse, text):
    # It said the (empty) rest "holds characters that are not base64url".
    with pytest.raises(DeviceLinkError, match="nothing after") as caught:
        parse(text)
    assert "not base64url" not in str(caught.value)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_link_request, "tslink1-req.abc*"),
        (parse_link_request, "tslink1-req.AAAAA"),
        (lambda text: open_link_answer(text, make_link_request()[1]), "tslink1-ans.abc*"),
        (lambda text: open_link_answer(text, make_link_request()[1]), "tslink1-ans.AAAAA"),
    ],
)
def test_a_copying_mistake_gives_one_piece_of_advice(parse, text):
    # The message said "copy the whole line" and the hint said it again; for an answer the
    # hint asked for a new answer, though the old one only needed copying again.
    with pytest.raises(DeviceLinkError) as caught:
        parse(text)
    message = caught.value.user_message()
    assert message.count("copy the whole line") == 1, message
    assert "new answer" not in message


def test_link_request_refuses_a_dangling_symlink_clearly(tmp_path):
    # It said "cannot create dangling: File exists".
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        asyncio.run(Wallet.link_request(tmp_path / "dangling"))
    assert not (tmp_path / "nowhere").exists()


def test_accept_that_loses_the_race_to_another_device_fails(server, tmp_path):
    # The losing device's 'accept --wait' printed "taken" and exited 0, as if it had the key.
    phone, tablet, alice = tmp_path / "phone", tmp_path / "tablet", tmp_path / "alice"
    bob_id = ok("wallet", "init", str(phone), "--server", server)
    alice_id = ok("wallet", "init", str(alice), "--server", server)
    ok(
        "wallet",
        "link-finish",
        str(tablet),
        ok("wallet", "link", "--wallet", str(phone), ok("wallet", "link-request", str(tablet))),
    )
    share_id = ok(
        "share", "--wallet", str(alice), "--to", bob_id, "--digital-key", "gate", "--title", "Gate"
    )
    for device in (tablet, phone):
        assert share_id in ok("inbox", "--wallet", str(device))
    # The tablet asks for its key first; the phone asks while Alice has not answered yet.
    assert ok("accept", "--wallet", str(tablet), share_id, "--wait", "0") == "key_requested"
    losing = subprocess.Popen(
        [sys.executable, "-m", "tigress_signal", "accept", "--wallet", str(phone), share_id,
         "--wait", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Alice answers only once both key signing requests wait for her at the intermediary.
        server_db = sqlite3.connect(tmp_path / "intermediary.sqlite3")
        while waiting_for(server_db, alice_id) < 2:
            assert losing.poll() is None, losing.communicate()
            time.sleep(0.1)
        while losing.poll() is None:
            ok("sync", "--wallet", str(alice), "--idle", "1")
        out, err = losing.communicate()
    finally:
        if losing.poll() is None:
            losing.kill()
            losing.wait()
    assert out.strip() == "taken", err
    assert losing.returncode == 1, err
    assert "another device of this account" in err and "Traceback" not in err


def waiting_for(server_db: sqlite3.Connection, account_id: str) -> int:
    """How many messages the intermediary holds for an account."""
    query = "SELECT count(*) FROM messages WHERE account_uuid = ?"
    return int(server_db.execute(query, (account_id,)).fetchone()[0])


@pytest.mark.parametrize(
    "command",
    [
        ["wallet", "show", "{f}"],
        ["inbox", "--wallet", "{f}"],
        ["wallet", "link-finish", "{f}", "tslink1-ans.AAAA"],
    ],
)
def test_a_command_on_an_empty_folder_leaves_it_empty(command, tmp_path):
    # Each left a wallet.lock behind, after which 'wallet init' and 'wallet link-request'
    # refused the folder as "not empty".
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(cli(*[part.format(f=folder) for part in command]), 1, "is not a wallet")
    assert list(folder.iterdir()) == []
    assert ok("wallet", "link-request", str(folder)).startswith("tslink1-req.")


async def test_export_of_a_taken_share_says_where_the_credential_went(people):
    # 'export' and 'lock try' said only "no credential stored for share ...".
    alice, bob, _ = people
    share = await alice.shares.offer_provisioning(bob.account_id, token(), title="Room 12")
    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
    await send_raw(alice, bob, Taken(share_id=uuid.UUID(share.share_id), device_id=2))
    await bob.shares.wait_for(share.share_id, [ShareState.TAKEN], WAIT)
    for read in (bob.shares.credential, bob.shares.digital_key):
        with pytest.raises(UnknownShare, match="another device of this account"):
            read(share.share_id)
    with pytest.raises(UnknownShare, match="no credential stored"):
        bob.shares.credential(str(uuid.uuid4()))


def test_a_device_that_removes_itself_is_told_what_that_means(server, tmp_path):
    # It printed only "removed device 2", and the folder then failed on every command.
    phone, tablet = tmp_path / "phone", tmp_path / "tablet"
    ok("wallet", "init", str(phone), "--server", server)
    request = ok("wallet", "link-request", str(tablet))
    ok("wallet", "link-finish", str(tablet), ok("wallet", "link", "--wallet", str(phone), request))
    result = cli("wallet", "remove-device", "--wallet", str(tablet), "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "removed device 2"
    assert "this device" in result.stderr and "can no longer connect" in result.stderr
    assert [
        line.split()[1] for line in ok("wallet", "devices", "--wallet", str(phone)).splitlines()
    ] == ["1"]


@pytest.mark.parametrize(
    "make",
    [Wallet.link_request, lambda folder: Wallet.create(folder, "http://127.0.0.1:9")],
    ids=["link-request", "init"],
)
async def test_a_new_wallet_that_finds_the_folder_locked_leaves_the_other_process_files(
    make, tmp_path, monkeypatch
):
    # Two 'wallet link-request' (or 'wallet init') on one new folder: the second saw the folder
    # still empty, then found it locked by the first, and its clean-up deleted the first one's
    # database and lock file while the first was still writing into them.
    folder = tmp_path / "tablet"
    folder.mkdir()
    first = WalletStore.open(folder)  # the other process, midway
    try:
        monkeypatch.setattr(wallet_module, "_claim_new_folder", lambda path: False)
        monkeypatch.setattr(Path, "exists", _exists_except(folder / "wallet.sqlite3"))
        with pytest.raises(StoreLocked):
            await make(folder)
        monkeypatch.undo()
        assert (folder / "wallet.sqlite3").exists() and (folder / "wallet.lock").exists()
    finally:
        first.close()


def _exists_except(hidden: Path):
    real = Path.exists

    def exists(self: Path, **kwargs: bool) -> bool:
        return False if self == hidden else real(self, **kwargs)

    return exists


@pytest.mark.parametrize("command", [["serve"], ["relay", "serve"]])
def test_serve_with_an_unusable_database_ends_without_a_traceback(command, tmp_path):
    # The clear "error: cannot open SQLite database ..." line came after a full traceback
    # that uvicorn logged for the app's failed start.
    (tmp_path / "afile").write_text("not a folder")
    database = f"sqlite:///{tmp_path / 'afile' / 'x.db'}"
    result = cli(*command, "--port", "0", "--database", database)
    refused(result, 1, "error: cannot open SQLite database")
    assert "Not a directory" in result.stderr


@pytest.mark.parametrize("damage", [b"\x00", b"-----BEGIN PRIVATE KEY-----\nAAAA\n", b""])
async def test_a_damaged_link_request_key_is_one_line_not_a_traceback(damage, tmp_path):
    # A waiting folder whose kept key cannot be read raised cryptography's ValueError, which
    # the command line printed as a traceback.
    folder = tmp_path / "tablet"
    request = await Wallet.link_request(folder)
    connection = sqlite3.connect(folder / "wallet.sqlite3", isolation_level=None)
    connection.execute("UPDATE pending_link SET private_key_pem = ?", (damage,))
    connection.close()
    with pytest.raises(StoreError, match="damaged"):
        Wallet.pending_link_request(folder)
    secrets = LinkSecrets("http://127.0.0.1:9", "a", b"k", b"p", "code", 2**40, "tofu")
    answer = seal_link_answer(parse_link_request(request.line), secrets)
    with pytest.raises(StoreError, match="damaged") as caught:
        await Wallet.finish_link(folder, answer)
    assert "wallet link-request" in caught.value.user_message()
