"""The GPU path, ready to measure: one script, one table, each GPU number against its CPU result.

Rows (a row that cannot run here says why instead of failing):

1. ERF, float32 (TF32 off): time, images/s, peak memory after one untimed warm-up image (cuDNN's algorithm
   choice, cuFFT plans, the kernel FFT cache); the maps of the first images against the same images on the CPU.
2. ERF with TF32 convolutions (cuDNN's default in PyTorch): the same, and its display map against the float32 one
   (correlation, largest relative difference of the raw maps).
3. ERF, bf16 autocast: the same.
4. OpenERF's protocol (``--convention kim2023``), ours batched against the ``openerf`` package at batch 1, where
   that package is installed.
5. FGVis, batched: time, images/s, peak memory; the first images' masks and records after a shorter search against
   the CPU's (same seeds, the same noise: FGVis draws it on the CPU).
6. ERF under a 2-process ``torchrun`` on this device (nccl where every rank has its own GPU, else gloo) against one
   process.

Every row but 2 and 3 runs with TF32 off (``NVIDIA_TF32_OVERRIDE=0`` for the torchrun processes), so the GPU's float32
is compared with the CPU's.

    python benchmarks/gpu_check.py          # one GPU: hpx_former_s18, ERF on 50 images at 1024 px, FGVis 16 at 224 px
    python benchmarks/gpu_check.py --cpu    # the tiny golden model on the CPU, the same checks in seconds (CI)

Exits 1 when a check misses its tolerance (float32 maps 1e-4 of the maximum, TF32 and bf16 display maps correlation
0.99, FGVis masks 1e-3, torchrun maps 1e-6), so it cannot rot silently. Goal on one H100-class GPU: ERF of 50 images
at 1024 px in <= 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from hpx_analysis.analyzers.erf import ERFResult, effective_receptive_field
from hpx_analysis.analyzers.fgvis import FgvisSettings, fgvis
from hpx_analysis.distributed import backend_for
from hpx_analysis.models.zoo import load_model

TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny" / "tiny_hpx.json"


@dataclass(frozen=True)
class Plan:
    """What one run measures: model, ERF images and side, FGVis images and side, images compared with the CPU, FGVis
    iterations of the timed run and of the comparison with the CPU."""

    model: str
    erf_images: int
    erf_size: int
    fgvis_images: int
    fgvis_size: int
    compared: int
    fgvis_iterations: int
    compared_fgvis_iterations: int


GPU_PLAN = Plan("hpx_former_s18", 50, 1024, 16, 224, 2, 500, 40)
CPU_PLAN = Plan(str(TINY), 4, 64, 4, 64, 2, 20, 20)


@dataclass
class Row:
    check: str
    seconds: Optional[float] = None
    images_per_s: Optional[float] = None
    peak_gb: Optional[float] = None
    against: str = ""
    ok: bool = True

    def cells(self) -> List[str]:
        def number(value: Optional[float], form: str) -> str:
            return "" if value is None else format(value, form)
        return [self.check, number(self.seconds, ".2f"), number(self.images_per_s, ".2f"), number(self.peak_gb, ".2f"),
                self.against, "yes" if self.ok else "NO"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(device: torch.device, work: Callable[[], object]) -> Tuple[object, float, Optional[float]]:
    """(result, seconds, peak GB): CUDA's peak allocation, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    result = work()
    _sync(device)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return result, seconds, peak / 2 ** 30


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the largest |b|."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 convolutions and matmuls allowed or not inside; the previous setting restored after."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def against_float32(result: ERFResult, fp32: ERFResult) -> Tuple[str, bool]:
    """The first display map against the float32 one (correlation >= 0.99 passes) and the raw maps' difference."""
    correlation = float(np.corrcoef(fp32.arrays["display"][0].ravel(), result.arrays["display"][0].ravel())[0, 1])
    difference = relative_difference(result.arrays["maps"][0], fp32.arrays["maps"][0])
    return f"float32 display map: correlation {correlation:.4f}, raw max diff {difference:.1e}", correlation >= 0.99


def erf_rows(plan: Plan, device: torch.device, images: torch.Tensor) -> List[Row]:
    """Rows 1 to 3."""
    model = load_model(plan.model, "random", seed=0, device=device)
    cpu_model = load_model(plan.model, "random", seed=0)
    effective_receptive_field(model, images[:1], progress=False)  # warm-up, untimed
    fp32, seconds, peak = measured(device, lambda: effective_receptive_field(
        model, images, batch_size=4, label="fp32", progress=False))
    first = images[:plan.compared]
    on_gpu = effective_receptive_field(model, first, batch_size=plan.compared, progress=False).arrays["maps"][0]
    on_cpu = effective_receptive_field(cpu_model, first, batch_size=plan.compared, progress=False).arrays["maps"][0]
    difference = relative_difference(on_gpu, on_cpu)
    rows = [Row(f"ERF float32, {len(images)} images at {plan.erf_size} px", seconds, len(images) / seconds, peak,
                f"CPU maps ({plan.compared} images): max diff {difference:.1e} of max", difference <= 1e-4)]
    with tf32(True):
        allowed, seconds, peak = measured(device, lambda: effective_receptive_field(
            model, images, batch_size=4, label="tf32", progress=False))
    rows.append(Row(f"ERF TF32 (PyTorch's default for convolutions), {len(images)} images", seconds,
                    len(images) / seconds, peak, *against_float32(allowed, fp32)))
    bf16, seconds, peak = measured(device, lambda: effective_receptive_field(
        model, images, batch_size=4, amp="bf16", label="bf16", progress=False))
    rows.append(Row(f"ERF bf16 autocast, {len(images)} images", seconds, len(images) / seconds, peak,
                    *against_float32(bf16, fp32)))
    return rows


