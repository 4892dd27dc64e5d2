"""The run store under fault injection (issue 20): real ERF, truncation and FGVis runs in child processes,
interrupted at random instants by SIGINT and SIGKILL, their saved states damaged, two processes on one key; every
final result equals an uninterrupted run's (``tests/fault_harness.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .fault_harness import ANALYSES, DAMAGES, run_harness

pytestmark = pytest.mark.slow


def test_nothing_is_lost_or_doubled_under_interrupts_damage_and_concurrency(tmp_path: Path) -> None:
    counts = run_harness(tmp_path, interruptions=24, damaged=8, pairs_per_analysis=1, seed=0)
    print("\n" + counts.table())
    assert counts.mismatches == []
    assert counts.interruptions >= 24 and min(counts.interrupted.values()) >= 6
    assert sorted(counts.per_analysis) == sorted(ANALYSES) and min(counts.per_analysis.values()) >= 8
    assert sum(counts.damaged.values()) >= 8 and sorted(counts.damaged) == sorted(DAMAGES)
    assert counts.warned_after_damage == sum(counts.damaged.values())
    assert counts.concurrent_pairs == len(ANALYSES) and counts.waited_or_reused == len(ANALYSES)
    assert counts.results_compared >= 3 * len(ANALYSES)
