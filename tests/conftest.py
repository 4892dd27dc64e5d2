"""Shared test setup: no network (anything that tries fails loudly), golden-file locations, tiny models."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Dict, Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).parent / "data" / "golden"
TINY = GOLDEN / "tiny"
TINY_NAMES = sorted(p.stem for p in TINY.glob("*.json"))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")


class NetworkAccessError(RuntimeError):
    pass


def _guarded_connect(self: socket.socket, address, *args, **kwargs):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _original_connect(self, address, *args, **kwargs)
    raise NetworkAccessError(f"test tried to reach the network: {address!r}")


_original_connect = socket.socket.connect


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test: outbound connections other than loopback raise NetworkAccessError."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture
def tiny_config() -> callable:
    """tiny_config(name) -> path of the golden tiny model config (.json)."""
    return lambda name: str(TINY / f"{name}.json")


def golden_state_dict(golden: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The reference weights of a golden tiny file, which keeps them under ``state_dict.`` beside its
    inputs, outputs and kernels."""
    prefix = "state_dict."
    return {key[len(prefix):]: value for key, value in golden.items() if key.startswith(prefix)}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> callable:
    """tiny_weights(name) -> path of a checkpoint (.safetensors) holding just the golden tiny model's weights."""
    folder = tmp_path_factory.mktemp("tiny_weights")

    def path(name: str) -> str:
        checkpoint = folder / f"{name}.safetensors"
        if not checkpoint.exists():
            save_file(golden_state_dict(load_file(str(TINY / f"{name}.safetensors"))), str(checkpoint))
        return str(checkpoint)
    return path
