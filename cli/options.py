"""Options shared by the commands, defined once, and the choices of every command as enums (their values
equal the library's constants, which a test checks). Types and plain helpers only: importing this loads no torch."""

from __future__ import annotations

import ast
import hashlib
import math
import os
import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional

import typer
from typing_extensions import Annotated

if TYPE_CHECKING:
    from hpx_analysis.layer_names import LayerRef
    from hpx_analysis.workflows import ModelSpec

Model = Annotated[Optional[str], typer.Option("--model", "-m", show_default=False,
                                              help="Model name (`hpx-analyze models`), any timm model, or a model "
                                              "config .json. Required.")]
Models = Annotated[Optional[List[str]], typer.Option("--model", "-m", show_default=False,
                                                     help="Model name; repeat for several models (`hpx-analyze "
                                                     "models` lists them). Required.")]
Weights = Annotated[str, typer.Option("--weights", "--checkpoint", "-w",
                                      help="'pretrained' (hub or local HF cache), 'random' (seeded), "
                                      "or a checkpoint file (.pth/.bin/.safetensors).")]
WeightsPerModel = Annotated[Optional[List[str]], typer.Option(
    "--weights", "--checkpoint", "-w", show_default=False,
    help="'pretrained' (hub or local HF cache), 'random' (seeded), or a checkpoint file (.pth/.bin/.safetensors); "
         "one for every model, or repeated once per --model in the same order. Default: pretrained.")]
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 4096
"""Input sides the commands take: every stage keeps a feature map of at least 1 px (strides up to 32), and a
4096 px ERF pass already needs about 50 GB."""
InputSize = Annotated[Optional[int], typer.Option("--input-size", min=MIN_INPUT_SIZE, max=MAX_INPUT_SIZE,
                                                 help="Input resolution in px (it sets the feature-map sides F); "
                                                 "default: the model's pretrained resolution.")]
Images = Annotated[Optional[Path], typer.Option("--images", help="Image folder (recursive) or ImageFolder tree; "
                                                "default: scikit-image's bundled photographs.")]
NumImages = Annotated[int, typer.Option("--num-images", min=1, help="How many images to use (sorted, seeded, spread "
                                        "over class subfolders).")]
LAYER_FORMS = ("numbered from 1 as in the paper: S3 or 3 (a stage), S3B2, S3 B2 or 3.2 (a block), or the module "
               "paths stages.2, stages.2.blocks.1 (from 0, as the modules)")
LAYER_RANGES = "a range of blocks of one stage: S1B1-6, 1.1-6 (a ViT's blocks are its one stage)"
Layers = Annotated[Optional[List[str]], typer.Option("--layers", metavar="LAYERS", show_default=False,
                                                     help=f"Stages or blocks, {LAYER_FORMS}, or {LAYER_RANGES}; "
                                                     "comma-separated or repeated. Default: all.")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Resume an interrupted run and reuse a finished "
                                      "one with the same model, inputs and options (runs are kept under OUT/runs).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when available).")]


def writable_folder(value: Path) -> Path:
    """Option callback: a folder that exists or can be made (its nearest existing ancestor a folder this process
    may write in), checked before any work; nothing is created here."""
    existing = value.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise typer.BadParameter(f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"cannot write in {existing}")
    return value


Out = Annotated[Path, typer.Option("--out", "-o", callback=writable_folder,
                                   help="Output folder for figures and results.")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2 ** 32 - 1,
                                   help="Random seed (weights='random', image selection, noise).")]
Metrics = Annotated[Optional[List[str]], typer.Option(
    "--metrics", metavar="METRICS", show_default=False,
    help="Score every explanation, comma-separated or repeated: deletion, insertion (RISE curves and their AUCs, "
         "beside a seeded random pixel order), pointing, energy-pointing (need --boxes).")]
Boxes = Annotated[Optional[Path], typer.Option("--boxes", help="Object boxes for the pointing games: ImageNet's "
                                               "validation XMLs (Pascal VOC; a folder or the .tgz) or a CSV "
                                               "filename,xmin,ymin,xmax,ymax; matched by file name.")]
