"""Options shared by the commands, defined once, and the choices of every command as enums (their values
equal the library's constants, which a test checks). Types and plain helpers only: importing this loads no torch."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from typing_extensions import Annotated

Model = Annotated[str, typer.Option("--model", "-m", help="Model name (`hpx-analyze models`), any timm model, "
                                    "or a model config .json.")]
Models = Annotated[List[str], typer.Option("--model", "-m", help="Model name; repeat for several models "
                                           "(`hpx-analyze models` lists them).")]
Weights = Annotated[str, typer.Option("--weights", "--checkpoint", "-w",
                                      help="'pretrained' (hub or local HF cache), 'random' (seeded), "
                                      "or a checkpoint file (.pth/.bin/.safetensors).")]
WeightsPerModel = Annotated[Optional[List[str]], typer.Option(
    "--weights", "--checkpoint", "-w", show_default=False,
    help="'pretrained' (hub or local HF cache), 'random' (seeded), or a checkpoint file (.pth/.bin/.safetensors); "
         "one for every model, or repeated once per --model in the same order. Default: pretrained.")]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Input resolution in px (it sets the "
                                                 "feature-map sides F); default: the model's pretrained "
                                                 "resolution.")]
Images = Annotated[Optional[Path], typer.Option("--images", help="Image folder (recursive) or ImageFolder tree; "
                                                "default: scikit-image's bundled photographs.")]
NumImages = Annotated[int, typer.Option("--num-images", help="How many images to use (sorted, seeded, spread over "
                                        "class subfolders).")]
Layers = Annotated[Optional[str], typer.Option("--layers", help="Stages or blocks, numbered from 1 as in the paper: "
                                               "S1B1,S2B3 or 1.1,2.3 (STAGE.BLOCK), S3 (all of stage 3), or module "
                                               "paths stages.0.blocks.0 (from 0). Default: all.")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Resume an interrupted run and reuse a finished "
                                      "one with the same model, inputs and options (runs are kept under OUT/runs).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when available).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder for figures and results.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (weights='random', image selection, noise).")]
WeightsKey = Annotated[Optional[str], typer.Option("--weights-key", help="Entry of a training script's checkpoint "
                                                   "that holds the weights, e.g. model_ema. Default: model for "
                                                   "Hyena N-D checkpoints; timm's choice for other files.")]
ModelKwargs = Annotated[Optional[List[str]], typer.Option(
    "--model-kwargs", metavar="KEY=VALUE", show_default=False,
    help="Model constructor option, e.g. directions=4dir or embed_dim=32 (the value read as a Python literal, "
         "else as text, as timm's train.py); repeat for several; they apply to every --model and win over a "
         "checkpoint's saved args.")]

DEFAULT_WEIGHTS = "pretrained"
DEFAULT_DEVICE = "auto"
DEFAULT_OUT = Path("figures")
DEFAULT_SEED = 0
DEFAULT_RESUME = True


def choices(name: str, *values: str) -> type:
    """A str Enum for a Typer option whose members are ``values`` (attribute names with ``-`` as ``_``)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


# The choices of every command; each equals a library constant (checked by a test), spelled out here because
# importing the library would import torch for ``--help``.
Convention = choices("Convention", "replknet", "kim2023")                    # analyzers.erf.CONVENTIONS
Amp = choices("Amp", "bf16", "fp16")                                         # analyzers.erf.AMP_DTYPES
Method = choices("Method", "fgvis", "saliency", "integrated-gradients", "occlusion", "gradcam")  # attribution.METHODS
Reference = choices("Reference", "black", "blur", "mean")                    # analyzers.methods.REFERENCES
BoundActivations = choices("BoundActivations", "relu", "all")                # analyzers.fgvis.BOUND_ACTIVATIONS
Shape = choices("Shape", "disc", "square")                                   # analyzers.truncation.SHAPES
HbCut = choices("HbCut", "wrap", "offset")                                   # analyzers.truncation.HB_CUTS
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


@dataclass(frozen=True)
class ModelLoader:
    """What every model-loading command passes to ``load_model`` beside the name and weights: the checkpoint entry
    (``--weights-key``) and the constructor options (``--model-kwargs``), parsed once."""

    weights_key: Optional[str]
    kwargs: Dict[str, Any]

    @classmethod
    def from_options(cls, weights_key: Optional[str], model_kwargs: Optional[List[str]]) -> "ModelLoader":
        return cls(weights_key, parse_model_kwargs(model_kwargs))

    def load(self, name: str, weights: str, seed: int, device: Any = "cpu") -> Any:
        """``hpx_analysis.models.zoo.load_model`` with these options: an eval-mode model on ``device``."""
        from hpx_analysis.models.zoo import load_model
        return load_model(name, weights, seed=seed, device=device, weights_key=self.weights_key, **self.kwargs)


def safe_filename(text: str) -> str:
    """``text`` with every run of characters other than letters, digits and ``_.+-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)
