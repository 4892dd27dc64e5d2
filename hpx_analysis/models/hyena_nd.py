"""Hyena N-D (Zimerman & Wolf, "Multi-Dimensional Hyena for Spatial Inductive Bias", AISTATS 2024).

A DeiT ViT (timm ``VisionTransformer``, no class token, the head reads token 0, the top-left patch) whose
attention is replaced by an order-2 Hyena operator with a 2D implicit filter and a causal 2D convolution.
The computation and the state-dict layout follow the authors' official training code (see
``tests/data/golden/hyena_nd/README.md``):

- mixer on tokens (B, L*L, D), row-major over an L x L grid: ``in_proj`` D -> 3D, depthwise 3x3
  ``short_filter``, split into x0, x1, v; ``y = x0 * long(v * x1)``; ``out_proj`` D -> D.
- ``long(v) = causal2d(v, k / (2L)) + v * bias_c`` with ``causal2d(v, K)[c, i, j] = sum_{a<=i, b<=j}
  K[c, i-a, j-b] v[c, a, b]``; the factor 1/(2L) is the reference's FFT normalisation.
- directions: ``standard`` causal; ``seq`` (per block) anti-causal, i.e. ``long`` on v flipped along both
  axes; ``directional_mode="seq"`` alternates seq (even blocks) and standard (odd blocks); ``4dir`` runs
  the causal ``long`` on four flips of v (identity, both axes, W, H), flips back and mixes the four
  gated outputs with ``linear_mix`` (4 -> 1).
- filter ``k[c, i, j]``: N-D form, a sine MLP on ``[z_i, z_j]`` times the window
  ``exp(-t_i |dx_c|) exp(-t_j |dy_c|) + shift_c``; product form, ``hx[i, c] * hy[j, c]`` of two 1D sine
  MLPs each times its own window ``exp(-t |d_c|) + shift_c``. The sine modules of a filter are one module.

For the analyzers, ``mixer.effective_filter`` (:class:`HyenaNDCanvasFilter`) is the long-filter view of a block:
the kernel it applies as one true convolution on a centred (2L-1) x (2L-1) canvas; while that kernel is modified or
overridden the block convolves with it instead of its directional causal path.

The model runs only at its build resolution, like the reference.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, list_models, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import HpxError
from .long_filters import SquareFilter, fft_conv_same, kept_span

FILTER_FORMS = ("nd", "product")
DIRECTIONS = ("standard", "seq", "4dir")
WINDOWS = ("standard", "learn", "no")
DEIT_DIMS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
"""DeiT size -> (embed dim, depth, heads)."""
FOUR_FLIPS: Tuple[Tuple[int, ...], ...] = ((), (-2, -1), (-1,), (-2,))
"""The spatial axes each ``4dir`` copy flips (channels-first): identity, both, W, H."""


class Sin(nn.Module):
    """``sin(freq * x)`` with a learned per-feature frequency ``freq`` (1, W)."""

    def __init__(self, width: int, w: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def _sine_mlp(in_features: int, width: int, channels: int, sin: Sin) -> nn.Sequential:
    """linear in -> W, sin, W -> W, sin, W -> W, sin, W -> channels (no bias), with one shared sine module."""
    return nn.Sequential(nn.Linear(in_features, width), sin, nn.Linear(width, width), sin,
                         nn.Linear(width, width), sin, nn.Linear(width, channels, bias=False))


class PositionalEmbedding(nn.Module):
    """Hyena's filter input over L positions: ``z`` (1, L, 3) = [t, cos, -sin] (learned), ``t`` (1, L, 1) in [0, 1]."""

    def __init__(self, length: int, emb_dim: int = 3) -> None:
        super().__init__()
        t = torch.linspace(0, 1, length)[None, :, None]
        bands = (emb_dim - 1) // 2
        w = 2 * math.pi * torch.arange(length, dtype=torch.float32)[None, :, None] / length
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        self.z = nn.Parameter(torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)


