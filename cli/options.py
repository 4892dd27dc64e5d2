"""Options shared by every command, defined once. Types and plain helpers only: importing this loads no torch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

Model = Annotated[str, typer.Option("--model", "-m", help="Model name (`hpx-analyze models`), any timm model, "
                                    "or a model config .json.")]
Models = Annotated[List[str], typer.Option("--model", "-m", help="Model name; repeat for several models "
                                           "(`hpx-analyze models` lists them).")]
Weights = Annotated[str, typer.Option("--weights", "--checkpoint", "-w",
                                      help="'pretrained' (hub or local HF cache), 'random' (seeded), "
                                      "or a checkpoint file (.pth/.bin/.safetensors).")]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Input resolution defining the feature-map "
                                                 "size F; default the model's training resolution.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when available).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder for figures and results.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (weights='random', image selection, noise).")]

DEFAULT_WEIGHTS = "pretrained"
DEFAULT_DEVICE = "auto"
DEFAULT_OUT = Path("figures")
DEFAULT_SEED = 0


def safe_filename(text: str) -> str:
    """``text`` with every run of characters other than letters, digits and ``_.+-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)
