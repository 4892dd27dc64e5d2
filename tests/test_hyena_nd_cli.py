"""Hyena N-D checkpoints of the official training script (``best_checkpoint.pth``: ``model``, ``model_ema`` and the
``args`` Namespace) through every CLI command, with ``--weights-key`` and ``--model-kwargs``; DeiT (timm's attention
ViT) as the baseline beside a Hyena N-D model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hpx_analysis.analyzers.erf import effective_receptive_field
from hpx_analysis.analyzers.kernels import KernelsResult, compute_kernels
from hpx_analysis.errors import HpxError
from hpx_analysis_cli.app import app
from hpx_analysis_cli.options import parse_model_kwargs

from .conftest import golden_state_dict, random_image_folder
from .test_hyena_nd import HND, TINY_DIMS, _config, _official_checkpoint, _training_args

MODEL = "hyena_deit_tiny_patch16_224"
NAME = "tiny_hnd_seq"
TINY_KWARGS = [arg for key, value in TINY_DIMS.items() for arg in ("--model-kwargs", f"{key}={value}")]
"""The golden tiny dims, which the official ``args`` (DeiT tiny: 192, 12, 3) cannot express."""
DEIT_TINY_KWARGS = [arg for option in ("img_size=64", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2")
                    for arg in ("--model-kwargs", option)]
"""Small options that both the Hyena N-D model and timm's DeiT take (a fast side-by-side run)."""


def _golden_weights() -> dict:
    return golden_state_dict(load_file(str(HND / "tiny" / f"{NAME}.safetensors")))


