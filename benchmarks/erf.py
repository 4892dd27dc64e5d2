"""ERF speed and memory: the analyzer against the plain loop, each run as it would be, side by side in one run.

Plain loop: batch 1, parameters requiring grad, full forward, backward of the centre scalar (a user's script).
Analyzer: :func:`hpx_analysis.analyzers.erf.effective_receptive_field` (frozen parameters, forward
stopped at the output layer, frozen StarReLUs and HyenaPixel gatings fused, on the CPU by the native kernels of
:mod:`hpx_analysis.models.native` where a C compiler is at hand, batches).

Each variant runs in processes of its own, with glibc's default malloc (``default``: what a script gets) and with
freed memory kept in the process (``kept``: what ``hpx-analyze`` sets, :func:`hpx_analysis.devices.keep_freed_memory`).
A process loads the seeded model, measures the 2048x2048 float32 matmul rate, runs ``--warm-up`` untimed images
(a kept heap grows over the first two or three, then stays), times ``--images`` images, and measures its peak
memory over one more image after giving the free heap back (``malloc_trim``; CUDA: peak allocated). The
processes (four, five with ``--previous``) alternate for ``--rounds`` rounds, so drift of this noisy machine hits
every variant alike; the table gives medians over rounds. A ``torch.compile`` variant was dropped: it lost to eager on CPU (see README, ERF).
Prints seconds per image, speed-up against the plain loop with the same malloc setting, pass GFLOP
(torch.utils.flop_counter, FFTs excluded), achieved GFLOP/s as a fraction of the matmul rate of the same process,
peak memory per image, and the maximum map difference relative to the map's maximum (must be <= 1e-4).

    python benchmarks/erf.py            # hpx_former_s18, 1024 px, 2 rounds of 3 warm-up + 3 timed images
    python benchmarks/erf.py --previous ../prev   # and the analyzer of an earlier release's source tree
    python benchmarks/erf.py --quick    # tiny model at 64 px, one round: checks the script in about 30 s (a test)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny" / "tiny_hpx.json"
VARIANTS = ("plain loop", "analyzer")
MALLOC = ("default", "kept")  # glibc's default, or freed memory kept in the process (as hpx-analyze runs)


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


def peak_memory_gb(run: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor, device: str) -> Optional[float]:
    """Peak memory of one more ``run(images)`` in GB: RSS sampled every 5 ms minus RSS before, after giving the free
    heap back (a kept heap would hide the pass's peak in the RSS before it); CUDA: peak allocated. None for an
    earlier release (``--previous``) that cannot give the heap back."""
    try:
        from hpx_analysis.devices import release_freed_memory
    except ImportError:
        return None
    release_freed_memory()
    rss_before, rss_peak, done = _rss_gb(), [0.0], threading.Event()

    def sample() -> None:  # ru_maxrss spans the process; this is the peak of this pass alone
        while not done.is_set():
            rss_peak[0] = max(rss_peak[0], _rss_gb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run(images)
    _sync(device)
    done.set()
    sampler.join()
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else rss_peak[0] - rss_before


def time_variant(args: argparse.Namespace) -> None:
    """Subprocess body: ``args.warm_up`` untimed and ``args.images`` timed batches of ``args.variant``, then its
    peak memory; writes the summed map to ``args.map_to`` and prints seconds per image, matmul rate and peak GB."""
    from hpx_analysis.inspection import feature_layer
    from hpx_analysis.models.zoo import load_model

    model = load_model(args.model, "random", seed=0, device=args.device)
    layer = feature_layer(model)
    batches = _inputs(model, args.size, args.batch_size * (args.warm_up + args.images)).to(args.device)
    batches = list(batches.split(args.batch_size))
    run = _runner(args.variant, model, layer, args.batch_size)
    rate = matmul_rate(args.device)
    for batch in batches[:args.warm_up]:
        run(batch)
    summed, seconds = 0.0, 0.0
    for batch in batches[args.warm_up:]:
        start = time.perf_counter()
        summed = summed + run(batch)
        _sync(args.device)
        seconds += time.perf_counter() - start
    np.save(args.map_to, summed)
    peak = peak_memory_gb(run, batches[-1], args.device)
    together = args.batch_size if args.variant == "analyzer" else 1  # the plain loop takes one image at a time
    print(json.dumps({"seconds_per_image": seconds / (args.images * args.batch_size), "matmul_gflops": rate,
                      "peak_gb_per_image": None if peak is None else peak / together}))


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
    """The variants in alternating processes; prints the table; returns the worst map difference."""
    import tempfile

    from torch.utils.flop_counter import FlopCounterMode

    from hpx_analysis.analyzers.erf import erf_gradient_maps
    from hpx_analysis.engine import analysis_mode
    from hpx_analysis.inspection import feature_layer
    from hpx_analysis.models.native import description as native_kernels
    from hpx_analysis.models.zoo import load_model

    model = load_model(args.model, "random", seed=0, device=args.device)
    with FlopCounterMode(display=False) as counter, analysis_mode(model):
        erf_gradient_maps(model, _inputs(model, args.size, 1).to(args.device), feature_layer(model))
    gflop = counter.get_total_flops() / 1e9
    del model

    # (variant, malloc, source tree or "" for this one) -> one result per round
    runs: Dict[tuple, list] = {(v, m, ""): [] for m in MALLOC for v in VARIANTS}
    if args.previous:
        runs[("analyzer", "default", str(Path(args.previous).resolve()))] = []
    maps: Dict[tuple, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            for index, (variant, malloc, tree) in enumerate(runs):
                map_file = Path(scratch) / f"{index}.npy"
                command = [sys.executable, __file__, "--time-variant", variant, "--malloc", malloc,
                           "--model", args.model, "--size", str(args.size), "--batch-size", str(args.batch_size),
                           "--warm-up", str(args.warm_up), "--images", str(args.images), "--device", args.device,
                           "--map-to", str(map_file)]
                # --malloc alone decides; a user's HPX_KEEP_FREED_MEMORY=0 must not turn the kept rows into default ones
                environment = {**os.environ, "HPX_KEEP_FREED_MEMORY": "1"}
                if tree:  # the earlier release's package first on the path
                    environment["PYTHONPATH"] = os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])
                done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
                runs[(variant, malloc, tree)].append(json.loads(done.stdout.strip().splitlines()[-1]))
                maps[(variant, malloc, tree)] = np.load(map_file)

    def median_seconds(key: tuple) -> float:
        return float(np.median([run["seconds_per_image"] for run in runs[key]]))

    count = args.images * args.batch_size
    print(f"model {Path(args.model).stem} at {args.size} px, device {args.device}, {torch.get_num_threads()} threads, "
          f"analyzer batch {args.batch_size}; {args.rounds} rounds of one process per variant (alternating), "
          f"each {args.warm_up * args.batch_size} warm-up + {count} timed images; medians over rounds")
    rates = [run["matmul_gflops"] for results in runs.values() for run in results]
    print(f"matmul 2048x2048: {min(rates):.1f}-{max(rates):.1f} GFLOP/s; ERF pass (forward to the layer + input "
          f"backward): {gflop:.1f} GFLOP; this release's native CPU kernels: {native_kernels()}")
    reference, worst = maps[("plain loop", "default", "")], 0.0
    for (variant, malloc, tree), results in runs.items():
        per_image = median_seconds((variant, malloc, tree))
        plain = median_seconds(("plain loop", malloc, ""))
        fraction = float(np.median([gflop / run["seconds_per_image"] / run["matmul_gflops"] for run in results]))
        peaks = [run["peak_gb_per_image"] for run in results if run["peak_gb_per_image"] is not None]
        peak = f"{max(peaks):5.2f}" if peaks else "  n/a"
        difference = np.abs(maps[(variant, malloc, tree)] - reference).max() / np.abs(reference).max()
        worst = max(worst, difference)
        print(f"{variant:<11} {malloc:<8} {'previous' if tree else 'this':<8} {per_image:7.2f} s/image  "
              f"speed-up {plain / per_image:5.2f}x  {gflop / per_image:6.1f} GFLOP/s ({fraction:.2f} of matmul)  "
              f"peak {peak} GB/image  map difference {difference:.1e}")
    as_run = median_seconds(("plain loop", "default", "")) / median_seconds(("analyzer", "kept", ""))
    print(f"hpx-analyze (analyzer, kept) against a script's plain loop (default malloc): {as_run:.2f}x")
    print(f"maps agree to {worst:.1e} of the map maximum: {'OK' if worst <= 1e-4 else 'FAIL'} at 1e-4")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hpx_former_s18")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=3, help="timed batches per process")
    parser.add_argument("--warm-up", type=int, default=3, help="untimed batches per process before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--batch-size", type=int, default=1, help="analyzer batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model at 64 px, one round (a smoke run)")
    parser.add_argument("--previous", metavar="TREE", help="also time the analyzer (default malloc) of an earlier "
                        "release's source tree, e.g. a `git worktree add` of its commit, in the same alternation")
    parser.add_argument("--time-variant", dest="variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=MALLOC, default="default", help=argparse.SUPPRESS)
    parser.add_argument("--map-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.size, args.rounds, args.warm_up, args.images = str(TINY_CONFIG), 64, 1, 1, 1
    if args.variant:
        if args.malloc == "kept":  # (an earlier release, timed with the default only, may not have it)
            from hpx_analysis.devices import keep_freed_memory
            keep_freed_memory()
        time_variant(args)
    elif benchmark(args) > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
