"""``tigress-signal compare``: every channel completes both transfers in one run, and every
figure of the report comes from that run; the signal-cli row (over the fake Signal service) is
labelled functional only wherever it appears."""

from __future__ import annotations

import asyncio
import html
import json
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from compare_fixtures import comparison_run
from relay_fixtures import running_relay
from tigress_signal.evaluation.report import summary_markdown
from tigress_signal.evaluation.runner import (
    SIGNAL_CLI_CAVEAT,
    CompareSettings,
    ComparisonResult,
    _SignalCliChannel,
    run_comparison,
)
from tigress_signal.evaluation.wire import CountingProxy


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ComparisonResult, Path]:
    return comparison_run(tmp_path_factory)


def test_every_channel_completes_both_transfers(run):
    result, _ = run
    ran = {c.name: c for c in result.channels if c.status == "run"}
    assert set(ran) == {"selfhosted", "tigress-relay", "signal-cli"}
    for channel in ran.values():
        kinds = [t.kind for t in channel.transfers]
        assert kinds.count("stateless") == 2 and kinds.count("stateful") == 1
        for transfer in channel.transfers:
            assert transfer.completed and transfer.verified, transfer.error
    assert result.all_completed


def test_signal_cli_rows_ran_and_are_labelled_functional_only(run):
    result, out = run
    assert "functional only" in SIGNAL_CLI_CAVEAT and "fake Signal service" in SIGNAL_CLI_CAVEAT
    (channel,) = [c for c in result.channels if c.name == "signal-cli"]
    assert channel.status == "run" and channel.caveat == SIGNAL_CLI_CAVEAT
    kinds = [t.kind for t in channel.transfers]
    assert kinds.count("stateless") == 2 and kinds.count("stateful") == 1
    for transfer in channel.transfers:
        assert transfer.completed and transfer.verified, transfer.error
        for party in ("sender", "receiver"):
            # Counted on the wire to the (fake) daemon, not zeros standing in for "unknown".
            assert transfer.parties[party]["rpc_requests"] + transfer.parties[party]["pushes"]
            assert transfer.parties[party]["unparsed"] == 0

    data = json.loads((out / "report.json").read_text())
    rows = [r for r in data["summary"] if r["channel"] == "signal-cli"]
    assert {r["kind"] for r in rows} == {"stateless", "stateful"}
    for row in rows:
        assert row["status"] == "run" and row["caveat"] == SIGNAL_CLI_CAVEAT
        assert row["completed"] in ("2/2", "1/1")
    assert data["caveats"] == {"signal-cli": SIGNAL_CLI_CAVEAT}
    (listed,) = [c for c in data["channels"] if c["name"] == "signal-cli"]
    assert listed["caveat"] == SIGNAL_CLI_CAVEAT
    for series in ("signal-cli\u2020 stateless", "signal-cli\u2020 stateful"):
        # The plots' group labels; each plot prints the caveat under the marked groups.
        assert data["plot_series"][series] == SIGNAL_CLI_CAVEAT
    assert SIGNAL_CLI_CAVEAT in (out / "report.md").read_text()
    assert "| signal-cli \u2020 | stateless | 2/2 |" in (out / "report.md").read_text()
    assert html.escape(SIGNAL_CLI_CAVEAT) in (out / "report.html").read_text()
    assert SIGNAL_CLI_CAVEAT in result.summary_text()


async def test_signal_cli_row_says_not_run_when_the_fake_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "tigress_signal.testing.fake_signal_cli", None)
    channel = _SignalCliChannel(tmp_path, CompareSettings(progress=False))
    assert not await channel.try_setup()
    assert channel.run.status == "not run"
    assert channel.run.note.startswith("not run: ModuleNotFoundError")
    assert channel.run.transfers == [] and channel.run.setup == {}
    result = ComparisonResult(CompareSettings(), "now", channels=[channel.run])
    table = summary_markdown(result)
    assert "| signal-cli \u2020 | stateless | not run: ModuleNotFoundError" in table
    assert SIGNAL_CLI_CAVEAT in table