def _ema_weights() -> dict:
    """A ``model_ema`` entry that differs from ``model`` in every tensor."""
    return {key: value + 0.05 for key, value in _golden_weights().items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """best_checkpoint.pth as the official ``main.py`` writes it: the golden seq model, a different EMA, ``args``."""
    folder = tmp_path_factory.mktemp("checkpoint")
    return _official_checkpoint(folder / "best_checkpoint.pth", _golden_weights(), _training_args(_config(NAME)),
                                _ema_weights())


def _invoke(command: str, checkpoint: str, *args: str):
    result = CliRunner().invoke(app, [command, "-m", MODEL, "--checkpoint", checkpoint, *TINY_KWARGS, *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _assert_provenance(model_meta: dict, weights_key: str = "model", given: dict = TINY_DIMS) -> None:
    """The saved model metadata records the checkpoint's ``args``, the options read from them and those given."""
    assert model_meta["weights"] == "file" and model_meta["weights_key"] == weights_key
    assert model_meta["checkpoint_args"]["directional_mode"] == "seq"
    assert model_meta["checkpoint_args"]["model"] == "deit_tiny_patch16_224"
    assert model_meta["options_from_checkpoint"]["embed_dim"] == 192  # args say DeiT tiny; the command line wins
    assert model_meta["options_from_checkpoint"]["directions"] == "seq"
    assert model_meta["options_given"] == given


def test_model_kwargs_values_are_literals_or_text():
    parsed = parse_model_kwargs(["embed_dim=32", "directions=4dir", "sqrt_decay=True", "img_size=(64, 64)",
                                 "note=a=b", "embed_dim=48"])
    assert parsed == {"embed_dim": 48, "directions": "4dir", "sqrt_decay": True, "img_size": (64, 64), "note": "a=b"}
    assert parse_model_kwargs(None) == {}


@pytest.mark.parametrize("bad", ["embed_dim", "=4", "two words=1"])
def test_model_kwargs_syntax_error_is_one_line_exit_2(checkpoint, bad):
    result = CliRunner().invoke(app, ["inspect", "-m", MODEL, "--checkpoint", checkpoint, "--model-kwargs", bad])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and "'--model-kwargs'" in errors[0] and f"'{bad}'" in errors[0]


def test_option_the_constructor_rejects_is_one_line_error_naming_it():
    result = CliRunner().invoke(app, ["inspect", "-m", "deit_tiny_patch16_224", "-w", "random", "--model-kwargs",
                                      "embed_dim=32", "--model-kwargs", "window_size=7"])
    assert isinstance(result.exception, HpxError), result.output
    message = str(result.exception)
    assert "window_size=7" in message and "embed_dim" not in message and "\n" not in message


def test_inspect_lists_the_hyena_blocks_at_the_build_size(checkpoint):
    lines = _invoke("inspect", checkpoint).output.splitlines()[1:]
    assert len(lines) == 4 and all(line.split()[2:5] == ["hyena_nd", "8x8", "15x15"] for line in lines)


def test_kernels_and_coverage_record_args_and_given_options(checkpoint, tmp_path):
    _invoke("kernels", checkpoint, "-o", str(tmp_path))
    stem = tmp_path / f"kernels_{MODEL}"
    for suffix in (".npz", ".json", ".pdf", ".png"):
        assert stem.with_suffix(suffix).is_file()
    _assert_provenance(json.loads(stem.with_suffix(".json").read_text())["model"])
    _invoke("coverage", checkpoint, "-o", str(tmp_path))
    meta = json.loads((tmp_path / f"coverage_{MODEL}.json").read_text())
    _assert_provenance(meta["model"])
    assert [layer["kind"] for layer in meta["layers"]] == ["hyena_nd"] * 4
    rows = list(csv.DictReader(open(tmp_path / "coverage.csv")))
    assert len(rows) == 4 and all(0 < float(row["mean"]) <= 1 for row in rows)  # one-sided windows: at most L/L
    assert (tmp_path / "coverage.png").is_file()


def test_erf_runs_at_the_build_size(checkpoint, tmp_path):
    _invoke("erf", checkpoint, "--num-images", "2", "--device", "cpu", "-o", str(tmp_path))
    stem = tmp_path / f"erf_{MODEL}"
    meta = json.loads(stem.with_suffix(".json").read_text())
    _assert_provenance(meta["models"][0]["model"])
    assert "runs only at its build size" in meta["options"]["transform"]
    maps = np.load(stem.with_suffix(".npz"))["maps"]
    assert maps.shape == (1, 64, 64) and np.isfinite(maps).all() and maps.sum() > 0
    assert stem.with_suffix(".png").is_file()


def test_explain_fgvis_and_saliency(checkpoint, tmp_path):
    _invoke("explain", checkpoint, "--method", "fgvis", "--method", "saliency", "--num-images", "1",
            "--iterations", "3", "--lambda-tries", "1", "--device", "cpu", "-o", str(tmp_path))
    folder = tmp_path / "explain"
    for method in ("fgvis", "saliency"):
        meta = json.loads((folder / f"{MODEL}_{method}.json").read_text())
        _assert_provenance(meta["model"])
        assert np.load(folder / f"{MODEL}_{method}.npz")["masks" if method == "fgvis" else "maps"].shape[-2:] == (
            64, 64)
    assert (folder / f"explain_{MODEL}_fgvis+saliency.png").is_file()


@torch.no_grad()
def test_weights_key_model_ema_gives_the_ema_kernels(checkpoint, tmp_path):
    """``--weights-key model_ema`` loads the EMA entry: its kernels differ from ``model``'s and equal those of the
    EMA state dict loaded into a model built by hand."""
    _invoke("kernels", checkpoint, "--normalise", "none", "-o", str(tmp_path / "model"))
    _invoke("kernels", checkpoint, "--normalise", "none", "--weights-key", "model_ema", "-o", str(tmp_path / "ema"))
    plain, ema = (KernelsResult.load(tmp_path / folder / f"kernels_{MODEL}") for folder in ("model", "ema"))
    _assert_provenance(ema.meta["model"], weights_key="model_ema")
    config = _config(NAME)
    by_hand = timm.create_model(MODEL, img_size=config["img_size"], patch_size=config["patch_size"],
                                num_classes=config["num_classes"], filter_width=config["filter_order"], **TINY_DIMS)
    by_hand.load_state_dict(_ema_weights(), strict=True)
    expected = compute_kernels(by_hand.eval(), normalisation="none")
    assert len(ema.layers) == len(expected.layers) == 4
    for i in range(4):
        np.testing.assert_allclose(ema.panels(i), expected.panels(i), atol=1e-6, rtol=0)
        assert np.abs(ema.panels(i) - plain.panels(i)).max() > 1e-4


def test_given_directions_win_over_args_and_are_recorded(checkpoint, tmp_path):
    """args say ``seq`` (block 1 anti-causal: taps on the upper-left quadrant of the canvas); ``directions=standard``
    makes every block causal (lower-right quadrant), and the metadata records both."""
    length = 8
    _invoke("kernels", checkpoint, "--normalise", "none", "--model-kwargs", "directions=standard",
            "-o", str(tmp_path / "standard"))
    _invoke("kernels", checkpoint, "--normalise", "none", "-o", str(tmp_path / "seq"))
    standard, seq = (KernelsResult.load(tmp_path / folder / f"kernels_{MODEL}") for folder in ("standard", "seq"))
    _assert_provenance(standard.meta["model"], given={**TINY_DIMS, "directions": "standard"})
    causal, anti_causal = standard.panels(0)[0].copy(), seq.panels(0)[0].copy()
    assert causal[length - 1:, length - 1:].any() and anti_causal[:length, :length].any()
    causal[length - 1:, length - 1:] = 0
    anti_causal[:length, :length] = 0
    assert not causal.any() and not anti_causal.any()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageFolder tree: 2 classes x 2 random images."""
    return random_image_folder(tmp_path_factory.mktemp("data") / "val", ("a", "b"))


def test_truncate_on_the_checkpoint(checkpoint, image_folder, tmp_path):
    """Keeping every tap (r = 3 > (2L-1)/L * sqrt(2)) reproduces the untruncated model's accuracy."""
    _invoke("truncate", checkpoint, "--data", str(image_folder), "--sizes", "0,3", "--bootstrap", "20",
            "--batch-size", "4", "--no-resume", "-o", str(tmp_path))
    stem = tmp_path / f"truncate_{MODEL}"
    meta = json.loads(stem.with_suffix(".json").read_text())
    _assert_provenance(meta["model"])
    assert meta["layer_kinds"] == {"S1": ["hyena_nd"]} and meta["images_evaluated"] == 4
    rows = list(csv.DictReader(open(stem.with_suffix(".csv"))))
    assert [float(row["relative_size"]) for row in rows] == [0.0, 3.0]
    assert float(rows[1]["top1"]) == float(rows[1]["reference_top1"]) and float(rows[1]["kept_fraction"]) == 1.0


# -- DeiT (attention) beside Hyena N-D ------------------------------------------------------------------------------

def test_deit_baseline_beside_hyena_in_erf_and_coverage(tmp_path):
    both = ["-m", MODEL, "-m", "deit_tiny_patch16_224", "--weights", "random", *DEIT_TINY_KWARGS]
    erf = CliRunner().invoke(app, ["erf", *both, "--num-images", "1", "--device", "cpu", "-o", str(tmp_path)])
    assert erf.exit_code == 0, erf.output + repr(erf.exception)
    stem = tmp_path / f"erf_{MODEL}+deit_tiny_patch16_224"
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert [entry["label"] for entry in meta["models"]] == [MODEL, "deit_tiny_patch16_224"]
    assert all(entry["model"]["options_given"]["img_size"] == 64 for entry in meta["models"])
    maps = np.load(stem.with_suffix(".npz"))["maps"]
    assert maps.shape == (2, 64, 64)
    corners = [maps[1][:8, :8], maps[1][:8, -8:], maps[1][-8:, :8], maps[1][-8:, -8:]]
    assert all(corner.sum() > 0 for corner in corners)  # attention: the centre token sees every patch
    coverage = CliRunner().invoke(app, ["coverage", *both, "--device", "cpu", "-o", str(tmp_path)])
    assert coverage.exit_code == 0, coverage.output + repr(coverage.exception)
    rows = list(csv.DictReader(open(tmp_path / "coverage.csv")))
    assert [(row["model"], row["kind"]) for row in rows] == [(MODEL, "hyena_nd")] * 2 + [
        ("deit_tiny_patch16_224", "attention")] * 2
    assert all(float(row["mean"]) == 2.0 and row["energy_mean"] == "nan" for row in rows[2:])
    assert json.loads((tmp_path / "coverage.json").read_text())["models"][1]["options_given"]["depth"] == 2
    assert (tmp_path / "coverage.png").is_file()


def test_erf_of_a_class_token_vit_drops_the_class_token():
    """Before the blocks (``pos_drop``) each token holds only its own patch, so the centre token (4, 4) of the 8 x 8
    grid of a ViT with a class token sees exactly the pixels of patch (4, 4): the class token is not a grid cell."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2).eval()
    result = effective_receptive_field(model, torch.randn(1, 3, 64, 64), layer="pos_drop", progress=False)
    erf = result.arrays["maps"][0]
    assert erf[32:40, 32:40].sum() > 0
    erf[32:40, 32:40] = 0
    assert not erf.any()