def openerf_row(plan: Plan, device: torch.device, folder: Path) -> Row:
    """Row 4: OpenERF's own ``compute_erf`` (batch 1) against ours batched on the images of ``folder``, where the
    ``openerf`` package is installed."""
    try:
        from openerf.erf import compute_erf
    except ImportError:
        return Row("OpenERF protocol vs the openerf package", against="openerf not installed: skipped")
    model = load_model(plan.model, "random", seed=0, device=device)
    paths = sorted(folder.glob("*.png"))
    ours, seconds, peak = measured(device, lambda: effective_receptive_field(
        model, paths, convention="kim2023", batch_size=len(paths), progress=False))
    theirs, their_seconds, _ = measured(device, lambda: compute_erf(model, image_dir=folder, device=device,
                                                                    show_progress=False))
    difference = relative_difference(ours.arrays["maps"][0], theirs.erf_map)
    return Row(f"OpenERF protocol, ours batched, {len(paths)} images", seconds, len(paths) / seconds, peak,
               f"openerf 0.6.1 at batch 1 ({their_seconds:.2f} s): max diff {difference:.1e} of max",
               difference <= 1e-4)


def fgvis_row(plan: Plan, device: torch.device) -> Row:
    """FGVis batched on ``device``, timed; its first images after a shorter search against the CPU's masks and
    records."""
    images = torch.randn(plan.fgvis_images, 3, plan.fgvis_size, plan.fgvis_size,
                         generator=torch.Generator().manual_seed(1))
    settings = FgvisSettings(iterations=plan.fgvis_iterations, lambda_tries=2, lambda_start=1e-6)
    model = load_model(plan.model, "random", seed=0, device=device)
    _, seconds, peak = measured(device, lambda: fgvis(model, images.to(device), settings=settings,
                                                      batch_size=plan.fgvis_images))
    short = replace(settings, iterations=plan.compared_fgvis_iterations)
    first = images[:plan.compared]
    here = fgvis(model, first.to(device), settings=short, batch_size=plan.compared)
    cpu = fgvis(load_model(plan.model, "random", seed=0), first, settings=short, batch_size=plan.compared)
    difference = float(np.abs(here.masks - cpu.masks).max())
    same_flips = [r["iterations"] for r in here.records] == [r["iterations"] for r in cpu.records]
    return Row(f"FGVis batched, {plan.fgvis_images} images at {plan.fgvis_size} px", seconds,
               plan.fgvis_images / seconds, peak,
               f"CPU ({plan.compared} images, {short.iterations} iterations): masks max diff {difference:.1e}, "
               f"same flip iterations: {same_flips}", difference <= 1e-3 and same_flips)


def torchrun_row(plan: Plan, device: torch.device, folder: Path) -> Row:
    """Row 6: ``hpx-analyze erf`` under a 2-process torchrun on ``device`` against one process, on the images of
    ``folder``."""
    executable = shutil.which("hpx-analyze")
    if executable is None:
        return Row("ERF under torchrun (2 processes)", against="hpx-analyze not on PATH: skipped")
    images = len(list(folder.glob("*.png")))
    args = ["erf", "--model", plan.model, "--weights", "random", "--images", str(folder), "--num-images", str(images),
            "--input-size", str(plan.erf_size), "--device", str(device), "--no-resume"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "NVIDIA_TF32_OVERRIDE": "0"}
    with tempfile.TemporaryDirectory() as out:
        single = subprocess.run([executable, *args, "--out", f"{out}/one"], capture_output=True, text=True,
                                env=environment)
        started = time.perf_counter()
        launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--no-python",
                                   executable, *args, "--out", f"{out}/two"], capture_output=True, text=True,
                                  env=environment)
        seconds = time.perf_counter() - started
        if single.returncode or launched.returncode:
            failed = launched if launched.returncode else single
            return Row("ERF under torchrun (2 processes)", seconds, against=failed.stderr.strip().splitlines()[-1],
                       ok=False)
        one, two = (ERFResult.load(next(Path(out, name).glob("erf_*.npz"))) for name in ("one", "two"))
    difference = relative_difference(two.arrays["maps"][0], one.arrays["maps"][0])
    backend = backend_for(device, 2)
    return Row(f"ERF under torchrun (2 processes, {backend}), {images} images", seconds, images / seconds, None,
               f"one process: max diff {difference:.1e}", difference <= 1e-6)


def write_images(folder: Path, count: int, side: int) -> Path:
    """``count`` random RGB PNGs of ``side`` px in ``folder``."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny golden model on the CPU (the CI mode)")
    parser.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --cpu for the CPU mode")
    plan, device = (CPU_PLAN, torch.device("cpu")) if args.cpu else (GPU_PLAN, torch.device(args.device))
    images = torch.randn(plan.erf_images, 3, plan.erf_size, plan.erf_size, generator=torch.Generator().manual_seed(0))
    with tf32(False):
        rows = erf_rows(plan, device, images)
        with tempfile.TemporaryDirectory() as folder:
            files = write_images(Path(folder), 4, plan.erf_size)
            rows += [openerf_row(plan, device, files), fgvis_row(plan, device), torchrun_row(plan, device, files)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, model {Path(plan.model).stem}")
    print("| check | s | images/s | peak GB | against | ok |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    sys.exit(0 if all(row.ok for row in rows) else 1)


if __name__ == "__main__":
    main()
