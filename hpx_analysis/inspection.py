"""Discovery of token-mixing layers: the substrate every analyzer builds on.

``list_mixers(model, input_size)`` enumerates a model's token mixers in forward order with stage
(0-based, as in module paths; the paper numbers stages 1-4), block, module path, kind and the
feature-map size at a given input resolution. A mixer with a long filter exposes it as ``mixer.long_filter``, an
instance of :class:`~hpx_analysis.models.long_filters.LongFilterBase`, and the filter describes itself to the
analyses (its kind, applied kernel, tap geometry, window and coverage rule): HyenaPixel's implicit 2D filter, Hyena's
1D filter, the effective kernel of a SLaK / RepLKNet large convolution, a Hyena N-D block's kernel on its centred
canvas, or any new family that implements the protocol. Blocks are found in MetaFormer/ConvNeXt-style ``stages``
(mixer attribute ``token_mixer``, ``conv_dw``, ``conv2`` or ``large_kernel``), ResNet ``layerN``, VGG ``features``
and ViT ``blocks`` (mixer ``attn``, all in stage 0). Mixers without a long filter are classified here (attention,
local convolution, the separable long convolution ablation) for the coverage of the baselines.

Layer names (``LayerRef``) come from :mod:`hpx_analysis.layer_names`; interventions on kernels and weights
(``modify_kernels``, ``cut_short_convs``, ``truncate_kernels``) from :mod:`hpx_analysis.interventions`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .devices import model_placement
from .errors import HpxError
from .layer_names import LayerLike, LayerRef
from .models.long_filters import LongFilterBase

SEPARABLE_LONG_CONV = "separable_long_conv"
ATTENTION = "attention"
LOCAL_CONV = "local_conv"
OTHER = "other"
ATTENTION_COVERAGE = 2.0
"""The relative coverage of attention: every token sees the whole map, as a two-sided full kernel would."""
MIXER_ATTRIBUTES = ("token_mixer", "conv_dw", "conv2", "large_kernel")  # a block's token mixer, first found wins
VIT_MIXER = "attn"  # the token mixer of a ViT block (``blocks.<i>.attn``; Hyena N-D replaces the attention there)


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
        """The mixer's long filter (``module.long_filter``), else None."""
        found = getattr(self.module, "long_filter", None)
        return found if isinstance(found, LongFilterBase) else None

    @property
    def filter_path(self) -> Optional[str]:
        """Module path of the long filter (``...long_conv``, ``...filter_fn``, ``...effective_filter``), else None."""
        filt = self.long_filter
        if filt is None:
            return None
        return next(f"{self.path}.{name}" for name, module in self.module.named_modules() if module is filt)

    def fixed_coverage(self) -> Optional[float]:
        """Relative coverage of a mixer without a long filter: attention 2 (global), a convolution k / F (its
        kernel over the map's longer side); None for other mixers."""
        if self.kind == ATTENTION:
            return ATTENTION_COVERAGE
        if self.kind in (LOCAL_CONV, SEPARABLE_LONG_CONV):
            return max(self.kernel_size) / max(self.feature_size)
        return None

    @property
    def ref(self) -> LayerRef:
        """Stage and block of this layer (numbered from 0)."""
        return LayerRef(self.stage, self.block)

    @property
    def name(self) -> str:
        """Short label in the paper's numbering: ``S3 B2`` (stage and block from 1)."""
        return str(self.ref)

    @property
    def block_path(self) -> str:
        """Module path of the block holding the mixer (``stages.2.blocks.1``); the mixer itself when it is
        the whole block (VGG's convolutions)."""
        parent, _, last = self.path.rpartition(".")
        return parent if last in MIXER_ATTRIBUTES or last == VIT_MIXER else self.path


