"""Device selection shared by the library and the CLI."""

from __future__ import annotations

import itertools

import torch

from .errors import HpxError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HpxError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HpxError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def model_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (else its first buffer; CPU float32 for a model with
    neither, e.g. a function wrapped as a module)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):  # stops at the first floating one
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32
