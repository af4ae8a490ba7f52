"""One small comparison run, shared by the comparison and browser tests (it takes seconds)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tigress_signal.evaluation.runner import CompareSettings, ComparisonResult, run_comparison

_RUNS: dict[str, tuple[ComparisonResult, Path]] = {}


def comparison_run(factory: pytest.TempPathFactory) -> tuple[ComparisonResult, Path]:
    """The shared run (made on first use): 2 stateless and 1 stateful transfer per channel."""
    if "run" not in _RUNS:
        out = factory.mktemp("compare") / "report"
        settings = CompareSettings(
            stateless=2, stateful=1, out=out, progress=False, relay_wait_seconds=5
        )
        _RUNS["run"] = (asyncio.run(run_comparison(settings)), out)
    return _RUNS["run"]
