"""Native CPU kernels (``native.c``) for passes without a parameter gradient: FFT filtering of channels-last signals,
StarReLU, and HyenaPixel's gating around its filter.

The C source ships with the package and is compiled on first use with the system's C compiler (``$CC`` or ``cc``;
``-O3 -march=native -fopenmp``), about a second, into ``~/.cache/hpx-analysis/native`` (``HPX_NATIVE_DIR``
elsewhere), one library per source, compiler and CPU, and loaded through ctypes; its parallel loops run on PyTorch's
own OpenMP threads. Without a compiler, or with ``HPX_NATIVE=0``, every caller keeps its PyTorch path (a warning says
why, once): the kernels change speed, not results beyond float32 rounding (ERF maps of ``hpx_former_s18`` at 1024 px
within 1e-5 of their maximum). Which kernels computed a run is part of its key (:func:`description`).

Measured on 2 CPU cores at 1024 px (``benchmarks/native_kernels.py``, README "ERF"): the FFT filtering 2.5-4x faster
than PyTorch's FFTs of the same signal (no layout copies; every step of a 16-channel block in cache), and the ERF
pass of ``hpx_former_s18`` about 17% shorter with all three kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

NATIVE_ENV = "HPX_NATIVE"          # "0": never build or use the native kernels
NATIVE_DIR_ENV = "HPX_NATIVE_DIR"  # where built libraries are kept (default ~/.cache/hpx-analysis/native)
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")
LANES = 16  # channels per vector in native.c
MAX_GATE_CHANNELS = 4096  # the gating kernels' per-pixel buffer (native.c)

_FLOAT = ctypes.POINTER(ctypes.c_float)
_SIGNATURES = {
    "hpx_fft_filter": (ctypes.c_int, [_FLOAT, _FLOAT, _FLOAT, _FLOAT] + [ctypes.c_int] * 12),
    "hpx_star_relu": (None, [_FLOAT, _FLOAT, ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_int]),
    "hpx_star_relu_backward": (None, [_FLOAT, _FLOAT, _FLOAT, ctypes.c_float, ctypes.c_int64, ctypes.c_int]),
    "hpx_gate_in": (ctypes.c_int, [_FLOAT, _FLOAT, ctypes.c_float] + [_FLOAT] * 3
                    + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
    "hpx_gate_out": (ctypes.c_int, [_FLOAT, _FLOAT, _FLOAT, ctypes.c_float] + [_FLOAT] * 3
                     + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
    "hpx_gate_out_backward": (ctypes.c_int, [_FLOAT] * 8 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
    "hpx_gate_in_backward": (ctypes.c_int, [_FLOAT] * 6 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
}


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded (the message says why)."""


def _compiler() -> Tuple[str, str]:
    """(path, first line of ``--version``) of ``$CC`` or ``cc``; NativeBuildError if there is none."""
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise NativeBuildError(f"no C compiler ({name!r} not found; set CC)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"{path} --version failed: {error}") from error
    return path, (version.splitlines() or ["unknown"])[0]


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(wanted))) or platform.machine()


@functools.lru_cache(maxsize=None)
def _build_identity() -> Tuple[str, str, str]:
    """(compiler path, compiler version, key): the key hashes the source, compiler, flags and CPU."""
    path, version = _compiler()
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(), _cpu().encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return path, version, digest.hexdigest()[:16]


def _library_dir() -> Path:
    return Path(os.environ.get(NATIVE_DIR_ENV) or Path.home() / ".cache" / "hpx-analysis" / "native")


def build() -> Path:
    """The compiled library for this source, compiler and CPU, compiled now if it is not there yet (atomically, so
    concurrent processes each see a whole file). NativeBuildError if compiling fails."""
    compiler, _, key = _build_identity()
    target = _library_dir() / f"hpx_native-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeBuildError(f"cannot create {target.parent}: {error}") from error
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"{compiler} failed: {error}") from error
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        message = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise NativeBuildError(f"{compiler} could not compile {SOURCE.name}: {message}")
    os.replace(partial, target)
    return target


@functools.lru_cache(maxsize=None)
def _loaded() -> Optional[ctypes.CDLL]:
    """The native library, built and loaded once per process; None (with one warning) where that fails."""
    try:
        library = ctypes.CDLL(str(build()))
    except (NativeBuildError, OSError) as error:
        warnings.warn(f"hpx-analysis runs without its native CPU kernels (PyTorch's instead, slower): {error}",
                      RuntimeWarning, stacklevel=3)
        return None
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library


def library() -> Optional[ctypes.CDLL]:
    """The native library, or None where ``HPX_NATIVE=0`` or it cannot be built."""
    return None if os.environ.get(NATIVE_ENV, "1") == "0" else _loaded()


