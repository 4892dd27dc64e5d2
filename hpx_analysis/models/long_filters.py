"""Implicit long filters of HyenaPixel (2D) and bidirectional/causal Hyena (1D).

Both filters are evaluated from a stored positional embedding by a small sine-activated
network and multiplied by a learned exponential window. They are applied as true
convolutions (not cross-correlations) with zero padding, computed with FFTs, plus a
per-channel skip gain ``u * bias``.

In eval mode a filter does not depend on the input, so its FFT is cached per FFT size and
device for as long as the values it was computed from hold: the weights' (every use compares
them in full, so an edit by any route, ``.data`` included, is seen) or, under a kernel
modifier, the modified kernel's (the modifier runs on every use; its closure may change). ``with
filt.override_kernel(k):`` makes the filter apply a given kernel instead; its FFTs live in
a cache of their own for the duration of the block, so the learned kernel's cache is
untouched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import Tensor, nn

from ..errors import HpxError
from .native import fft_filter as native_fft_filter
from .native import filters as native_filters

KernelModifier = Callable[[Tensor], Tensor]


class Sin(nn.Module):
    """``sin(freq * x)`` with a learnable frequency per feature; ``freq_shape`` broadcasts over x."""

    def __init__(self, freq_shape: Sequence[int], init: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full(tuple(freq_shape), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


def fft_shape_for(sizes: Sequence[int], kernel_size: Sequence[int], centre: Sequence[int]) -> Tuple[int, ...]:
    """Smallest fast FFT size per dim at which a centred linear convolution does not wrap around."""
    return tuple(next_fast_len(n + max(c, s - 1 - c), real=True) for n, s, c in zip(sizes, kernel_size, centre))


def kernel_fft(kernel: Tensor, fft_shape: Sequence[int]) -> Tensor:
    """rFFT of a kernel (C, *S) zero-padded to fft_shape, in float32: (C, *fft_shape[:-1], fft_shape[-1]//2+1)."""
    dims = tuple(range(-len(fft_shape), 0))
    return torch.fft.rfftn(kernel.float(), s=tuple(fft_shape), dim=dims)


FFT_GROUP_BYTES = 4 * 2 ** 20  # a signal of more padded float32 planes than this is filtered without a gradient
FFT_GROUPS = 8                  # in this many groups of channels, each group's planes in cache between the FFT steps


def _channel_groups(signal: Tensor, fft_shape: Sequence[int]) -> Iterator[Tuple[int, int]]:
    """(first channel, count) of the groups in which :func:`_filter_in_fft_by_torch` filters signal (B, C, *N)
    without a gradient: all channels at once up to FFT_GROUP_BYTES of padded planes, else about C / FFT_GROUPS
    channels (at most FFT_GROUP_BYTES, one at least). At 1024 px that is 12-23% less time per filter call at
    HyenaPixel's stages 1-3; at stage 4 (3.3 MB) groups cost 10% more (docs/erf-performance.md). The values: the same
    bits at those sizes, float32 rounding at some others (MKL's batched transforms may round differently in another
    batch size: 1e-7 of the maximum at a 60 x 60 FFT in a batch of 32). 1D signals (Hyena) and signals off the CPU (a
    GPU's batched FFTs want every channel at once) stay whole."""
    channels = signal.shape[1]
    plane_bytes = 4 * signal.shape[0] * math.prod(fft_shape)
    count = channels
    if signal.device.type == "cpu" and len(fft_shape) > 1 and plane_bytes * channels > FFT_GROUP_BYTES:
        count = max(1, min(-(-channels // FFT_GROUPS), FFT_GROUP_BYTES // plane_bytes))
    for start in range(0, channels, count):
        yield start, min(count, channels - start)


def _filter_in_fft(signal: Tensor, spectrum: Tensor, fft_shape: Sequence[int], place: Sequence[int],
                   read: Sequence[int], conjugate: bool = False, skip: Optional[Tensor] = None) -> Tensor:
    """signal (B, C, *N) zero-padded to fft_shape with its first pixel at ``place``, multiplied by ``spectrum`` (its
    conjugate with ``conjugate``) in the rFFT domain, read back from ``read`` on, plus ``skip * signal`` where skip
    (1, C, 1, ...) is given: (B, C, *N), the signal's dtype and, for a channels-last (B, C, H, W) signal, its layout
    (the FFTs run on (H, W)-contiguous copies; an output left in their layout would make every elementwise operation
    after it mix layouts, several times slower on the CPU). Where no gradient flows, a channels-last float32 CPU
    signal is filtered by the native kernel (:mod:`.native`: no layout copies, 2.5-4x faster), others as below."""
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (signal, spectrum, skip))
    if not tracked and native_filters(signal, spectrum, fft_shape):
        return native_fft_filter(signal, spectrum, fft_shape, place, read, conjugate, skip)
    filtered = _filter_in_fft_by_torch(signal, spectrum.conj() if conjugate else spectrum, fft_shape, place, read)
    return filtered if skip is None else torch.addcmul(filtered, signal, skip)


def _filter_in_fft_by_torch(signal: Tensor, spectrum: Tensor, fft_shape: Sequence[int], place: Sequence[int],
                            read: Sequence[int]) -> Tensor:
    """:func:`_filter_in_fft` without conjugate and skip, by PyTorch's FFTs."""
    dims = tuple(range(-len(fft_shape), 0))
    sizes = signal.shape[-len(fft_shape):]
    # padded explicitly: the same values as rfftn(s=fft_shape), 5-10% faster forward and backward at 1024 px
    padding = [pad for n, size, before in zip(reversed(fft_shape), reversed(sizes), reversed(place))
               for pad in (before, n - size - before)]
    channels_last = signal.dim() == 4 and signal.is_contiguous(memory_format=torch.channels_last)
    groups = list(_channel_groups(signal, fft_shape))
    if torch.is_grad_enabled() and (signal.requires_grad or spectrum.requires_grad):
        # autograd's graph of irfftn: the split inverse below gives the same values, but its gradient rounds
        # differently
        full = torch.fft.irfftn(torch.fft.rfftn(F.pad(signal.float().contiguous(), padding), dim=dims) * spectrum,
                                s=tuple(fft_shape), dim=dims)
        for dim, n, start in zip(dims, sizes, read):
            full = full.narrow(dim, start, n)
    elif len(groups) == 1:
        full = _filtered_without_graph(signal, spectrum, fft_shape, padding, read)
    else:  # each group written into the output in the signal's dtype and layout
        out = torch.empty_like(signal, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for first, count in groups:
            out.narrow(1, first, count).copy_(_filtered_without_graph(
                signal.narrow(1, first, count), spectrum.narrow(0, first, count), fft_shape, padding, read))
        return out
    return full.to(signal.dtype).contiguous(memory_format=torch.channels_last) if channels_last else full.to(
        signal.dtype)


def _filtered_without_graph(signal: Tensor, spectrum: Tensor, fft_shape: Sequence[int], padding: Sequence[int],
                            read: Sequence[int]) -> Tensor:
    """:func:`_filter_in_fft`'s result for signal (B, C, *N) where no gradient flows, float32, a view into the last
    inverse's output: irfftn's own steps (complex inverses over the leading dims, then the real one over the last)
    with the rows the crop drops left out before the last (10-15% less time, the same values)."""
    dims = tuple(range(-len(fft_shape), 0))
    sizes = signal.shape[-len(fft_shape):]
    product = torch.fft.rfftn(F.pad(signal.float().contiguous(), padding), dim=dims) * spectrum
    if len(dims) > 1:
        product = torch.fft.ifftn(product, dim=dims[:-1])
    for dim, n, start in zip(dims[:-1], sizes[:-1], read[:-1]):
        product = product.narrow(dim, start, n)
    return torch.fft.irfft(product, n=fft_shape[-1], dim=-1).narrow(-1, read[-1], sizes[-1])


def apply_kernel_fft(signal: Tensor, kernel_f: Tensor, fft_shape: Sequence[int], centre: Sequence[int],
                     skip: Optional[Tensor] = None) -> Tensor:
    """True convolution of signal (B, C, *N) with a kernel given by its FFT (:func:`kernel_fft`, fft_shape from
    :func:`fft_shape_for`), plus ``skip * signal`` where skip (1, C, 1, ...) is given: (B, C, *N), in the signal's
    dtype and layout."""
    return _filter_in_fft(signal, kernel_f, fft_shape, (0,) * len(fft_shape), centre, skip=skip)


def apply_kernel_fft_adjoint(grad: Tensor, kernel_f: Tensor, fft_shape: Sequence[int], centre: Sequence[int],
                             skip: Optional[Tensor] = None) -> Tensor:
    """The adjoint of :func:`apply_kernel_fft` applied to grad (B, C, *N), i.e. the gradient of its input (the
    cross-correlation with the kernel, plus ``skip * grad``): (B, C, *N), in grad's dtype and layout. fft_shape
    leaves no wrap-around here either: it spans N + max(c, S - 1 - c) per dim."""
    return _filter_in_fft(grad, kernel_f, fft_shape, centre, (0,) * len(fft_shape), conjugate=True, skip=skip)


def fft_conv_same(signal: Tensor, kernel: Tensor, centre: Sequence[int]) -> Tensor:
    """True convolution of signal (B, C, *N) with kernel (C, *S), zero padding, output the size of signal.

    ``centre[i]`` is the kernel index that sits on the output pixel (offset 0). The FFT is large
    enough that nothing wraps around, so this equals the direct zero-padded convolution.
    """
    dims = kernel.dim() - 1
    fft_shape = fft_shape_for(signal.shape[-dims:], kernel.shape[1:], centre)
    return apply_kernel_fft(signal, kernel_fft(kernel, fft_shape), fft_shape, centre)


class KernelFFTCache:
    """FFTs of a kernel (or a kernel itself), one per key (FFT shape and device), valid while the tensors they were
    computed from keep their values. The values are compared in full on every use: an edit through ``.data`` leaves
    a tensor's version counter alone, and a kernel modifier's closure is not a tensor of the filter at all, so
    identities and versions would miss both."""

    def __init__(self) -> None:
        self._entries: Dict[Tuple, Tensor] = {}
        self._sources: List[Tensor] = []  # copies of the tensors the entries were computed from

    def _holds(self, sources: Sequence[Tensor]) -> bool:
        return len(sources) == len(self._sources) and all(
            kept.shape == source.shape and kept.dtype == source.dtype and kept.device == source.device
            and torch.equal(kept, source) for kept, source in zip(self._sources, sources))

    def lookup(self, sources: Sequence[Tensor], key: Tuple) -> Optional[Tensor]:
        """The entry of ``key`` if the entries were computed from tensors with ``sources``' values, else None; entries
        from other values are dropped, and ``sources``' values kept for those :meth:`store` adds next."""
        if not self._holds(sources):
            self._entries.clear()
            self._sources = [source.detach().clone() for source in sources]
        return self._entries.get(key)

    def store(self, key: Tuple, value: Tensor) -> None:
        self._entries[key] = value

    def clear(self) -> None:
        self._entries.clear()
        self._sources = []

    def __len__(self) -> int:
        return len(self._entries)


def nearest_displacement(offsets: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """Nearest 2D displacement (rows a, columns b), each shaped like the integer 1D ``offsets`` d, on
    rows of ``width`` W: a * W + b = d with |b| <= W / 2; on a tie |b| = W / 2 the smaller |a|."""
    half = width // 2
    cols = torch.remainder(offsets + half, width) - half  # in [-half, W - half - 1]
    rows = torch.div(offsets - cols, width, rounding_mode="floor")
    tie = (2 * cols.abs() == width) & (rows > 0)  # (a, -W/2) with a > 0: (a - 1, W/2) is nearer the centre row
    return rows - tie.long(), torch.where(tie, -cols, cols)


def kept_span(windows: Tensor, threshold: float) -> Tensor:
    """Taps (C,) from the first to the last tap whose window value ``windows`` (C, T) reaches ``threshold``;
    0 where none does."""
    taps = torch.arange(windows.shape[-1], device=windows.device)
    above = windows >= threshold
    first = torch.where(above, taps, windows.shape[-1]).amin(1)
    last = torch.where(above, taps, -1).amax(1)
    return (last - first + 1).clamp_min(0).to(windows.dtype)


class LongFilterBase(nn.Module):
    """Common behaviour of implicit long filters: kernel modifiers, kernel overrides and the FFT cache; and the
    facts the analyses read from every long-filter family (its protocol, in the spirit of timm's models describing
    themselves):

    - ``kind``: the family's name in results; ``kernel()``: the applied kernel (C, *S) as a true convolution,
      ``y[p] = sum_d K[centre + d] x[p - d]``; ``kernel_size`` and ``centre`` (the index of offset 0 per axis);
    - ``on_sequence``: the kernel runs along the row-major flattened map (1D taps, wrapped onto the map for
      pictures and cuts); ``one_sided``: its taps lie on one side of the centre along each of its own axes (a
      causal or quarter-plane kernel), else around it (a causal kernel on the sequence still wraps onto both sides
      of the centre along a row of the map);
    - :meth:`tap_displacements`: where each tap sits on a feature map, the geometry of truncation masks, energy
      coverage and the wrapped pictures;
    - :meth:`window`, :meth:`window_parameters` where the family has a decay window, and :meth:`window_extent`,
      its coverage rule: the taps its window keeps (a windowless kernel keeps them all).

    Subclasses set ``channels`` and implement ``base_kernel()`` (the learned kernel, (C, S, S) or (C, T)),
    ``kernel_size`` and ``centre``; a family with a window overrides the window methods.
    """

    channels: int
    kind: str = "long_filter"
    on_sequence: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._kernel_modifier: Optional[KernelModifier] = None
        self._override: Optional[Tuple[Tensor, KernelFFTCache]] = None
        self.fft_cache = KernelFFTCache()
        self._learned_kernel_cache = KernelFFTCache()  # the learned kernel under a modifier, against the weights
        self.use_cache = True

    @property
    def kernel_modifier(self) -> Optional[KernelModifier]:
        """Optional function (C, *S) -> (C, *S) applied to the learned kernel before use."""
        return self._kernel_modifier

    @kernel_modifier.setter
    def kernel_modifier(self, modifier: Optional[KernelModifier]) -> None:
        self._kernel_modifier = modifier

    @property
    def active(self) -> bool:
        """Whether a kernel modifier or an override is set, i.e. the applied kernel is not the learned one."""
        return self._kernel_modifier is not None or self._override is not None

    # -- kernel ---------------------------------------------------------------------------
    def base_kernel(self) -> Tensor:
        raise NotImplementedError

    @property
    def centre(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def kernel(self) -> Tensor:
        """The kernel this filter applies: the override if one is active, else the learned kernel
        after any modifier."""
        if self._override is not None:
            return self._override[0]
        kernel = self.base_kernel()
        if self.kernel_modifier is not None:
            kernel = self.kernel_modifier(kernel)
        return kernel

    @contextlib.contextmanager
    def override_kernel(self, kernel: Tensor) -> Iterator[None]:
        """Inside the block the filter applies ``kernel`` (C, *S), shaped like ``self.kernel()``, instead
        of its learned kernel (any modifier is ignored). Its FFTs are cached per FFT shape and device in
        a cache of the block's own, valid while ``kernel`` keeps its values (an in-place edit of
        ``kernel`` recomputes them); the learned kernel's cache is neither read nor written. Blocks
        nest (the innermost wins); on exit, also by an exception, the previous behaviour returns."""
        expected = (self.channels, *self.kernel_size)
        if tuple(kernel.shape) != expected:
            raise ValueError(f"override kernel has shape {tuple(kernel.shape)}, the filter's kernel {expected}")
        previous, self._override = self._override, (kernel, KernelFFTCache())
        try:
            yield
        finally:
            self._override = previous

    # -- the analyses' protocol -----------------------------------------------------------
    @property
    def one_sided(self) -> bool:
        """Whether the taps lie on one side of the centre along each of the kernel's axes (causal or quarter-plane
        kernels)."""
        return False

    def tap_offsets(self) -> Tuple[Tensor, ...]:
        """Integer offset of each tap from the centre per kernel axis: ((S,), (S,)) or ((T,),)."""
        return tuple(torch.arange(n) - c for n, c in zip(self.kernel_size, self.centre))

    def tap_displacements(self, feature_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Displacement (rows, columns) in pixels of each tap from the output position on an (H, W) feature map:
        broadcastable (S, 1) and (1, S) for a 2D kernel; (T,) each for a kernel on the flattened map, each
        offset's :func:`nearest_displacement` on rows of width W."""
        offsets = self.tap_offsets()
        if self.on_sequence:
            return nearest_displacement(offsets[0], feature_size[1])
        return offsets[0][:, None], offsets[1][None, :]

    def coverage_length(self, feature_size: Tuple[int, int]) -> int:
        """What window extents are measured against: the longer side F of the map, or its length H * W for a kernel
        on the flattened sequence."""
        return feature_size[0] * feature_size[1] if self.on_sequence else max(feature_size)

    def extent_cap(self) -> Optional[float]:
        """The kernel's own extent in taps along an axis (S, or the centre's taps plus one for a one-sided kernel);
        None for a kernel on the flattened sequence, whose wrapped taps are not capped."""
        if self.on_sequence:
            return None
        return float(max(self.centre) + 1 if self.one_sided else max(self.kernel_size))

    @property
    def has_window(self) -> bool:
        """Whether the family multiplies its kernel by a decay window."""
        return False

    def window(self) -> Tensor:
        """The decay window, shaped like the kernel; the base class has none."""
        raise HpxError(f"{type(self).__name__} has no decay window (its kernel is explicit)")

    def window_parameters(self) -> Dict[str, Tensor]:
        """The window's per-channel parameters; the base class has none."""
        raise HpxError(f"{type(self).__name__} has no decay window (its kernel is explicit)")

    def window_extent(self, threshold: float) -> Tensor:
        """Extent (C,) in taps that the window keeps at ``threshold``; without a window every tap is kept: the
        kernel's extent (:meth:`extent_cap`, or every tap of a sequence kernel)."""
        cap = self.extent_cap()
        return torch.full((self.channels,), float(cap if cap is not None else max(self.kernel_size)))

    # -- caching --------------------------------------------------------------------------
    def _float32_kernel(self, device: torch.device) -> Tensor:
        """:meth:`kernel` computed in float32 also under autocast, so one cached spectrum serves passes with and
        without it."""
        with torch.autocast(device.type, enabled=False):
            return self.kernel()

    def _cache_and_sources(self, device: torch.device) -> Tuple[Optional[KernelFFTCache], List[Tensor]]:
        """The FFT cache of the kernel now applied and the tensors whose values its entries must match: the override
        kernel; the modified kernel (its learned kernel cached against the weights); or the weights. (None, []) where
        nothing is cached: the cache off, training, or a tensor that needs its gradient (the kernel must stay in the
        autograd graph)."""
        if not self.use_cache:
            return None, []
        needs_grad = torch.is_grad_enabled()
        if self._override is not None:
            kernel, cache = self._override
            return (None, []) if needs_grad and kernel.requires_grad else (cache, [kernel])
        weights = list(self.parameters()) + list(self.buffers())
        if self.training or (needs_grad and any(w.requires_grad for w in weights)):
            return None, []
        if self._kernel_modifier is None:
            return self.fft_cache, weights
        learned = self._learned_kernel_cache.lookup(weights, ())
        if learned is None:
            with torch.autocast(device.type, enabled=False):
                learned = self.base_kernel()
            self._learned_kernel_cache.store((), learned)
        kernel = self._kernel_modifier(learned.clone())  # a copy: a modifier may edit its input in place
        return (None, []) if needs_grad and kernel.requires_grad else (self.fft_cache, [kernel])

    def spectrum(self, sizes: Sequence[int], device: torch.device) -> Tuple[Tensor, Tuple[int, ...]]:
        """The rFFT of the kernel now applied (float32), for signals of spatial size ``sizes`` on ``device``, from the
        cache when it holds the current values, and its FFT shape: ((C, *fft_shape[:-1], fft_shape[-1] // 2 + 1),
        fft_shape)."""
        fft_shape = fft_shape_for(sizes, self.kernel_size, self.centre)
        cache, sources = self._cache_and_sources(device)
        if cache is None:
            return kernel_fft(self._float32_kernel(device), fft_shape), fft_shape
        key = (fft_shape, str(device))
        kernel_f = cache.lookup(sources, key)
        if kernel_f is None:
            kernel_f = kernel_fft(sources[0] if self.active else self._float32_kernel(device), fft_shape)
            cache.store(key, kernel_f)
        return kernel_f, fft_shape

    def convolve(self, u: Tensor) -> Tensor:
        """Apply the long filter (true convolution, zero padding) to u: (B, C, *spatial)."""
        kernel_f, fft_shape = self.spectrum(u.shape[-len(self.centre):], u.device)
        return apply_kernel_fft(u, kernel_f, fft_shape, self.centre)

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        raise NotImplementedError


class SquareFilter(LongFilterBase):
    """A long filter with an odd S x S kernel centred at (S // 2, S // 2); subclasses set ``size`` S."""

    size: int

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return (self.size, self.size)

    @property
    def centre(self) -> Tuple[int, int]:
        return (self.size // 2, self.size // 2)


class HyenaPixelFilter(SquareFilter):
    """2D implicit long filter ``K = f(z) * (exp(-|delta| d) + shift)`` of HyenaPixel.

    Stored tensors (reference names): ``z`` (1, E, S, S) positional embedding, ``distance_map``
    (1, 1, S, S) Euclidean tap distance from the centre in pixels, ``deltas``/``shift``/``bias``
    (1, C, 1, 1), ``implicit_filter`` = 1x1 conv E->O, sin, 1x1 conv O->O, sin, 1x1 conv O->C
    (no bias), O = 2E.

    Initialisation options (the published models use the defaults): ``sin_init``, the sine
    frequency (higher: finer kernel detail); ``decay_scale`` multiplies the window decays (below 1:
    windows reach further); ``output_gain`` multiplies the last layer's weights when
    :meth:`apply_output_gain` is called after the model-wide weight init.
    """

    def __init__(self, channels: int, kernel_size: int, emb_dim: int, sin_init: float = 1.0,
                 decay_scale: float = 1.0, output_gain: float = 1.0):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"long kernel size must be odd, got {kernel_size}")
        hidden = 2 * emb_dim
        self.channels, self.size, self.emb_dim, self.output_gain = channels, kernel_size, emb_dim, output_gain
        self.register_buffer("z", sinusoidal_embedding_2d(kernel_size, emb_dim)[None])
        self.register_buffer("distance_map", centre_distance_map(kernel_size)[None, None])
        # decays chosen so that windows fall to 1% between 30% and 150% of the kernel radius
        radius = max(kernel_size // 2, 1)
        decay = torch.linspace(math.log(100) / (0.3 * radius), math.log(100) / (1.5 * radius), channels)
        self.deltas = nn.Parameter(decay_scale * decay.view(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.implicit_filter = nn.Sequential(
            nn.Conv2d(emb_dim, hidden, 1),
            Sin((1, hidden, 1, 1), sin_init),
            nn.Conv2d(hidden, hidden, 1),
            Sin((1, hidden, 1, 1), sin_init),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    @torch.no_grad()
    def apply_output_gain(self) -> None:
        """Multiply the last implicit-filter layer by ``output_gain`` (call once, after weight init)."""
        self.implicit_filter[-1].weight.mul_(self.output_gain)

    kind = "hyenapixel_2d"

    @property
    def has_window(self) -> bool:
        return True

    def window(self) -> Tensor:
        """Window ``exp(-|delta_c| d) + shift_c``: (C, S, S)."""
        return (torch.exp(-self.distance_map * self.deltas.abs()) + self.shift)[0]

    def window_parameters(self) -> Dict[str, Tensor]:
        """``delta`` (C,) the decay |delta|, ``shift`` (C,), ``distance`` (S, S) the tap distances in pixels."""
        return {"delta": self.deltas.detach().flatten().abs().clone(), "shift": self.shift.detach().flatten().clone(),
                "distance": self.distance_map[0, 0].clone()}

    def window_extent(self, threshold: float) -> Tensor:
        """2 * (largest tap distance with ``window >= threshold``) + 1, at most S (every tap kept: the corners reach
        past S), 0 where no tap is kept: (C,)."""
        windows = self.window().detach().float()
        above = windows >= threshold
        distance = self.distance_map[0, 0].float().expand_as(windows)
        reach = torch.where(above, distance, torch.zeros_like(windows)).flatten(1).amax(1)
        extent = torch.clamp(2 * reach + 1, max=self.size)
        return torch.where(above.flatten(1).any(1), extent, torch.zeros_like(extent))

    def base_kernel(self) -> Tensor:
        """Learned kernel f(z) * window: (C, S, S)."""
        return self.implicit_filter(self.z)[0] * self.window()

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, C, H, W) -> (B, C, H, W): ``(u conv K) + u * bias``."""
        return self.convolve(u) + u * self.bias


class HyenaFilter1D(LongFilterBase):
    """1D implicit long filter of Hyena: ``h = g(z) * exp(-t |delta|)`` applied along a sequence.

    Stored tensors (reference names): ``pos_emb.z`` (1, T, E), ``pos_emb.t`` (1, T, 1),
    ``modulation.deltas`` (1, 1, C), ``bias`` (C,), ``implicit_filter`` = linear E->O, sin,
    2x (linear O->O, sin), linear O->C (no bias). Non-causal: T = 2L-1 taps centred on tap L-1.
    Causal: T = L taps, tap 0 is offset 0.
    """

    def __init__(self, channels: int, seq_len: int, emb_dim: int, hidden: int, causal: bool = False,
                 sin_init: float = 1.0):
        super().__init__()
        self.channels, self.seq_len, self.causal = channels, seq_len, causal
        taps = seq_len if causal else 2 * seq_len - 1
        self.pos_emb = _HyenaPositions(taps, emb_dim, causal)
        self.modulation = _HyenaModulation(channels)
        self.bias = nn.Parameter(torch.randn(channels))
        self.implicit_filter = nn.Sequential(
            nn.Linear(emb_dim, hidden),
            Sin((1, hidden), sin_init),
            nn.Linear(hidden, hidden),
            Sin((1, hidden), sin_init),
            nn.Linear(hidden, hidden),
            Sin((1, hidden), sin_init),
            nn.Linear(hidden, channels, bias=False),
        )

    kind = "hyena_1d"
    on_sequence = True

    @property
    def num_taps(self) -> int:
        return self.pos_emb.z.shape[1]

    @property
    def one_sided(self) -> bool:
        return self.causal

    @property
    def has_window(self) -> bool:
        return True

    def window_parameters(self) -> Dict[str, Tensor]:
        """``delta`` (C,) the decay |delta|, ``shift`` (C,) zeros (no shift), ``t`` (T,) the normalised tap times."""
        delta = self.modulation.deltas.detach().flatten().abs().clone()
        return {"delta": delta, "shift": torch.zeros_like(delta), "t": self.pos_emb.t.flatten().clone()}

    def window_extent(self, threshold: float) -> Tensor:
        """Taps (C,) from the first to the last one with ``window >= threshold`` (2 * reach + 1 bidirectional, reach +
        1 causal, at most T), 0 where none is kept."""
        return kept_span(self.window().detach().float(), threshold)

    @property
    def kernel_size(self) -> Tuple[int]:
        return (self.num_taps,)

    @property
    def centre(self) -> Tuple[int]:
        return (0,) if self.causal else (self.seq_len - 1,)

    def window(self) -> Tensor:
        """Window ``exp(-t |delta_c|)``: (C, T)."""
        return torch.exp(-self.pos_emb.t[0] * self.modulation.deltas[0].abs()).t()

    def base_kernel(self) -> Tensor:
        """Learned kernel g(z) * window: (C, T)."""
        return self.implicit_filter(self.pos_emb.z)[0].t() * self.window()

    def forward(self, v: Tensor) -> Tensor:
        """v: (B, C, L') -> (B, C, L'): ``(v conv h) + v * bias``, a linear (non-circular) convolution."""
        return self.convolve(v) + v * self.bias[:, None]


class _HyenaPositions(nn.Module):
    """Stored positional embedding ``z`` (1, T, E) and time grid ``t`` (1, T, 1) of a 1D Hyena filter."""

    def __init__(self, taps: int, emb_dim: int, causal: bool):
        super().__init__()
        if causal:
            grid = torch.linspace(0, 1, taps)
        else:
            grid = torch.linspace(-1, 1, taps).abs()
        bands = (emb_dim - 1) // 2
        phase = 2 * math.pi * torch.arange(taps)[:, None] / taps * torch.arange(bands)[None, :]
        z = torch.cat([grid[:, None], torch.cos(phase), torch.sin(phase)], dim=1)
        z = F.pad(z, (0, emb_dim - z.shape[1]))
        self.register_buffer("z", z[None])
        self.register_buffer("t", grid[None, :, None])


class _HyenaModulation(nn.Module):
    """Per-channel decay rates ``deltas`` (1, 1, C) of the 1D exponential window."""

    def __init__(self, channels: int):
        super().__init__()
        decay = torch.linspace(math.log(100) / 0.3, math.log(100) / 1.5, channels)
        self.deltas = nn.Parameter(decay.view(1, 1, channels))


def sinusoidal_embedding_2d(size: int, emb_dim: int) -> Tensor:
    """2D sine/cosine positional embedding (E, S, S): half the channels encode x, half y."""
    per_axis = emb_dim // 2
    pairs = max(per_axis // 2, 1)
    position = torch.arange(size, dtype=torch.float32)
    rates = 10000.0 ** (-torch.arange(pairs, dtype=torch.float32) / pairs)
    angles = position[:, None] * rates[None, :]
    axis = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(size, 2 * pairs)[:, :per_axis]
    along_x = axis.t()[:, None, :].expand(per_axis, size, size)
    along_y = axis.t()[:, :, None].expand(per_axis, size, size)
    emb = torch.cat([along_x, along_y], dim=0)
    return F.pad(emb, (0, 0, 0, 0, 0, emb_dim - emb.shape[0])).contiguous()


def centre_distance_map(size: int) -> Tensor:
    """Euclidean distance (S, S) of each tap from the kernel centre, in pixels."""
    offset = torch.arange(size, dtype=torch.float32) - size // 2
    return torch.sqrt(offset[:, None] ** 2 + offset[None, :] ** 2)