def test_report_files_are_written(run):
    _, out = run
    for name in (
        "report.md",
        "report.json",
        "report.html",
        "time_per_transfer.png",
        "bytes_per_transfer.png",
        "round_trips_per_transfer.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("time_per_transfer.png", "bytes_per_transfer.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "<script" not in page


def test_figures_come_from_the_run(run):
    _, out = run
    data = json.loads((out / "report.json").read_text())
    channels = {c["name"]: c for c in data["channels"]}
    for row in data["summary"]:
        if row["status"] != "run":
            continue
        transfers = [t for t in channels[row["channel"]]["transfers"] if t["kind"] == row["kind"]]
        assert row["median_ms"] == pytest.approx(
            statistics.median(t["total_ms"] for t in transfers)
        )
        for party in ("sender", "receiver"):
            mean = statistics.fmean(t["parties"][party]["round_trips"] for t in transfers)
            assert row[f"{party}_round_trips"] == pytest.approx(mean)
            assert row[f"{party}_bytes_sent"] > 0 and row[f"{party}_bytes_received"] > 0
    for channel in channels.values():
        for transfer in channel["transfers"]:
            # A transfer's totals are the sum of its steps, per party.
            for party, totals in transfer["parties"].items():
                for measure in ("bytes_sent", "http_requests"):
                    steps = sum(s["parties"][party][measure] for s in transfer["steps"])
                    assert steps == totals[measure]
            assert transfer["total_ms"] == pytest.approx(sum(s["ms"] for s in transfer["steps"]))


def test_what_each_server_stored_is_measured(run):
    result, _ = run
    signal = result.findings["intermediary"]
    relay = result.findings["tigress-relay"]
    linking = {c.column for c in signal.linking_columns}
    # One sender and one recipient across three transfers: the intermediary can link them all.
    assert {"messages.source_uuid", "messages.account_uuid"} <= linking
    assert signal.pairs_linked >= 1
    assert relay.linking_columns == []
    assert relay.pairs_linked == 0
    assert {c.column for c in relay.columns_of("display")} >= {"mailboxes.display_title"}
    assert not signal.stores_addresses and not relay.stores_addresses
    assert relay.tables["mailboxes"]["rows_left"] == 0  # every mailbox was deleted


def test_property_checks_are_backed_by_the_run(run):
    result, out = run
    checks = result.checks
    assert checks["secret_never_sent"]["passed"]
    assert checks["secret_never_sent"]["shares"] == 3
    opened = checks["one_key_opens_a_whole_share"]
    # Stateless: offer + accepted; stateful: offer, request, endorsement, accepted.
    assert opened["payloads_stored"] == 2 * 2 + 4
    assert opened["opened_with_the_link_secret"] == opened["payloads_stored"]
    assert opened["opened_with_another_shares_secret"] == 0
    assert checks["relay_accounts"]["distinct_sender_claims"] == 3
    assert checks["signal_sessions"]["accounts_stored"] == 2
    assert checks["signal_sessions"]["prekey_messages"] >= 1
    markdown = (out / "report.md").read_text()
    assert "| Forward secrecy |" in markdown
    assert f"opened {opened['payloads_stored']} of {opened['payloads_stored']}" in markdown


async def test_hardened_mode_runs_through_compare(tmp_path: Path):
    settings = CompareSettings(
        stateless=1, stateful=0, out=tmp_path / "r", hardened=True, progress=False
    )
    result = await run_comparison(settings)
    assert result.all_completed
    properties = {
        p["property"]: p
        for p in json.loads((tmp_path / "r" / "report.json").read_text())["properties"]
    }
    assert properties["Relay replaying or reflecting an old message"]["tigress"] == "detected"
    assert result.checks["one_key_opens_a_whole_share"]["opened_with_the_link_secret"] == 2


async def test_the_counting_proxy_counts_requests_and_bytes(tmp_path: Path):
    async with running_relay(tmp_path) as relay:
        host, port = "127.0.0.1", int(relay.url.rsplit(":", 1)[1])
        async with CountingProxy(host, port) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, trust_env=False) as http:
                for _ in range(3):
                    assert (await http.get("/health")).status_code == 200
            await asyncio.sleep(0.05)
            counts = proxy.counts.copy()
    assert counts.connections == 1
    assert counts.http_requests == 3
    assert counts.round_trips == 4
    assert counts.bytes_sent > 3 * len("GET /health HTTP/1.1\r\n")
    assert counts.bytes_received > 3 * len('{"status":"ok"}')
    assert counts.unparsed == 0


def test_cli_refuses_nothing_to_compare(tmp_path: Path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tigress_signal",
            "compare",
            "--stateless",
            "0",
            "--stateful",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1
