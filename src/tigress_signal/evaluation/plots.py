"""The report's PNG plots, drawn with matplotlib's Agg backend (no display needed).

Three figures, each with one group per channel and transfer kind: the time of each transfer
(every transfer as a dot, the median as a bar), bytes per transfer and round trips per
transfer (sender and receiver side by side, means with the spread as error bars).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt

_SENDER_COLOUR = "#3b6fb6"
_RECEIVER_COLOUR = "#d9822b"


def draw_plots(series: Mapping[str, Any], folder: Path) -> list[Path]:
    """Draw the three plots into ``folder``; returns their paths (none when nothing ran)."""
    if not series:
        return []
    labels = list(series)
    paths = [
        _time_plot(labels, [series[k]["ms"] for k in labels], folder / "time_per_transfer.png"),
        _pair_plot(
            labels,
            [series[k]["bytes"] for k in labels],
            "bytes per transfer (sent + received, incl. headers)",
            folder / "bytes_per_transfer.png",
        ),
        _pair_plot(
            labels,
            [series[k]["round_trips"] for k in labels],
            "round trips per transfer (TCP set-ups + HTTP requests)",
            folder / "round_trips_per_transfer.png",
        ),
    ]
    return paths


def _time_plot(labels: Sequence[str], values: Sequence[Sequence[float]], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=100)
    positions = range(len(labels))
    medians = [statistics.median(v) if v else 0.0 for v in values]
    axes.bar(positions, medians, color="#c9d6ea", label="median")
    for x, points in zip(positions, values, strict=True):
        axes.scatter([x] * len(points), points, color=_SENDER_COLOUR, s=14, zorder=3)
    axes.set_xticks(list(positions), labels, rotation=15, ha="right")
    axes.set_ylabel("ms")
    axes.set_title("time per transfer (each dot one transfer)")
    axes.legend(loc="upper left")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _pair_plot(
    labels: Sequence[str],
    values: Sequence[Mapping[str, Sequence[float]]],
    title: str,
    path: Path,
) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=100)
    width = 0.38
    for offset, party, colour in (
        (-width / 2, "sender", _SENDER_COLOUR),
        (width / 2, "receiver", _RECEIVER_COLOUR),
    ):
        means = [statistics.fmean(v[party]) if v[party] else 0.0 for v in values]
        spread = [statistics.pstdev(v[party]) if len(v[party]) > 1 else 0.0 for v in values]
        axes.bar(
            [i + offset for i in range(len(labels))],
            means,
            width,
            yerr=spread,
            capsize=3,
            color=colour,
            label=party,
        )
    axes.set_xticks(list(range(len(labels))), labels, rotation=15, ha="right")
    axes.set_title(title)
    axes.legend(loc="upper left")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
