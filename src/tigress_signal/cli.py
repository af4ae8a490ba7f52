"""``tigress-signal``: the command line.

Every command a script needs to run a transfer across separate processes (``serve``,
``wallet init``, ``share``, ``inbox``, ``accept``, ``decline``, ...), plus ``demo``, which runs
both kinds of transfer end to end on this machine. Errors a user can cause end as one line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import qrcode
from pydantic import ValidationError

from tigress_signal import __version__
from tigress_signal.credentials import (
    ReferenceLock,
    provisioning_from_file,
)
from tigress_signal.credentials.messages import MAX_DEVICE_ID, describe_validation_error
from tigress_signal.errors import ConfigError, TigressSignalError, UntrustedIdentity
from tigress_signal.shares.service import DigitalKeyTerms, Share
from tigress_signal.shares.states import ShareState
from tigress_signal.signal_cli.commands import add_commands as add_signal_cli_commands
from tigress_signal.wallet.wallet import Wallet

log = logging.getLogger(__name__)

#: Exit statuses: 1 for an operation that failed, 2 for a command line that makes no sense.
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    # A server logs what it does (it has no other output); other commands only when asked.
    chatty = args.log or getattr(args, "run", None) in (_serve, _relay_serve)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if chatty else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    try:
        status: int = asyncio.run(args.run(args))
    except UntrustedIdentity as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(_untrusted_hint(args, exc.peer), file=sys.stderr)
        return EXIT_FAILED
    except TigressSignalError as exc:
        print(f"error: {exc.user_message()}", file=sys.stderr)
        return EXIT_FAILED
    except ValidationError as exc:
        print(f"error: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError:
        # Before OSError, of which it is a subclass (and which would print an empty message).
        print(
            "error: timed out waiting for the peer; the share stays pending"
            " (see it with inbox, go on with sync or accept later)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tigress-signal",
        description="Move digital credentials between wallets over the Signal protocol.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log", action="store_true", help="log each step (INFO) to stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo", help="run both transfers end to end on this machine")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="run the self-hosted intermediary")
    serve.add_argument("--config", type=Path, help="intermediary TOML configuration file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on")
    serve.add_argument("--database", help="database URL, e.g. sqlite:///var/intermediary.db")
    serve.set_defaults(run=_serve)

    relay = commands.add_parser("relay", help="the Tigress mailbox relay").add_subparsers(
        title="relay commands", metavar="COMMAND", required=True
    )
    relay_serve = relay.add_parser("serve", help="run a Tigress mailbox relay")
    relay_serve.add_argument("--config", type=Path, help="relay TOML configuration file")
    relay_serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    relay_serve.add_argument("--port", type=int, help="port to listen on (default 8480)")
    relay_serve.add_argument("--database", help="database URL, e.g. sqlite:///relay.db")
    relay_serve.add_argument(
        "--public-url", help="origin share links name, e.g. https://relay.example"
    )
    relay_serve.set_defaults(run=_relay_serve)

    compare = commands.add_parser(
        "compare", help="run transfers over each channel and write a comparison report"
    )
    compare.add_argument(
        "--stateless", type=int, default=3, help="stateless transfers per channel"
    )
    compare.add_argument("--stateful", type=int, default=3, help="stateful transfers per channel")
    compare.add_argument("--out", type=Path, default=Path("compare-report"), help="report folder")
    compare.add_argument(
        "--hardened",
        action="store_true",
        help="relay channel in the hardened mode (AEAD position)",
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare.set_defaults(run=_compare)

    wallet = commands.add_parser("wallet", help="create or show a wallet").add_subparsers(
        title="wallet commands", metavar="COMMAND", required=True
    )
    init = wallet.add_parser("init", help="create a wallet folder and register it")
    init.add_argument("folder", type=Path)
    init.add_argument("--server", required=True, help="the intermediary's URL")
    init.add_argument("--trust", choices=["tofu", "always", "verify"], default="tofu")
    init.set_defaults(run=_wallet_init)
    show = wallet.add_parser("show", help="print a wallet's account, device, channel and server")
    show.add_argument("folder", type=Path)
    show.set_defaults(run=_wallet_show)
    link_request = wallet.add_parser(
        "link-request", help="new device: make a wallet folder waiting to be linked"
    )
    link_request.add_argument("folder", type=Path, help="a new or empty folder for the device")
    link_request.add_argument(
        "--show", action="store_true", help="print the request of a folder already waiting"
    )
    link_request.set_defaults(run=_wallet_link_request)
    link = wallet.add_parser("link", help="existing device: answer a new device's link request")
    link.add_argument("--wallet", type=Path, required=True, help="the existing device's folder")
    link.add_argument("request", help="the line 'wallet link-request' printed on the new device")
    link.set_defaults(run=_wallet_link)
    link_finish = wallet.add_parser(
        "link-finish", help="new device: link the waiting folder with the existing one's answer"
    )
    link_finish.add_argument("folder", type=Path, help="the folder 'wallet link-request' made")
    link_finish.add_argument("answer", help="the line 'wallet link' printed on the other device")
    link_finish.set_defaults(run=_wallet_link_finish)
    devices = wallet.add_parser("devices", help="list the devices of a wallet's account")
    devices.add_argument("--wallet", type=Path, required=True, help="any device's wallet folder")
    devices.set_defaults(run=_wallet_devices)
    remove = wallet.add_parser(
        "remove-device",
        help="remove a device from a wallet's account",
        description="The primary device (1) may remove any other device; another device may"
        " remove only itself. A removed device cannot connect again; link it anew from a new"
        " folder.",
    )
    remove.add_argument("--wallet", type=Path, required=True, help="the removing device's folder")
    remove.add_argument(
        "device_id", type=_device_id, metavar="ID", help="the device id, as 'wallet devices' lists"
    )
    remove.set_defaults(run=_wallet_remove_device)
    reset = wallet.add_parser(
        "reset-identity",
        help="register the wallet's account again with a new identity key (as a reinstall does)",
    )
    reset.add_argument("folder", type=Path)
    reset.set_defaults(run=_wallet_reset_identity)

    share = commands.add_parser("share", help="offer a credential to another wallet")
    share.add_argument("--wallet", type=Path, required=True)
    share.add_argument("--to", required=True, metavar="ACCOUNT_ID", help="the receiver")
    kind = share.add_mutually_exclusive_group(required=True)
    kind.add_argument("--file", type=Path, help="offer this credential file, byte for byte")
    kind.add_argument("--access-token", metavar="SCOPE", help="issue and offer an access token")
    kind.add_argument("--digital-key", metavar="LOCK_ID", help="offer a digital key to a lock")
    share.add_argument("--media-type", help="media type of --file (guessed if absent)")
    share.add_argument("--title", required=True)
    share.add_argument("--description", default="")
    share.add_argument("--valid-days", type=_days, default=7.0, help="digital key validity (days)")
    share.add_argument("--expires-in", type=_hours, default=48.0, help="offer lifetime (hours)")
    share.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        help="seconds to wait for the share to end; the status is 1 unless it ends accepted",
    )
    share.set_defaults(run=_share)

    sync = commands.add_parser("sync", help="process arrived messages, then exit")
    sync.add_argument("--wallet", type=Path, required=True)
    sync.add_argument("--idle", type=_seconds, default=1.5, help="exit after this quiet time")
    sync.set_defaults(run=_sync)

    inbox = commands.add_parser("inbox", help="process arrived messages and list shares")
    inbox.add_argument("--wallet", type=Path, required=True)
    inbox.add_argument("--idle", type=_seconds, default=1.5, help="wait this long for messages")
    inbox.set_defaults(run=_inbox)

    for name, helptext in (("accept", "accept an offer"), ("decline", "decline an offer")):
        answer = commands.add_parser(name, help=helptext)
        answer.add_argument("--wallet", type=Path, required=True)
        answer.add_argument("share_id")
        answer.add_argument(
            "--wait", type=_seconds, default=30.0, help="seconds to wait for the share to complete"
        )
        answer.set_defaults(run=_accept if name == "accept" else _decline)

    cancel = commands.add_parser("cancel", help="withdraw from a share")
    cancel.add_argument("--wallet", type=Path, required=True)
    cancel.add_argument("share_id")
    cancel.set_defaults(run=_cancel)

    export = commands.add_parser("export", help="write a received credential to a file")
    export.add_argument("--wallet", type=Path, required=True)
    export.add_argument("share_id")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.set_defaults(run=_export)

    safety = commands.add_parser(
        "safety-number", help="show the safety number to compare with a peer"
    )
    safety.add_argument("--wallet", type=Path, required=True)
    safety.add_argument("peer", metavar="ACCOUNT_ID")
    safety.add_argument("--no-qr", action="store_true", help="digits only, no QR code")
    safety.set_defaults(run=_safety_number)

    trust = commands.add_parser(
        "trust", help="trust a peer's current identity key, then process its kept messages"
    )
    trust.add_argument("--wallet", type=Path, required=True)
    trust.add_argument("peer", metavar="ACCOUNT_ID")
    # Trusting a key nobody compared is what an attacker in the middle hopes for: the user has
    # to either give the digits or say plainly that they did not compare them.
    compared = trust.add_mutually_exclusive_group(required=True)
    compared.add_argument(
        "--safety-number",
        metavar="DIGITS",
        help="the 60 digits compared with the peer; nothing is trusted unless they match",
    )
    compared.add_argument(
        "--without-comparing",
        action="store_true",
        help="trust the key without comparing safety numbers (not recommended)",
    )
    trust.set_defaults(run=_trust)

    add_signal_cli_commands(commands)

    lock = commands.add_parser("lock", help="the reference lock").add_subparsers(
        title="lock commands", metavar="COMMAND", required=True
    )
    owner = lock.add_parser("owner-key", help="print the owner's public key for a lock")
    owner.add_argument("--wallet", type=Path, required=True)
    owner.add_argument("lock_id")
    owner.set_defaults(run=_lock_owner_key)
    attempt = lock.add_parser("try", help="open the reference lock with a received key")
    attempt.add_argument("--wallet", type=Path, required=True)
    attempt.add_argument("share_id")
    attempt.add_argument(
        "--owner-key", required=True, help="owner public key (hex, from owner-key)"
    )
    attempt.set_defaults(run=_lock_try)
    return parser


def _bounded(name: str, low: float, high: float, *, low_ok: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of ``name`` within [low or (low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {name}") from None
        above_low = value >= low if low_ok else value > low
        if not (math.isfinite(value) and above_low and value <= high):
            bound = "at least" if low_ok else "more than"
            raise argparse.ArgumentTypeError(
                f"{text} {name}: must be {bound} {low:g} and at most {high:g}"
            )
        return value

    return parse


_seconds = _bounded("seconds", 0, 24 * 3600, low_ok=True)
_hours = _bounded("hours", 0, 24 * 365, low_ok=False)
_days = _bounded("days", 0, 3650, low_ok=False)


def _device_id(text: str) -> int:
    """An argparse type: a device id, 1 to 127, in ASCII digits."""
    # str.isdigit() alone also passes a superscript two (which int() refuses) and other
    # scripts' digits (which int() reads), so "1" would have more than one spelling.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_DEVICE_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device id (1 to {MAX_DEVICE_ID})")
    return int(text)


# -- commands ---------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from tigress_signal.intermediary.config import load_intermediary_config
    from tigress_signal.intermediary.server import serve

    overrides = {"host": args.host, "port": args.port, "database_url": args.database}
    config = load_intermediary_config(
        args.config, {k: v for k, v in overrides.items() if v is not None}
    )
    await serve(config)
    return 0


async def _relay_serve(args: argparse.Namespace) -> int:
    from tigress_signal.relay.config import load_relay_config
    from tigress_signal.relay.server import serve as serve_relay

    overrides = {
        "host": args.host,
        "port": args.port,
        "database_url": args.database,
        "public_url": args.public_url,
    }
    config = load_relay_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    await serve_relay(config)
    return 0


async def _compare(args: argparse.Namespace) -> int:
    from tigress_signal.evaluation.runner import CompareSettings, run_comparison

    if args.stateless < 0 or args.stateful < 0 or args.stateless + args.stateful == 0:
        raise ConfigError("--stateless and --stateful must be 0 or more, and not both 0")
    settings = CompareSettings(
        stateless=args.stateless,
        stateful=args.stateful,
        out=args.out,
        hardened=args.hardened,
        progress=not args.no_progress,
    )
    result = await run_comparison(settings)
    print(result.summary_text())
    print(f"report written to {args.out}/ (report.md, report.json, report.html, plots)")
    return 0 if result.all_completed else EXIT_FAILED


async def _wallet_init(args: argparse.Namespace) -> int:
    wallet = await Wallet.create(args.folder, args.server, trust_policy=args.trust)
    async with wallet:
        print(wallet.account_id)
    return 0


async def _wallet_show(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.folder) as wallet:
        print(f"account   {wallet.account_id}")
        if wallet.config.channel == "selfhosted":
            print(f"device    {wallet.account.device_id}")
        print(f"channel   {wallet.config.channel}")
        if wallet.config.selfhosted is not None:
            print(f"server    {wallet.config.server_url()}")
    return 0


async def _wallet_link_request(args: argparse.Namespace) -> int:
    if args.show:
        request = Wallet.pending_link_request(args.folder)
    else:
        request = await Wallet.link_request(args.folder)
    print(request.line)
    print(
        f"check code {request.check_code}: the existing device shows it too; paste the line"
        " above into 'wallet link' there, then its answer into 'wallet link-finish' here",
        file=sys.stderr,
    )
    return 0


async def _wallet_link(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        answer = await wallet.answer_link(args.request)
    expires = datetime.fromtimestamp(answer.expires_at / 1000, UTC).isoformat(timespec="seconds")
    print(answer.line)
    print(
        f"This answer hands over your account's identity. Paste it only into your own new"
        f" device, the one showing check code {answer.check_code}; never send it to anyone."
        f" It works once, until {expires}.",
        file=sys.stderr,
    )
    return 0


async def _wallet_link_finish(args: argparse.Namespace) -> int:
    async with await Wallet.finish_link(args.folder, args.answer) as wallet:
        print(f"linked as device {wallet.account.device_id} of account {wallet.account_id}")
    return 0


async def _wallet_devices(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        own = wallet.account.device_id
        for device in await wallet.devices():
            created = datetime.fromtimestamp(device.created / 1000, UTC)
            mark = "  (this device)" if device.id == own else ""
            print(f"device {device.id}  added {created.isoformat(timespec='seconds')}{mark}")
    return 0


async def _wallet_remove_device(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        await wallet.remove_device(args.device_id)
        itself = args.device_id == wallet.account.device_id
    print(f"removed device {args.device_id}")
    if itself:
        print(
            f"that was this device: {args.wallet} can no longer connect; delete the folder, or"
            " link it again from a new one",
            file=sys.stderr,
        )
    return 0


async def _share(args: argparse.Namespace) -> int:
    try:
        return await _offer(args)
    except TigressSignalError as exc:
        if exc.stored_share is None:
            raise
        # The offer is stored and waits in the outbox: say so, so nobody offers it twice.
        print(exc.stored_share)
        print(
            f"the offer is stored but not sent yet: {exc.user_message()}; it goes out by itself"
            " once that is resolved (sync sends it); do not share again",
            file=sys.stderr,
        )
        if isinstance(exc, UntrustedIdentity):
            print(_untrusted_hint(args, exc.peer), file=sys.stderr)
        return EXIT_FAILED


async def _offer(args: argparse.Namespace) -> int:
    lifetime = timedelta(hours=args.expires_in)
    async with _running(args.wallet) as wallet:
        if args.file is not None:
            provisioning = provisioning_from_file(args.file, media_type=args.media_type)
            share = await wallet.shares.offer_provisioning(
                args.to,
                provisioning,
                title=args.title,
                description=args.description,
                lifetime=lifetime,
            )
        elif args.access_token is not None:
            share = await wallet.shares.offer_access_token(
                args.to,
                [args.access_token],
                title=args.title,
                description=args.description,
                lifetime=lifetime,
            )
        else:
            now = datetime.now(UTC)
            terms = DigitalKeyTerms(
                lock_id=args.digital_key,
                rights=("unlock",),
                not_before=now,
                not_after=now + timedelta(days=args.valid_days),
            )
            share = await wallet.shares.offer_digital_key(
                args.to, terms, title=args.title, description=args.description, lifetime=lifetime
            )
        print(share.share_id)
        if args.wait > 0:
            share = await wallet.shares.wait_for(share.share_id, _FINAL_STATES, args.wait)
            print(share.state.value)
            # A script tells an accepted share from a declined or cancelled one by the status.
            if share.state is not ShareState.ACCEPTED:
                return EXIT_FAILED
    return 0


async def _sync(args: argparse.Namespace) -> int:
    async with _running(args.wallet, idle=args.idle):
        pass
    return 0


async def _inbox(args: argparse.Namespace) -> int:
    async with _running(args.wallet, idle=args.idle) as wallet:
        shares = wallet.shares.shares()
        if not shares:
            print("no shares")
        for share in shares:
            print(_share_line(share))
        for credential in wallet.shares.credentials():
            size = len(credential.content)
            print(f"credential {credential.share_id} {credential.media_type} {size} bytes")
    return 0


async def _accept(args: argparse.Namespace) -> int:
    async with _running(args.wallet, idle=0.5) as wallet:
        share = await wallet.shares.accept(args.share_id)
        if share.state is ShareState.KEY_REQUESTED and args.wait > 0:
            share = await wallet.shares.wait_for(share.share_id, _FINAL_STATES, args.wait)
        print(share.state.value)
    # With --wait, a share still waiting for its endorsement means the wait ran out.
    waited_in_vain = args.wait > 0 and share.state is ShareState.KEY_REQUESTED
    if share.state is ShareState.TAKEN:
        # This device asked for the key, but the sender honoured another device's request.
        print(
            "error: another device of this account accepted the share first; the credential"
            " is on that device, not on this one",
            file=sys.stderr,
        )
    elif share.state.is_final and share.state is not ShareState.ACCEPTED:
        print(f"error: the share ended {share.state.value} while waiting", file=sys.stderr)
    ended_otherwise = share.state.is_final and share.state is not ShareState.ACCEPTED
    return EXIT_FAILED if waited_in_vain or ended_otherwise else 0


async def _decline(args: argparse.Namespace) -> int:
    async with _running(args.wallet, idle=0.5) as wallet:
        share = await wallet.shares.decline(args.share_id)
        print(share.state.value)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with _running(args.wallet, idle=0.5) as wallet:
        share = await wallet.shares.cancel(args.share_id)
        print(share.state.value)
    return 0


async def _export(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        credential = wallet.shares.credential(args.share_id)
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name the file to write")
    # A credential (a digital key holds its private key) is written readable by its owner
    # only, and never over an existing file unless asked.
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        descriptor = os.open(args.out, flags, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{args.out} exists", hint="choose another file or add --force to replace it"
        ) from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(credential.content)
    os.chmod(args.out, 0o600)
    print(f"{credential.media_type} {len(credential.content)} bytes -> {args.out}")
    return 0


async def _safety_number(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        number = await wallet.safety_number(args.peer)
        identity = wallet.peer_identity(args.peer)
    # The status goes to stderr so that stdout stays the number alone, for scripts.
    print(f"{identity.status()}", file=sys.stderr)
    if not identity.can_send:
        print(
            f"compare these digits with {args.peer}, then run:"
            f" tigress-signal trust --wallet {args.wallet} {args.peer} --safety-number DIGITS",
            file=sys.stderr,
        )
    groups = [number.digits[i : i + 5] for i in range(0, len(number.digits), 5)]
    for row in range(0, len(groups), 4):
        print(" ".join(groups[row : row + 4]))
    if not args.no_qr:
        code = qrcode.QRCode(border=1)
        code.add_data(number.scannable)
        code.print_ascii(out=sys.stdout, invert=True)
    return 0


async def _trust(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        changed = wallet.peer_identity(args.peer).changed
        processed = await wallet.trust(args.peer, args.safety_number)
    how = "" if args.safety_number else " without comparing safety numbers"
    print(f"trusted the {'new ' if changed else ''}identity key of {args.peer}{how}")
    print(f"processed {processed} kept message(s)")
    return 0


async def _wallet_reset_identity(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.folder) as wallet:
        account = await wallet.reset_identity()
    print(account.account_id)
    print(
        "registered again with a new identity key; peers will see that it changed",
        file=sys.stderr,
    )
    return 0


def _untrusted_hint(args: argparse.Namespace, peer: str) -> str:
    folder = getattr(args, "wallet", None) or getattr(args, "folder", None) or "FOLDER"
    who = peer or "PEER"
    return (
        f"hint: {who}'s identity key is new or changed and not trusted. Compare safety numbers"
        f" with {who} in person:\n"
        f"  tigress-signal safety-number --wallet {folder} {who}\n"
        f"then, if they match:\n"
        f"  tigress-signal trust --wallet {folder} {who} --safety-number DIGITS"
    )


async def _lock_owner_key(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        print(wallet.shares.existing_owner_key(args.lock_id).public_key_der.hex())
    return 0


async def _lock_try(args: argparse.Namespace) -> int:
    async with await Wallet.open(args.wallet) as wallet:
        key = wallet.shares.digital_key(args.share_id)
        try:
            owner_key = bytes.fromhex(args.owner_key)
        except ValueError:
            raise ConfigError(
                "--owner-key must be the hex text 'lock owner-key' printed"
            ) from None
        lock = ReferenceLock(key.endorsement.lock_id, owner_key)
        challenge = lock.challenge()
        lock.unlock(key.endorsement, key.holder.respond(challenge, key.endorsement.lock_id))
        print(f"lock {key.endorsement.lock_id}: unlocked")
    return 0


@contextlib.asynccontextmanager
async def _running(folder: Path, *, idle: float = 0.0) -> AsyncIterator[Wallet]:
    """Open a wallet with its receive loop running; on exit, first let it go quiet for ``idle``."""
    wallet = await Wallet.open(folder)
    try:
        loop_task = asyncio.create_task(wallet.shares.run(), name="receive loop")
        try:
            await _wait_idle_or_failed(wallet, loop_task, idle)
            yield wallet
            await _wait_idle_or_failed(wallet, loop_task, idle)
        finally:
            await wallet.channel.close()
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
    finally:
        await wallet.aclose()


async def _wait_idle_or_failed(wallet: Wallet, loop_task: asyncio.Task[None], idle: float) -> None:
    """Let the wallet go quiet for ``idle``; raise at once what ended its receive loop.

    A loop that ends with an error (the intermediary refused the device's credentials, say)
    must fail the command, not leave it to report an empty inbox as if all were well.
    """
    quiet = asyncio.create_task(wallet.shares.wait_idle(idle), name="wait idle")
    try:
        await asyncio.wait({quiet, loop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        quiet.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await quiet
    if loop_task.done() and not loop_task.cancelled():
        loop_task.result()  # raises the loop's error, if any


_FINAL_STATES = (
    ShareState.ACCEPTED,
    ShareState.DECLINED,
    ShareState.CANCELLED,
    ShareState.EXPIRED,
    ShareState.TAKEN,
)


def _share_line(share: Share) -> str:
    return (
        f"{share.share_id} {share.role:<8} {share.flow:<9} {share.state.value:<13}"
        f' {share.credential_format} "{share.title}" peer={share.peer}'
    )


# -- demo -------------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from tigress_signal.demo import run_demo

    return await run_demo()


if __name__ == "__main__":
    sys.exit(main())
