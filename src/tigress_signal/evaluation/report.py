"""The comparison report: ``report.json``, ``report.md``, PNG plots and ``report.html``.

Every figure comes from the :class:`~tigress_signal.evaluation.runner.ComparisonResult` of the
run; the only fixed text is the explanation of what a figure means and the design facts a run
cannot observe, which the properties table marks as such ("by design"). The HTML page is one
self-contained file: plots inlined as ``data:`` images, one inline style block allowed by its
hash in the page's Content-Security-Policy, no script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tigress_signal.errors import TigressSignalError
from tigress_signal.evaluation.plots import draw_plots

if TYPE_CHECKING:
    from tigress_signal.evaluation.runner import ChannelRun, ComparisonResult

log = logging.getLogger(__name__)

REPORT_TITLE = "Tigress-Signal: self-hosted Signal channel and Tigress relay, side by side"
#: Marks a channel whose figures carry a caveat; the caveat is printed with the mark.
CAVEAT_MARK = "\u2020"
_KINDS = ("stateless", "stateful")


def write_report(result: ComparisonResult, folder: Path) -> list[Path]:
    """Write every file of the report into ``folder``; returns their paths.

    Raises:
        TigressSignalError: the folder cannot be written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plots = draw_plots(plot_data(result), folder)
        data = report_data(result, [p.name for p in plots])
        json_path = folder / "report.json"
        json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", "utf-8")
        md_path = folder / "report.md"
        md_path.write_text(markdown(data), "utf-8")
        html_path = folder / "report.html"
        html_path.write_text(html_page(data, folder), "utf-8")
    except OSError as exc:
        raise TigressSignalError(
            f"cannot write the report into {folder}: {exc.strerror or exc}"
        ) from exc
    log.info("comparison report written to %s", folder)
    return [json_path, md_path, html_path, *plots]


# -- data ----------------------------------------------------------------------------------------


def summary_rows(result: ComparisonResult) -> list[dict[str, Any]]:
    """One row per channel and transfer kind, from the transfers of the run."""
    rows: list[dict[str, Any]] = []
    for channel in result.channels:
        for kind in _KINDS:
            transfers = [t for t in channel.transfers if t.kind == kind]
            if channel.status != "run":
                rows.append(
                    {
                        "channel": channel.name,
                        "kind": kind,
                        "status": channel.note,
                        "caveat": channel.caveat,
                    }
                )
                continue
            if not transfers:
                continue
            done = [t for t in transfers if t.completed and t.verified]
            row: dict[str, Any] = {
                "channel": channel.name,
                "kind": kind,
                "status": "run",
                "caveat": channel.caveat,
                "completed": f"{len(done)}/{len(transfers)}",
                "median_ms": _median([t.total_ms for t in done]),
            }
            for party in ("sender", "receiver"):
                for measure in ("http_requests", "round_trips", "bytes_sent", "bytes_received"):
                    row[f"{party}_{measure}"] = _mean(
                        [t.parties.get(party, {}).get(measure, 0) for t in done]
                    )
                row[f"{party}_pushes"] = _mean(
                    [t.parties.get(party, {}).get("pushes", 0) for t in done]
                )
            rows.append(row)
    return rows


def summary_markdown(result: ComparisonResult) -> str:
    """The summary table as Markdown."""
    return _summary_table(summary_rows(result))


def plot_data(result: ComparisonResult) -> dict[str, Any]:
    """What the plots draw: per channel and kind, the values of each completed transfer."""
    series: dict[str, Any] = {}
    for channel in result.channels:
        if channel.status != "run":
            continue
        for kind in _KINDS:
            done = [t for t in channel.transfers if t.kind == kind and t.completed]
            if not done:
                continue
            mark = CAVEAT_MARK if channel.caveat else ""
            series[f"{channel.name}{mark} {kind}"] = {
                "caveat": channel.caveat,
                "ms": [t.total_ms for t in done],
                "bytes": {
                    p: [t.parties[p]["bytes_sent"] + t.parties[p]["bytes_received"] for t in done]
                    for p in ("sender", "receiver")
                },
                "round_trips": {
                    p: [t.parties[p]["round_trips"] for t in done] for p in ("sender", "receiver")
                },
            }
    return series


