"""Linking a second device through the command line, each step in its own process, and a share
that the second device redeems while the first one is told it is taken.
"""

from __future__ import annotations

from pathlib import Path

from test_transfer_processes import cli, ok, server

__all__ = ["server"]  # the fixture is used by name below


def test_three_link_steps_across_processes_then_one_device_redeems(server, tmp_path: Path):
    phone, tablet, alice = tmp_path / "phone", tmp_path / "tablet", tmp_path / "alice"
    bob_id = ok("wallet", "init", str(phone), "--server", server)
    alice_id = ok("wallet", "init", str(alice), "--server", server)

    # 1. The new device makes its request.
    step = cli("wallet", "link-request", str(tablet))
    assert step.returncode == 0, step.stderr
    request = step.stdout.strip()
    assert request.startswith("tslink1-req.") and "\n" not in request
    check_code = step.stderr.split("check code ", 1)[1].split(":", 1)[0]
    assert ok("wallet", "link-request", str(tablet), "--show") == request

    # 2. The existing device answers it, warning where the answer may go.
    step = cli("wallet", "link", "--wallet", str(phone), request)
    assert step.returncode == 0, step.stderr
    answer = step.stdout.strip()
    assert answer.startswith("tslink1-ans.")
    assert "only into your own new device" in step.stderr
    assert check_code in step.stderr

    # A wrong paste is one line of error, and the folder still waits.
    step = cli("wallet", "link-finish", str(tablet), request)
    assert step.returncode == 1
    assert step.stderr.startswith("error: this is a link request, not a link answer")
    assert "Traceback" not in step.stderr
    step = cli("wallet", "show", str(tablet))
    assert step.returncode == 1 and "waiting to be linked" in step.stderr

    # 3. The new device finishes and opens like any other wallet.
    assert ok("wallet", "link-finish", str(tablet), answer) == (
        f"linked as device 2 of account {bob_id}"
    )
    assert f"account   {bob_id}" in ok("wallet", "show", str(tablet))
    listed = ok("wallet", "devices", "--wallet", str(tablet)).splitlines()
    assert [line.split()[1] for line in listed] == ["1", "2"]
    assert listed[1].endswith("(this device)")

    # Alice offers to Bob's account: both devices list it; the tablet takes it.
    offer = ("--access-token", "room:5", "--title", "Room 5")
    share_id = ok("share", "--wallet", str(alice), "--to", bob_id, *offer)
    for device in (phone, tablet):
        assert share_id in ok("inbox", "--wallet", str(device))
    assert ok("accept", "--wallet", str(tablet), share_id) == "accepted"
    ok("sync", "--wallet", str(alice), "--idle", "2")
    phone_inbox = ok("inbox", "--wallet", str(phone), "--idle", "2")
    (line,) = [line for line in phone_inbox.splitlines() if line.startswith(share_id)]
    assert " taken " in line
    assert "credential" not in phone_inbox
    assert f"credential {share_id}" in ok("inbox", "--wallet", str(tablet))
    alice_inbox = ok("inbox", "--wallet", str(alice))
    assert " accepted " in alice_inbox and alice_id != bob_id

    # The primary device removes the tablet.
    assert ok("wallet", "remove-device", "--wallet", str(phone), "2") == "removed device 2"
    assert len(ok("wallet", "devices", "--wallet", str(phone)).splitlines()) == 1
    step = cli("wallet", "remove-device", "--wallet", str(phone), "0")
    assert step.returncode == 2 and "not a device id" in step.stderr
