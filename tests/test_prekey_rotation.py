"""Rotation of a wallet's signed prekey and last-resort Kyber prekey, through a running
intermediary: new ids are published, first messages made from older bundles still decrypt
during the grace period, and replaced keys are deleted after it (the clock is moved, not
waited for).
"""

from __future__ import annotations

import logging
import sqlite3
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tigress_signal.errors import ConfigError
from tigress_signal.intermediary.client import IntermediaryClient
from tigress_signal.intermediary.config import IntermediaryConfig, RateLimit
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.config import DEFAULT_GRACE_DAYS, parse_config
from tigress_signal.wallet.rotation import last_resort_kyber_ids
from tigress_signal.wallet.store import _MIGRATIONS, WalletStore
from tigress_signal.wallet.wallet import Wallet
from wallet_helpers import free_port, receiving, token

WAIT = 30.0
DAY = timedelta(days=1)
GRACE = timedelta(days=DEFAULT_GRACE_DAYS)


@pytest.fixture
def server_config(tmp_path: Path) -> IntermediaryConfig:
    # A lenient bundle-fetch limit: some tests drain a wallet's one-time keys on purpose.
    return IntermediaryConfig(
        port=free_port(),
        database_url=f"sqlite:///{tmp_path / 'intermediary.db'}",
        bundle_fetch_rate=RateLimit(burst=1000, per_second=100.0),
    )


def client_of(wallet: Wallet, url: str) -> IntermediaryClient:
    client = IntermediaryClient(url)
    account = wallet.account
    client.authenticate(account.account_id, account.device_id, account.password)
    return client


def record_keys(wallet: Wallet, kind: str) -> set[int]:
    rows = wallet.store.connection.execute("SELECT key FROM records WHERE kind = ?", (kind,))
    return {int(key) for (key,) in rows}


def kyber_uses(wallet: Wallet, key_id: int) -> list[str]:
    rows = wallet.store.connection.execute(
        "SELECT key FROM records WHERE kind = 'kyber_used' AND key LIKE ?", (f"{key_id}:%",)
    )
    return [key for (key,) in rows]


async def drain(taker: IntermediaryClient, owner: Wallet, url: str) -> None:
    """Take every one-time key of ``owner`` so that bundles carry the last-resort Kyber key."""
    async with client_of(owner, url) as own:
        counts = await own.prekey_counts()
        for _ in range(max(counts.count, counts.pq_count)):
            await taker.fetch_bundle(owner.account_id)
        drained = await own.prekey_counts()
    assert (drained.count, drained.pq_count) == (0, 0)