def report_data(result: ComparisonResult, plot_names: Sequence[str]) -> dict[str, Any]:
    """The whole report as plain data (``report.json``); the other files are views of it."""
    return {
        "title": REPORT_TITLE,
        "started_at": result.started_at,
        "duration_s": round(result.duration_s, 2),
        "settings": {
            "stateless": result.settings.stateless,
            "stateful": result.settings.stateful,
            "relay_mode": "hardened" if result.settings.hardened else "as drafted",
            "relay_wait_seconds": result.settings.relay_wait_seconds,
        },
        "environment": result.environment,
        "method": METHOD,
        "caveats": {c.name: c.caveat for c in result.channels if c.caveat},
        "summary": summary_rows(result),
        "channels": [_channel_data(c) for c in result.channels],
        "stored": {name: f.as_dict() for name, f in result.findings.items()},
        "stored_overview": _stored_overview(result),
        "checks": result.checks,
        "properties": properties(result),
        "plots": list(plot_names),
        "plot_series": {label: s["caveat"] for label, s in plot_data(result).items()},
    }


METHOD = (
    "Both servers ran as separate processes on loopback with SQLite. Every party reached its "
    "server through its own counting proxy, so bytes include HTTP headers and WebSocket "
    "framing. A round trip is a TCP connection set-up or an HTTP request answered; WebSocket "
    "frames the server pushes are counted apart ('pushes'). Step times are wall-clock times "
    "measured by the run; the link hop of the relay channel (QR code, chat) is in memory and "
    "costs nothing here. What each server stored was recorded by SQLite triggers the run added "
    "to its database, including rows the server deleted again; each row is attributed to the "
    "transfer during which it was written. The first self-hosted transfer between two wallets "
    "also sets up their libsignal sessions (prekey bundles, PQXDH); later ones reuse them. Every "
    "relay transfer uses a new mailbox, secret and pair of device claims. Relay reads wait at "
    "the relay for news (the relay has no push service), so a pending read is counted when it "
    "is sent. The signal-cli channel ran against the package's fake signal-cli daemon and fake "
    "Signal service in the comparing process: each wallet's JSON-RPC traffic with that daemon "
    "went through its own counting proxy on a UNIX socket (a round trip is a JSON-RPC request "
    "answered, a push a notification the daemon sent); nothing went to Signal, and the fake "
    "adds up to 20 ms of jitter to each answer, so those figures are functional only and no "
    "server storage was measured for it."
)


def _channel_data(channel: ChannelRun) -> dict[str, Any]:
    return {
        "name": channel.name,
        "description": channel.description,
        "status": channel.status,
        "note": channel.note,
        "caveat": channel.caveat,
        "setup": channel.setup,
        "stats": channel.stats,
        "transfers": [
            {
                **{k: v for k, v in asdict(t).items() if k != "steps"},
                "steps": [asdict(s) for s in t.steps],
            }
            for t in channel.transfers
        ],
    }


def _stored_overview(result: ComparisonResult) -> list[dict[str, Any]]:
    """Per server: which stored columns identified whom, linked what, showed what, and when."""
    rows = []
    for server, findings in result.findings.items():

        def names(*kinds: str, _f: Any = findings) -> list[str]:
            return [c.column for c in _f.columns_of(*kinds)]

        rows.append(
            {
                "server": server,
                "sender_identifiers": names("sender"),
                "recipient_identifiers": names("recipient"),
                "party_identifiers": names("party"),
                "values_linking_transfers": [
                    f"{c.column} ({c.linking_values} value(s) across {c.linked_transfers} of "
                    f"{findings.transfers} transfers)"
                    for c in findings.linking_columns
                ],
                "sender_recipient_pairs_recurring": findings.pairs_linked,
                "display_information": names("display"),
                "timestamps": names("time"),
                "client_addresses_stored": findings.stores_addresses,
                "rows_left_after_run": {t: v["rows_left"] for t, v in findings.tables.items()},
            }
        )
    return rows