def _classify(module: nn.Module) -> Tuple[str, Optional[Tuple[int, ...]]]:
    """Kind and kernel size of a token mixer: its long filter's (:class:`LongFilterBase` ``kind`` and
    ``kernel_size``), else attention, a separable long convolution (HyenaPixel's "SC" ablation), a local
    convolution or other."""
    filt = getattr(module, "long_filter", None)
    if isinstance(filt, LongFilterBase):
        return filt.kind, tuple(filt.kernel_size)
    separable = getattr(module, "long_horizontal_conv", None)
    if separable is not None:
        return SEPARABLE_LONG_CONV, (separable.kernel_size[0],) * 2
    if hasattr(module, "qkv") or isinstance(module, nn.MultiheadAttention):
        return ATTENTION, None
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    if convs:
        return LOCAL_CONV, tuple(convs[0].kernel_size)
    return OTHER, None


def _block_mixers(model: nn.Module) -> Iterator[Tuple[int, int, str, nn.Module]]:
    """(stage, block, path, mixer) for MetaFormer/ConvNeXt-style ``stages``, ResNet ``layerN``, VGG ``features``,
    ViT ``blocks`` (all in stage 0, mixer ``attn``). Blocks without a mixer (RepLKNet's ConvFFN) are skipped; block
    numbers stay the module indices."""
    if hasattr(model, "stages"):
        for s, stage in enumerate(model.stages):
            blocks = getattr(stage, "blocks", stage)
            prefix = f"stages.{s}.blocks" if hasattr(stage, "blocks") else f"stages.{s}"
            for b, block in enumerate(blocks):
                for attr in MIXER_ATTRIBUTES:
                    if hasattr(block, attr):
                        yield s, b, f"{prefix}.{b}.{attr}", getattr(block, attr)
                        break
    elif hasattr(model, "blocks"):
        for b, block in enumerate(model.blocks):
            if hasattr(block, VIT_MIXER):
                yield 0, b, f"blocks.{b}.{VIT_MIXER}", getattr(block, VIT_MIXER)
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
        device, dtype = model_placement(model)
        model.eval()
        model(torch.zeros(1, 3, *input_hw, device=device, dtype=dtype))
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
    """Only the layers with a long filter (``MixerInfo.long_filter``)."""
    return [info for info in list_mixers(model, input_size) if info.long_filter is not None]


def long_filter(layer: Union[MixerInfo, LongFilterBase]) -> LongFilterBase:
    """The layer's long filter; ValueError for a mixer without one."""
    filt = layer if isinstance(layer, LongFilterBase) else layer.long_filter
    if filt is None:
        raise ValueError(f"layer {layer.path} ({layer.kind}) has no implicit long filter")
    return filt


@torch.no_grad()
def kernel(layer: Union[MixerInfo, LongFilterBase]) -> Tensor:
    """The kernel a long-filter layer applies (after any active modification), as a true convolution: (C, S, S) or
    (C, T); a one-line HpxError when it holds NaN or infinite values (damaged weights), which every figure and
    extent would silently show as blank or zero."""
    values = long_filter(layer).kernel().detach()
    if not bool(torch.isfinite(values).all()):
        where = f"layer {layer.path}" if isinstance(layer, MixerInfo) else type(layer).__name__
        raise HpxError(f"the kernel of {where} holds NaN or infinite values: are the weights damaged?")
    return values


@torch.no_grad()
def window(layer: Union[MixerInfo, LongFilterBase]) -> Tensor:
    """The decay window, shaped like the kernel (HpxError for a family without one): HyenaPixel
    ``exp(-|delta| d) + shift`` (C, S, S); Hyena ``exp(-t|delta|)`` (C, T); Hyena N-D its 2D window on the block's
    canvas (C, 2L-1, 2L-1), 0 where the block applies no tap."""
    return long_filter(layer).window().detach()


@torch.no_grad()
def window_parameters(layer: Union[MixerInfo, LongFilterBase]) -> Dict[str, Tensor]:
    """Per-channel window parameters (HpxError for a family without a window): HyenaPixel ``delta``, ``shift`` (C,)
    and the tap distances ``distance`` (S, S); Hyena 1D ``delta``, ``shift`` (zero) and ``t`` (T,); Hyena N-D
    ``delta`` (2, C) along rows and columns, ``shift`` (C,) or (2, C), ``t`` (L,)."""
    return long_filter(layer).window_parameters()


