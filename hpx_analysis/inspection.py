"""Inspection of token-mixing layers: the substrate every analyzer builds on.

``list_mixers(model, input_size)`` enumerates a model's token mixers in forward order with stage
(0-based, as in module paths; the paper numbers stages 1-4), block, module path, kind and the
feature-map size at a given input resolution. For long filters ``kernel(info)`` returns the kernel
actually applied, (C, S, S) or (C, T), and ``window(info)`` HyenaPixel's window. SLaK / RepLKNet large kernels
(kind ``large_conv``) count as long filters: their kernel is the block's effective single depthwise kernel
(C, K, K), and while it is modified the block runs as one convolution (``models.large_kernel.EffectiveKernelFilter``).
Hyena N-D ViTs (kind ``hyena_nd``; ``blocks`` without stages: the whole ViT is stage 0, its attention blocks kind
``attention``) likewise: the kernel ``k / (2L)`` each block applies, as one true convolution on a centred
(2L-1) x (2L-1) canvas (a quadrant, or four for ``4dir``; ``models.hyena_nd.HyenaNDCanvasFilter``).
``modify_kernels`` applies a function to chosen layers' kernels and restores them afterwards;
``cut_short_convs`` keeps only the centre tap of chosen stages' short (5x5) depthwise kernels, likewise.

``LayerRef`` is the one way to name a stage or block: numbered from 0 in the Python API, parsed from
the paper's 1-based ``S3`` / ``S3B2`` / ``3.2`` on the command line, or from module paths
(``stages.2.blocks.1``, from 0); ``select_mixers`` and ``layer_module`` resolve it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import HpxError
from .models.hyena_nd import HyenaNDCanvasFilter, HyenaNDMixer
from .models.large_kernel import LargeKernelConv
from .models.long_filters import HyenaFilter1D, HyenaPixelFilter, LongFilterBase
from .models.mixers import HyenaMixer, HyenaPixelMixer

HYENAPIXEL_2D = "hyenapixel_2d"
HYENA_1D = "hyena_1d"
SEPARABLE_LONG_CONV = "separable_long_conv"
ATTENTION = "attention"
LOCAL_CONV = "local_conv"
LARGE_CONV = "large_conv"
HYENA_ND = "hyena_nd"
OTHER = "other"
MIXER_ATTRIBUTES = ("token_mixer", "conv_dw", "conv2", "large_kernel")  # a block's token mixer, first found wins
VIT_MIXER = "attn"  # the token mixer of a ViT block (``blocks.<i>.attn``; Hyena N-D replaces the attention there)

LAYER_SYNTAX = "S3, S3B2, 3, 3.2, stages.2 or stages.2.blocks.1"
_PAPER_LABEL = re.compile(r"s(\d+)(?:\s*b(\d+))?", re.IGNORECASE)   # numbered from 1, as in the paper
_NUMBERS = re.compile(r"(\d+)(?:\.(\d+))?")                        # numbered from 1 or 0 (``one_based``)
_MODULE_PATH = re.compile(r"stages\.(\d+)(?:\.blocks\.(\d+))?")    # numbered from 0, as the modules


@dataclass(frozen=True)
class LayerRef:
    """A stage, or one block of it, numbered from 0: ``LayerRef(2, 1)`` is the paper's S3 B2, the block
    ``stages.2.blocks.1``; ``LayerRef(2)`` is all of stage 3. ``str()`` gives the paper's label."""

    stage: int
    block: Optional[int] = None

    def __post_init__(self) -> None:
        if self.stage < 0 or (self.block is not None and self.block < 0):
            raise HpxError(f"stage and block indices start at 0, got stage {self.stage}, block {self.block}")

    @classmethod
    def parse(cls, text: str, one_based: bool = True) -> "LayerRef":
        """``S3``, ``s3``, ``S3B2``, ``S3 B2`` (the paper's labels, numbered from 1), ``3``, ``3.2`` (STAGE.BLOCK,
        numbered from 1 when ``one_based``, as on the command line, else from 0, as in the Python API) or
        the module paths ``stages.2``, ``stages.2.blocks.1`` (numbered from 0). HpxError for other text."""
        stripped = text.strip()
        for pattern, from_one in ((_PAPER_LABEL, True), (_NUMBERS, one_based), (_MODULE_PATH, False)):
            match = pattern.fullmatch(stripped)
            if match is None:
                continue
            stage, block = (None if g is None else int(g) - from_one for g in match.groups())
            if stage < 0 or (block is not None and block < 0):
                raise HpxError(f"layer '{stripped}': stages and blocks are numbered from 1 here, as in the paper")
            return cls(stage, block)
        raise HpxError(f"layer '{stripped}' names no stage or block; write {LAYER_SYNTAX}")

    @classmethod
    def of(cls, layer: "LayerLike") -> "LayerRef":
        """A LayerRef from the Python API's forms, all numbered from 0: a LayerRef, a stage index, a
        (stage, block) pair, or text for :meth:`parse` with ``one_based=False``."""
        if isinstance(layer, LayerRef):
            return layer
        if isinstance(layer, str):
            return cls.parse(layer, one_based=False)
        if isinstance(layer, numbers.Integral):
            return cls(int(layer))
        stage, block = layer
        return cls(int(stage), int(block))

    def matches(self, info: "MixerInfo") -> bool:
        """Whether the mixer lies in this stage (and block)."""
        return info.stage == self.stage and (self.block is None or info.block == self.block)

    def __str__(self) -> str:
        return f"S{self.stage + 1}" + ("" if self.block is None else f" B{self.block + 1}")