async def test_rotation_publishes_new_ids_and_bundles_carry_them(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob, client_of(alice, server.url) as taker:
            async with client_of(bob, server.url) as own:
                before = await own.prekey_counts()
            kyber_before = record_keys(bob, "kyber_prekey")

            # Just registered: nothing is due yet.
            idle = await bob.rotate_prekeys()
            assert (idle.signed_prekey_id, idle.last_resort_kyber_id) == (None, None)

            rotated = await bob.rotate_prekeys(now=datetime.now(UTC) + 3 * DAY)
            assert rotated.signed_prekey_id is not None
            assert rotated.last_resort_kyber_id is not None
            assert rotated.signed_prekey_id != before.signed_pre_key_id
            assert rotated.last_resort_kyber_id not in kyber_before

            async with client_of(bob, server.url) as own:
                after = await own.prekey_counts()
            assert after.signed_pre_key_id == rotated.signed_prekey_id
            assert after.pq_last_resort_pre_key_id == rotated.last_resort_kyber_id
            (device,) = (await taker.fetch_bundle(bob.account_id)).devices
            assert device.signed_prekey.key_id == rotated.signed_prekey_id
            await drain(taker, bob, server.url)
            (device,) = (await taker.fetch_bundle(bob.account_id)).devices
            assert device.pq_prekey.key_id == rotated.last_resort_kyber_id


async def test_a_message_from_a_bundle_taken_before_rotation_decrypts_with_the_old_signed_prekey(
    server_config, tmp_path
):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob:
            old_signed = record_keys(bob, "signed_prekey")
            # Alice's offer waits at the server, made from the bundle Bob published first.
            share = await alice.shares.offer_provisioning(bob.account_id, token("a"), title="a")
            rotated = await bob.rotate_prekeys(now=datetime.now(UTC) + 3 * DAY)
            assert rotated.signed_prekey_id is not None
            async with receiving(bob):
                got = await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            assert got.state is ShareState.OFFERED
            # Within the grace period both signed prekeys are kept.
            assert record_keys(bob, "signed_prekey") == old_signed | {rotated.signed_prekey_id}


async def test_an_old_last_resort_kyber_key_serves_two_first_messages_after_rotation(
    server_config, tmp_path
):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        carol = await Wallet.create(tmp_path / "carol", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, carol, client_of(alice, server.url) as taker:
            async with bob:
                (old_last_resort,) = _current_last_resort(bob)
                await drain(taker, bob, server.url)
                # With no one-time keys left, both offers use Bob's last-resort Kyber key.
                first = await alice.shares.offer_provisioning(
                    bob.account_id, token("a"), title="a"
                )
                second = await carol.shares.offer_provisioning(
                    bob.account_id, token("c"), title="c"
                )
                replaced_at = datetime.now(UTC) + 3 * DAY
                rotated = await bob.rotate_prekeys(now=replaced_at)
                assert rotated.last_resort_kyber_id not in (None, old_last_resort)
            # Opened again, the wallet names every kept last-resort key to its sidecar.
            async with await Wallet.open(tmp_path / "bob") as bob:
                async with receiving(bob):
                    for share in (first, second):
                        await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
                assert old_last_resort in record_keys(bob, "kyber_prekey")
                assert rotated.last_resort_kyber_id in record_keys(bob, "kyber_prekey")
                assert len(kyber_uses(bob, old_last_resort)) == 2

                # Once its grace period is over the key goes, and with it the uses seen.
                await bob.rotate_prekeys(now=replaced_at + GRACE)
                assert old_last_resort not in record_keys(bob, "kyber_prekey")
                assert kyber_uses(bob, old_last_resort) == []


async def test_replaced_keys_are_deleted_once_the_grace_period_ends(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with bob:
            (old_signed,) = record_keys(bob, "signed_prekey")
            (old_last_resort,) = _current_last_resort(bob)
            replaced_at = datetime.now(UTC) + 3 * DAY
            first = await bob.rotate_prekeys(now=replaced_at)

            # A minute before the grace period ends the old keys are still there (the newer
            # ones are due again and get replaced in turn).
            almost = await bob.rotate_prekeys(now=replaced_at + GRACE - timedelta(minutes=1))
            assert almost.deleted == 0
            assert old_signed in record_keys(bob, "signed_prekey")
            assert old_last_resort in record_keys(bob, "kyber_prekey")

            ended = await bob.rotate_prekeys(now=replaced_at + GRACE)
            assert ended.deleted == 2
            signed = record_keys(bob, "signed_prekey")
            kyber = record_keys(bob, "kyber_prekey")
            assert old_signed not in signed and old_last_resort not in kyber
            # The keys replaced later are still in their own grace period.
            assert {first.signed_prekey_id, almost.signed_prekey_id} <= signed
            assert {first.last_resort_kyber_id, almost.last_resort_kyber_id} <= kyber
            assert old_last_resort not in _kept_last_resort(bob)


async def test_key_ids_are_never_reused(server_config, tmp_path):
    async with IntermediaryServer(server_config) as server:
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with bob:
            one_time_kyber = record_keys(bob, "kyber_prekey") - set(_current_last_resort(bob))
            signed_ids = list(record_keys(bob, "signed_prekey"))
            kyber_ids = list(_current_last_resort(bob))
            moment = datetime.now(UTC)
            for _ in range(5):
                moment += 3 * DAY
                rotated = await bob.rotate_prekeys(now=moment)
                assert rotated.signed_prekey_id is not None
                assert rotated.last_resort_kyber_id is not None
                signed_ids.append(rotated.signed_prekey_id)
                kyber_ids.append(rotated.last_resort_kyber_id)
            assert len(set(signed_ids)) == len(signed_ids) == 6
            assert len(set(kyber_ids)) == len(kyber_ids) == 6
            # Last-resort keys share the Kyber id space with one-time keys: none overwrote one.
            assert not set(kyber_ids) & one_time_kyber
            assert record_keys(bob, "kyber_prekey") == one_time_kyber | set(kyber_ids)


async def test_a_wallet_due_a_rotation_rotates_when_it_connects(server_config, tmp_path, caplog):
    async with IntermediaryServer(server_config) as server:
        alice = await Wallet.create(tmp_path / "alice", server.url)
        bob = await Wallet.create(tmp_path / "bob", server.url)
        async with alice, bob, client_of(bob, server.url) as own:
            before = await own.prekey_counts()
            # Bob's keys were published three days ago.
            with bob.store.transaction() as conn:
                conn.execute(
                    "UPDATE rotating_prekeys SET published_at = ?",
                    ((datetime.now(UTC) - 3 * DAY).isoformat(timespec="milliseconds"),),
                )
            share = await alice.shares.offer_provisioning(bob.account_id, token("a"), title="a")
            with caplog.at_level(logging.INFO, logger="tigress_signal.wallet.rotation"):
                # Keys are maintained on connecting, before any message is taken: once the
                # offer has arrived, the rotation is done.
                async with receiving(bob):
                    await bob.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
            after = await own.prekey_counts()
            assert after.signed_pre_key_id != before.signed_pre_key_id
            assert after.pq_last_resort_pre_key_id != before.pq_last_resort_pre_key_id
            lines = [r for r in caplog.records if r.name == "tigress_signal.wallet.rotation"]
            assert len(lines) == 1 and lines[0].levelno == logging.INFO
            assert f"now id {after.signed_pre_key_id}" in lines[0].getMessage()


def test_an_existing_wallet_lists_its_registered_keys_after_the_upgrade(tmp_path):
    # A wallet made before rotation: schema version 1, signed prekey 1, last-resort Kyber key 1.
    tmp_path.mkdir(exist_ok=True)
    db = sqlite3.connect(tmp_path / "wallet.sqlite3")
    db.executescript(_MIGRATIONS[0] + "PRAGMA user_version=1;")
    db.execute(
        "INSERT INTO account VALUES (1, 'acct', 1, 'pw', x'00', x'00', 7,"
        " '2026-01-01T00:00:00.000+00:00')"
    )
    db.executemany(
        "INSERT INTO records (kind, key, value) VALUES (?, ?, x'00')",
        [("signed_prekey", "1"), ("kyber_prekey", "1"), ("kyber_prekey", "2")],
    )
    db.execute("INSERT INTO counters VALUES ('kyber_prekey', 102)")
    db.commit()
    db.close()
    with WalletStore.open(tmp_path) as store:
        rows = store.connection.execute(
            "SELECT kind, key_id, published_at, retired_at FROM rotating_prekeys ORDER BY 1"
        ).fetchall()
        assert rows == [
            ("last_resort_kyber", 1, "2026-01-01T00:00:00.000+00:00", None),
            ("signed_prekey", 1, "2026-01-01T00:00:00.000+00:00", None),
        ]
        with store.transaction() as conn:
            assert store.next_ids(conn, "signed_prekey", 1) == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prekey_rotation_days", 0),
        ("prekey_rotation_days", "soon"),
        ("prekey_grace_days", 0.5),
        ("prekey_grace_days", 10_000),
    ],
)
def test_bad_rotation_settings_are_refused_by_name(key, value):
    raw: dict[str, object] = {"selfhosted": {"server_url": "http://127.0.0.1:8443", key: value}}
    with pytest.raises(ConfigError, match=f"selfhosted.{key}"):
        parse_config(raw, source="wallet.toml")


def test_rotation_settings_survive_a_round_trip_through_wallet_toml():
    raw: dict[str, object] = {
        "selfhosted": {
            "server_url": "http://127.0.0.1:8443",
            "prekey_rotation_days": 7,
            "prekey_grace_days": 60,
        }
    }
    config = parse_config(raw, source="wallet.toml")
    again = parse_config(tomllib.loads(config.to_toml()), source="again")
    policy = again.rotation_policy()
    assert (policy.interval, policy.grace) == (timedelta(days=7), timedelta(days=60))


def _current_last_resort(wallet: Wallet) -> list[int]:
    rows = wallet.store.connection.execute(
        "SELECT key_id FROM rotating_prekeys"
        " WHERE kind = 'last_resort_kyber' AND retired_at IS NULL"
    )
    return [int(key_id) for (key_id,) in rows]


def _kept_last_resort(wallet: Wallet) -> list[int]:
    return last_resort_kyber_ids(wallet.store)
