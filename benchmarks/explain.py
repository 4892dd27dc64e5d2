"""FGVis speed, measured side by side in one run.

1. Time per optimisation step with the activation-bound defense versus a plain forward + backward
   (gradient to the input) of the same model and batch. Target: at most 15% overhead.
2. Images/s of batched versus one-at-a-time explanation (same settings, same seeds).
3. ``--search``: the whole lambda search on the shipped HyenaPixel demo proxy (4 noisy same-row images, reference
   ``mean``, the demo's run), the tries side by side (``fgvis``) against the reference's procedure, one image and
   one try at a time until a try flips (``lambda_search(max_samples=1)``); the chosen tries must agree.

    python benchmarks/explain.py --quick              # tiny HyenaPixel, 64 px (seconds on a CPU)
    python benchmarks/explain.py -m hpx_former_s18 --size 224 --batch 8 --device cuda
    python benchmarks/explain.py --search             # lambda search on the demo proxy (a few minutes on a CPU)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from hpx_analysis.analyzers.fgvis import (FgvisSettings, activation_bounds, class_ranks, fgvis, lambda_search,
                                          optimise_masks, sample_seed)
from hpx_analysis.analyzers.attribution import reference_image
from hpx_analysis.devices import resolve_device
from hpx_analysis.images import model_mean_std
from hpx_analysis.models.zoo import load_model

TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny"
STILL_LR = 1e-12
"""A learning rate whose steps (at most 1e-12, the gradient being divided by its maximum) leave a float32 mask at 1."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(variants: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds per call of each variant; the variants run interleaved (one round each per
    repeat, after a warm-up round) so load changes on a shared machine hit all of them alike."""
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def search_comparison(repeats: int) -> None:
    """Part 3: seconds of the lambda search side by side and one try at a time, interleaved, and their records."""
    from hpx_analysis.demo.pipeline import FGVIS_REFERENCE, GLOBAL_TASK, HPX_PROXY, shipped_proxy
    from hpx_analysis.demo.tasks import sample_task
    from hpx_analysis.demo.training import EVAL_SEED_OFFSET
    from hpx_analysis.images import normalise

    model = shipped_proxy(HPX_PROXY, GLOBAL_TASK)
    batch = sample_task(GLOBAL_TASK, 64, EVAL_SEED_OFFSET + 2)
    images = normalise(batch.images[torch.nonzero(batch.labels == 1).flatten()[:4]], *model_mean_std(model))
    settings = FgvisSettings(reference=FGVIS_REFERENCE)
    records: Dict[str, list] = {}

    def side_by_side() -> None:
        records["side by side"] = [(r["lambda"], r["iterations"]) for r in fgvis(model, images, seed=0,
                                                                                 settings=settings).records]

    def one_at_a_time() -> None:
        with activation_bounds(model) as bounds:
            with bounds.record(), torch.no_grad():
                probs = model(images).softmax(-1)
            targets = probs.argmax(-1)
            references = reference_image(images, FGVIS_REFERENCE, *model_mean_std(model))
            chosen = lambda_search(model, bounds, images, references, targets, class_ranks(probs, targets),
                                   list(range(len(images))), settings, max_samples=1)  # fgvis(seed=0)'s seeds
        records["one at a time"] = [(settings.lambda_of(attempt), outcome.iterations) for attempt, outcome in chosen]

    seconds = _timed({"side by side": side_by_side, "one at a time": one_at_a_time}, repeats, torch.device("cpu"))
    print(f"lambda search, demo proxy, {len(images)} images, reference {FGVIS_REFERENCE}: "
          + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
          + f"; speed-up {seconds['one at a time'] / seconds['side by side']:.2f}x")
    print(f"chosen (lambda, iterations): {records['side by side']}; "
          f"{'the same' if records['side by side'] == records['one at a time'] else 'DIFFERENT'} one at a time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default=str(TINY / "tiny_hpx.json"))
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64 px, batch 4, few steps")
    parser.add_argument("--search", action="store_true", help="only part 3, the lambda search on the demo proxy")
    args = parser.parse_args()
    if args.search:
        search_comparison(max(1, args.repeats // 5))
        return
    if args.quick:
        args.model, args.size, args.batch, args.steps, args.repeats = str(TINY / "tiny_hpx.json"), 64, 4, 10, 3

    device = resolve_device(args.device)
    model = load_model(args.model, args.weights, device=device)
    mean, std = model_mean_std(model)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    references = reference_image(images, "black", mean, std)
    lambdas = torch.full((args.batch,), 1e-4, device=device)
    rows = torch.arange(args.batch, device=device)
    seeds = [sample_seed(0, i) for i in range(args.batch)]
    # every sample runs all steps: the target is the clean top-1 and, with no noise and a learning rate whose steps
    # vanish below float32 resolution (fgvis refuses lr = 0), the mask stays 1 and the evidence the clean image (the
    # work per step is the same as in a real run)
    with torch.no_grad():
        targets = model(images).argmax(-1)
    settings = FgvisSettings(iterations=args.steps, lr=STILL_LR, noise_std=0.0)

    def plain() -> None:
        for _ in range(args.steps):
            x = images.clone().requires_grad_(True)
            torch.autograd.grad(model(x).softmax(-1)[:, 0].sum(), x)

    def fgvis_steps(bounded: bool):
        def run() -> None:
            with activation_bounds(model) as bounds:
                bounds.bounded = bounded
                with bounds.record(), torch.no_grad():
                    model(images)
                optimise_masks(model, bounds, images, references, targets, lambdas, seeds, rows, settings)
        return run

    print(f"model {Path(args.model).stem}, {args.size}px, batch {args.batch}, {args.steps} steps, device {device}")
    step = _timed({"plain": plain, "unbounded": fgvis_steps(False), "bounded": fgvis_steps(True)}, args.repeats,
                  device)
    t_plain, t_nobound, t_bound = step["plain"] / args.steps, *(step[k] / (args.steps + 1)
                                                                 for k in ("unbounded", "bounded"))
    print(f"plain forward+backward      {t_plain * 1e3:8.2f} ms/step")
    print(f"fgvis step without bounds   {t_nobound * 1e3:8.2f} ms/step  ratio {t_nobound / t_plain:.3f}")
    print(f"fgvis step with bounds      {t_bound * 1e3:8.2f} ms/step  ratio {t_bound / t_plain:.3f} "
          f"(overhead {100 * (t_bound / t_plain - 1):+.1f}%, target <= +15%)")
    print(f"bounds alone (vs unbounded step)                  overhead {100 * (t_bound / t_nobound - 1):+.1f}%")

    explain_settings = FgvisSettings(iterations=args.steps, lr=STILL_LR, noise_std=0.0, lambda_tries=1)
    count = args.batch

    def explain(batch_size: int):
        return lambda: fgvis(model, images[:count], target=targets[:count].tolist(), settings=explain_settings,
                             batch_size=batch_size, mean=mean, std=std)

    whole = _timed({"single": explain(1), "batched": explain(count)}, max(1, args.repeats // 2), device)
    t_single, t_batched = whole["single"], whole["batched"]
    print(f"one at a time   {count / t_single:8.2f} images/s")
    print(f"batched ({count:>2})    {count / t_batched:8.2f} images/s  speed-up {t_single / t_batched:.2f}x")


if __name__ == "__main__":
    main()
