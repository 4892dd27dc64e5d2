"""ERF speed and memory: the analyzer against the plain loop, side by side in one run.

Plain loop: batch 1, parameters requiring grad, full forward, backward of the centre scalar.
Analyzer: :func:`hpx_analysis.analyzers.erf.effective_receptive_field` (frozen parameters, forward
stopped at the output layer, batches, optional ``torch.compile``). Each side runs in its own
subprocess so its peak resident memory can be read; both use the same images and weights.

Prints seconds per image, the speed-up, peak memory per image (peak RSS minus RSS before the first
pass, CPU; peak allocated, CUDA), the pass FLOPs (torch.utils.flop_counter, FFTs excluded), achieved
GFLOP/s as a fraction of a 2048x2048 float32 matmul rate measured in the same run, and the maximum
map difference relative to the map's maximum (must be <= 1e-4).

    python benchmarks/erf.py            # hpx_former_s18, 1024 px, 2 timed images per side
    python benchmarks/erf.py --quick    # tiny model at 64 px: checks the script in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny" / "tiny_hpx.json"


def _rss_gb() -> float:
    """Current resident set size of this process in GB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e9


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _inputs(model: torch.nn.Module, size: int, count: int) -> torch.Tensor:
    from hpx_analysis.images import model_mean_std, read_rgb, sample_images, to_model_input
    mean, std = model_mean_std(model)
    return torch.stack([to_model_input(read_rgb(s), (size, size), mean, std) for s in sample_images(count)])


def _plain_map(model: torch.nn.Module, image: torch.Tensor, layer: str) -> torch.Tensor:
    """The textbook loop body: full forward with parameter gradients on, hook the layer, backward."""
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


def run_side(args: argparse.Namespace) -> None:
    """One side in this process: warm-up pass (counted for FLOPs), then timed images; prints JSON."""
    from torch.utils.flop_counter import FlopCounterMode

    from hpx_analysis.analyzers.erf import (compiled_submodules, effective_receptive_field, erf_gradient_maps,
                                            frozen_parameters)
    from hpx_analysis.inspection import feature_layer
    from hpx_analysis.models.zoo import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, "random", seed=0, device=args.device)
    layer = feature_layer(model)
    images = _inputs(model, args.size, args.images + 1).to(args.device)
    cuda = args.device.startswith("cuda")
    rss_before = _rss_gb()
    flops = None
    if args.side == "plain":
        _plain_map(model, images[0], layer)  # warm-up
        start = time.perf_counter()
        maps = torch.stack([_plain_map(model, image, layer) for image in images[1:]])
    else:
        with FlopCounterMode(display=False) as counter, frozen_parameters(model):
            erf_gradient_maps(model, images[:1], layer)  # eager warm-up, counted
        flops = counter.get_total_flops()
        with compiled_submodules(model, layer) if args.compile else contextlib.nullcontext():
            if args.compile:  # compile warm-up, untimed; the second pass absorbs stride-driven recompiles
                effective_receptive_field(model, images[:1].repeat(2, 1, 1, 1), layer=layer,
                                          batch_size=args.batch_size, progress=False)
            start = time.perf_counter()
            result = effective_receptive_field(model, images[1:], layer=layer, batch_size=args.batch_size,
                                               progress=False)
        maps = torch.from_numpy(result.arrays["maps"][0])[None] * len(images[1:])  # sum, as the plain side
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.images
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else _peak_rss_gb() - rss_before
    np.save(args.maps_out, maps.sum(0).double().cpu().numpy())
    print(json.dumps({"seconds_per_image": seconds, "peak_gb": peak, "flops": flops}))


def matmul_rate(device: str, repeats: int = 10) -> float:
    """GFLOP/s of a 2048x2048 float32 matmul (best of ``repeats``)."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hpx_former_s18")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2, help="timed images per side (plus one warm-up)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add an analyzer side with torch.compile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="tiny model at 64 px (a smoke run)")
    parser.add_argument("--side", choices=("plain", "analyzer"), help=argparse.SUPPRESS)
    parser.add_argument("--maps-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.size = str(TINY_CONFIG), 64
    if args.side:
        run_side(args)
        return

    rate = matmul_rate(args.device)
    variants = [("plain loop", "plain", False), ("analyzer", "analyzer", False)]
    if args.compile:
        variants.append(("analyzer+compile", "analyzer", True))
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, side, compiled in variants:
            maps_out = str(Path(tmp) / f"{len(sides)}.npy")
            command = [sys.executable, __file__, "--side", side, "--maps-out", maps_out, "--model", args.model,
                       "--size", str(args.size), "--images", str(args.images), "--batch-size", str(args.batch_size),
                       "--device", args.device, "--threads", str(args.threads)] + (["--compile"] if compiled else [])
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            sides[name] = json.loads(output.strip().splitlines()[-1])
            sides[name]["map"] = np.load(maps_out)
    plain = sides["plain loop"]
    gflop = sides["analyzer"]["flops"] / 1e9
    print(f"model {Path(args.model).stem} at {args.size} px, {args.images} timed images per side, "
          f"device {args.device}, {args.threads} threads, analyzer batch {args.batch_size}")
    print(f"matmul 2048x2048: {rate:.1f} GFLOP/s; ERF pass (forward to the layer + input backward): {gflop:.1f} GFLOP")
    worst = 0.0
    for name, side in sides.items():
        per_image = side["seconds_per_image"]
        batch = 1 if name == "plain loop" else args.batch_size
        difference = np.abs(side["map"] - plain["map"]).max() / np.abs(plain["map"]).max()
        worst = max(worst, difference)
        print(f"{name:<17} {per_image:7.2f} s/image  speed-up {plain['seconds_per_image'] / per_image:5.2f}x  "
              f"{gflop / per_image:6.1f} GFLOP/s ({gflop / per_image / rate:.2f} of matmul)  "
              f"peak {side['peak_gb'] / batch:5.2f} GB/image  map difference {difference:.1e}")
    print(f"maps agree to {worst:.1e} of the map maximum: {'OK' if worst <= 1e-4 else 'FAIL'} at 1e-4")
    if worst > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