LayerLike = Union[LayerRef, int, Tuple[int, int], str]


def parse_layers(text: Optional[str], one_based: bool = True) -> Optional[List[LayerRef]]:
    """``"S1B1,2.1,S3"`` -> [LayerRef(0, 0), LayerRef(1, 0), LayerRef(2)]: comma-separated
    :meth:`LayerRef.parse` forms, numbered from 1 as on the command line unless ``one_based`` is False;
    None for no text."""
    if not text:
        return None
    return [LayerRef.parse(item, one_based) for item in text.split(",")]


_BLOCK_RANGE = re.compile(r"(.+?)\s*-\s*(\d+)")  # a block form, then the last block of the range


def parse_layer_group(text: str, one_based: bool = True) -> List[LayerRef]:
    """One :meth:`LayerRef.parse` form as a one-element list, or a range of blocks of one stage, its end numbered
    like its start: ``S1B1-6`` (blocks 1 to 6 of stage 1, from 1), ``1.1-6`` (from 1 when ``one_based``, else
    from 0), ``stages.0.blocks.0-5`` (from 0)."""
    match = _BLOCK_RANGE.fullmatch(text.strip())
    if match is None:
        return [LayerRef.parse(text, one_based)]
    first = LayerRef.parse(match[1], one_based)
    if first.block is None:
        raise HpxError(f"layer range '{text.strip()}' must start at a block, as in S1B1-6 or 1.1-6")
    start = match[1].strip()  # the end is numbered like the start: paper labels from 1, module paths from 0
    last = int(match[2]) - bool(_PAPER_LABEL.fullmatch(start) or (one_based and _NUMBERS.fullmatch(start)))
    if last < first.block:
        raise HpxError(f"layer range '{text.strip()}' ends before it starts")
    return [LayerRef(first.stage, block) for block in range(first.block, last + 1)]


def group_label(refs: Sequence[LayerRef]) -> str:
    """The paper's label of refs taken together: ``S3``, ``S1 B3``, ``S1 B1-6`` for consecutive blocks of one
    stage, else the labels joined by ``+``."""
    blocks = [ref.block for ref in refs]
    if len(refs) > 1 and len({ref.stage for ref in refs}) == 1 and None not in blocks and (
            blocks == list(range(blocks[0], blocks[0] + len(blocks)))):
        return f"{refs[0]}-{blocks[-1] + 1}"
    return "+".join(map(str, refs))


