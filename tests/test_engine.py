"""The run layer: outputs placed and summed, unreadable images, resume after an interruption, reuse of a
finished run, run keys that follow the content, and the model left as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hpx_analysis.engine import ImageDataset, ItemOutput, SumOutput, analysis_mode, run_batches, run_key
from hpx_analysis.errors import HpxError
from hpx_analysis.images import ImageSource

OUTPUTS = {"double": ItemOutput((3,), "float32"), "total": SumOutput((3,)), "count": SumOutput((), "int64")}


class Interrupt(RuntimeError):
    pass


def _step(calls: List[List[int]], fail_at: int = -1):
    """Per image: its channel means doubled; sums of the means and of the image count. Raises at call fail_at."""
    def step(batch) -> Dict[str, np.ndarray]:
        if len(calls) == fail_at:
            raise Interrupt("stop")
        calls.append(batch.indices.tolist())
        means = batch.images.mean((2, 3)).double()
        return {"double": 2 * means, "total": means.sum(0), "count": np.int64(len(batch.indices))}
    return step


@pytest.fixture
def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.arange(7 * 3 * 4 * 4, dtype=torch.float32).reshape(7, 3, 4, 4) / 100


def test_items_are_placed_and_sums_added(model, images) -> None:
    calls: List[List[int]] = []
    run = run_batches(model, ImageDataset(images), _step(calls), OUTPUTS, batch_size=3, progress=False)
    means = images.mean((2, 3)).double().numpy()
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]
    np.testing.assert_allclose(run.arrays["double"], 2 * means, rtol=1e-6)
    np.testing.assert_allclose(run.arrays["total"], means.sum(0))
    assert run.arrays["count"] == 7 and run.evaluated.all() and run.unreadable == []
    assert run.counts == {"world_size": 1, "batches_total": 3, "batches_resumed": 0, "batches_computed": 3}


def test_unreadable_files_are_skipped_and_counted_or_fail_strictly(model, tmp_path: Path) -> None:
    sources = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        if i == 2:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((4, 4, 3), 50 * i, np.uint8)).save(path)
        sources.append(ImageSource(name=path.name, path=path))
    transform = lambda image: torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)  # noqa: E731
    run = run_batches(model, ImageDataset(sources, transform), _step([]), OUTPUTS, batch_size=2, progress=False)
    assert run.unreadable == [2] and run.arrays["count"] == 3
    np.testing.assert_allclose(run.arrays["double"][:, 0], [0, 100, 0, 300])
    with pytest.raises(HpxError, match="unreadable image 2.png"):
        run_batches(model, ImageDataset(sources, transform), _step([]), OUTPUTS, batch_size=2, strict=True,
                    progress=False)
    # a saved run that skipped the file is not reused by a strict rerun either
    run_batches(model, ImageDataset(sources, transform), _step([]), OUTPUTS, batch_size=2, progress=False,
                resume_dir=tmp_path / "runs")
    with pytest.raises(HpxError, match="unreadable image 2.png in the saved run"):
        run_batches(model, ImageDataset(sources, transform), _step([]), OUTPUTS, batch_size=2, strict=True,
                    progress=False, resume_dir=tmp_path / "runs")


def _digest(images) -> str:
    return ImageDataset(images).content_digest()


def test_an_interrupted_run_resumes_and_a_finished_one_is_reused(model, images, tmp_path: Path, capsys) -> None:
    reference = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, progress=False)
    with pytest.raises(Interrupt):
        run_batches(model, ImageDataset(images), _step([], fail_at=2), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                    save_every_s=1e9, progress=False)  # no periodic save: the state is saved as the loop stops
    calls: List[List[int]] = []
    resumed = run_batches(model, ImageDataset(images), _step(calls), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                          progress=False)
    assert calls == [[4, 5], [6]]
    assert resumed.counts["batches_resumed"] == 2 and resumed.counts["batches_computed"] == 2
    assert "resuming the run" in capsys.readouterr().err
    for name in OUTPUTS:
        np.testing.assert_array_equal(resumed.arrays[name], reference.arrays[name])
    again: List[List[int]] = []
    reused = run_batches(model, ImageDataset(images), _step(again), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                         progress=False)
    assert again == [] and reused.counts["batches_resumed"] == 4 and reused.key == resumed.key
    err = capsys.readouterr().err
    assert f"reusing the finished run {tmp_path / reused.key} (4 of 4 batches)" in err and "--no-resume" in err
    np.testing.assert_array_equal(reused.arrays["double"], reference.arrays["double"])
    assert sorted(p.name for p in (tmp_path / reused.key).iterdir()) == ["rank0-of-1.lock", "rank0-of-1.npz"]


def test_run_keys_follow_weights_inputs_and_options(model, images) -> None:
    key = run_key(model, _digest(images), {"size": 4})
    assert key == run_key(model, _digest(images.clone()), {"size": 4})
    assert key != run_key(model, _digest(images), {"size": 5})
    assert key != run_key(model, _digest(images + 1e-3), {"size": 4})
    assert key != run_key(model, _digest(images.reshape(7, 3, 2, 8)), {"size": 4})  # same values, other shape
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-6  # an in-place edit of the weights: same path, other content
    edited = run_key(model, _digest(images), {"size": 4})
    assert edited != key
    model[1].running_mean.add_(1.0)  # buffers count too: compared with the key just before this edit
    assert run_key(model, _digest(images), {"size": 4}) != edited


def test_the_model_is_left_as_it_was(model, images) -> None:
    model.train()
    model[1].weight.requires_grad_(False)
    seen = []

    def step(batch) -> Dict[str, np.ndarray]:
        seen.append((model.training, [p.requires_grad for p in model.parameters()]))
        return {"double": np.zeros((len(batch.indices), 3)), "total": np.zeros(3), "count": np.int64(0)}

    run_batches(model, ImageDataset(images), step, OUTPUTS, batch_size=4, progress=False)
    assert seen == [(False, [False] * 4)] * 2
    assert model.training and [p.requires_grad for p in model.parameters()] == [True, True, False, True]
    with pytest.raises(Interrupt), analysis_mode(model):
        raise Interrupt("inside")
    assert model.training


def test_a_step_must_return_every_output(model, images) -> None:
    with pytest.raises(ValueError, match="count"):
        run_batches(model, ImageDataset(images), lambda batch: {"double": np.zeros((len(batch.indices), 3)),
                                                                "total": np.zeros(3)},
                    OUTPUTS, batch_size=4, progress=False)


def test_model_placement_without_parameters():
    """A function wrapped as a module has neither parameters nor buffers: CPU float32; else its first tensor's."""
    from hpx_analysis.devices import model_placement
    assert model_placement(torch.nn.ReLU()) == (torch.device("cpu"), torch.float32)
    assert model_placement(torch.nn.Linear(2, 2).double()) == (torch.device("cpu"), torch.float64)
    batch_norm = torch.nn.BatchNorm1d(2, affine=False).half()
    assert model_placement(batch_norm) == (torch.device("cpu"), torch.float16)


