"""Shared test setup: no network (anything that tries fails loudly), golden-file locations, tiny models."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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


@pytest.fixture
def tiny_weights() -> callable:
    """tiny_weights(name) -> path of the golden tiny checkpoint (.safetensors, weights under state_dict.)."""
    return lambda name: str(TINY / f"{name}.safetensors")
