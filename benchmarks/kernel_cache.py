"""Forward time of hpx_former_s18 with and without the eval-mode kernel FFT cache, side by side,
and peak memory of forward + input-gradient backward at 1024 px, batch 1 (parameters frozen).

    python benchmarks/kernel_cache.py [--sizes 224 1024] [--repeats 3] [--device cpu]

Timings alternate cached/uncached runs in one process so machine noise hits both alike. Peak memory
is measured in a fresh subprocess (CPU: resident-set growth; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Dict, List

import torch

import hpx_analysis  # noqa: F401
from hpx_analysis.inspection import long_filter_layers
from hpx_analysis.models.zoo import load_model


def set_cache(model: torch.nn.Module, enabled: bool) -> None:
    for info in long_filter_layers(model):
        info.long_filter.use_cache = enabled
        info.long_filter.fft_cache.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(model: torch.nn.Module, size: int, repeats: int, device: torch.device) -> Dict[str, float]:
    """Median forward seconds with the cache on (after a warm-up that fills it) and off."""
    image = torch.randn(1, 3, size, size, device=device)
    times: Dict[str, List[float]] = {"cached": [], "uncached": []}
    set_cache(model, True)
    model(image)  # warm-up: fills the cache
    for _ in range(repeats):
        for mode in ("cached", "uncached"):
            for info in long_filter_layers(model):
                info.long_filter.use_cache = mode == "cached"
            _sync(device)
            start = time.perf_counter()
            model(image)
            _sync(device)
            times[mode].append(time.perf_counter() - start)
    return {mode: sorted(values)[len(values) // 2] for mode, values in times.items()}


def peak_memory_child(size: int, device_name: str) -> None:
    """Run in a subprocess: print peak bytes of forward + input-gradient backward at ``size``."""
    import resource

    device = torch.device(device_name)
    model = load_model("hpx_former_s18", "random", device=device)
    for param in model.parameters():
        param.requires_grad_(False)
    image = torch.randn(1, 3, size, size, device=device, requires_grad=True)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model(image).sum().backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-size", type=int, default=1024)
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        peak_memory_child(args.child_memory, args.device)
        return
    device = torch.device(args.device)
    model = load_model("hpx_former_s18", "random", device=device)
    print(f"hpx_former_s18, random weights, batch 1, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'size':>6} {'cached s':>10} {'uncached s':>11} {'speed-up':>9}")
    for size in args.sizes:
        result = time_forward(model, size, args.repeats, device)
        print(f"{size:>6} {result['cached']:>10.3f} {result['uncached']:>11.3f} "
              f"{result['uncached'] / result['cached']:>8.2f}x")
    child = subprocess.run([sys.executable, __file__, "--child-memory", str(args.memory_size), "--device", args.device],
                           capture_output=True, text=True, check=True)
    peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"]
    print(f"peak memory, forward + input-gradient backward at {args.memory_size} px, batch 1, frozen params: "
          f"{peak / 2 ** 30:.2f} GiB (target < 8 GiB)")


if __name__ == "__main__":
    main()
