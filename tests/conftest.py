"""Shared test setup: no network (anything that tries fails loudly), golden-file locations, tiny models."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Mapping, Set, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
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


def free_port() -> int:
    """A free loopback TCP port, for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ONE_THREAD = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def torchrun(args, out: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``hpx-analyze ARGS --out OUT`` under a 2-process CPU (gloo) torchrun, one thread per process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "--no-python", shutil.which("hpx-analyze")]
    return subprocess.run(launcher + args + ["--out", str(out)], capture_output=True, text=True, env=ONE_THREAD,
                          timeout=timeout)


def one_process(args, out: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``hpx-analyze ARGS --out OUT`` in one process with one thread, the same arithmetic as each torchrun rank's."""
    return subprocess.run([shutil.which("hpx-analyze"), *args, "--out", str(out)], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=timeout)


def library_imports() -> Dict[str, Set[str]]:
    """Module -> the ``hpx_analysis`` modules it imports anywhere in its source (imports inside functions
    too), by dotted name, e.g. ``"hpx_analysis.analyzers.fgvis" -> {"hpx_analysis.analyzers.methods", ...}``."""
    import hpx_analysis  # here: importing it at the top would load huggingface_hub before HF_HUB_OFFLINE is set
    root = Path(hpx_analysis.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            imported |= {candidate for candidate in candidates if candidate in modules and candidate != name}
        graph[name] = imported
    return graph


def meta_model_and_state_dict(arch: str, entries) -> Tuple[torch.nn.Module, Dict[str, torch.Tensor]]:
    """The registered model ``arch`` on the meta device, and a meta state dict of a manifest's (key, shape) entries."""
    import timm  # here: importing it at the top would load huggingface_hub before HF_HUB_OFFLINE is set
    with torch.device("meta"):
        model = timm.create_model(arch)
    return model, {key: torch.empty(shape, device="meta") for key, shape in entries}


def random_image_folder(root: Path, classes: Tuple[str, ...], per_class: int = 2,
                        size: Tuple[int, int] = (70, 90), seed: int = 0) -> Path:
    """An ImageFolder tree under ``root``: ``per_class`` random RGB PNGs of ``size`` (H, W) in each class folder."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root