def is_layer_syntax(text: str) -> bool:
    """Whether ``text`` has one of :meth:`LayerRef.parse`'s forms (other text may be a module path)."""
    return any(p.fullmatch(text.strip()) for p in (_PAPER_LABEL, _NUMBERS, _MODULE_PATH))


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
        """The implicit long filter of a HyenaPixel / Hyena layer, the effective-kernel view of a SLaK / RepLKNet
        large kernel (``large_conv``) or the canvas-kernel view of a Hyena N-D mixer (``hyena_nd``), else None."""
        if isinstance(self.module, (LargeKernelConv, HyenaNDMixer)):
            return self.module.effective_filter
        if isinstance(self.module, HyenaPixelMixer) and not self.module.use_separable_conv:
            return self.module.long_conv
        if isinstance(self.module, HyenaMixer):
            return self.module.filter_fn
        return None

    @property
    def filter_path(self) -> Optional[str]:
        """Module path of the long filter (``...long_conv`` / ``...filter_fn`` / ``...effective_filter``), else None."""
        suffix = {HYENAPIXEL_2D: "long_conv", HYENA_1D: "filter_fn", LARGE_CONV: "effective_filter",
                  HYENA_ND: "effective_filter"}.get(self.kind)
        return f"{self.path}.{suffix}" if suffix else None

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
    """Kind and kernel size of a token mixer."""
    if isinstance(module, LargeKernelConv):
        return LARGE_CONV, (module.kernel_size, module.kernel_size)
    if isinstance(module, HyenaPixelMixer):
        size = module.long_horizontal_conv.kernel_size[0] if module.use_separable_conv else module.long_conv.size
        return (SEPARABLE_LONG_CONV if module.use_separable_conv else HYENAPIXEL_2D), (size, size)
    if isinstance(module, HyenaMixer):
        return HYENA_1D, (module.filter_fn.num_taps,)
    if isinstance(module, HyenaNDMixer):
        return HYENA_ND, module.effective_filter.kernel_size
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
    """Only the layers with a long filter (HyenaPixel 2D, Hyena 1D, SLaK / RepLKNet ``large_conv``, ``hyena_nd``)."""
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


def _windowed_filter(layer: Union[MixerInfo, LongFilterBase]) -> LongFilterBase:
    """The layer's long filter when it has a decay window; HpxError for the explicit large kernels."""
    filt = _filter_of(layer)
    if not isinstance(filt, (HyenaPixelFilter, HyenaFilter1D, HyenaNDCanvasFilter)):
        raise HpxError(f"{type(filt).__name__} has no decay window (a large convolution's kernel is explicit)")
    return filt


@torch.no_grad()
def window(layer: Union[MixerInfo, LongFilterBase]) -> Tensor:
    """The decay window: HyenaPixel ``exp(-|delta| d) + shift`` (C, S, S); Hyena ``exp(-t|delta|)`` (C, T); Hyena N-D
    its 2D window on the block's canvas (C, 2L-1, 2L-1), 0 where the block applies no tap."""
    return _windowed_filter(layer).window().detach()


@torch.no_grad()
def window_parameters(layer: Union[MixerInfo, LongFilterBase]) -> Dict[str, Tensor]:
    """Per-channel window parameters: ``delta`` (C,), ``shift`` (C,) (zero for Hyena 1D), and the
    tap distances ``distance`` (S, S) in pixels or ``t`` (T,) normalised time; Hyena N-D: ``delta`` (2, C) along
    rows and columns, ``shift`` (C,) or (2, C), ``t`` (L,) (:meth:`..models.hyena_nd.HyenaNDMixer.window_parameters`)."""
    filt = _windowed_filter(layer)
    if isinstance(filt, HyenaPixelFilter):
        return {"delta": filt.deltas.flatten().abs().clone(), "shift": filt.shift.flatten().clone(),
                "distance": filt.distance_map[0, 0].clone()}
    if isinstance(filt, HyenaNDCanvasFilter):
        return filt.window_parameters()
    channels = filt.modulation.deltas.numel()
    return {"delta": filt.modulation.deltas.flatten().abs().clone(), "shift": torch.zeros(channels),
            "t": filt.pos_emb.t.flatten().clone()}


