"""``benchmarks/gpu_check.py --cpu``: the GPU check's CPU mode runs in CI, so the script cannot rot before a GPU is
at hand (issue 23): every row runs on the tiny model and meets its tolerance."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ONE_THREAD

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.distributed
def test_the_gpu_check_runs_in_its_cpu_mode() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu"], capture_output=True, text=True, env=ONE_THREAD,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    checks = [row.split(" | ")[0].lstrip("| ") for row in rows]
    prefixes = ["ERF float32", "ERF TF32", "ERF bf16 autocast", "OpenERF protocol", "FGVis batched",
                "ERF under torchrun"]
    assert len(checks) == len(prefixes) and all(c.startswith(p) for c, p in zip(checks, prefixes)), checks
    assert all(row.rstrip(" |").endswith("yes") for row in rows)


def test_ranks_sharing_one_gpu_use_gloo(monkeypatch) -> None:
    """nccl refuses two ranks on one GPU, so torchrun on a single GPU, or with every rank sent to one ``cuda:N``,
    joins with gloo."""
    import torch
    from hpx_analysis.distributed import backend_for

    assert backend_for(torch.device("cpu"), 2) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert backend_for(torch.device("cuda"), 2) == "gloo" and backend_for(torch.device("cuda"), 1) == "nccl"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert backend_for(torch.device("cuda"), 2) == "nccl"
    assert backend_for(torch.device("cuda", 1), 2) == "gloo" and backend_for(torch.device("cuda", 1), 1) == "nccl"
