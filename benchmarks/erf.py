"""ERF speed and memory: the analyzer against the plain loop, side by side in one run.

Plain loop: batch 1, parameters requiring grad, full forward, backward of the centre scalar.
Analyzer: :func:`hpx_analysis.analyzers.erf.effective_receptive_field` (frozen parameters, forward
stopped at the output layer, frozen StarReLUs fused, batches).

Timing: one process, two copies of the same seeded model, the variants alternate image by image
(so load from other processes hits all of them alike); one untimed warm-up round first. Memory: each
variant once more in its own subprocess for one image after a warm-up, peak RSS (sampled every 5 ms)
minus RSS before the pass, the free heap given back first (CUDA: peak allocated). With ``--keep-freed-memory``
the whole process (both variants) keeps freed memory for reuse, as the ``hpx-analyze`` command does
(:func:`hpx_analysis.devices.keep_freed_memory`); without it, glibc's default. A ``torch.compile`` variant was dropped: it lost to
eager on CPU (see README, ERF).
Prints seconds per image, speed-up, pass GFLOP (torch.utils.flop_counter, FFTs excluded), achieved
GFLOP/s as a fraction of a 2048x2048 float32 matmul rate measured in the same run, peak memory per
image, and the maximum map difference relative to the map's maximum (must be <= 1e-4).

    python benchmarks/erf.py            # hpx_former_s18, 1024 px, 2 timed images per variant
    python benchmarks/erf.py --keep-freed-memory   # the process keeps freed memory, as hpx-analyze runs
    python benchmarks/erf.py --quick    # tiny model at 64 px: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny" / "tiny_hpx.json"
VARIANTS = ("plain loop", "analyzer")


def _rss_gb() -> float:
    """Current resident set size of this process in GB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e9


def _inputs(model: torch.nn.Module, size: int, count: int) -> torch.Tensor:
    """The first ``count`` bundled sample photographs, prepared: (count, 3, size, size)."""
    from hpx_analysis.images import eval_transform, read_rgb, sample_images
    transform, _ = eval_transform(model, size, crop=False, interpolation="bicubic")  # the replknet inputs
    return torch.stack([transform(read_rgb(s)) for s in sample_images(count)])