WeightsKey = Annotated[Optional[str], typer.Option("--weights-key", help="Entry of a training script's checkpoint "
                                                   "that holds the weights, e.g. model_ema. Default: model for "
                                                   "Hyena N-D checkpoints; timm's choice for other files.")]
ModelKwargs = Annotated[Optional[List[str]], typer.Option(
    "--model-kwargs", metavar="KEY=VALUE", show_default=False,
    help="Model constructor option, e.g. directions=4dir or embed_dim=32 (the value read as a Python literal, "
         "else as text, as timm's train.py); repeat for several; they apply to every --model and win over a "
         "checkpoint's saved args.")]


def finite(value: Optional[float]) -> Optional[float]:
    """Option callback: a finite number (click's ranges let NaN through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def given(context: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was given on the command line (not left at its default)."""
    source = context.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"  # typer's own ParameterSource, not click's


DEFAULT_WEIGHTS = "pretrained"
DEFAULT_DEVICE = "auto"
DEFAULT_OUT = Path("figures")
DEFAULT_SEED = 0
DEFAULT_RESUME = True


def _renamed(param: typer.CallbackParam, value: Optional[List[str]]) -> Optional[List[str]]:
    """The values of an old spelling of ``--layers``, with a note on stderr when it was used."""
    if value:
        typer.echo(f"note: {param.opts[0]} is now --layers; the old name goes in a later release", err=True)
    return value


# The old spellings of --layers, hidden from --help and kept for one release (each with a note when used).
LayerRenamed = Annotated[Optional[List[str]], typer.Option("--layer", hidden=True, callback=_renamed)]     # erf
StageRenamed = Annotated[Optional[List[str]], typer.Option("--stage", hidden=True, callback=_renamed)]    # truncate