def description() -> str:
    """Which native kernels compute a run (for run keys): the source, compiler and CPU key and the compiler, or
    ``"off"``."""
    if library() is None:
        return "off"
    _, version, key = _build_identity()
    return f"{key} ({version}; {' '.join(FLAGS)})"


def _pointer(tensor: Optional[Tensor]) -> Optional[ctypes.POINTER(ctypes.c_float)]:
    return None if tensor is None else ctypes.cast(tensor.data_ptr(), _FLOAT)


def _threads() -> int:
    return torch.get_num_threads()


def _channels_last_float(*tensors: Tensor) -> bool:
    """Whether every tensor is a (B, C, H, W) float32 CPU tensor whose memory is channels-last, (B, H, W, C)."""
    return all(t.dim() == 4 and t.device.type == "cpu" and t.dtype == torch.float32
               and t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


def filters(signal: Tensor, spectrum: Tensor, fft_shape: Sequence[int]) -> bool:
    """Whether :func:`fft_filter` takes this filtering: a 2D FFT of a channels-last float32 CPU signal whose spectrum
    is a complex64 CPU tensor (not a conjugate view) that needs no gradient, with the library available."""
    return (len(fft_shape) == 2 and _channels_last_float(signal) and spectrum.dtype == torch.complex64
            and spectrum.device.type == "cpu" and not spectrum.requires_grad and not spectrum.is_conj()
            and library() is not None)


def spectrum_lanes(spectrum: Tensor) -> Tensor:
    """spectrum (C, NH, NW // 2 + 1) complex64 (not a conjugate view: :func:`fft_filter` conjugates on request) in
    native.c's layout: (ceil(C / 16), 2, NW // 2 + 1, NH, 16) float32, channels zero-padded to a multiple of 16. Kept
    on the spectrum tensor while its version holds (the spectra of :class:`.KernelFFTCache` live as long as their
    filter's values)."""
    if spectrum.is_conj():
        raise ValueError("spectrum_lanes takes a spectrum, not a conjugate view of one")
    kept = getattr(spectrum, "_hpx_native_lanes", None)
    if kept is not None and kept[0] == spectrum._version:
        return kept[1]
    channels, rows, columns = spectrum.shape
    blocks = -(-channels // LANES)
    padded = torch.zeros(blocks * LANES, rows, columns, 2)
    padded[:channels] = torch.view_as_real(spectrum)
    lanes = padded.view(blocks, LANES, rows, columns, 2).permute(0, 4, 3, 2, 1).contiguous()
    spectrum._hpx_native_lanes = (spectrum._version, lanes)
    return lanes


def fft_filter(signal: Tensor, spectrum: Tensor, fft_shape: Sequence[int], place: Sequence[int],
               read: Sequence[int], conjugate: bool, skip: Optional[Tensor]) -> Tensor:
    """native.c's ``hpx_fft_filter``: signal (B, C, H, W) channels-last, zero-padded to fft_shape at ``place``,
    multiplied by ``spectrum`` (C, NH, NW // 2 + 1) (its conjugate with ``conjugate``), read from ``read``, plus
    ``skip`` (C,)-broadcastable times signal where given: (B, C, H, W) channels-last float32. Call where
    :func:`filters` holds."""
    batch, channels, height, width = signal.shape
    out = torch.empty_like(signal, memory_format=torch.channels_last)
    skip_flat = None if skip is None else skip.detach().reshape(-1).float().contiguous()
    if skip_flat is not None and skip_flat.numel() != channels:
        raise ValueError(f"skip has {skip_flat.numel()} values for {channels} channels")
    lanes = spectrum_lanes(spectrum)
    status = library().hpx_fft_filter(
        _pointer(signal), _pointer(out), _pointer(lanes), _pointer(skip_flat), int(conjugate),
        batch, channels, height, width, *fft_shape, *place, *read, _threads())
    if status:
        raise RuntimeError({1: "native FFT filtering ran out of memory",
                            2: f"native FFT filtering: {tuple(signal.shape)} at {tuple(place)} / {tuple(read)} does "
                               f"not fit the FFT {tuple(fft_shape)}"}.get(status, f"native FFT filtering: {status}"))
    return out


def star_relu(x: Tensor, scale: float, bias: float) -> Tensor:
    """bias + scale * relu(x)^2 in x's shape and memory format, for x where :func:`dense_float` holds."""
    out = torch.empty_like(x)
    library().hpx_star_relu(_pointer(x), _pointer(out), scale, bias, x.numel(), _threads())
    return out


def star_relu_backward(x: Tensor, grad: Tensor, scale: float) -> Tensor:
    """grad * 2 * scale * relu(x), the input gradient of :func:`star_relu`; grad is made x's layout first."""
    grad = grad.contiguous(memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format)
    grad_x = torch.empty_like(x)
    library().hpx_star_relu_backward(_pointer(x), _pointer(grad), _pointer(grad_x), scale, x.numel(), _threads())
    return grad_x


def dense_float(x: Tensor) -> bool:
    """Whether x is a float32 CPU tensor whose memory is one dense block (contiguous or channels-last), with the
    library available: what :func:`star_relu` takes."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and library() is not None
            and (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))))


def gates(qkv: Tensor, qk_weight: Optional[Tensor], out_weight: Optional[Tensor]) -> bool:
    """Whether the gating kernels take HyenaPixel's gating of qkv (B, 3C, H, W): channels-last float32 on the CPU, two
    layer norms with float32 weights, at most MAX_GATE_CHANNELS channels, the library available."""
    return (qk_weight is not None and out_weight is not None and _channels_last_float(qkv)
            and all(w.dtype == torch.float32 and w.is_contiguous() for w in (qk_weight, out_weight))
            and qkv.shape[1] // 3 <= MAX_GATE_CHANNELS
            and library() is not None)


def _gating_shape(qkv: Tensor) -> Tuple[int, int, Tuple[int, int, int, int]]:
    """Pixels P, channels C and the (B, C, H, W) shape of one of q, k, v for qkv (B, 3C, H, W)."""
    batch, channels3, height, width = qkv.shape
    return batch * height * width, channels3 // 3, (batch, channels3 // 3, height, width)


def _empty(shape: Tuple[int, ...]) -> Tensor:
    """An uninitialised float32 (B, C, H, W) tensor, channels-last."""
    return torch.empty(shape, memory_format=torch.channels_last)


def gate_in(qkv: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The layer norm of q * k for qkv (B, 3C, H, W): normed (B, C, H, W) and the norm's statistics (2, P) (mean,
    1 / std per pixel)."""
    pixels, channels, shape = _gating_shape(qkv)
    normed, statistics, weight = _empty(shape), torch.empty(2, pixels), weight.detach()
    library().hpx_gate_in(_pointer(qkv), _pointer(weight), eps, _pointer(normed), _pointer(statistics[0]),
                          _pointer(statistics[1]), pixels, channels, _threads())
    return normed, statistics


def gate_out(qkv: Tensor, filtered: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The layer norm of v * filtered (filtered (B, C, H, W) channels-last): out (B, C, H, W) and the norm's
    statistics (2, P)."""
    pixels, channels, shape = _gating_shape(qkv)
    out, statistics, weight = _empty(shape), torch.empty(2, pixels), weight.detach()
    library().hpx_gate_out(_pointer(qkv), _pointer(filtered), _pointer(weight), eps, _pointer(out),
                           _pointer(statistics[0]), _pointer(statistics[1]), pixels, channels, _threads())
    return out, statistics


def gate_out_backward(grad: Tensor, qkv: Tensor, filtered: Tensor, statistics: Tensor, weight: Tensor,
                      grad_qkv: Tensor) -> Tensor:
    """The gradient of :func:`gate_out` from grad (B, C, H, W) of its output (v * filtered recomputed per pixel): v's
    written into grad_qkv's last C channels (grad_qkv (B, 3C, H, W) channels-last); returns filtered's (B, C, H, W)."""
    pixels, channels, shape = _gating_shape(qkv)
    grad, grad_filtered, weight = grad.contiguous(memory_format=torch.channels_last), _empty(shape), weight.detach()
    library().hpx_gate_out_backward(_pointer(grad), _pointer(qkv), _pointer(filtered), _pointer(statistics[0]),
                                    _pointer(statistics[1]), _pointer(weight), _pointer(grad_qkv),
                                    _pointer(grad_filtered), pixels, channels, _threads())
    return grad_filtered


def gate_in_backward(grad: Tensor, qkv: Tensor, statistics: Tensor, weight: Tensor, grad_qkv: Tensor) -> None:
    """The gradient of :func:`gate_in` from grad (B, C, H, W) of normed (q * k recomputed per pixel): q's and k's
    written into grad_qkv's first 2C channels."""
    pixels, channels, _ = _gating_shape(qkv)
    grad, weight = grad.contiguous(memory_format=torch.channels_last), weight.detach()
    library().hpx_gate_in_backward(_pointer(grad), _pointer(qkv), _pointer(statistics[0]), _pointer(statistics[1]),
                                   _pointer(weight), _pointer(grad_qkv), pixels, channels, _threads())
