"""Truncation sweeps two ways, side by side in one run: the analyzer's batch evaluation against a naive loop.

Naive loop: for every (stage, relative size) the stage's kernels are masked with ``modify_kernels``
and the whole model runs (implicit filters re-evaluated per setting). Analyzer: the batch function of
:func:`hpx_analysis.analyzers.truncation.truncation_sweep` (stage inputs computed once, identical tap
sets evaluated once, masked kernels applied with ``override_kernel``). Both see the same batch, weights and
random labels; their top-1/top-5 correctness must be identical.

Two sweeps are measured: every stage with its long filters (4 stages x 11 sizes for hpx_former_s18)
and the last stage alone; for a ViT (``--model hyena_deit_tiny_patch16_224``) all blocks as one group, and the
second half of the blocks. Printed: seconds per sweep for both, the measured speed-up and two predictions
from FLOP counts (torch.utils.flop_counter, FFTs excluded): prefix reuse alone, and prefix reuse
plus skipping duplicate tap sets.

    python benchmarks/truncation.py             # hpx_former_s18, 224 px, batch 2, sizes 0:2:0.2, 1 thread
    python benchmarks/truncation.py --quick     # tiny model at 64 px: checks the script in seconds
    python benchmarks/truncation.py --model hyena_deit_tiny_patch16_224   # Hyena N-D blocks
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hpx_analysis.analyzers import truncation as trunc
from hpx_analysis.inspection import long_filter_layers
from hpx_analysis.interventions import kept_taps, modify_kernels, relative_tap_distance
from hpx_analysis.layer_names import GroupLike, group_refs
from hpx_analysis.models.zoo import load_model

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny" / "tiny_hpx.json"


@torch.no_grad()
def naive_sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, stages: Sequence[GroupLike],
                sizes: Sequence[float], input_hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Correctness (B, 1 + groups * sizes) with a full forward per setting (masks prepared once)."""
    infos = long_filter_layers(model, input_hw)
    distance = {info.index: relative_tap_distance(info) for info in infos}
    flags = [trunc._correct(model(images), labels)]
    for group in stages:
        refs = group_refs(group)
        for size in sizes:
            def cut(k: torch.Tensor, info, _size: float = size) -> torch.Tensor:
                return k * kept_taps(distance[info.index], _size).to(k.dtype)
            with modify_kernels(model, cut, layers=lambda info: any(ref.matches(info) for ref in refs)):
                flags.append(trunc._correct(model(images), labels))
    return torch.stack([f[0] for f in flags], 1).numpy(), torch.stack([f[1] for f in flags], 1).numpy()


@torch.no_grad()
def segment_flops(model: nn.Module, images: torch.Tensor) -> List[float]:
    """FLOPs of [stem, step 1, ..., step N, head] for one batch (steps: stages, or a ViT's blocks; FFTs not
    counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    flops = []
    x = images
    steps = trunc._model_steps(model)
    for segment in [steps.stem, *steps.steps, model.forward_head]:
        with FlopCounterMode(display=False) as counter:
            x = segment(x)
        flops.append(float(counter.get_total_flops()))
    return flops


def predicted_gain(flops: Sequence[float], plans: Sequence["trunc._StagePlan"], sizes: int) -> Tuple[float, float]:
    """Naive / analyzer cost from FLOPs: prefix reuse alone, and with duplicate tap sets skipped."""
    full = sum(flops)
    suffix = {p.entry: sum(flops[p.entry + 1:]) for p in plans}  # flops[0] is the stem
    naive = full * (1 + len(plans) * sizes)
    prefix_only = full + sum(sizes * suffix[p.entry] for p in plans)
    with_dedup = full + sum((len(p.masks) - (p.full is not None)) * suffix[p.entry] for p in plans)
    return naive / prefix_only, naive / with_dedup


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, stages: Sequence[GroupLike],
            sizes: Sequence[float], input_hw: Tuple[int, int], repeats: int) -> Dict[str, float]:
    """Best-of-``repeats`` seconds of both sweeps, checked for identical correctness."""
    timings = {"naive": [], "analyzer": []}
    for _ in range(repeats):
        start = time.perf_counter()
        naive = naive_sweep(model, images, labels, stages, sizes, input_hw)
        timings["naive"].append(time.perf_counter() - start)
        start = time.perf_counter()
        plans = trunc._stage_plans(model, stages, sizes, "disc", input_hw)
        fast = trunc._evaluate_batch(model, images, labels, plans)
        timings["analyzer"].append(time.perf_counter() - start)
        if not (np.array_equal(naive[0], fast[0]) and np.array_equal(naive[1], fast[1])):
            raise SystemExit("MISMATCH: the analyzer's correctness flags differ from the naive loop's")
    prefix, dedup = predicted_gain(segment_flops(model, images), plans, len(sizes))
    naive_s, fast_s = min(timings["naive"]), min(timings["analyzer"])
    return {"naive_s": naive_s, "analyzer_s": fast_s, "speedup": naive_s / fast_s, "predicted_prefix": prefix,
            "predicted_prefix_dedup": dedup, "distinct": {p.label: len(p.masks) for p in plans}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model at 64 px")
    parser.add_argument("--model", default="hpx_former_s18")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps timings stable on a CPU shared with other jobs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, size = (str(TINY_CONFIG), 64) if args.quick else (args.model, args.size)
    model = load_model(name, "random", seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    # labels = the model's own predictions, so accuracies are high and any truncation effect shows
    labels = model(images).argmax(1)
    sizes = [round(0.2 * i, 1) for i in range(11)]
    all_stages = sorted({info.stage for info in long_filter_layers(model)})
    print(f"{name} at {size}px, batch {args.batch}, {len(sizes)} sizes, torch threads {torch.get_num_threads()}")
    if hasattr(model, "stages"):
        sweeps = (("all stages", all_stages), (f"stage {all_stages[-1] + 1}", [all_stages[-1]]))
    else:  # a ViT: one stage of blocks
        depth = len(model.blocks)
        sweeps = (("all blocks", [0]), (f"blocks {depth // 2 + 1}-{depth}", [f"S1B{depth // 2 + 1}-{depth}"]))
    for label, stages in sweeps:
        r = measure(model, images, labels, stages, sizes, (size, size), args.repeats)
        print(f"{label:<12} naive {r['naive_s']:7.2f} s  analyzer {r['analyzer_s']:7.2f} s  "
              f"speed-up {r['speedup']:5.2f}x  predicted (FLOPs): prefix reuse {r['predicted_prefix']:.2f}x, "
              f"+ duplicate sets skipped {r['predicted_prefix_dedup']:.2f}x  distinct sets {r['distinct']}  "
              f"identical accuracies: yes")


if __name__ == "__main__":
    main()