class Window(nn.Module):
    """Exponential decay window ``exp(-t |delta_c|) + shift_c`` over one or two axes.

    ``deltas`` names the decay rates, (1, 1, D) each; with ``learnable`` they and ``shift`` are parameters,
    otherwise buffers and the shift is 0 (the reference's frozen "standard" window). ``sqrt_decay``
    (``hyena2d_sqrt_decay``): the reference takes the square root of the N-D filter's decay product before adding
    the shift, i.e. every rate halved; its product-form windows ignore the option, so they get False here.
    """

    def __init__(self, channels: int, names: Tuple[str, ...], learnable: bool, sqrt_decay: bool,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2) -> None:
        super().__init__()
        self.sqrt_decay = sqrt_decay
        rates = torch.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct, channels)
        for name in names:
            if learnable:
                self.register_parameter(name, nn.Parameter(rates[None, None].clone()))
            else:
                self.register_buffer(name, rates[None, None].clone())
        self.shift = nn.Parameter(torch.zeros(1, 1, channels)) if learnable else None

    def rate(self, name: str) -> torch.Tensor:
        """(1, 1, D) the decay rate applied: |delta|, halved under ``sqrt_decay`` (no golden file covers it)."""
        return getattr(self, name).abs() * (0.5 if self.sqrt_decay else 1.0)

    def decay(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """(1, L, D) ``exp(-t * rate)`` (:meth:`rate`)."""
        return torch.exp(-t * self.rate(name))

    def offset(self) -> torch.Tensor | float:
        """(D,) the learned shift, or 0 for the frozen window."""
        return self.shift[0, 0] if self.shift is not None else 0.0


class _ImplicitFilter(nn.Module):
    """What both filter forms hold first: the side ``length`` L, the skip gain ``bias`` (D,) and the positions
    (``emb_dim`` features each, the reference's 3 by default)."""

    def __init__(self, channels: int, length: int, emb_dim: int = 3) -> None:
        super().__init__()
        self.length = length
        self.bias = nn.Parameter(torch.randn(channels))
        self.pos_emb = PositionalEmbedding(length, emb_dim)

    @staticmethod
    @torch.no_grad()
    def _scale_outputs(mlps: Tuple[nn.Sequential, ...], gain: float) -> None:
        """Multiply each sine MLP's last layer by ``gain`` (an initialisation option; 1 for the reference)."""
        for mlp in mlps:
            mlp[-1].weight.mul_(gain)


class HyenaNDFilter(_ImplicitFilter):
    """N-D implicit filter: ``k[c, i, j] = mlp([z_i, z_j])[c] * window[c, i, j]``; ``bias`` (D,) is the skip gain.
    ``emb_dim`` (positional features) and ``output_gain`` (last layer's init scale) keep the reference's 3 and 1
    by default."""

    def __init__(self, channels: int, length: int, width: int = 64, window: str = "standard",
                 sqrt_decay: bool = False, emb_dim: int = 3, output_gain: float = 1.0) -> None:
        super().__init__(channels, length, emb_dim)
        self.implicit_filter = _sine_mlp(2 * self.pos_emb.z.shape[-1], width, channels, Sin(width))
        self._scale_outputs((self.implicit_filter,), output_gain)
        self.modulation = (None if window == "no" else
                           Window(channels, ("Xdeltas", "Ydeltas"), window == "learn", sqrt_decay))

    def window(self) -> torch.Tensor:
        """(D, L, L) ``exp(-t_i |dx_c|) exp(-t_j |dy_c|) + shift_c``; ones without a window."""
        if self.modulation is None:
            return self.bias.new_ones(self.bias.numel(), self.length, self.length)
        t = self.pos_emb.t
        rows, cols = self.modulation.decay(t, "Xdeltas")[0], self.modulation.decay(t, "Ydeltas")[0]  # (L, D)
        return (rows[:, None] * cols[None, :] + self.modulation.offset()).permute(2, 0, 1)

    def kernel(self) -> torch.Tensor:
        """(D, L, L) the filter network's output times the window, before the 1/(2L) scale."""
        z, length = self.pos_emb.z[0], self.length
        grid = torch.cat([z[:, None].expand(length, length, -1), z[None, :].expand(length, length, -1)], dim=-1)
        return self.implicit_filter(grid).permute(2, 0, 1) * self.window()


class HyenaProductFilter(_ImplicitFilter):
    """Product filter: ``k[c, i, j] = hx[i, c] hy[j, c]``, two 1D sine MLPs each times its own window.
    ``sqrt_decay`` is accepted and, as in the reference, has no effect on this form."""

    def __init__(self, channels: int, length: int, width: int = 64, window: str = "standard",
                 sqrt_decay: bool = False, emb_dim: int = 3, output_gain: float = 1.0) -> None:
        super().__init__(channels, length, emb_dim)
        sin = Sin(width)
        self.Ximplicit_filter = _sine_mlp(emb_dim, width, channels, sin)
        self.Yimplicit_filter = _sine_mlp(emb_dim, width, channels, sin)
        self._scale_outputs((self.Ximplicit_filter, self.Yimplicit_filter), output_gain)
        windows = (None, None) if window == "no" else (
            Window(channels, ("deltas",), window == "learn", sqrt_decay=False) for _ in range(2))
        self.Xmodulation, self.Ymodulation = windows

    def _axis_windows(self) -> List[torch.Tensor]:
        """[(L, D), (L, D)] the row and column windows ``exp(-t |d_c|) + shift_c``; ones without a window."""
        ones = self.bias.new_ones(self.length, self.bias.numel())
        return [ones if window is None else (window.decay(self.pos_emb.t, "deltas") + window.offset())[0]
                for window in (self.Xmodulation, self.Ymodulation)]

    def window(self) -> torch.Tensor:
        """(D, L, L) the product of the row and column windows."""
        rows, cols = self._axis_windows()
        return (rows[:, None] * cols[None, :]).permute(2, 0, 1)

    def kernel(self) -> torch.Tensor:
        """(D, L, L) ``hx[i, c] * hy[j, c]``, before the 1/(2L) scale."""
        hx, hy = (mlp(self.pos_emb.z)[0] * window for mlp, window in
                  zip((self.Ximplicit_filter, self.Yimplicit_filter), self._axis_windows()))
        return (hx[:, None] * hy[None, :]).permute(2, 0, 1)


def causal_conv2d(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``out[b, c, i, j] = sum_{a<=i, b'<=j} kernel[c, i-a, j-b'] v[b, c, a, b']``: v (B, C, L, L), kernel (C, L, L).

    Zero-padded FFTs of size 2L x 2L make the circular convolution exact on the kept L x L corner.
    """
    height, width = v.shape[-2:]
    size = (2 * height, 2 * width)
    spectrum = torch.fft.rfft2(v.float(), s=size) * torch.fft.rfft2(kernel.float(), s=size)
    return torch.fft.irfft2(spectrum, s=size)[..., :height, :width].to(v.dtype)


class HyenaNDCanvasFilter(SquareFilter):
    """The long-filter view of a :class:`HyenaNDMixer` (``mixer.effective_filter``), for the analyzers.

    ``kernel()`` (D, 2L-1, 2L-1) is the kernel the block applies as a true convolution centred at (L-1, L-1),
    like HyenaPixel's: ``k / (2L)`` on the quadrant of non-negative offsets (``standard``), of non-positive
    offsets (``seq``), or for ``4dir`` the four flipped quadrants weighted by ``linear_mix`` (the centre tap
    holds all four). While a kernel modifier or an override is set, the mixer convolves ``v`` with this kernel
    (zero padding) plus the skip ``skip_gain * v`` instead of its directional causal path: the same function
    while the kernel is unchanged. It holds no tensors.
    """

    kind = "hyena_nd"

    def __init__(self, mixer: "HyenaNDMixer") -> None:
        super().__init__()
        self.channels, self.size = mixer.out_proj.in_features, 2 * mixer.length - 1
        self.direction = mixer.direction
        # bound methods, so the mixer is no child of its filter
        self._canvas, self._skip, self._window = mixer.canvas_kernel, mixer.skip_gain, mixer.canvas_window
        self.window_parameters = mixer.window_parameters

    @property
    def one_sided(self) -> bool:
        """A quarter-plane block (causal ``standard``, anti-causal ``seq``); ``4dir`` mixes all four quadrants."""
        return self.direction != "4dir"

    @property
    def has_window(self) -> bool:
        return True

    def window_extent(self, threshold: float) -> torch.Tensor:
        """Per axis, the taps from the first to the last row (column) of the canvas holding a tap with ``window >=
        threshold`` (reach + 1 for a quarter-plane block, 2 * reach + 1 for ``4dir``); the larger axis: (D,)."""
        windows = self.window().detach().float()
        return torch.maximum(*[kept_span(windows.amax(dim), threshold) for dim in (-1, -2)])

    def base_kernel(self) -> torch.Tensor:
        """(D, 2L-1, 2L-1) the applied kernel on its centred canvas, true-convolution orientation."""
        return self._canvas()

    def window(self) -> torch.Tensor:
        """(D, 2L-1, 2L-1) the decay window on the canvas, 0 where the block applies no tap
        (:meth:`HyenaNDMixer.canvas_window`)."""
        return self._window()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """(B, D, L, L) -> (B, D, L, L): ``v`` convolved with ``kernel()`` (centred, zero padding) plus the skip."""
        return fft_conv_same(v, self.kernel(), self.centre) + v * self._skip()[:, None, None].to(v.dtype)


class HyenaNDMixer(nn.Module):
    """Hyena N-D token mixer (order 2) on tokens (B, L*L, D) of an L x L grid, in one block's direction."""

    def __init__(self, dim: int, length: int, direction: str = "standard", filter_form: str = "nd",
                 filter_width: int = 64, window: str = "standard", sqrt_decay: bool = False,
                 filter_emb_dim: int = 3, filter_output_gain: float = 1.0) -> None:
        super().__init__()
        self.length, self.direction = length, direction
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.short_filter = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim)
        filter_cls = HyenaNDFilter if filter_form == "nd" else HyenaProductFilter
        self.filter_fn = filter_cls(dim, length, filter_width, window, sqrt_decay, filter_emb_dim, filter_output_gain)
        self.linear_mix = nn.Linear(4, 1) if direction == "4dir" else None
        self.effective_filter = HyenaNDCanvasFilter(self)

    @property
    def long_filter(self) -> HyenaNDCanvasFilter:
        """The long-filter view the analyses read: the applied kernel on its centred canvas."""
        return self.effective_filter

    def kernel(self) -> torch.Tensor:
        """(D, L, L) the raw filter ``k`` (network times window); the layer applies ``k / (2L)``."""
        return self.filter_fn.kernel()

    def _direction_weights(self) -> List[Tuple[Tuple[int, ...], torch.Tensor | float]]:
        """(flipped axes, weight) of each causal convolution the block sums: one for standard/seq, four for 4dir."""
        if self.linear_mix is not None:
            return list(zip(FOUR_FLIPS, self.linear_mix.weight[0]))
        return [((-2, -1), 1.0)] if self.direction == "seq" else [((), 1.0)]

    def _on_canvas(self, quadrant: torch.Tensor, fill: float = 0.0) -> List[torch.Tensor]:
        """(D, L, L) values at the causal offsets -> one (D, 2L-1, 2L-1) canvas per summed direction (centre
        (L-1, L-1), flipped like that direction's convolution), ``fill`` elsewhere."""
        pad = self.length - 1
        causal = nn.functional.pad(quadrant, (pad, 0, pad, 0), value=fill)
        return [causal.flip(axes) if axes else causal for axes, _ in self._direction_weights()]

    def canvas_kernel(self) -> torch.Tensor:
        """(D, 2L-1, 2L-1) the applied kernel as one true convolution centred at (L-1, L-1) (see
        :class:`HyenaNDCanvasFilter`): the causal quadrant ``k / (2L)``, flipped per direction and weighted."""
        canvases = self._on_canvas(self.kernel() / (2 * self.length))
        return sum(weight * canvas for canvas, (_, weight) in zip(canvases, self._direction_weights()))

    def canvas_window(self) -> torch.Tensor:
        """(D, 2L-1, 2L-1) the filter's window laid out like :meth:`canvas_kernel` (for ``4dir`` each quadrant from
        its direction; the centre row and column, which directions share, their largest value), 0 at offsets the
        block does not use."""
        stacked = torch.stack(self._on_canvas(self.filter_fn.window(), fill=-math.inf)).amax(0)
        return stacked.masked_fill(stacked == -math.inf, 0.0)

    def window_parameters(self) -> Dict[str, torch.Tensor]:
        """``delta`` (2, D) the decay rates applied along rows and columns (|delta|, halved under ``sqrt_decay``; 0
        without a window); ``shift`` the learned shift, (D,) added to the product of the two decays (N-D form) or
        (2, D) to each axis' decay (product form), 0 for a frozen window; ``t`` (L,) the tap positions in [0, 1]."""
        filt = self.filter_fn
        if isinstance(filt, HyenaNDFilter):
            windows, names = [filt.modulation] * 2, ("Xdeltas", "Ydeltas")
        else:
            windows, names = [filt.Xmodulation, filt.Ymodulation], ("deltas", "deltas")
        zeros = torch.zeros_like(filt.bias.flatten())  # on the model's device, as the windows' own tensors
        delta = torch.stack([zeros if w is None else w.rate(n).flatten() for w, n in zip(windows, names)])
        shifts = [zeros if w is None else w.offset() + zeros for w in windows]
        shift = shifts[0] if isinstance(filt, HyenaNDFilter) else torch.stack(shifts)
        return {"delta": delta.detach().clone(), "shift": shift.detach().clone(), "t": filt.pos_emb.t.flatten().clone()}

    def skip_gain(self) -> torch.Tensor:
        """(D,) the block's total skip gain on ``v``: ``filter_fn.bias``, times the summed ``linear_mix`` weights
        for 4dir."""
        return sum(weight * self.filter_fn.bias for _, weight in self._direction_weights())

    def convolve(self, v: torch.Tensor, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The long convolution alone (no skip) in the block's base direction: v (B, D, L, L) -> (B, D, L, L).

        ``seq``: anti-causal (taps at a >= i, b >= j); ``standard`` and ``4dir``: causal. ``kernel``: the
        raw k (D, L, L), by default the filter's.
        """
        scaled = (self.kernel() if kernel is None else kernel) / (2 * self.length)
        if self.direction == "seq":
            return causal_conv2d(v.flip((-2, -1)), scaled).flip((-2, -1))
        return causal_conv2d(v, scaled)

    def _long(self, v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return self.convolve(v, kernel) + v * self.filter_fn.bias[:, None, None]

    def forward(self, x: torch.Tensor, **unused: Any) -> torch.Tensor:
        """x (B, L*L, D) -> (B, L*L, D); ``unused``: timm's attention arguments (mask), ignored."""
        batch, _, dim = x.shape
        length = self.length
        u = self.in_proj(x).transpose(1, 2).reshape(batch, 3 * dim, length, length)
        x0, x1, v = self.short_filter(u).split(dim, dim=1)
        v = v * x1
        if self.effective_filter.active:  # one centred convolution with the (modified) canvas kernel
            y = (self.effective_filter(v) * x0).flatten(2).transpose(1, 2)
            if self.linear_mix is not None:
                y = y + self.linear_mix.bias
        elif self.linear_mix is None:
            y = (self._long(v, self.kernel()) * x0).flatten(2).transpose(1, 2)
        else:
            kernel = self.kernel()
            flipped = [self._long(v.flip(axes), kernel).flip(axes) if axes else self._long(v, kernel)
                       for axes in FOUR_FLIPS]
            stacked = torch.stack([(f * x0).flatten(2).transpose(1, 2) for f in flipped], dim=-1)
            y = self.linear_mix(stacked)[..., 0]
        return self.out_proj(y)


class FixedSizePatchEmbed(PatchEmbed):
    """timm's patch embedding that refuses, with one line, any input size other than the build size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            height, width = self.img_size
            raise HpxError(f"this Hyena N-D model runs only at the size it was built/trained at, "
                           f"{height}x{width} px; got {x.shape[-2]}x{x.shape[-1]}")
        return super().forward(x)


def block_directions(directions: str, depth: int) -> List[str]:
    """Per-block direction: ``seq`` alternates seq (even blocks) and standard (odd); others are uniform."""
    if directions == "seq":
        return ["seq" if i % 2 == 0 else "standard" for i in range(depth)]
    return [directions] * depth


def _check_option(name: str, value: Any, allowed: Tuple[Any, ...]) -> None:
    if value not in allowed:
        raise HpxError(f"Hyena N-D option {name}={value!r} is not supported; use one of {', '.join(map(str, allowed))}")


class HyenaNDViT(VisionTransformer):
    """DeiT ViT with Hyena N-D mixers (``blocks.<i>.attn``); ``hybrid`` keeps attention in blocks i > depth // 2.

    Options as in the official script: ``filter_form`` (``nd`` | ``product``), ``directions``
    (``standard`` | ``seq`` | ``4dir``), ``window`` (``standard`` frozen | ``learn`` | ``no``),
    ``sqrt_decay``, ``filter_width``, ``hyena_order`` (2 only), ``parameterisation`` (``implicit`` only).
    Initialisation options outside the script (the demo's proxy): ``filter_emb_dim``, the positional features
    per axis of the filter input (reference: 3), and ``filter_output_gain``, a factor on the filter network's
    last layer at init (reference: 1). No class token; the head reads token 0.
    """

    def __init__(self, img_size: int | Tuple[int, int] = 224, patch_size: int = 16, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, filter_form: str = "nd",
                 directions: str = "seq", window: str = "standard", sqrt_decay: bool = False,
                 filter_width: int = 64, hybrid: bool = False, hyena_order: int = 2,
                 parameterisation: str = "implicit", filter_emb_dim: int = 3, filter_output_gain: float = 1.0,
                 **kwargs: Any) -> None:
        _check_option("directions", directions, DIRECTIONS)
        _check_option("filter_form", filter_form, FILTER_FORMS)
        _check_option("window", window, WINDOWS)
        _check_option("hyena_order", hyena_order, (2,))
        _check_option("parameterisation", parameterisation, ("implicit",))
        if not isinstance(img_size, int):  # timm's builder passes the pretrained config's (H, W)
            if img_size[0] != img_size[1]:
                raise HpxError(f"Hyena N-D needs a square input; got img_size {tuple(img_size)}")
            img_size = int(img_size[0])
        if img_size % patch_size:
            raise HpxError(f"Hyena N-D needs img_size divisible by patch_size; got {img_size} and {patch_size}")
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_token=False, global_pool="",
                         fc_norm=False, embed_layer=FixedSizePatchEmbed, norm_layer=partial(LayerNorm, eps=1e-6),
                         **kwargs)
        self.global_pool = "token"
        length = img_size // patch_size
        self.block_kinds: List[str] = []
        for i, direction in enumerate(block_directions(directions, depth)):
            if hybrid and i > depth // 2:
                self.block_kinds.append("attention")
                continue
            self.blocks[i].attn = HyenaNDMixer(embed_dim, length, direction, filter_form, filter_width, window,
                                               sqrt_decay, filter_emb_dim, filter_output_gain)
            self.block_kinds.append(f"hyena_nd:{direction}")
        self.hyena_options = dict(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                                  embed_dim=embed_dim, depth=depth, num_heads=num_heads, filter_form=filter_form,
                                  directions=directions, window=window, sqrt_decay=sqrt_decay,
                                  filter_width=filter_width, hybrid=hybrid, filter_emb_dim=filter_emb_dim,
                                  filter_output_gain=filter_output_gain)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """(B, N, D) -> (B, D): token 0, the top-left patch (the reference's head input)."""
        return x[:, 0]


def options_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Options that a bare state dict fixes: class count (head), input and patch size, filter form, width,
    positional features (when not the reference's 3) and window, 4dir (``linear_mix``), hybrid (attention keys); the seq/standard directions cannot be read from
    weights, nor the heads (embed dim and depth come from the model name or options)."""
    options: Dict[str, Any] = {}
    if "head.weight" in state_dict:
        options["num_classes"] = int(state_dict["head.weight"].shape[0])
    if "pos_embed" in state_dict and "patch_embed.proj.weight" in state_dict:
        patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
        options.update(patch_size=patch, img_size=math.isqrt(int(state_dict["pos_embed"].shape[1])) * patch)
    filter_keys = [key for key in state_dict if ".filter_fn." in key]
    if filter_keys:
        options["filter_form"] = "product" if any(".Ximplicit_filter." in k for k in filter_keys) else "nd"
        first_layer = next(k for k in filter_keys if k.endswith("implicit_filter.0.weight"))
        options["filter_width"] = int(state_dict[first_layer].shape[0])
        positions = next((k for k in filter_keys if k.endswith("pos_emb.z")), None)
        if positions is not None and state_dict[positions].shape[-1] != 3:  # the reference's 3 features
            options["filter_emb_dim"] = int(state_dict[positions].shape[-1])
        if any(k.endswith("modulation.shift") for k in filter_keys):
            options["window"] = "learn"
        elif any("deltas" in k for k in filter_keys):
            options["window"] = "standard"
        else:
            options["window"] = "no"
        if any(".linear_mix." in k for k in state_dict):
            options["directions"] = "4dir"
        options["hybrid"] = any(k.endswith(".attn.qkv.weight") for k in state_dict)
    return options


TRAINING_METHODS = {"hyena2d": False, "hyena2dattn": True}
"""The official script's ``method`` -> hybrid (attention in the later blocks)."""
UNSUPPORTED_FLAGS = {
    "direct_paramtrization": "Hyena N-D models here load the implicit (sine MLP) filter only",
    "use_cls_token": "the reference's Hyena N-D mixer needs a square token grid, so it runs without a class token",
}
"""Switches of the official ``main.py`` that the loaded models do not support, with the reason."""


def options_from_training_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """Model options from the ``args`` a checkpoint of the official ``main.py`` holds (only those present)."""
    options: Dict[str, Any] = {}
    if "method" in args:
        if args["method"] not in TRAINING_METHODS:
            raise HpxError(f"checkpoint trained with method={args['method']!r}; Hyena N-D models load "
                           f"{' or '.join(TRAINING_METHODS)}")
        options["hybrid"] = TRAINING_METHODS[args["method"]]
    if "hyena_order" in args:
        _check_option("hyena_order", args["hyena_order"], (2,))
    for flag, why in UNSUPPORTED_FLAGS.items():
        if args.get(flag):
            raise HpxError(f"checkpoint trained with --{flag}: {why}")
    if "model" in args:
        size = next((size for size in DEIT_DIMS if size in str(args["model"])), None)
        if size is None:
            raise HpxError(f"checkpoint model={args['model']!r} is not a DeiT tiny/small/base")
        options.update(_deit(size))
    renames = {"directional_mode": "directions", "window_mode": "window", "hyena2d_sqrt_decay": "sqrt_decay",
               "hyena_filter_order": "filter_width", "patch_size": "patch_size", "input_size": "img_size",
               "nb_classes": "num_classes"}
    options.update({ours: args[theirs] for theirs, ours in renames.items() if args.get(theirs) is not None})
    if "hyena2d_filter" in args:
        options["filter_form"] = "nd" if args["hyena2d_filter"] else "product"
    return options


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "hyena_deit_tiny_patch16_224": _cfg(),
    "hyena_deit_tiny_hybrid_patch16_224": _cfg(),
    "hyena_deit_small_patch16_224": _cfg(),
})


def _create(name: str, pretrained: bool, defaults: Dict[str, Any], **kwargs: Any) -> HyenaNDViT:
    if pretrained:
        raise HpxError(f"no published weights for '{name}' (the authors publish none); pass a checkpoint file")
    model = build_model_with_cfg(HyenaNDViT, name, pretrained, **{**defaults, **kwargs})
    size = model.hyena_options["img_size"]
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size),
                            "num_classes": model.num_classes}
    return model


def _deit(size: str) -> Dict[str, int]:
    """embed_dim, depth, num_heads of a DeiT size."""
    return dict(zip(("embed_dim", "depth", "num_heads"), DEIT_DIMS[size]))


@register_model
def hyena_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> HyenaNDViT:
    return _create("hyena_deit_tiny_patch16_224", pretrained, _deit("tiny"), **kwargs)


@register_model
def hyena_deit_tiny_hybrid_patch16_224(pretrained: bool = False, **kwargs: Any) -> HyenaNDViT:
    return _create("hyena_deit_tiny_hybrid_patch16_224", pretrained, {**_deit("tiny"), "hybrid": True}, **kwargs)


@register_model
def hyena_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> HyenaNDViT:
    return _create("hyena_deit_small_patch16_224", pretrained, _deit("small"), **kwargs)


def model_names() -> List[str]:
    """The model names this module registered with timm."""
    return list_models(module=__name__.rsplit(".", 1)[-1])
