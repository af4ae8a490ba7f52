"""The relay against the security checklist of the Tigress drafts (one test or more per item).

Item numbers refer to the checklist in the reference summary of the Tigress relay. Items that
only a client can keep (the fragment, tamper detection, fresh claims per share, relay trust)
are tested in ``test_relay_channel.py``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay_fixtures import (
    Clock,
    create,
    create_body,
    headers,
    new_claim,
    payload,
    rows,
    running_relay,
)
from tigress_signal.errors import ConfigError
from tigress_signal.relay.config import RelayConfig, load_relay_config
from tigress_signal.relay.mailboxes import claim_digest, sweep_expired
from tigress_signal.relay.preview import CONTENT_SECURITY_POLICY

HOUR = 3600


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
async def relay(tmp_path: Path):
    clock = Clock()
    async with (
        running_relay(tmp_path, clock) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):
        yield server, http, clock


# -- 1. TLS only ---------------------------------------------------------------------------------


def test_1_beyond_loopback_without_tls_is_refused():
    with pytest.raises(ConfigError, match=r"TLS|tls"):
        load_relay_config(None, {"host": "0.0.0.0"})
    # A TLS proxy in front is the other accepted set-up.
    assert load_relay_config(None, {"host": "0.0.0.0", "behind_tls_proxy": True}).host


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_1_with_tls_the_relay_speaks_https_and_refuses_plain_http(tmp_path: Path):
    cert, key = _self_signed(tmp_path)
    async with running_relay(tmp_path, tls_certfile=str(cert), tls_keyfile=str(key)) as server:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=context, trust_env=False) as http:
            response = await http.post(
                f"{server.url}/v1/m", json=create_body(), headers=headers(new_claim())
            )
            assert response.status_code == 200
            assert response.json()["urlLink"].startswith("https://")
        plain = server.url.replace("https://", "http://")
        async with httpx.AsyncClient(trust_env=False) as http:
            with pytest.raises(httpx.HTTPError):
                answer = await http.get(f"{plain}/health")
                # uvicorn may answer a plain request with a TLS alert or an empty reply;
                # either way no API answer comes back.
                assert answer.status_code >= 400


# -- 3, 19. What the relay stores -----------------------------------------------------------------


async def test_3_19_the_database_holds_ciphertext_and_no_identifiers(relay, tmp_path: Path):
    _, http, _ = relay
    sender, receiver = new_claim(), new_claim()
    body = create_body()
    response = await http.post(
        "/v1/m",
        json=body,
        headers={**headers(sender), "Mailbox-Device-Attestation": "oem-attestation-blob"},
    )
    mailbox = response.json()["urlLink"].rsplit("/", 1)[1]
    await http.post(f"/v1/m/{mailbox}", headers=headers(receiver))
    db = tmp_path / "relay.db"
    tables = {name for (name,) in rows(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"schema_version", "mailboxes", "mailbox_requests"}
    dump = "\n".join(
        map(str, rows(db, "SELECT * FROM mailboxes") + rows(db, "SELECT * FROM mailbox_requests"))
    )
    # Claims are kept as digests only; no address, attestation or push token is stored.
    for secret_value in (sender, receiver, "127.0.0.1", "oem-attestation-blob"):
        assert secret_value not in dump
    assert claim_digest(sender) in dump and claim_digest(receiver) in dump
    stored = rows(db, "SELECT payload FROM mailboxes")[0][0]
    assert stored == base64.b64decode(body["payload"]["data"])
    columns = [row[1] for row in rows(db, "PRAGMA table_info(mailboxes)")]
    assert not any("created" in c or "address" in c or "token" in c for c in columns)


# -- 7, 8. Mailbox ids ---------------------------------------------------------------------------


async def test_7_ids_are_random_uuid4_and_cannot_be_listed(relay):
    _, http, _ = relay
    ids = [await create(http, new_claim()) for _ in range(5)]
    assert len(set(ids)) == 5
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert (await http.get("/v1/m")).status_code == 405
    # A client cannot choose the id: an id in the create body is an unknown field.
    response = await http.post(
        "/v1/m",
        json=create_body(mailboxIdentifier=str(uuid.uuid4())),
        headers=headers(new_claim()),
    )
    assert response.status_code == 400


async def test_8_unknown_ids_are_404_and_guessing_is_rate_limited(tmp_path: Path):
    async with (
        running_relay(tmp_path, misses_per_minute=3) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):
        statuses = []
        for _ in range(5):
            guess = str(uuid.uuid4())
            statuses.append(
                (await http.post(f"/v1/m/{guess}", headers=headers(new_claim()))).status_code
            )
        assert statuses[:3] == [404, 404, 404]
        assert statuses[3:] == [429, 429]
        limited = await http.get(f"/v1/m/{uuid.uuid4()}")
        assert limited.status_code == 429 and "retry-after" in limited.headers


# -- 9, 10. Binding and relinquish ----------------------------------------------------------------


async def test_9_first_claimer_binds_and_a_third_claim_gets_401_everywhere(relay):
    _, http, _ = relay
    sender, receiver, third = new_claim(), new_claim(), new_claim()
    mailbox = await create(http, sender, expiration=iso(Clock().now + HOUR))
    assert (await http.post(f"/v1/m/{mailbox}", headers=headers(receiver))).status_code == 200
    assert (await http.post(f"/v1/m/{mailbox}", headers=headers(sender))).status_code == 200
    path = f"/v1/m/{mailbox}"
    assert (await http.post(path, headers=headers(third))).status_code == 401
    update = {"payload": payload()}
    assert (await http.put(path, json=update, headers=headers(third))).status_code == 401
    assert (await http.delete(path, headers=headers(third))).status_code == 401
    assert (await http.patch(path, headers=headers(third))).status_code == 401
    # Both bound parties still work.
    assert (await http.put(path, json=update, headers=headers(receiver))).status_code == 200
    assert (await http.put(path, json=update, headers=headers(sender))).status_code == 200


async def test_9_a_claim_header_is_required_and_must_be_a_uuid(relay):
    _, http, _ = relay
    assert (await http.post("/v1/m", json=create_body(), headers=headers())).status_code == 400
    bad = {**headers(), "Mailbox-Device-Claim": "device-serial-1234"}
    assert (await http.post("/v1/m", json=create_body(), headers=bad)).status_code == 400
    no_request_id = {"Mailbox-Device-Claim": new_claim()}
    assert (await http.post("/v1/m", json=create_body(), headers=no_request_id)).status_code == 400


async def test_10_only_the_bound_recipient_relinquishes_then_another_may_bind(relay):
    _, http, _ = relay
    sender, first, second = new_claim(), new_claim(), new_claim()
    mailbox = await create(http, sender)
    path = f"/v1/m/{mailbox}"
    assert (await http.patch(path, headers=headers(first))).status_code == 401  # not bound
    await http.post(path, headers=headers(first))
    assert (await http.patch(path, headers=headers(sender))).status_code == 401  # the creator
    assert (await http.post(path, headers=headers(second))).status_code == 401
    assert (await http.patch(path, headers=headers(first))).status_code == 200
    assert (await http.post(path, headers=headers(second))).status_code == 200
    assert (await http.post(path, headers=headers(first))).status_code == 401


# -- 11, 15, 18. Deletion ------------------------------------------------------------------------


@pytest.mark.parametrize("deleter", ["sender", "receiver"])
async def test_11_delete_by_a_bound_party_then_everything_is_404(relay, deleter: str):
    _, http, _ = relay
    claims = {"sender": new_claim(), "receiver": new_claim()}
    mailbox = await create(http, claims["sender"])
    path = f"/v1/m/{mailbox}"
    await http.post(path, headers=headers(claims["receiver"]))
    assert (await http.delete(path, headers=headers(claims[deleter]))).status_code == 200
    for claim in claims.values():
        assert (await http.post(path, headers=headers(claim))).status_code == 404
        put = await http.put(path, json={"payload": payload()}, headers=headers(claim))
        assert put.status_code == 404
        assert (await http.patch(path, headers=headers(claim))).status_code == 404
        assert (await http.delete(path, headers=headers(claim))).status_code == 404
    assert (await http.get(path)).status_code == 404


async def test_15_sender_cancels_an_unaccepted_share_by_deleting(relay):
    _, http, _ = relay
    sender = new_claim()
    mailbox = await create(http, sender)
    assert (await http.delete(f"/v1/m/{mailbox}", headers=headers(sender))).status_code == 200
    assert (await http.post(f"/v1/m/{mailbox}", headers=headers(new_claim()))).status_code == 404


async def test_recipient_rights_follow_access_rights(relay):
    _, http, _ = relay
    sender, receiver = new_claim(), new_claim()
    mailbox = await create(http, sender, expiration=iso(Clock().now + HOUR), rights="R")
    path = f"/v1/m/{mailbox}"
    await http.post(path, headers=headers(receiver))
    assert (
        await http.put(path, json={"payload": payload()}, headers=headers(receiver))
    ).status_code == 403
    assert (await http.delete(path, headers=headers(receiver))).status_code == 403
    assert (
        await http.put(path, json={"payload": payload()}, headers=headers(sender))
    ).status_code == 200


# -- 12. Request ids -----------------------------------------------------------------------------


async def test_12_a_repeated_request_id_is_201_and_changes_nothing(relay, tmp_path: Path):
    _, http, _ = relay
    sender, receiver = new_claim(), new_claim()
    request_id = str(uuid.uuid4())
    body = create_body(expiration=iso(Clock().now + HOUR))
    first = await http.post("/v1/m", json=body, headers=headers(sender, request_id))
    again = await http.post("/v1/m", json=create_body(), headers=headers(sender, request_id))
    assert first.status_code == 200 and again.status_code == 201
    assert first.headers["mailbox-request-id"] == request_id
    assert again.headers["mailbox-request-id"] == request_id
    assert again.json()["urlLink"] == first.json()["urlLink"]
    assert rows(tmp_path / "relay.db", "SELECT COUNT(*) FROM mailboxes") == [(1,)]

    path = "/v1/m/" + first.json()["urlLink"].rsplit("/", 1)[1]
    await http.post(path, headers=headers(receiver))
    update_id = str(uuid.uuid4())
    body = {"payload": payload()}
    one = await http.put(path, json=body, headers=headers(receiver, update_id))
    two = await http.put(path, json={"payload": payload()}, headers=headers(receiver, update_id))
    assert (one.status_code, two.status_code) == (200, 201)
    read = await http.post(path, headers=headers(sender))
    assert read.json()["payload"] == body["payload"]  # the repeat did not overwrite
    assert read.headers["mailbox-version"] == "2"

    relinquish_id = str(uuid.uuid4())
    assert (await http.patch(path, headers=headers(receiver, relinquish_id))).status_code == 200
    assert (await http.patch(path, headers=headers(receiver, relinquish_id))).status_code == 201


async def test_12_errors_echo_the_request_id_too(relay):
    _, http, _ = relay
    request_id = str(uuid.uuid4())
    response = await http.post(f"/v1/m/{uuid.uuid4()}", headers=headers(new_claim(), request_id))
    assert response.status_code == 404
    assert response.headers["mailbox-request-id"] == request_id


# -- 13, 14. Expiry and the lifetime cap ----------------------------------------------------------


async def test_13_an_expired_mailbox_is_404_and_the_sweep_purges_it(relay, tmp_path: Path):
    server, http, clock = relay
    sender, receiver = new_claim(), new_claim()
    mailbox = await create(http, sender, expiration=iso(clock.now + HOUR))
    path = f"/v1/m/{mailbox}"
    await http.post(path, headers=headers(receiver))
    clock.now += HOUR + 1
    assert (await http.post(path, headers=headers(receiver))).status_code == 404
    assert (
        await http.put(path, json={"payload": payload()}, headers=headers(sender))
    ).status_code == 404
    assert (await http.delete(path, headers=headers(sender))).status_code == 404
    assert (await http.get(path)).status_code == 404
    db = tmp_path / "relay.db"
    assert rows(db, "SELECT COUNT(*) FROM mailboxes") == [(1,)]  # still on disk until swept
    assert await sweep_expired(server.context) == 1
    assert rows(db, "SELECT COUNT(*) FROM mailboxes") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM mailbox_requests") == [(0,)]


async def test_13_the_sweep_runs_by_itself(tmp_path: Path):
    clock = Clock()
    async with (
        running_relay(tmp_path, clock, sweep_interval_seconds=0.05) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):
        await create(http, new_claim(), expiration=iso(clock.now + 60))
        clock.now += 61
        for _ in range(100):
            if rows(tmp_path / "relay.db", "SELECT COUNT(*) FROM mailboxes") == [(0,)]:
                break
            await asyncio.sleep(0.05)
        assert rows(tmp_path / "relay.db", "SELECT COUNT(*) FROM mailboxes") == [(0,)]


async def test_14_lifetime_is_capped_at_48_hours_by_default(relay, tmp_path: Path):
    _, http, clock = relay
    assert RelayConfig().max_lifetime_hours == 48
    mailbox = await create(http, new_claim(), expiration=iso(clock.now + 30 * 24 * HOUR))
    expires = rows(tmp_path / "relay.db", "SELECT expires_at FROM mailboxes")[0][0]
    assert expires == int(clock.now + 48 * HOUR)
    read = await http.post(f"/v1/m/{mailbox}", headers=headers(new_claim()))
    assert read.json()["expiration"] == iso(clock.now + 48 * HOUR)
    past = await http.post(
        "/v1/m", json=create_body(expiration=iso(clock.now - 10)), headers=headers(new_claim())
    )
    assert past.status_code == 400
    no_expiry = await create(http, new_claim())
    read = await http.post(f"/v1/m/{no_expiry}", headers=headers(new_claim()))
    assert read.json()["expiration"] == iso(clock.now + 24 * HOUR)


# -- 22, 23. The public preview ------------------------------------------------------------------


async def test_23_preview_has_opengraph_tags_strict_csp_and_no_script(relay):
    _, http, _ = relay
    body = create_body()
    body["displayInformation"]["title"] = '<script>alert("x")</script> Room'
    response = await http.post("/v1/m", json=body, headers=headers(new_claim()))
    link = response.json()["urlLink"]
    page = await http.get(link)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "script-src" not in CONTENT_SECURITY_POLICY  # falls back to default-src 'none'
    html = page.text
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    for tag in ("og:title", "og:description", "og:url", "og:type", "og:image"):
        assert f'property="{tag}"' in html
    assert f'content="{link}"' in html
    assert page.headers["referrer-policy"] == "no-referrer"


# -- 24, 25. Size and rate limits -----------------------------------------------------------------


async def test_24_oversize_payloads_and_display_texts_are_413(tmp_path: Path):
    async with (
        running_relay(
            tmp_path, max_payload_bytes=1024, max_display_chars=64, max_body_bytes=8192
        ) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):
        big = create_body()
        big["payload"] = payload(2048)
        assert (
            await http.post("/v1/m", json=big, headers=headers(new_claim()))
        ).status_code == 413
        long_title = create_body()
        long_title["displayInformation"]["title"] = "x" * 65
        response = await http.post("/v1/m", json=long_title, headers=headers(new_claim()))
        assert response.status_code == 413
        huge = b'{"payload": "' + b"A" * 10000 + b'"}'
        response = await http.post(
            "/v1/m",
            content=huge,
            headers={**headers(new_claim()), "Content-Type": "application/json"},
        )
        assert response.status_code == 413
        claim = new_claim()
        mailbox = await create(http, claim)
        update = await http.put(
            f"/v1/m/{mailbox}", json={"payload": payload(2048)}, headers=headers(claim)
        )
        assert update.status_code == 413


async def test_25_requests_per_address_are_rate_limited(tmp_path: Path):
    async with (
        running_relay(tmp_path, requests_per_minute=60, burst=5) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):
        statuses = [(await http.get("/health")).status_code for _ in range(8)]
        assert statuses[:5] == [200] * 5
        assert 429 in statuses[5:]
        limited = await http.get("/health")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1


# -- 2. The relay's log ---------------------------------------------------------------------------


async def test_2_the_relay_log_names_no_mailbox_claim_or_payload(relay, caplog):
    _, http, _ = relay
    caplog.set_level(logging.DEBUG)
    claim = new_claim()
    body = create_body()
    mailbox = await create(http, claim)
    await http.put(f"/v1/m/{mailbox}", json={"payload": body["payload"]}, headers=headers(claim))
    await http.get(f"/v1/m/{mailbox}")
    # The relay's own loggers. (uvicorn's access log, which would show paths, is switched off
    # by the relay; pytest re-attaches a handler to it, so it is left out here.)
    text = "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name.startswith(("tigress_signal", "uvicorn.error"))
    )
    assert "/v1/m/{mailbox_id}" in text
    for value in (mailbox, claim, body["payload"]["data"][:20], "Room 1207"):
        assert value not in text


# -- Malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"payload": {"type": "AES128", "data": "AAAA"}, "displayInformation": {}}',
        b'{"payload": {"type": "AEAD_AES_256_GCM", "data": "***"}, "displayInformation":'
        b' {"title": "", "description": "", "imageURL": ""}}',
    ],
)
async def test_malformed_creates_are_400(relay, body: bytes):
    _, http, _ = relay
    response = await http.post(
        "/v1/m", content=body, headers={**headers(new_claim()), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] in ("malformed_json", "invalid_request")


async def test_a_read_waits_for_a_newer_payload(relay):
    _, http, _ = relay
    sender, receiver = new_claim(), new_claim()
    mailbox = await create(http, sender)
    path = f"/v1/m/{mailbox}"
    first = await http.post(path, headers=headers(receiver))
    assert first.headers["mailbox-version"] == "1"
    wait = {**headers(receiver), "Mailbox-Known-Version": "1", "Prefer": "wait=0.2"}
    nothing = await http.post(path, headers=wait)
    assert nothing.status_code == 204

    async def update_soon() -> None:
        await asyncio.sleep(0.1)
        await http.put(path, json={"payload": payload()}, headers=headers(sender))

    writer = asyncio.create_task(update_soon())
    news = await http.post(path, headers={**wait, "Prefer": "wait=5"})
    await writer
    assert news.status_code == 200 and news.headers["mailbox-version"] == "2"


def test_the_example_configuration_loads():
    example = Path(__file__).resolve().parents[1] / "config" / "relay.toml"
    config = load_relay_config(example)
    assert config.max_lifetime_hours == 48 and config.host == "127.0.0.1"