def properties(result: ComparisonResult) -> list[dict[str, str]]:
    """The properties table; each entry says whether the run checked it and what it found."""
    checks = result.checks
    sessions = checks.get("signal_sessions", {})
    opened = checks.get("one_key_opens_a_whole_share", {})
    secret = checks.get("secret_never_sent", {})
    accounts = checks.get("relay_accounts", {})
    signal_findings = result.findings.get("intermediary")
    relay_findings = result.findings.get("tigress-relay")
    mode = "hardened" if result.settings.hardened else "as drafted"

    def linking(findings: Any) -> str:
        if findings is None:
            return "not measured"
        columns = findings.linking_columns
        if not columns:
            return (
                f"no identifying stored value appears in two transfers "
                f"(checked over {findings.transfers} transfers)"
            )
        parts = [
            f"{c.column} links {c.linked_transfers} of {findings.transfers} transfers"
            for c in columns
        ]
        return "; ".join(parts) + f"; recurring sender/recipient pairs: {findings.pairs_linked}"

    rows = [
        {
            "property": "Forward secrecy",
            "selfhosted": "yes, by design (Double Ratchet over PQXDH)",
            "selfhosted_evidence": (
                f"run: {sessions.get('prekey_messages', 0)} PreKey and "
                f"{sessions.get('ratchet_messages', 0)} ratchet messages stored, "
                f"{sessions.get('one_time_prekeys_consumed', 0)} one-time prekeys consumed; "
                "erasure of old keys is not observable from outside"
            ),
            "tigress": "no",
            "tigress_evidence": (
                f"run: the link's secret opened {opened.get('opened_with_the_link_secret', 0)} "
                f"of {opened.get('payloads_stored', 0)} payloads the relay stored; a copy of "
                "the relay's data plus the link, at any later time, reads the whole exchange"
            ),
        },
        {
            "property": "Post-compromise security",
            "selfhosted": "yes, by design (each reply ratchets a new DH key)",
            "selfhosted_evidence": "by design; the run does not simulate a compromise",
            "tigress": "no",
            "tigress_evidence": (
                "run: one key opened both directions of every exchange "
                f"({opened.get('opened_with_the_link_secret', 0)} payloads); nothing renews it"
            ),
        },
        {
            "property": "Accounts needed",
            "selfhosted": "yes, one per wallet",
            "selfhosted_evidence": (
                f"run: the accounts table held {sessions.get('accounts_stored', 0)} rows after "
                "the run"
            ),
            "tigress": "none",
            "tigress_evidence": (
                f"run: relay tables {', '.join(accounts.get('tables', []))}; "
                f"{accounts.get('shares', 0)} shares used "
                f"{accounts.get('distinct_sender_claims', 0)} distinct sender claims and "
                f"{accounts.get('distinct_recipient_claims', 0)} distinct recipient claims"
            ),
        },
        {
            "property": "What the server can link from what it stores",
            "selfhosted": "sender and recipient of every message, across transfers",
            "selfhosted_evidence": "run: " + linking(signal_findings),
            "tigress": "the two devices of one mailbox, nothing across mailboxes",
            "tigress_evidence": "run: " + linking(relay_findings),
        },
        {
            "property": "Key material kept from the server",
            "selfhosted": "yes (libsignal; the server holds public keys and ciphertext)",
            "selfhosted_evidence": "by design; the server stores public prekeys only",
            "tigress": "yes, if the link stays private",
            "tigress_evidence": (
                f"run: {secret.get('occurrences', 0)} occurrences of any share secret in "
                f"{secret.get('bytes_searched', 0)} bytes the parties sent to the relay "
                f"({secret.get('shares', 0)} shares)"
            ),
        },
        {
            "property": "Relay replaying or reflecting an old message",
            "selfhosted": "detected (libsignal refuses duplicates and wrong sessions)",
            "selfhosted_evidence": "by design",
            "tigress": "detected" if result.settings.hardened else "not detected by the channel",
            "tigress_evidence": (
                f"this run used the {mode} mode; tests/test_relay_channel.py shows the drafted "
                "mode accepting a replayed and a reflected payload and the hardened mode "
                "refusing both (the share state machine still drops repeated message ids)"
            ),
        },
        {
            "property": "IP addresses, timing, sizes",
            "selfhosted": "seen by the server",
            "selfhosted_evidence": _addresses(signal_findings),
            "tigress": "seen by the server",
            "tigress_evidence": _addresses(relay_findings),
        },
    ]
    return rows


def _addresses(findings: Any) -> str:
    if findings is None:
        return "not measured"
    stored = "stored" if findings.stores_addresses else "not stored"
    timestamps = ", ".join(c.column for c in findings.columns_of("time")) or "none"
    return f"run: client addresses {stored}; timestamp columns written: {timestamps}"


