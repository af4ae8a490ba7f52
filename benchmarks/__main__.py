"""``python -m benchmarks`` (``make bench``): libsignal throughput, Python API against raw."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

from benchmarks.libsignal_throughput import Settings, report, run


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--runs", type=int, default=defaults.runs)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="per measurement")
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--payload", type=int, default=defaults.payload, help="bytes")
    parser.add_argument(
        "--conversations", type=int, default=defaults.conversations, help="for the concurrent case"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/libsignal_throughput.json"),
        help="where to write the results as JSON",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    settings = Settings(args.runs, args.seconds, args.warmup, args.payload, args.conversations)
    results = asyncio.run(run(settings))
    summary = report(settings, results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