def tap_displacements(layer: MixerInfo) -> Tuple[Tensor, Tensor]:
    """Displacement (rows, columns) in pixels of each tap of the layer's long filter on its feature map
    (:meth:`LongFilterBase.tap_displacements`)."""
    if layer.feature_size is None:
        raise ValueError("layer info lacks feature_size: list the layers with an input_size")
    return long_filter(layer).tap_displacements(layer.feature_size)


def _paper_numbers(indices: Iterable[int]) -> str:
    """0-based indices numbered from 1, as in the paper: ``1-4`` when contiguous, else ``1, 3``."""
    numbers = sorted({i + 1 for i in indices})
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _missing(infos: Sequence[MixerInfo], ref: LayerRef) -> str:
    """Why no mixer in ``infos`` matches ``ref``, with what the model has instead."""
    stages = {info.stage for info in infos}
    if not stages:
        return f"cannot find {ref}: the model has no stages of blocks (MetaFormer stages, ResNet layerN, VGG features)"
    if ref.stage not in stages:
        return f"stage {ref.stage + 1} does not exist; the model has stages {_paper_numbers(stages)}"
    blocks = {info.block for info in infos if info.stage == ref.stage}
    return (f"block {ref.block + 1} of stage {ref.stage + 1} does not exist; stage {ref.stage + 1} has blocks "
            f"{_paper_numbers(blocks)}")


def select_mixers(infos: Sequence[MixerInfo], layers: Optional[Iterable[LayerLike]],
                  long_filters_only: bool = False) -> List[MixerInfo]:
    """The mixers among ``infos`` (all of a model's, :func:`list_mixers`) that ``layers`` (one or a list) name,
    numbered from 0 (:meth:`LayerRef.of`; a stage names all its blocks), in that order without repeats; all
    when None.

    long_filters_only: only layers with an implicit long filter. HpxError for a stage or block that the
    model lacks, or that has no long filter, saying what exists.
    """
    candidates = [info for info in infos if info.long_filter is not None or not long_filters_only]
    if layers is None:
        return candidates
    if isinstance(layers, (str, LayerRef, numbers.Integral)):
        layers = [layers]
    allowed = {info.index for info in candidates}
    chosen: Dict[int, MixerInfo] = {}
    for ref in map(LayerRef.of, layers):
        found = [info for info in infos if ref.matches(info)]
        if not found:
            raise HpxError(_missing(infos, ref))
        kept = [info for info in found if info.index in allowed]
        if not kept:
            where = (f"layers with one are in stages {_paper_numbers(i.stage for i in candidates)}" if candidates
                     else "the model has no long-filter layers (HyenaPixel, Hyena, large kernels)")
            raise HpxError(f"{ref} has no long filter (its mixer is {found[0].kind}); {where}")
        for info in kept:
            chosen.setdefault(info.index, info)
    return list(chosen.values())


def feature_modules(model: nn.Module) -> List[str]:
    """Module paths in timm's ``feature_info`` (the stage outputs), [] when the model has none."""
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    return [entry["module"] for entry in (info if isinstance(info, list) else info.get_dicts())]


def feature_layer(model: nn.Module) -> str:
    """Module path of the last stage's output, before the final norm and head (the ERF output)."""
    modules = feature_modules(model)
    if modules:
        return modules[-1]
    raise ValueError(f"{type(model).__name__} has no feature_info; name the layer explicitly")


def layer_module(model: nn.Module, layer: LayerLike) -> str:
    """Module path of a stage's output or of one block, ``layer`` numbered from 0 (:meth:`LayerRef.of`).

    A stage is the ``feature_info`` module holding all its blocks (``stages.2`` in MetaFormers,
    ``layer3`` in ResNets), a block the module holding its mixer (``stages.2.blocks.1``).
    """
    ref = LayerRef.of(layer)
    blocks = select_mixers(list_mixers(model), [ref])
    if ref.block is not None:
        return blocks[0].block_path
    for module in feature_modules(model):
        if all(info.path.startswith(module + ".") for info in blocks):
            return module
    raise HpxError(f"{type(model).__name__} has no module holding all of {ref}; name a module path instead")