def choices(name: str, *values: str) -> type:
    """A str Enum for a Typer option whose members are ``values`` (attribute names with ``-`` as ``_``)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


# The choices of every command; each equals a library constant (checked by a test), spelled out here because
# importing the library would import torch for ``--help``.
Convention = choices("Convention", "replknet", "kim2023")                    # analyzers.erf.CONVENTIONS
Amp = choices("Amp", "bf16", "fp16")                                         # analyzers.erf.AMP_DTYPES
Gradient = choices("Gradient", "relu", "abs")                                # analyzers.erf.GRADIENTS
Method = choices("Method", "fgvis", "saliency", "integrated-gradients", "occlusion", "gradcam")  # attribution.METHODS
Reference = choices("Reference", "black", "blur", "mean")                    # analyzers.methods.REFERENCES
BoundActivations = choices("BoundActivations", "relu", "all")                # analyzers.fgvis.BOUND_ACTIVATIONS
Shape = choices("Shape", "disc", "square")                                   # interventions.SHAPES
HbCut = choices("HbCut", "wrap", "offset")                                   # interventions.HB_CUTS
Normalisation = choices("Normalisation", "maxabs", "minmax", "none")         # analyzers.kernels.NORMALISATIONS
Orientation = choices("Orientation", "kernel", "response")                   # analyzers.kernels.ORIENTATIONS


def weights_per_model(models: List[str], weights: Optional[List[str]]) -> List[str]:
    """The weights source of each model: one given for all (default ``pretrained``), or one per model."""
    chosen = weights or [DEFAULT_WEIGHTS]
    if len(chosen) == 1:
        return chosen * len(models)
    if len(chosen) != len(models):
        raise typer.BadParameter(f"give one --weights for all models or one per --model: got {len(chosen)} for "
                                 f"{len(models)} models", param_hint="'--weights'")
    return list(chosen)


def parse_model_kwargs(values: Optional[List[str]]) -> Dict[str, Any]:
    """Constructor options from ``KEY=VALUE`` texts, each value a Python literal (``32``, ``True``, ``(8, 8)``) or
    else the text itself (timm's ``--model-kwargs`` convention); a later key wins."""
    parsed: Dict[str, Any] = {}
    for text in values or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip().isidentifier():
            raise typer.BadParameter(f"expected KEY=VALUE with KEY a Python name, got '{text}'",
                                     param_hint="'--model-kwargs'")
        try:
            parsed[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed[key.strip()] = value
    return parsed


def model_specs(models: Optional[List[str]], weights: Optional[List[str]], weights_key: Optional[str],
                model_kwargs: Optional[List[str]]) -> List["ModelSpec"]:
    """What ``--model``, ``--weights`` (:func:`weights_per_model`), ``--weights-key`` and ``--model-kwargs`` name: one
    :class:`~hpx_analysis.workflows.ModelSpec` per model, labels made distinct (one model with two weights files);
    a one-line error without ``--model``."""
    from hpx_analysis.errors import HpxError
    from hpx_analysis.workflows import ModelSpec, distinct_labels

    if not models:
        raise HpxError("missing --model: name a model (`hpx-analyze models` lists them), a timm model or a model "
                       "config .json")
    kwargs, sources = parse_model_kwargs(model_kwargs), weights_per_model(models, weights)
    return distinct_labels([ModelSpec(name, source, weights_key, kwargs) for name, source in zip(models, sources)])


def model_spec(model: Optional[str], weights: str, weights_key: Optional[str],
               model_kwargs: Optional[List[str]]) -> "ModelSpec":
    """:func:`model_specs` of a command that takes one ``--model``."""
    return model_specs([model] if model else None, [weights], weights_key, model_kwargs)[0]


def listed(*values: Optional[List[str]]) -> List[str]:
    """The items of a repeated, comma-separated option's values, in order."""
    return [item.strip() for given in values for value in given or [] for item in value.split(",") if item.strip()]


def layer_texts(*values: Optional[List[str]]) -> List[str]:
    """The items of ``--layers`` values (and of its old spelling), in order (:func:`listed`)."""
    return listed(*values)


def input_sizes(values: Optional[List[str]]) -> List[int]:
    """The sides of repeated, comma-separated ``--input-size`` values, in order; a one-line error for text that
    is no whole number."""
    from hpx_analysis.errors import HpxError

    sizes = []
    for item in listed(values):
        if not item.lstrip("+-").isdigit():
            raise HpxError(f"--input-size takes whole numbers of pixels (224 or 224,512,1024), got '{item}'")
        if not MIN_INPUT_SIZE <= int(item) <= MAX_INPUT_SIZE:
            raise HpxError(f"the input size must be {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} px (--input-size), got {item}")
        sizes.append(int(item))
    return sizes


def layer_groups(texts: List[str]) -> Optional[List[List["LayerRef"]]]:
    """Each text as the layers it names (:func:`~hpx_analysis.layer_names.parse_layer_group`: a stage, a block or
    a block range of one stage, numbered from 1); None for all (no text, or ``all``)."""
    from hpx_analysis.errors import HpxError
    from hpx_analysis.layer_names import parse_layer_group
    if "all" in texts and len(texts) > 1:
        others = ", ".join(text for text in texts if text != "all")
        raise HpxError(f"--layers all names every layer; give it alone, not with {others}")
    if not texts or "all" in texts:
        return None
    return [parse_layer_group(text) for text in texts]


def selected_layers(layers: Optional[List[str]]) -> Optional[List["LayerRef"]]:
    """The stages and blocks ``--layers`` names, in order; None for all."""
    groups = layer_groups(layer_texts(layers))
    return None if groups is None else [ref for group in groups for ref in group]


def runs_dir(out: Path, resume: bool) -> Optional[Path]:
    """Where resumable runs are kept (``OUT/runs``); None with ``--no-resume``."""
    return Path(out) / "runs" if resume else None


def report_written(paths: Iterable[Path | str]) -> None:
    """One ``wrote PATH`` line per written file."""
    for path in paths:
        typer.echo(f"wrote {path}")


MAX_NAME = 120
"""Longest file stem written (file systems refuse names over 255 bytes; the suffixes and a ``.damaged-...`` stay)."""


def safe_filename(text: str) -> str:
    """``text`` with every run of characters other than letters, digits and ``_.+-`` replaced by ``_``; a stem over
    :data:`MAX_NAME` characters is cut and ends in 12 hex digits of its SHA-256, so long names stay distinct."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
