"""``benchmarks/erf.py --quick``: the ERF benchmark behind the README's numbers runs end to end on the tiny model,
so it cannot rot between releases: the four processes (plain loop and analyzer, glibc's default malloc and kept
memory) each report a row, and their maps agree to 1e-4 of the maximum."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ONE_THREAD

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "erf.py"


def test_the_erf_benchmark_runs_every_variant_and_the_maps_agree() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=ONE_THREAD,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split()[:3] for line in run.stdout.splitlines() if "s/image" in line]
    assert rows == [["plain", "loop", "default"], ["analyzer", "default", "this"], ["plain", "loop", "kept"],
                    ["analyzer", "kept", "this"]], run.stdout
    assert "OK at 1e-4" in run.stdout