def nearest_displacement(offsets: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """Nearest 2D displacement (rows a, columns b), each shaped like the integer 1D ``offsets`` d, on
    rows of ``width`` W: a * W + b = d with |b| <= W / 2; on a tie |b| = W / 2 the smaller |a|."""
    half = width // 2
    cols = torch.remainder(offsets + half, width) - half  # in [-half, W - half - 1]
    rows = torch.div(offsets - cols, width, rounding_mode="floor")
    tie = (2 * cols.abs() == width) & (rows > 0)  # (a, -W/2) with a > 0: (a - 1, W/2) is nearer the centre row
    return rows - tie.long(), torch.where(tie, -cols, cols)


def tap_offsets(layer: MixerInfo) -> List[Tensor]:
    """Integer offset of each tap from the kernel centre per kernel axis: [(S,), (S,)] or [(T,)]."""
    filt = _filter_of(layer)
    return [torch.arange(n) - c for n, c in zip(filt.kernel_size, filt.centre)]


def tap_displacements(layer: MixerInfo) -> Tuple[Tensor, Tensor]:
    """2D displacement (rows, columns) in pixels of each tap on the feature map: broadcastable (S, 1) and (1, S)
    for 2D kernels; (T,) each for a Hyena 1D kernel, its offsets' :func:`nearest_displacement` on rows of the
    map's width."""
    offsets = tap_offsets(layer)
    if len(offsets) == 2:
        return offsets[0][:, None], offsets[1][None, :]
    if layer.feature_size is None:
        raise ValueError("layer info lacks feature_size: list the layers with an input_size")
    return nearest_displacement(offsets[0], layer.feature_size[1])


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


LayerSelector = Union[None, Iterable[LayerLike], Callable[[MixerInfo], bool]]


@contextlib.contextmanager
def modify_kernels(model: nn.Module, modifier: Callable[[Tensor, MixerInfo], Tensor],
                   layers: LayerSelector = None, input_size: Union[int, Sequence[int], None] = None
                   ) -> Iterator[List[MixerInfo]]:
    """Apply ``modifier(kernel, info) -> kernel`` to the long filters of the chosen layers inside the block.

    layers: None (all long-filter layers), stages and blocks numbered from 0 (``[LayerRef(2, 0)]``, ``[2]``
    for all of stage 3, ``[(2, 0)]``, ``["S3 B1"]``; :func:`select_mixers`), or a predicate on MixerInfo.
    input_size: resolution for ``info.feature_size`` (needed by size-dependent modifiers).
    Yields the modified layers. On exit every filter gets its previous modifier back, so the
    model computes exactly what it computed before; cached kernel FFTs are refreshed. A modified
    ``large_conv`` block runs as one convolution with its effective kernel and bias (its branches again on exit).
    """
    if callable(layers):
        chosen = [info for info in long_filter_layers(model, input_size) if layers(info)]
    else:
        chosen = select_mixers(list_mixers(model, input_size), layers, long_filters_only=True)
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


@contextlib.contextmanager
def cut_short_convs(model: nn.Module, stages: Iterable[int]) -> Iterator[List[MixerInfo]]:
    """Inside the block the depthwise (short, 5x5) kernels (C, 1, k, k) of the HyenaPixel mixers in the
    0-based ``stages`` keep only their centre tap, so the gated short path only scales each channel;
    the long filters are untouched. Yields the cut layers; on exit the saved weights are copied back,
    bit for bit, also when the block raises."""
    wanted = set(stages)
    chosen = [info for info in list_mixers(model) if info.stage in wanted and isinstance(info.module, HyenaPixelMixer)]
    missing = wanted - {info.stage for info in chosen}
    if missing:
        raise HpxError(f"no HyenaPixel mixer in stage(s) {', '.join(str(stage + 1) for stage in sorted(missing))}")
    convs = [info.module.depthwise_conv for info in chosen]
    saved = [conv.weight.detach().clone() for conv in convs]
    try:
        with torch.no_grad():
            for conv in convs:
                off_centre = torch.ones_like(conv.weight, dtype=torch.bool)
                off_centre[..., conv.weight.shape[-2] // 2, conv.weight.shape[-1] // 2] = False
                conv.weight.masked_fill_(off_centre, 0.0)
        yield chosen
    finally:
        with torch.no_grad():
            for conv, weight in zip(convs, saved):
                conv.weight.copy_(weight)
