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
    """Draw the three plots into ``folder``; returns their paths (none when nothing ran).

    Each entry of ``series`` may carry a ``caveat``; every plot then prints it.
    """
    if not series:
        return []
    labels = list(series)
    # A channel whose figures carry a caveat has it printed under every plot (its label is
    # marked with the same sign as in the tables).
    caveats = list(dict.fromkeys(series[k]["caveat"] for k in labels if series[k].get("caveat")))
    note = "\n".join(f"\u2020 {c}" for c in caveats)
    paths = [
        _time_plot(
            labels, [series[k]["ms"] for k in labels], folder / "time_per_transfer.png", note
        ),
        _pair_plot(
            labels,
            [series[k]["bytes"] for k in labels],
            "bytes per transfer (sent + received, incl. headers)",
            folder / "bytes_per_transfer.png",
            note,
        ),
        _pair_plot(
            labels,
            [series[k]["round_trips"] for k in labels],
            "round trips per transfer (connection set-ups + HTTP or JSON-RPC requests)",
            folder / "round_trips_per_transfer.png",
            note,
        ),
    ]
    return paths


def _time_plot(
    labels: Sequence[str], values: Sequence[Sequence[float]], path: Path, note: str
) -> Path:
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
    _finish(figure, path, note)
    return path


def _pair_plot(
    labels: Sequence[str],
    values: Sequence[Mapping[str, Sequence[float]]],
    title: str,
    path: Path,
    note: str,
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
    _finish(figure, path, note)
    return path


def _finish(figure: Any, path: Path, note: str) -> None:
    """Lay the figure out, print ``note`` under it, save it and free it."""
    lines = note.count("\n") + 1 if note else 0
    bottom = min(0.04 * lines + 0.01, 0.3)
    figure.tight_layout(rect=(0, bottom, 1, 1))
    if note:
        figure.text(0.01, 0.01, note, fontsize=7.5, color="#8a1c1c", va="bottom", ha="left")
    figure.savefig(path)
    plt.close(figure)
