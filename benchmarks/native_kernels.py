"""Native CPU kernels against the PyTorch paths they replace, per call, side by side in one process.

At the shapes of ``hpx_former_s18``'s four stages at 1024 px (batch 1, channels-last, the model's FFT sizes), each
pair alternating ``--repeats`` times after a warm-up, medians: the long filter's FFT filtering without a gradient
(convolution and adjoint, skip gain included), the HyenaPixel gating forward + backward (``NativeHyenaPixelGating``
against ``FrozenHyenaPixelGating``, each with its own filtering) and StarReLU forward + backward on the MLP's hidden
activation. Prints milliseconds and the speed-up; checks that the outputs agree to float32 rounding.

    python benchmarks/native_kernels.py              # about a minute on 2 cores
    python benchmarks/native_kernels.py --quick      # small shapes, a smoke run (a test)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from hpx_analysis.devices import keep_freed_memory
from hpx_analysis.models import frozen, native
from hpx_analysis.models.long_filters import apply_kernel_fft, apply_kernel_fft_adjoint, fft_shape_for, kernel_fft

# (channels, side, long kernel size) of hpx_former_s18's stages at 1024 px (FFTs of 320, 160, 80, 40); MLP ratio 4
STAGES = ((64, 256, 129), (128, 128, 65), (320, 64, 33), (512, 32, 17))
QUICK_STAGES = ((20, 24, 9), (40, 12, 5))


def _channels_last(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).contiguous(memory_format=torch.channels_last)


def _with_native(enabled: bool, function: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """function run with the native kernels on or off (``HPX_NATIVE``)."""
    def run() -> torch.Tensor:
        os.environ[native.NATIVE_ENV] = "1" if enabled else "0"
        return function()
    return run


def _cases(channels: int, side: int, kernel_size: int) -> Dict[str, Dict[str, Callable[[], torch.Tensor]]]:
    """case name -> variant ("native", "pytorch") -> a callable for one stage; each returns its output to compare (no
    gradient flows in the filter cases: nothing requires one)."""
    generator = torch.Generator().manual_seed(channels)
    centre = (kernel_size // 2, kernel_size // 2)
    fft_shape = fft_shape_for((side, side), (kernel_size, kernel_size), centre)
    spectrum = kernel_fft(0.05 * torch.randn(channels, kernel_size, kernel_size, generator=generator), fft_shape)
    skip = torch.randn(1, channels, 1, 1, generator=generator)
    signal = _channels_last(1, channels, side, side, generator=generator)
    qkv = _channels_last(1, 3 * channels, side, side, generator=generator)
    grad = _channels_last(1, channels, side, side, generator=generator)
    weights = [torch.rand(channels, generator=generator) + 0.5 for _ in range(2)]
    hidden = _channels_last(1, 4 * channels, side, side, generator=generator)
    hidden_grad = _channels_last(1, 4 * channels, side, side, generator=generator)
    scale, bias = torch.tensor([0.8]), torch.tensor([-0.2])

    def gating(kind: type) -> torch.Tensor:
        x = qkv.clone().requires_grad_(True)
        kind.apply(x, *weights, 1e-5, spectrum, skip, fft_shape, centre).backward(grad)
        return x.grad

    def star_relu() -> torch.Tensor:
        x = hidden.clone().requires_grad_(True)
        frozen.FrozenStarReLU.apply(x, scale, bias).backward(hidden_grad)
        return x.grad

    filtering = {"filter": lambda: apply_kernel_fft(signal, spectrum, fft_shape, centre, skip=skip),
                 "filter adjoint": lambda: apply_kernel_fft_adjoint(signal, spectrum, fft_shape, centre, skip=skip)}
    return {**{name: {"native": _with_native(True, f), "pytorch": _with_native(False, f)}
               for name, f in filtering.items()},
            "gating f+b": {"native": _with_native(True, lambda: gating(frozen.NativeHyenaPixelGating)),
                           "pytorch": _with_native(False, lambda: gating(frozen.FrozenHyenaPixelGating))},
            "StarReLU f+b": {"native": _with_native(True, star_relu), "pytorch": _with_native(False, star_relu)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="alternating pairs per case")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats (a smoke run)")
    args = parser.parse_args()
    if native.library() is None:
        raise SystemExit("native_kernels: the native kernels are not available here (see the warning above)")
    keep_freed_memory()  # as hpx-analyze runs: no page faults on reused activations
    stages, repeats = (QUICK_STAGES, 2) if args.quick else (STAGES, args.repeats)
    print(f"native kernels {native.description()}; {torch.get_num_threads()} threads; medians of {repeats} "
          "alternating pairs after a warm-up")
    worst = 0.0
    for channels, side, kernel_size in stages:
        for name, runs in _cases(channels, side, kernel_size).items():
            outputs = {key: f() for key, f in runs.items()}
            times: Dict[str, List[float]] = {key: [] for key in runs}
            for repeat in range(repeats):
                for key in (("native", "pytorch") if repeat % 2 == 0 else ("pytorch", "native")):
                    start = time.perf_counter()
                    runs[key]()
                    times[key].append(time.perf_counter() - start)
            expected = outputs["pytorch"]
            difference = float((outputs["native"] - expected).abs().max() / expected.abs().max())
            worst = max(worst, difference)
            native_ms, torch_ms = (1e3 * float(np.median(times[key])) for key in ("native", "pytorch"))
            print(f"{channels:4d} x {side:3d}^2  {name:<15} native {native_ms:7.2f} ms  pytorch {torch_ms:7.2f} ms  "
                  f"{torch_ms / native_ms:5.2f}x  difference {difference:.1e}")
    os.environ.pop(native.NATIVE_ENV, None)
    print(f"outputs agree to {worst:.1e} of their maximum: {'OK' if worst <= 1e-5 else 'FAIL'} at 1e-5")
    if worst > 1e-5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
