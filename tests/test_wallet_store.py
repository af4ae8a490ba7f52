"""The wallet's SQLite store: process lock, records, counters, transactions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tigress_signal.bridge.records import RecordChange
from tigress_signal.errors import StoreError, StoreLocked
from tigress_signal.wallet.store import HeldEnvelope, WalletStore


def test_records_are_written_and_deleted_in_one_transaction(tmp_path):
    with WalletStore.open(tmp_path / "w") as store:
        with store.transaction() as conn:
            store.apply_changes(
                conn,
                [
                    RecordChange("session", "peer.1", b"session-1"),
                    RecordChange("prekey", "7", b"prekey-7"),
                ],
            )
        assert store.load_record("session", "peer.1") == b"session-1"
        with store.transaction() as conn:
            store.apply_changes(
                conn,
                [
                    RecordChange("session", "peer.1", b"session-2"),
                    RecordChange("prekey", "7", None),
                ],
            )
        assert store.load_record("session", "peer.1") == b"session-2"
        assert store.load_record("prekey", "7") is None


def test_a_failed_transaction_leaves_records_unchanged(tmp_path):
    with WalletStore.open(tmp_path / "w") as store:
        with store.transaction() as conn:
            store.apply_changes(conn, [RecordChange("session", "peer.1", b"before")])
        with pytest.raises(RuntimeError), store.transaction() as conn:
            store.apply_changes(conn, [RecordChange("session", "peer.1", b"after")])
            raise RuntimeError("effect failed")
        assert store.load_record("session", "peer.1") == b"before"


def test_unknown_record_kind_is_refused(tmp_path):
    with (
        WalletStore.open(tmp_path / "w") as store,
        pytest.raises(StoreError, match="unknown libsignal record kind"),
        store.transaction() as conn,
    ):
        store.apply_changes(conn, [RecordChange("bogus", "x", b"")])  # type: ignore[arg-type]


def test_counters_never_hand_out_an_id_twice_across_reopen(tmp_path):
    with WalletStore.open(tmp_path / "w") as store, store.transaction() as conn:
        first = store.next_ids(conn, "prekey", 100)
    with WalletStore.open(tmp_path / "w") as store, store.transaction() as conn:
        second = store.next_ids(conn, "prekey", 100)
    assert first == 1
    assert second == 101


def test_data_survives_reopen(tmp_path):
    with WalletStore.open(tmp_path / "w") as store, store.transaction() as conn:
        store.mark_envelope_seen(conn, "guid-1")
    with WalletStore.open(tmp_path / "w") as store:
        assert store.envelope_seen("guid-1")
        assert not store.envelope_seen("guid-2")


def test_second_process_is_refused_while_the_wallet_is_open(tmp_path):
    folder = tmp_path / "w"
    with WalletStore.open(folder):
        code = (
            "import sys; from tigress_signal.wallet.store import WalletStore;"
            "from tigress_signal.errors import StoreLocked\n"
            "try:\n WalletStore.open(sys.argv[1])\n"
            "except StoreLocked as e:\n print('locked', e); sys.exit(3)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 3, result.stderr
        assert "in use by another process" in result.stdout
    # Once closed, the wallet opens again.
    WalletStore.open(folder).close()


def test_same_process_second_open_is_refused(tmp_path):
    with WalletStore.open(tmp_path / "w"), pytest.raises(StoreLocked):
        WalletStore.open(tmp_path / "w")


def test_open_without_create_needs_an_existing_wallet(tmp_path):
    with pytest.raises(StoreError, match="no wallet folder"):
        WalletStore.open(tmp_path / "missing", create=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is not a wallet"):
        WalletStore.open(tmp_path / "empty", create=False)


def test_database_file_is_private(tmp_path):
    with WalletStore.open(tmp_path / "w"):
        mode = (tmp_path / "w" / "wallet.sqlite3").stat().st_mode & 0o777
    assert mode == 0o600


def test_held_envelopes_are_kept_once_in_order_across_reopen(tmp_path):
    with WalletStore.open(tmp_path / "w") as store, store.transaction() as conn:
        for guid, peer in (("e1", "bob"), ("e2", "carol"), ("e3", "bob"), ("e1", "bob")):
            store.hold_envelope(conn, HeldEnvelope(guid, peer, 1, 3, guid.encode()))
        store.note_identity_seen(conn, "bob", b"\x05old")
        store.note_identity_seen(conn, "bob", b"\x05new")
    with WalletStore.open(tmp_path / "w", create=False) as store:
        assert [h.envelope_id for h in store.held_envelopes()] == ["e1", "e2", "e3"]
        assert [h.content for h in store.held_envelopes("bob")] == [b"e1", b"e3"]
        assert store.holds_for("bob") and not store.holds_for("dave")
        assert store.identity_seen("bob") == b"\x05new"
        assert store.identity_seen("carol") is None
        with store.transaction() as conn:
            store.release_held(conn, "e1")
        assert [h.envelope_id for h in store.held_envelopes("bob")] == ["e3"]
        assert not store.is_held("e1") and store.is_held("e3")
