"""Inspection of token-mixing layers: the substrate every analyzer builds on.

``list_mixers(model, input_size)`` enumerates a model's token mixers in forward order with stage
(0-based, as in module paths; the paper numbers stages 1-4), block, module path, kind and the
feature-map size at a given input resolution. For long filters ``kernel(info)`` returns the kernel
actually applied, (C, S, S) or (C, T), and ``window(info)`` HyenaPixel's window.
``modify_kernels`` applies a function to chosen layers' kernels and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .models.long_filters import HyenaFilter1D, HyenaPixelFilter, LongFilterBase
from .models.mixers import HyenaMixer, HyenaPixelMixer

HYENAPIXEL_2D = "hyenapixel_2d"
HYENA_1D = "hyena_1d"
SEPARABLE_LONG_CONV = "separable_long_conv"
ATTENTION = "attention"
LOCAL_CONV = "local_conv"
OTHER = "other"


@dataclass
class MixerInfo:
    """One token-mixing layer. ``feature_size`` is (H, W) of its input at the queried resolution."""

    index: int
    stage: int
    block: int
    path: str
    kind: str
    module: nn.Module = field(repr=False)
    feature_size: Optional[Tuple[int, int]] = None
    kernel_size: Optional[Tuple[int, ...]] = None

    @property
    def long_filter(self) -> Optional[LongFilterBase]:
        """The implicit long filter of a HyenaPixel / Hyena layer, else None."""
        if isinstance(self.module, HyenaPixelMixer) and not self.module.use_separable_conv:
            return self.module.long_conv
        if isinstance(self.module, HyenaMixer):
            return self.module.filter_fn
        return None

    @property
    def filter_path(self) -> Optional[str]:
        """Module path of the long filter (``...long_conv`` / ``...filter_fn``), else None."""
        suffix = {HYENAPIXEL_2D: "long_conv", HYENA_1D: "filter_fn"}.get(self.kind)
        return f"{self.path}.{suffix}" if suffix else None

    @property
    def name(self) -> str:
        """Short label in the paper's numbering: ``S3 B2`` (stage and block from 1)."""
        return f"S{self.stage + 1} B{self.block + 1}"


def _classify(module: nn.Module) -> Tuple[str, Optional[Tuple[int, ...]]]:
    """Kind and kernel size of a token mixer."""
    if isinstance(module, HyenaPixelMixer):
        size = module.long_horizontal_conv.kernel_size[0] if module.use_separable_conv else module.long_conv.size
        return (SEPARABLE_LONG_CONV if module.use_separable_conv else HYENAPIXEL_2D), (size, size)
    if isinstance(module, HyenaMixer):
        return HYENA_1D, (module.filter_fn.num_taps,)
    if hasattr(module, "qkv") or isinstance(module, nn.MultiheadAttention):
        return ATTENTION, None
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    if convs:
        return LOCAL_CONV, tuple(convs[0].kernel_size)
    return OTHER, None


def _block_mixers(model: nn.Module) -> Iterator[Tuple[int, int, str, nn.Module]]:
    """(stage, block, path, mixer) for MetaFormer/ConvNeXt-style ``stages``, ResNet ``layerN``, VGG ``features``."""
    if hasattr(model, "stages"):
        for s, stage in enumerate(model.stages):
            blocks = getattr(stage, "blocks", stage)
            prefix = f"stages.{s}.blocks" if hasattr(stage, "blocks") else f"stages.{s}"
            for b, block in enumerate(blocks):
                for attr in ("token_mixer", "conv_dw", "conv2"):
                    if hasattr(block, attr):
                        yield s, b, f"{prefix}.{b}.{attr}", getattr(block, attr)
                        break
    elif hasattr(model, "layer1"):
        for s in range(4):
            for b, block in enumerate(getattr(model, f"layer{s + 1}", [])):
                yield s, b, f"layer{s + 1}.{b}.conv2", block.conv2
    elif hasattr(model, "features"):
        stage, block = 0, 0
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.Conv2d):
                yield stage, block, f"features.{i}", layer
                block += 1
            elif isinstance(layer, nn.MaxPool2d):
                stage, block = stage + 1, 0


def _as_hw(size: Union[int, Sequence[int], None]) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[-2]), int(size[-1]))