# -- Markdown ------------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    """``report.md``."""
    lines = [f"# {data['title']}", ""]
    settings = data["settings"]
    lines += [
        f"Run started {data['started_at']}, took {data['duration_s']} s: "
        f"{settings['stateless']} stateless and {settings['stateful']} stateful transfers per "
        f"channel; relay channel {settings['relay_mode']}.",
        "",
        "## Summary",
        "",
        _summary_table(data["summary"]),
        "",
        "Times are medians of completed transfers; other figures are means per transfer. "
        "Round trips: connection set-ups plus HTTP or JSON-RPC requests. Pushes: WebSocket "
        "frames or JSON-RPC notifications the server sent.",
        "",
        "## Properties",
        "",
        "| property | self-hosted | evidence | Tigress relay | evidence |",
        "|---|---|---|---|---|",
    ]
    for row in data["properties"]:
        lines.append(
            f"| {row['property']} | {row['selfhosted']} | {row['selfhosted_evidence']} | "
            f"{row['tigress']} | {row['tigress_evidence']} |"
        )
    lines += ["", "## What each server stored", ""]
    lines += [
        "| | " + " | ".join(r["server"] for r in data["stored_overview"]) + " |",
        "|---|" + "---|" * len(data["stored_overview"]),
    ]
    for key, label in _STORED_LABELS:
        cells = [_cell(r[key]) for r in data["stored_overview"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Time per step (median ms)", ""]
    lines += _step_table(data)
    lines += ["", "## Set-up before any transfer", ""]
    lines += _markdown_table(_SETUP_HEADER, _setup_rows(data))
    lines += ["", "## Channels", ""]
    for channel in data["channels"]:
        status = channel["note"] or channel["status"]
        lines.append(f"- **{channel['name']}**: {channel['description']}. {status}")
        if channel["caveat"]:
            lines.append(f"  - **{channel['caveat']}**")
        failed = [t for t in channel["transfers"] if not (t["completed"] and t["verified"])]
        for transfer in failed:
            lines.append(
                f"  - {transfer['transfer_id']} failed: {transfer['error'] or 'did not verify'}"
            )
        if channel["stats"]:
            stats = ", ".join(f"{k} {v}" for k, v in channel["stats"].items())
            lines.append(f"  - channel counters: {stats}")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in data["plots"]]
    lines += ["", "## Method", "", data["method"], ""]
    return "\n".join(lines)


_STORED_LABELS = (
    ("sender_identifiers", "sender identifiers"),
    ("recipient_identifiers", "recipient identifiers"),
    ("party_identifiers", "other party identifiers"),
    ("values_linking_transfers", "values linking one transfer to another"),
    ("sender_recipient_pairs_recurring", "sender/recipient pairs in 2+ transfers"),
    ("display_information", "display information (clear text)"),
    ("timestamps", "timestamps"),
    ("client_addresses_stored", "client addresses stored"),
    ("rows_left_after_run", "rows left after the run"),
)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "<br>".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _summary_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "| channel | kind | completed | median ms | sender round trips | receiver round trips "
        "| sender bytes out/in | receiver bytes out/in | pushes (s/r) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        channel = _marked(row)
        if row.get("status") != "run":
            lines.append(f"| {channel} | {row['kind']} | {row['status']} | | | | | | |")
            continue
        lines.append(
            f"| {channel} | {row['kind']} | {row['completed']} | {row['median_ms']:.1f} "
            f"| {row['sender_round_trips']:.1f} | {row['receiver_round_trips']:.1f} "
            f"| {row['sender_bytes_sent']:.0f}/{row['sender_bytes_received']:.0f} "
            f"| {row['receiver_bytes_sent']:.0f}/{row['receiver_bytes_received']:.0f} "
            f"| {row['sender_pushes']:.1f}/{row['receiver_pushes']:.1f} |"
        )
    lines += ["", *(f"{CAVEAT_MARK} {caveat}" for caveat in _caveats(rows))]
    return "\n".join(lines).rstrip("\n")


def _marked(row: dict[str, Any]) -> str:
    """The channel's name, marked when its figures carry a caveat."""
    return f"{row['channel']} {CAVEAT_MARK}" if row.get("caveat") else str(row["channel"])


def _caveats(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["caveat"]) for r in rows if r.get("caveat")))


_STEP_HEADER = [
    "channel",
    "kind",
    "step",
    "median ms",
    "sender round trips",
    "receiver round trips",
]
_SETUP_HEADER = ["channel", "party", "ms", "round trips", "bytes sent", "bytes received"]


def _step_table(data: dict[str, Any]) -> list[str]:
    return _markdown_table(_STEP_HEADER, _step_rows(data))


