"""Load: many wallets running many shares at once through one intermediary.

``python -m benchmarks.share_load`` (defaults: 50 wallets, 20 shares each) starts one
intermediary on loopback (SQLite in a temporary folder), creates the wallets in this process
(each with its own libsignal sidecar), and has every wallet offer stateless credentials to
others chosen round-robin: each wallet runs its shares one after another, all wallets at once.
Each receiver accepts as its offers arrive. It checks
that every credential arrived exactly once and prints the 50th and 99th percentile share times
(offer sent to the sender seeing ``accepted``), with the total throughput.

It is a benchmark, not a test: it takes minutes on a small machine and its figures depend on
the machine. Progress is printed as shares complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tigress_signal.credentials import ProvisioningInformation
from tigress_signal.errors import ChannelError
from tigress_signal.intermediary.config import IntermediaryConfig, RateLimit
from tigress_signal.intermediary.server import IntermediaryServer
from tigress_signal.shares.states import ShareState
from tigress_signal.wallet.wallet import Wallet

WAIT = 600.0


async def run(wallet_count: int, shares_each: int) -> dict[str, object]:
    """Run the load and return its figures."""
    with tempfile.TemporaryDirectory(prefix="tigress-load-") as tmp:
        folder = Path(tmp)
        # Generous limits: this measures the system under load, not its abuse limits.
        config = IntermediaryConfig(
            port=0,
            database_url=f"sqlite:///{folder / 'intermediary.db'}",
            message_rate=RateLimit(burst=100_000, per_second=100_000.0),
            bundle_fetch_rate=RateLimit(burst=100_000, per_second=100_000.0),
            address_rate=RateLimit(burst=1_000_000, per_second=1_000_000.0),
            account_creation_rate=RateLimit(burst=100_000, per_second=100_000.0),
        )
        async with IntermediaryServer(config) as server:
            started = time.perf_counter()
            wallets: list[Wallet] = []
            for n in range(wallet_count):
                wallets.append(await Wallet.create(folder / f"w{n}", server.url))
                _progress(f"wallets {n + 1}/{wallet_count}")
            print(f"\ncreated {wallet_count} wallets in {time.perf_counter() - started:.1f} s")
            async with contextlib.AsyncExitStack() as stack:
                for wallet in wallets:
                    await stack.enter_async_context(wallet)
                    task = asyncio.create_task(wallet.shares.run())
                    stack.push_async_callback(_stop, task)
                return await _load(wallets, shares_each)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _load(wallets: list[Wallet], shares_each: int) -> dict[str, object]:
    total = len(wallets) * shares_each
    done = 0
    durations: list[float] = []

    retries = 0

    async def one(sender: Wallet, receiver: Wallet, n: int) -> None:
        nonlocal done, retries
        text = f"{sender.account_id}#{n}".encode()
        began = time.perf_counter()
        for _attempt in range(5):
            try:
                share = await sender.shares.offer_provisioning(
                    receiver.account_id,
                    ProvisioningInformation(media_type="text/plain", content=text),
                    title=f"load {n}",
                )
                break
            except ChannelError:
                # Nothing was stored: the offer did not happen, and is made again, as a
                # person would. Counted, so the figures show it.
                retries += 1
                await asyncio.sleep(0.5)
        else:
            raise RuntimeError("an offer failed five times")
        await receiver.shares.wait_for(share.share_id, [ShareState.OFFERED], WAIT)
        await receiver.shares.accept(share.share_id)
        await sender.shares.wait_for(share.share_id, [ShareState.ACCEPTED], WAIT)
        durations.append(time.perf_counter() - began)
        done += 1
        if done % 10 == 0 or done == total:
            _progress(f"shares {done}/{total}")

    async def wallet_shares(i: int, sender: Wallet) -> None:
        # Each wallet runs its shares one after another; the wallets run at the same time.
        for n in range(shares_each):
            await one(sender, wallets[(i + 1 + n % (len(wallets) - 1)) % len(wallets)], n)

    began = time.perf_counter()
    await asyncio.gather(*(wallet_shares(i, sender) for i, sender in enumerate(wallets)))
    elapsed = time.perf_counter() - began
    print()

    # Every credential arrived exactly once, in the wallet it was meant for.
    received = [c.content for w in wallets for c in w.shares.credentials()]
    lost = total - len(set(received))
    duplicated = len(received) - len(set(received))
    ordered = sorted(durations)
    figures: dict[str, object] = {
        "wallets": len(wallets),
        "shares": total,
        "received": len(received),
        "distinct_received": len(set(received)),
        "offer_retries": retries,
        "lost": lost,
        "duplicated": duplicated,
        "seconds": round(elapsed, 2),
        "shares_per_second": round(total / elapsed, 2),
        "p50_share_seconds": round(statistics.median(ordered), 3),
        "p99_share_seconds": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }
    print(json.dumps(figures, indent=2))
    return figures


def _progress(text: str) -> None:
    print(f"\r{text}", end="", file=sys.stdout, flush=True)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wallets", type=int, default=50)
    parser.add_argument("--shares", type=int, default=20, help="shares each wallet offers")
    parser.add_argument("--out", type=Path, default=Path("bench-results/share_load.json"))
    args = parser.parse_args()
    if args.wallets < 2 or args.shares < 1:
        parser.error("at least 2 wallets and 1 share each")
    figures = asyncio.run(run(args.wallets, args.shares))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["lost"] == figures["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