def _plain_map(model: torch.nn.Module, image: torch.Tensor, layer: str) -> torch.Tensor:
    """The textbook loop body: full forward with parameter gradients on, hook the layer, backward: (H, W)."""
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _a, out: captured.update(out=out))
    x = image[None].clone().requires_grad_(True)
    model(x)
    handle.remove()
    feature = captured["out"]
    centre = feature[:, :, feature.shape[-2] // 2, feature.shape[-1] // 2]
    torch.relu(centre).sum().backward()
    model.zero_grad(set_to_none=True)
    return torch.relu(x.grad[0]).sum(0)


def _runner(variant: str, model: torch.nn.Module, layer: str, batch_size: int) -> Callable[[torch.Tensor], np.ndarray]:
    """images (B, 3, H, W) -> summed ERF map (H, W) for one variant."""
    from hpx_analysis.analyzers.erf import effective_receptive_field

    if variant == "plain loop":
        return lambda images: sum(_plain_map(model, image, layer) for image in images).double().cpu().numpy()
    return lambda images: effective_receptive_field(model, images, layer=layer, batch_size=batch_size,
                                                    progress=False).arrays["maps"][0] * len(images)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(args: argparse.Namespace) -> None:
    """Subprocess body: one warm-up and one measured image of ``args.variant``; prints peak GB per image."""
    from hpx_analysis.devices import release_freed_memory
    from hpx_analysis.inspection import feature_layer
    from hpx_analysis.models.zoo import load_model

    model = load_model(args.model, "random", seed=0, device=args.device)
    layer = feature_layer(model)
    images = _inputs(model, args.size, args.batch_size).to(args.device)
    run = _runner(args.variant, model, layer, args.batch_size)
    run(images)  # warm-up outside the measured peak
    release_freed_memory()  # a kept heap would hide the pass's peak in the RSS before it
    rss_before, rss_peak, done = _rss_gb(), [0.0], threading.Event()

    def sample() -> None:  # RSS every 5 ms: the peak of this pass alone (ru_maxrss spans the process)
        while not done.is_set():
            rss_peak[0] = max(rss_peak[0], _rss_gb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run(images)
    _sync(args.device)
    done.set()
    sampler.join()
    peak = torch.cuda.max_memory_allocated() / 1e9 if args.device.startswith("cuda") else rss_peak[0] - rss_before
    print(json.dumps({"peak_gb_per_image": peak / args.batch_size}))


def matmul_rate(device: str, repeats: int = 10) -> float:
    """GFLOP/s of a 2048x2048 float32 matmul (best of ``repeats``)."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best / 1e9


def benchmark(args: argparse.Namespace) -> float:
    """Interleaved timing of the variants; prints the table; returns the worst map difference."""
    from torch.utils.flop_counter import FlopCounterMode

    from hpx_analysis.analyzers.erf import erf_gradient_maps
    from hpx_analysis.engine import analysis_mode
    from hpx_analysis.inspection import feature_layer
    from hpx_analysis.models.zoo import load_model

    models = {v: load_model(args.model, "random", seed=0, device=args.device) for v in VARIANTS}
    layer = feature_layer(models["analyzer"])
    batches = _inputs(models["analyzer"], args.size, args.batch_size * (args.images + 1)).to(args.device)
    batches = list(batches.split(args.batch_size))
    with FlopCounterMode(display=False) as counter, analysis_mode(models["analyzer"]):
        erf_gradient_maps(models["analyzer"], batches[0][:1], layer)
    gflop = counter.get_total_flops() / 1e9
    rate = matmul_rate(args.device)

    runners = {v: _runner(v, models[v], layer, args.batch_size) for v in VARIANTS}
    seconds: Dict[str, float] = {v: 0.0 for v in VARIANTS}
    maps: Dict[str, np.ndarray] = {}
    for variant in VARIANTS:
        runners[variant](batches[0])  # warm-up
    for batch in batches[1:]:
        for variant in VARIANTS:
            start = time.perf_counter()
            summed = runners[variant](batch)
            _sync(args.device)
            seconds[variant] += time.perf_counter() - start
            maps[variant] = maps.get(variant, 0) + summed

    count = args.images * args.batch_size
    print(f"model {Path(args.model).stem} at {args.size} px, {count} timed images per variant (interleaved), "
          f"device {args.device}, {torch.get_num_threads()} threads, analyzer batch {args.batch_size}, freed memory "
          f"{'kept (both variants)' if args.keep_freed_memory else 'returned (glibc default)'}")
    print(f"matmul 2048x2048: {rate:.1f} GFLOP/s; ERF pass (forward to the layer + input backward): {gflop:.1f} GFLOP")
    plain_time, worst = seconds["plain loop"] / count, 0.0
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--memory-of", variant, "--model", args.model, "--size", str(args.size),
                   "--batch-size", str(args.batch_size), "--device", args.device]
        command += ["--keep-freed-memory"] if args.keep_freed_memory else []
        memory = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout
                            .strip().splitlines()[-1])["peak_gb_per_image"]
        per_image = seconds[variant] / count
        difference = np.abs(maps[variant] - maps["plain loop"]).max() / np.abs(maps["plain loop"]).max()
        worst = max(worst, difference)
        print(f"{variant:<17} {per_image:7.2f} s/image  speed-up {plain_time / per_image:5.2f}x  "
              f"{gflop / per_image:6.1f} GFLOP/s ({gflop / per_image / rate:.2f} of matmul)  "
              f"peak {memory:5.2f} GB/image  map difference {difference:.1e}")
    print(f"maps agree to {worst:.1e} of the map maximum: {'OK' if worst <= 1e-4 else 'FAIL'} at 1e-4")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hpx_former_s18")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2, help="timed batches per variant (plus one warm-up)")
    parser.add_argument("--batch-size", type=int, default=1, help="analyzer batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model at 64 px (a smoke run)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the process for reuse (both variants), as hpx-analyze does")
    parser.add_argument("--memory-of", dest="variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.size = str(TINY_CONFIG), 64
    if args.keep_freed_memory:
        from hpx_analysis.devices import keep_freed_memory
        keep_freed_memory()
    if args.variant:
        measure_memory(args)
    elif benchmark(args) > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