def _step_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for channel in data["channels"]:
        for kind in _KINDS:
            transfers = [t for t in channel["transfers"] if t["kind"] == kind and t["completed"]]
            if not transfers:
                continue
            for index, step in enumerate(transfers[0]["steps"]):
                same = [t["steps"][index] for t in transfers if len(t["steps"]) > index]
                rows.append(
                    [
                        channel["name"],
                        kind,
                        step["name"],
                        f"{_median([s['ms'] for s in same]):.1f}",
                        f"{_mean([s['parties']['sender']['round_trips'] for s in same]):.1f}",
                        f"{_mean([s['parties']['receiver']['round_trips'] for s in same]):.1f}",
                    ]
                )
    return rows


def _setup_rows(data: dict[str, Any]) -> list[list[str]]:
    return [
        [
            channel["name"],
            party,
            f"{setup['ms']:.0f}",
            str(setup["round_trips"]),
            str(setup["bytes_sent"]),
            str(setup["bytes_received"]),
        ]
        for channel in data["channels"]
        for party, setup in channel["setup"].items()
    ]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- HTML ----------------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#1d1d24;"
    "padding:0 1rem}table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
    "th,td{border:1px solid #c8c8d0;padding:.3rem .5rem;text-align:left;vertical-align:top}"
    "th{background:#eef0f4}img{max-width:100%;border:1px solid #ddd;margin:.5rem 0}"
    "code{background:#f3f3f6;padding:0 .2rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
HTML_CSP = f"default-src 'none'; img-src data:; style-src 'sha256-{_STYLE_HASH}'"


def html_page(data: dict[str, Any], folder: Path) -> str:
    """``report.html``: the report as one page, plots inlined, no script."""
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{e(HTML_CSP)}">',
        f"<title>{e(data['title'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{e(data['title'])}</h1>",
        f"<p>Run started {e(data['started_at'])}, took {data['duration_s']} s; "
        f"{data['settings']['stateless']} stateless and {data['settings']['stateful']} stateful "
        f"transfers per channel; relay channel {e(data['settings']['relay_mode'])}.</p>",
        "<h2>Summary</h2>",
        _html_table(
            [
                "channel",
                "kind",
                "completed",
                "median ms",
                "sender round trips",
                "receiver round trips",
                "sender bytes out/in",
                "receiver bytes out/in",
            ],
            [_summary_cells(r) for r in data["summary"]],
        ),
        *(
            f"<p><strong>{CAVEAT_MARK} {e(caveat)}</strong></p>"
            for caveat in _caveats(data["summary"])
        ),
        "<h2>Properties</h2>",
        _html_table(
            ["property", "self-hosted", "evidence", "Tigress relay", "evidence"],
            [
                [
                    r["property"],
                    r["selfhosted"],
                    r["selfhosted_evidence"],
                    r["tigress"],
                    r["tigress_evidence"],
                ]
                for r in data["properties"]
            ],
        ),
        "<h2>What each server stored</h2>",
        _html_table(
            ["", *[r["server"] for r in data["stored_overview"]]],
            [
                [label, *[_cell(r[key]).replace("<br>", "; ") for r in data["stored_overview"]]]
                for key, label in _STORED_LABELS
            ],
        ),
        "<h2>Time per step (median ms)</h2>",
        _html_table(_STEP_HEADER, _step_rows(data)),
        "<h2>Set-up before any transfer</h2>",
        _html_table(_SETUP_HEADER, _setup_rows(data)),
        "<h2>Plots</h2>",
    ]
    for name in data["plots"]:
        encoded = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(name)}" src="data:image/png;base64,{encoded}"></figure>'
        )
    parts += [f"<h2>Method</h2><p>{e(data['method'])}</p>", "</body></html>", ""]
    return "\n".join(parts)


def _summary_cells(row: dict[str, Any]) -> list[str]:
    if row.get("status") != "run":
        return [_marked(row), row["kind"], row["status"], "", "", "", "", ""]
    return [
        _marked(row),
        row["kind"],
        row["completed"],
        f"{row['median_ms']:.1f}",
        f"{row['sender_round_trips']:.1f}",
        f"{row['receiver_round_trips']:.1f}",
        f"{row['sender_bytes_sent']:.0f}/{row['sender_bytes_received']:.0f}",
        f"{row['receiver_bytes_sent']:.0f}/{row['receiver_bytes_received']:.0f}",
    ]


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0
