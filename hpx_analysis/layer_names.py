"""Names of stages and blocks: the one way to name a layer, on the command line and in Python.

``LayerRef`` is numbered from 0 in the Python API (``LayerRef(2, 1)`` is the paper's S3 B2) and parsed from the
paper's 1-based ``S3`` / ``S3B2`` / ``3.2`` on the command line, or from module paths (``stages.2.blocks.1``, from 0);
block ranges of one stage (``S1B1-6``) name several blocks. This module imports no torch, so a command can check a
layer's spelling before it loads a model; :mod:`hpx_analysis.inspection` resolves names against a model.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple, Union

from .errors import HpxError


class Placed(Protocol):
    """Anything with a 0-based ``stage`` and ``block``, such as an ``inspection.MixerInfo``."""

    stage: int
    block: int


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

    def matches(self, info: Placed) -> bool:
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


GroupLike = Union[LayerLike, Sequence[LayerLike]]
"""A swept group in the Python API, numbered from 0: a stage, a block, a block range (``"S1B1-6"`` read as from 1
as in the paper, ``"0.0-5"`` from 0, :func:`parse_layer_group`) or a list of these taken together."""


def group_refs(group: GroupLike) -> List[LayerRef]:
    """The blocks or stages one :data:`GroupLike` names, numbered from 0."""
    if isinstance(group, str):
        return parse_layer_group(group, one_based=False)
    if isinstance(group, (LayerRef, numbers.Integral)) or (isinstance(group, tuple) and len(group) == 2
                                                          and all(isinstance(v, numbers.Integral) for v in group)):
        return [LayerRef.of(group)]
    return [ref for item in group for ref in group_refs(item)]


__all__ = ["LAYER_SYNTAX", "LayerRef", "LayerLike", "GroupLike", "parse_layers", "parse_layer_group", "group_label",
           "group_refs", "is_layer_syntax"]
