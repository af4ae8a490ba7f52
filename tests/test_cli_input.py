"""The command line refuses bad input with one line and a non-zero status, and leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tigress_signal", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )


def refused(result: subprocess.CompletedProcess[str], status: int, words: str) -> None:
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["sync", "--wallet", "w", "--idle", "nan"], "must be at least 0"),
        (["sync", "--wallet", "w", "--idle", "-1"], "must be at least 0"),
        (["inbox", "--wallet", "w", "--idle", "soon"], "is not a number of seconds"),
        (["accept", "--wallet", "w", "x", "--wait", "inf"], "at most 86400"),
        (
            ["share", "--wallet", "w", "--to", "x", "--access-token", "a", "--title", "t",
             "--expires-in", "1e30"],
            "at most 8760",
        ),
        (
            ["share", "--wallet", "w", "--to", "x", "--digital-key", "d", "--title", "t",
             "--valid-days", "-1"],
            "must be more than 0",
        ),
    ],
)  # fmt: skip
def test_bad_numbers_are_usage_errors(args, words):
    refused(cli(*args), 2, words)


def test_init_refuses_an_empty_folder_name(tmp_path):
    refused(cli("wallet", "init", "", "--server", "http://127.0.0.1:9", cwd=tmp_path), 1, "name")
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("mine")
    refused(
        cli("wallet", "init", str(tmp_path / "f"), "--server", "http://127.0.0.1:9"),
        1,
        "not a folder",
    )
    assert (tmp_path / "f").read_text() == "mine"


def test_init_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    refused(cli("wallet", "init", str(tmp_path), "--server", "http://127.0.0.1:9"), 1, "not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("garbage", "server URL"),
        ("ftp://127.0.0.1/x", "server URL"),
        ("http://127.0.0.1:99999", "server URL"),
        ("http://user:pw@127.0.0.1:9", "leave out the user name and password"),
    ],
)
def test_init_refuses_a_bad_server_url_and_creates_nothing(tmp_path, url, words):
    refused(cli("wallet", "init", str(tmp_path / "w"), "--server", url), 1, words)
    assert not (tmp_path / "w").exists()


def test_init_against_no_server_fails_cleanly_and_leaves_no_half_wallet(tmp_path):
    # Port 9 (discard) on loopback: nothing listens there on this machine.
    result = cli("wallet", "init", str(tmp_path / "w"), "--server", "http://127.0.0.1:9")
    refused(result, 1, "error:")
    assert not (tmp_path / "w").exists()


def test_commands_on_a_missing_wallet_say_so(tmp_path):
    refused(cli("wallet", "show", str(tmp_path / "nope")), 1, "no wallet folder")
    refused(cli("export", "--wallet", str(tmp_path / "nope"), "x", "--out", "o"), 1, "error:")


def test_a_wait_that_runs_out_says_so(monkeypatch, tmp_path, capsys):
    # TimeoutError is an OSError in Python 3.11: it must not come out as an empty "error: ".
    from tigress_signal import cli

    async def times_out(args: object) -> int:
        raise TimeoutError

    monkeypatch.setattr(cli, "_inbox", times_out)
    assert cli.main(["inbox", "--wallet", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "timed out waiting for the peer" in err and "stays pending" in err