FAULT_PROBE = """
import resource, torch
from hpx_analysis.devices import keep_freed_memory, release_freed_memory

scale, signal = torch.randn(16, 1, 1), torch.randn(16, 1024, 1024)

def faults_of_a_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # forward and backward with 64 MB activations and gradients, above glibc's largest mmap threshold (32 MB)
    torch.nn.functional.gelu(signal.clone().requires_grad_(True) * scale).square().mean().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_pass()
default = faults_of_a_pass()
applied = keep_freed_memory()
steady = sum([faults_of_a_pass() for _ in range(8)][4:])
release_freed_memory()
released = faults_of_a_pass()
print(default, int(applied), steady, released)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults() -> None:
    """By default glibc maps each 64 MB tensor of a pass afresh (about 164,000 page faults of 4 KB per pass here).
    After keep_freed_memory the heap grows for a pass or three (a 64-byte aligned request may not fit the free
    chunk an earlier one left) and then serves the passes from kept pages: passes 5-8 together fault less than
    one default pass (0-32,000 measured). release_freed_memory gives the pages back, so the next pass faults again.
    With HPX_KEEP_FREED_MEMORY=0 nothing changes."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    default, applied, steady, released = (int(word) for word in done.stdout.split())
    if default < 10_000:
        pytest.skip(f"{default} faults for a pass over 64 MB tensors: huge pages in effect, nothing to measure")
    assert applied == 1 and steady < default and released > default // 2, done.stdout
    opted_out = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HPX_KEEP_FREED_MEMORY": "0"})
    default, applied, steady, _ = (int(word) for word in opted_out.stdout.split())
    assert applied == 0 and steady > 3 * default, opted_out.stdout


def _rank0_worker(rank: int, store_path: str, answers) -> None:
    """One of two gloo ranks calling :func:`computed_on_rank0` twice, the second time failing on rank 0: its answers
    and which ranks computed into ``answers``."""
    import torch.distributed as dist

    from hpx_analysis.distributed import computed_on_rank0

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    calls: List[str] = []

    def compute(fail: bool) -> str:
        calls.append(f"rank {rank}")
        if fail:
            raise HpxError("cannot read the folder")
        return f"digest from rank {rank}"
    got = []
    try:
        for fail in (False, True):
            try:
                got.append(computed_on_rank0(lambda: compute(fail)))
            except HpxError as err:
                got.append(f"error: {err}")
        answers[rank] = (got, calls)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_work_computed_on_rank0_reaches_every_rank(tmp_path) -> None:
    """Only rank 0 computes, both ranks get its value; an error there stops rank 1 too, with rank 0's message."""
    import torch.multiprocessing as mp

    answers = mp.Manager().dict()
    mp.spawn(_rank0_worker, args=(str(tmp_path / "store"), answers), nprocs=2, join=True)
    assert answers[0] == (["digest from rank 0", "error: cannot read the folder"], ["rank 0", "rank 0"])
    assert answers[1] == (["digest from rank 0", "error: rank 0 failed: cannot read the folder"], [])