@torch.no_grad()
def _feature_sizes(model: nn.Module, modules: Sequence[nn.Module], input_hw: Tuple[int, int]) -> List[Tuple[int, int]]:
    """Spatial size of each module's input for a (1, 3, H, W) zero image (one forward pass)."""
    sizes: Dict[int, Tuple[int, int]] = {}

    def record(index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.dim() == 4:
                sizes[index] = (int(x.shape[-2]), int(x.shape[-1]))
            else:  # (B, N, C) tokens of an attention stage, row-major over a map of the input's aspect
                n = x.shape[1]
                h = round(math.sqrt(n * input_hw[0] / input_hw[1]))
                sizes[index] = (h, n // h)
        return hook

    handles = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(modules)]
    was_training = model.training
    try:
        param = next(model.parameters())
        model.eval()
        model(torch.zeros(1, 3, *input_hw, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [sizes.get(i) for i in range(len(modules))]


def list_mixers(model: nn.Module, input_size: Union[int, Sequence[int], None] = None) -> List[MixerInfo]:
    """Token-mixing layers of ``model`` in forward order; with ``input_size`` (int or (H, W)) their
    feature-map sizes at that input resolution (costs one forward pass)."""
    found = list(_block_mixers(model))
    infos = []
    for index, (stage, block, path, module) in enumerate(found):
        kind, kernel_size = _classify(module)
        infos.append(MixerInfo(index, stage, block, path, kind, module, None, kernel_size))
    hw = _as_hw(input_size)
    if hw is not None and infos:
        for info, size in zip(infos, _feature_sizes(model, [i.module for i in infos], hw)):
            info.feature_size = size
    return infos


def long_filter_layers(model: nn.Module, input_size: Union[int, Sequence[int], None] = None) -> List[MixerInfo]:
    """Only the layers with an implicit long filter (HyenaPixel 2D and Hyena 1D)."""
    return [info for info in list_mixers(model, input_size) if info.long_filter is not None]


def _filter_of(layer: Union[MixerInfo, LongFilterBase]) -> LongFilterBase:
    filt = layer if isinstance(layer, LongFilterBase) else layer.long_filter
    if filt is None:
        raise ValueError(f"layer {layer.path} ({layer.kind}) has no implicit long filter")
    return filt


@torch.no_grad()
def kernel(layer: Union[MixerInfo, LongFilterBase]) -> Tensor:
    """The kernel a long-filter layer applies (after any active modification): (C, S, S) or (C, T)."""
    return _filter_of(layer).kernel().detach()


@torch.no_grad()
def window(layer: Union[MixerInfo, LongFilterBase]) -> Tensor:
    """The decay window: HyenaPixel ``exp(-|delta| d) + shift`` (C, S, S); Hyena ``exp(-t|delta|)`` (C, T)."""
    return _filter_of(layer).window().detach()


@torch.no_grad()
def window_parameters(layer: Union[MixerInfo, LongFilterBase]) -> Dict[str, Tensor]:
    """Per-channel window parameters: ``delta`` (C,), ``shift`` (C,) (zero for Hyena 1D), and the
    tap distances ``distance`` (S, S) in pixels or ``t`` (T,) normalised time."""
    filt = _filter_of(layer)
    if isinstance(filt, HyenaPixelFilter):
        return {"delta": filt.deltas.flatten().abs().clone(), "shift": filt.shift.flatten().clone(),
                "distance": filt.distance_map[0, 0].clone()}
    assert isinstance(filt, HyenaFilter1D)
    channels = filt.modulation.deltas.numel()
    return {"delta": filt.modulation.deltas.flatten().abs().clone(), "shift": torch.zeros(channels),
            "t": filt.pos_emb.t.flatten().clone()}


LayerSelector = Union[None, Iterable[Union[int, str]], Callable[[MixerInfo], bool]]


def _selected(infos: List[MixerInfo], layers: LayerSelector) -> List[MixerInfo]:
    if layers is None:
        return infos
    if callable(layers):
        return [info for info in infos if layers(info)]
    wanted = set(layers)
    chosen = [info for info in infos if info.index in wanted or info.path in wanted or info.name in wanted]
    unknown = wanted - {info.index for info in chosen} - {info.path for info in chosen} - {info.name for info in chosen}
    if unknown:
        raise ValueError(f"no long-filter layer matches {sorted(map(str, unknown))}")
    return chosen


@contextlib.contextmanager
def modify_kernels(model: nn.Module, modifier: Callable[[Tensor, MixerInfo], Tensor],
                   layers: LayerSelector = None, input_size: Union[int, Sequence[int], None] = None
                   ) -> Iterator[List[MixerInfo]]:
    """Apply ``modifier(kernel, info) -> kernel`` to the long filters of the chosen layers inside the block.

    layers: None (all long-filter layers), mixer indices / paths / names (``S3 B1``), or a predicate.
    input_size: resolution for ``info.feature_size`` (needed by size-dependent modifiers).
    Yields the modified layers. On exit every filter gets its previous modifier back, so the
    model computes exactly what it computed before; cached kernel FFTs are refreshed.
    """
    chosen = _selected(long_filter_layers(model, input_size), layers)
    previous = [(info.long_filter, info.long_filter.kernel_modifier) for info in chosen]
    try:
        for info in chosen:
            inner = info.long_filter.kernel_modifier

            def apply(k: Tensor, _info: MixerInfo = info, _inner=inner) -> Tensor:
                return modifier(_inner(k) if _inner is not None else k, _info)

            info.long_filter.kernel_modifier = apply
        yield chosen
    finally:
        for filt, old in previous:
            filt.kernel_modifier = old


def feature_layer(model: nn.Module) -> str:
    """Module path of the last stage's output, before the final norm and head (the ERF output)."""
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        return last["module"]
    raise ValueError(f"{type(model).__name__} has no feature_info; name the layer explicitly")
