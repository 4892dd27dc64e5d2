"""Hyena N-D (Zimerman & Wolf 2024): golden parity with the official code, manifests, options, and checkpoints of
the official training script (``main.py``: ``{"model", "model_ema", "args": Namespace, ...}``)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hpx_analysis  # noqa: F401  (registers the models with timm)
from hpx_analysis.errors import HpxError
from hpx_analysis.analyzers.coverage import compute_coverage
from hpx_analysis.analyzers.kernels import compute_kernels
from hpx_analysis.inspection import kernel, list_mixers, select_mixers
from hpx_analysis.interventions import modify_kernels, truncate_kernels
from hpx_analysis.layer_names import LayerRef
from hpx_analysis.models import HyenaNDMixer, hyena_nd
from hpx_analysis.models.hyena_nd import HyenaNDCanvasFilter, causal_conv2d
from hpx_analysis.models.zoo import load_model
from hpx_analysis_cli.app import app

from .conftest import GOLDEN, golden_state_dict, meta_model_and_state_dict, random_image_folder

HYENA_ND = HyenaNDCanvasFilter.kind

HND = GOLDEN / "hyena_nd"
HND_NAMES = sorted(p.stem for p in (HND / "tiny").glob("*.json"))
HND_MANIFESTS = sorted((HND / "manifests").glob("*.json"))
TINY_DIMS = dict(embed_dim=32, depth=4, num_heads=2)
"""What the official script's ``args`` cannot say about the golden tiny models (not DeiT sizes)."""


def _config(name: str) -> dict:
    return json.loads((HND / "tiny" / f"{name}.json").read_text())


def _training_args(config: dict, **changes) -> argparse.Namespace:
    """The ``args`` the official ``main.py`` would have saved for a golden tiny model (plus unrelated entries)."""
    args = dict(model="deit_tiny_patch16_224", method=config["method"], directional_mode=config["directional_mode"],
                hyena2d_filter=config["hyena2d_filter"], window_mode=config["window_mode"], hyena2d_sqrt_decay=False,
                hyena_filter_order=config["filter_order"], hyena_order=2, patch_size=config["patch_size"],
                input_size=config["img_size"], nb_classes=config["num_classes"], lr=5e-4, data_path="/data/imagenet",
                output_dir="out", model_ema=True)
    return argparse.Namespace(**{**args, **changes})


def _official_checkpoint(path, model_weights, args, ema_weights=None) -> str:
    """A file laid out the way the official ``main.py`` saves ``checkpoint.pth`` / ``best_checkpoint.pth``."""
    torch.save({"model": model_weights, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0]}]},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 3,
                "model_ema": model_weights if ema_weights is None else ema_weights,
                "scaler": {"scale": 65536.0}, "args": args}, str(path))
    return str(path)


@pytest.fixture(scope="module", params=HND_NAMES)
def golden(request):
    """(name, config, model built from the config's reference options with the golden weights, golden tensors)."""
    name = request.param
    config, data = _config(name), load_file(str(HND / "tiny" / f"{name}.safetensors"))
    model = timm.create_model("hyena_deit_tiny_patch16_224", img_size=config["img_size"],
                              patch_size=config["patch_size"], num_classes=config["num_classes"],
                              filter_width=config["filter_order"], directions=config["directional_mode"],
                              filter_form="nd" if config["hyena2d_filter"] else "product",
                              window=config["window_mode"], hybrid=config["method"] == "hyena2dattn", **TINY_DIMS)
    model.load_state_dict(golden_state_dict(data), strict=True)
    return name, config, model.eval(), data


@torch.no_grad()
def test_golden_logits_and_every_block(golden):
    _, config, model, data = golden
    assert model.block_kinds == config["block_kinds"]
    torch.testing.assert_close(model(data["input"]), data["logits"], atol=1e-4, rtol=0)
    blocks = model.forward_intermediates(data["input"], norm=False, output_fmt="NLC", intermediates_only=True)
    assert len(blocks) == config["depth"]
    for i, tokens in enumerate(blocks):
        torch.testing.assert_close(tokens, data[f"features.block{i}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.norm(blocks[-1]), data["features.norm"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_golden_raw_kernels_and_impulse_responses(golden):
    _, _, model, data = golden
    mixers = {f"blocks.{i}.attn": block.attn for i, block in enumerate(model.blocks)
              if isinstance(block.attn, HyenaNDMixer)}
    assert set(mixers) == {key.split(".", 1)[1] for key in data if key.startswith("kernel_raw.")}
    for path, mixer in mixers.items():
        torch.testing.assert_close(mixer.kernel(), data[f"kernel_raw.{path}"], atol=1e-4, rtol=0)
    for key in (key for key in data if key.startswith("impulse.")):
        mixer = mixers[key.split(".", 1)[1]]
        channels, length = mixer.kernel().shape[:2]
        basis = torch.eye(length * length).reshape(-1, 1, length, length).expand(-1, channels, -1, -1)
        response = mixer.convolve(basis).permute(1, 2, 3, 0).reshape(channels, length, length, length, length)
        torch.testing.assert_close(response, data[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize("manifest", HND_MANIFESTS, ids=lambda p: p.stem)
def test_manifest_loads_strictly_with_exact_parameter_count(manifest):
    spec = json.loads(manifest.read_text())
    model, state_dict = meta_model_and_state_dict(spec["model"], spec["state_dict"])
    assert list(model.state_dict()) == list(state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]
    assert model.block_kinds == spec["block_kinds"]


def test_all_three_registered_without_weights():
    names = hyena_nd.model_names()
    assert sorted(names) == ["hyena_deit_small_patch16_224", "hyena_deit_tiny_hybrid_patch16_224",
                             "hyena_deit_tiny_patch16_224"]
    assert all(timm.is_model(name) for name in names) and not any(timm.is_model_pretrained(name) for name in names)
    with pytest.raises(HpxError, match="no published weights"):
        load_model("hyena_deit_tiny_patch16_224", "pretrained")


def test_causal_conv2d_equals_the_direct_sum():
    torch.manual_seed(0)
    v, kernel = torch.randn(2, 3, 5, 5), torch.randn(3, 5, 5)
    direct = torch.zeros_like(v)
    for i in range(5):
        for j in range(5):
            for a in range(i + 1):
                for b in range(j + 1):
                    direct[:, :, i, j] += kernel[:, i - a, j - b] * v[:, :, a, b]
    torch.testing.assert_close(causal_conv2d(v, kernel), direct, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_seq_blocks_are_anti_causal_and_scaled_by_one_over_2l():
    """A unit kernel tap at offset (0, 0) passes v through times 1/(2L); ``seq`` reaches only taps a >= i, b >= j."""
    model = timm.create_model("hyena_deit_tiny_patch16_224", img_size=64, patch_size=8, **TINY_DIMS)
    seq, standard = model.blocks[0].attn, model.blocks[1].attn
    assert (seq.direction, standard.direction) == ("seq", "standard")
    delta = torch.zeros(32, 8, 8)
    delta[:, 0, 0] = 1.0
    v = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(seq.convolve(v, delta), v / 16)
    impulse = torch.zeros(1, 32, 8, 8)
    impulse[..., 3, 5] = 1.0
    ones = torch.ones(32, 8, 8)
    reached = seq.convolve(impulse, ones).abs().amax(dim=(0, 1)) > 1e-4
    assert reached[:4, :6].all() and not reached[4:].any() and not reached[:, 6:].any()
    reached = standard.convolve(impulse, ones).abs().amax(dim=(0, 1)) > 1e-4
    assert reached[3:, 5:].all() and not reached[:3].any() and not reached[:, :5].any()


@pytest.mark.parametrize("option, value", [("directions", "symettric"), ("directions", "parallel"),
                                           ("parameterisation", "direct"), ("hyena_order", 3)])
def test_reference_options_without_sense_here_are_one_line_errors(option, value):
    with pytest.raises(HpxError) as err:
        timm.create_model("hyena_deit_tiny_patch16_224", **{option: value})
    assert option in str(err.value) and repr(value) in str(err.value) and "\n" not in str(err.value)


def test_other_input_size_names_the_build_size(golden):
    _, _, model, data = golden
    with pytest.raises(HpxError, match="64x64") as err:
        model(torch.zeros(1, 3, 96, 96))
    assert "\n" not in str(err.value)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny_hnd_seq", "tiny_hnd_hybrid", "tiny_hnd_4dir", "tiny_hnd_product"])
def test_official_training_checkpoint_configures_the_model(tmp_path, name):
    config, data = _config(name), load_file(str(HND / "tiny" / f"{name}.safetensors"))
    path = _official_checkpoint(tmp_path / "best_checkpoint.pth", golden_state_dict(data), _training_args(config))
    model = load_model("hyena_deit_tiny_patch16_224", path, **TINY_DIMS)
    assert model.block_kinds == config["block_kinds"]
    torch.testing.assert_close(model(data["input"]), data["logits"], atol=1e-4, rtol=0)
    provenance = model.hpx_provenance
    assert provenance["weights_key"] == "model" and provenance["options_given"] == TINY_DIMS
    assert provenance["checkpoint_args"]["directional_mode"] == config["directional_mode"]
    assert provenance["options_from_checkpoint"]["embed_dim"] == 192  # args say DeiT tiny; the caller wins
    json.dumps(provenance)


@torch.no_grad()
def test_given_options_win_over_args_and_ema_weights_by_key(tmp_path):
    config, data = _config("tiny_hnd_seq"), load_file(str(HND / "tiny" / "tiny_hnd_seq.safetensors"))
    golden_weights = golden_state_dict(data)
    perturbed = {key: value + 0.05 for key, value in golden_weights.items()}
    path = _official_checkpoint(tmp_path / "checkpoint.pth", perturbed, _training_args(config), golden_weights)
    ema = load_model("hyena_deit_tiny_patch16_224", path, weights_key="model_ema", **TINY_DIMS)
    torch.testing.assert_close(ema(data["input"]), data["logits"], atol=1e-4, rtol=0)
    assert ema.hpx_provenance["weights_key"] == "model_ema"
    plain = load_model("hyena_deit_tiny_patch16_224", path, **TINY_DIMS)
    assert (plain(data["input"]) - data["logits"]).abs().max() > 1e-2
    causal = load_model("hyena_deit_tiny_patch16_224", path, weights_key="model_ema", directions="standard",
                        **TINY_DIMS)
    assert causal.block_kinds == ["hyena_nd:standard"] * 4
    assert causal.hpx_provenance["options_from_checkpoint"]["directions"] == "seq"
    with pytest.raises(HpxError, match="no state dict under 'state_dict_ema'"):
        load_model("hyena_deit_tiny_patch16_224", path, weights_key="state_dict_ema", **TINY_DIMS)


@pytest.mark.parametrize("changes, message", [(dict(method="hyena"), "method='hyena'"),
                                              (dict(hyena_order=3), "hyena_order=3"),
                                              (dict(model="vit_large_patch16_224"), "DeiT tiny/small/base"),
                                              (dict(directional_mode="parallel"), "directions='parallel'"),
                                              (dict(window_mode="symettric"), "window='symettric'"),
                                              (dict(direct_paramtrization=True), "--direct_paramtrization"),
                                              (dict(use_cls_token=True), "--use_cls_token")])
def test_checkpoint_args_that_cannot_be_loaded_are_one_line_errors(tmp_path, changes, message):
    config, data = _config("tiny_hnd_seq"), load_file(str(HND / "tiny" / "tiny_hnd_seq.safetensors"))
    path = _official_checkpoint(tmp_path / "c.pth", golden_state_dict(data), _training_args(config, **changes))
    with pytest.raises(HpxError, match=message) as err:
        load_model("hyena_deit_tiny_patch16_224", path, **TINY_DIMS)
    assert "\n" not in str(err.value)


class _Foreign:
    """A class no checkpoint may unpickle."""


def test_checkpoint_with_another_pickled_object_is_refused(tmp_path):
    config, data = _config("tiny_hnd_seq"), load_file(str(HND / "tiny" / "tiny_hnd_seq.safetensors"))
    path = tmp_path / "c.pth"
    torch.save({"model": golden_state_dict(data), "args": _training_args(config), "extra": _Foreign()}, str(path))
    with pytest.raises(HpxError, match="not a readable checkpoint"):
        load_model("hyena_deit_tiny_patch16_224", str(path), **TINY_DIMS)


@torch.no_grad()
@pytest.mark.parametrize("name, given", [("tiny_hnd_seq", {}), ("tiny_hnd_4dir", {}),
                                         ("tiny_hnd_product", {"directions": "standard"})])
def test_bare_state_dict_gives_classes_filter_form_and_window(tmp_path, name, given):
    """No ``args``: class count, size, filter form, window (and 4dir's ``linear_mix``) come from the weights;
    the directions otherwise from the model name's default, ``seq``, or an option."""
    data = load_file(str(HND / "tiny" / f"{name}.safetensors"))
    path = tmp_path / "weights.safetensors"
    save_file(golden_state_dict(data), str(path))
    model = load_model("hyena_deit_tiny_patch16_224", str(path), **TINY_DIMS, **given)
    assert model.block_kinds == _config(name)["block_kinds"]
    assert model.num_classes == 10
    torch.testing.assert_close(model(data["input"]), data["logits"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_bare_state_dict_gives_the_filters_positional_features(tmp_path):
    """A filter network reading 5 positional features per axis (not the reference's 3) loads from its bare state
    dict without saying so: the width of ``pos_emb.z`` gives it."""
    torch.manual_seed(0)
    trained = timm.create_model("hyena_deit_tiny_patch16_224", img_size=32, patch_size=8, filter_width=16,
                                filter_emb_dim=5, **TINY_DIMS).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.clone() for k, v in trained.state_dict().items()}, str(path))
    loaded = load_model("hyena_deit_tiny_patch16_224", str(path), **TINY_DIMS)
    assert loaded.hpx_provenance["options_from_checkpoint"]["filter_emb_dim"] == 5
    image = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(image), trained(image))


@torch.no_grad()
def test_deit_tiny_checkpoint_loads_through_the_cli(tmp_path):
    """A CelebA-style run (40 classes, ``hyena2dattn``) at DeiT-tiny size: the CLI and Python load it from ``args``."""
    torch.manual_seed(0)
    trained = timm.create_model("hyena_deit_tiny_patch16_224", hybrid=True, num_classes=40).eval()
    args = argparse.Namespace(model="deit_tiny_patch16_224", method="hyena2dattn", directional_mode="seq",
                              hyena2d_filter=True, window_mode="standard", hyena2d_sqrt_decay=False,
                              hyena_filter_order=64, hyena_order=2, patch_size=16, input_size=224, nb_classes=40)
    path = _official_checkpoint(tmp_path / "best_checkpoint.pth", trained.state_dict(), args)
    result = CliRunner().invoke(app, ["inspect", "--model", "hyena_deit_tiny_patch16_224", "--checkpoint", path])
    assert result.exit_code == 0, result.output
    loaded = load_model("hyena_deit_tiny_patch16_224", path)
    assert loaded.block_kinds[6:8] == ["hyena_nd:seq", "attention"] and loaded.num_classes == 40
    image = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded(image), trained(image), atol=1e-5, rtol=0)
    assert loaded.head.weight.shape == (40, 192)


# -- the long-filter view for the analyzers (kind ``hyena_nd``) ------------------------------------------------------

def _hyena_layers(model):
    return [info for info in list_mixers(model, model.hyena_options["img_size"]) if info.kind == HYENA_ND]


def _real_path_response(mixer: HyenaNDMixer) -> torch.Tensor:
    """(C, L, L, L, L) the block's long convolution (no skip) through its directional causal path, as a linear map."""
    channels, length = mixer.kernel().shape[:2]
    basis = torch.eye(length * length).reshape(-1, 1, length, length).expand(-1, channels, -1, -1)
    if mixer.direction == "4dir":
        weights = mixer.linear_mix.weight[0]
        response = sum(w * (mixer.convolve(basis.flip(axes)).flip(axes) if axes else mixer.convolve(basis))
                       for w, axes in zip(weights, hyena_nd.FOUR_FLIPS))
    else:
        response = mixer.convolve(basis)
    return response.permute(1, 2, 3, 0).reshape(channels, length, length, length, length)


def _laid_out(canvas: torch.Tensor) -> torch.Tensor:
    """(C, 2L-1, 2L-1) true-convolution kernel -> (C, L, L, L, L) map ``[c, i, j, a, b] = K[c, L-1+i-a, L-1+j-b]``."""
    length = (canvas.shape[-1] + 1) // 2
    offsets = length - 1 + torch.arange(length)[:, None] - torch.arange(length)[None, :]  # (i, a) -> L-1+i-a
    return canvas[:, offsets[:, None, :, None], offsets[None, :, None, :]]


def test_vit_blocks_are_stage_0_with_hyena_nd_and_attention_kinds(golden):
    _, config, model, _ = golden
    infos = list_mixers(model, config["img_size"])
    kinds = [HYENA_ND if kind.startswith("hyena_nd") else kind for kind in config["block_kinds"]]
    assert [(i.stage, i.block, i.kind) for i in infos] == [(0, b, kind) for b, kind in enumerate(kinds)]
    length = config["img_size"] // config["patch_size"]
    for info in _hyena_layers(model):
        assert info.feature_size == (length, length) and info.kernel_size == (2 * length - 1,) * 2
        assert info.block_path == f"blocks.{info.block}"
        assert info.filter_path == f"blocks.{info.block}.attn.effective_filter"
        assert kernel(info).shape == (config["embed_dim"], 2 * length - 1, 2 * length - 1)
    assert [i.path for i in select_mixers(infos, [LayerRef.parse("S1 B3")])] == ["blocks.2.attn"]


@torch.no_grad()
def test_identity_modifier_runs_the_canvas_kernel_with_unchanged_logits(golden):
    _, _, model, data = golden
    with modify_kernels(model, lambda k, info: k) as modified:
        assert modified and all(info.long_filter.active for info in modified)
        logits = model(data["input"])
    assert not any(info.long_filter.active for info in modified)
    torch.testing.assert_close(logits, data["logits"], atol=1e-4, rtol=0)
    first = modified[0]
    with first.long_filter.override_kernel(kernel(first).clone()):
        torch.testing.assert_close(model(data["input"]), data["logits"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_canvas_kernel_laid_out_is_the_impulse_response_of_the_real_path(golden):
    _, _, model, data = golden
    for info in _hyena_layers(model):
        mixer, canvas = info.module, kernel(info)
        length = mixer.length
        laid_out = _laid_out(canvas)
        torch.testing.assert_close(laid_out, _real_path_response(mixer), atol=1e-5, rtol=0)
        golden_impulse = data.get(f"impulse.{info.path}")
        if golden_impulse is not None and mixer.direction != "4dir":
            torch.testing.assert_close(laid_out, golden_impulse, atol=1e-4, rtol=0)
        outside = torch.ones_like(canvas, dtype=torch.bool)  # 4dir: the four quadrants cover the canvas
        if mixer.direction == "standard":
            outside[:, length - 1:, length - 1:] = False
        elif mixer.direction == "seq":
            outside[:, :length, :length] = False
        else:
            outside[:] = False
        assert not canvas[outside].any()


@torch.no_grad()
def test_centre_tap_only_leaves_the_skip_plus_centre_gain(golden):
    _, config, model, _ = golden
    info = _hyena_layers(model)[0]
    mixer, length, dim = info.module, info.module.length, config["embed_dim"]
    tokens = torch.randn(2, length * length, dim)
    weights = mixer.linear_mix.weight[0] if mixer.linear_mix is not None else torch.ones(1)
    gain = weights.sum() * (mixer.kernel()[:, 0, 0] / (2 * length) + mixer.filter_fn.bias)  # (D,)
    u = mixer.in_proj(tokens).transpose(1, 2).reshape(2, 3 * dim, length, length)
    x0, x1, v = mixer.short_filter(u).split(dim, dim=1)
    gated = (gain[:, None, None] * v * x1 * x0).flatten(2).transpose(1, 2)
    if mixer.linear_mix is not None:
        gated = gated + mixer.linear_mix.bias
    expected = mixer.out_proj(gated)

    def centre_only(k: torch.Tensor, _info) -> torch.Tensor:
        kept = torch.zeros_like(k)
        kept[:, length - 1, length - 1] = k[:, length - 1, length - 1]
        return kept

    with modify_kernels(model, centre_only, [info.ref]):
        torch.testing.assert_close(mixer(tokens), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_kernel_panels_are_zero_outside_the_blocks_quadrant(golden):
    _, config, model, _ = golden
    length = config["img_size"] // config["patch_size"]
    result = compute_kernels(model, reduction="mean", normalisation="none")
    hyena_blocks = [info.block for info in _hyena_layers(model)]
    assert [layer["block"] for layer in result.layers] == hyena_blocks
    for i, block in enumerate(hyena_blocks):
        panel, direction = result.panels(i)[0], model.blocks[block].attn.direction
        assert panel.shape == (2 * length - 1, 2 * length - 1) and not result.outside(i).any()
        kept = {"standard": (slice(length - 1, None),) * 2, "seq": (slice(None, length),) * 2}.get(direction)
        if kept is not None:
            assert (panel[kept] != 0).any()
            panel = panel.copy()
            panel[kept] = 0
            assert not panel.any()


@torch.no_grad()
def test_energy_coverage_of_single_tap_kernels(golden):
    _, config, model, _ = golden
    length = config["img_size"] // config["patch_size"]
    kinds = [HYENA_ND if kind.startswith("hyena_nd") else kind for kind in config["block_kinds"]]
    result = compute_coverage(model)
    assert [layer["kind"] for layer in result.layers] == kinds
    hyena = [j for j, kind in enumerate(kinds) if kind == HYENA_ND]
    assert np.isfinite(result.arrays["mean"][hyena]).all() and np.isfinite(result.arrays["energy_mean"][hyena]).all()
    # extent in taps at Euclidean distance r: 2r + 1 for 4dir, r + 1 for one-sided blocks, capped at 2L - 1 and L
    for tap, centred, one_sided in (((0, 0), 1.0, 1.0), ((length - 1, length - 1), 2 * length - 1.0, length),
                                    ((0, 3), 7.0, 4.0)):
        def single_tap(k: torch.Tensor, _info) -> torch.Tensor:
            kept = torch.zeros_like(k)
            kept[:, length - 1 + tap[0], length - 1 + tap[1]] = 1.0
            return kept

        with modify_kernels(model, single_tap):
            modified = compute_coverage(model)
        for j in hyena:
            extent = centred if model.blocks[j].attn.direction == "4dir" else one_sided
            np.testing.assert_allclose(modified.arrays[f"energy_channels_{j}"], extent / length)


@torch.no_grad()
def test_truncation_keeps_every_tap_or_only_the_centre(golden):
    _, config, model, data = golden
    length = config["img_size"] // config["patch_size"]

    def centre_only(k: torch.Tensor, _info) -> torch.Tensor:
        kept = torch.zeros_like(k)
        kept[:, length - 1, length - 1] = k[:, length - 1, length - 1]
        return kept

    with truncate_kernels(model, [0], (length - 1) / (length / 2), shape="square") as chosen:
        assert [info.kind for info in chosen] == [HYENA_ND] * len(_hyena_layers(model))
        torch.testing.assert_close(model(data["input"]), data["logits"], atol=1e-4, rtol=0)
    with modify_kernels(model, centre_only):
        expected = model(data["input"])
    with truncate_kernels(model, [0], 0.5 / (length / 2)):  # adjacent taps lie at 1 / (L/2)
        torch.testing.assert_close(model(data["input"]), expected, atol=1e-6, rtol=0)
    assert (expected - data["logits"]).abs().max() > 1e-3  # the cut changes the model


def _axis_windows_by_hand(mixer: HyenaNDMixer) -> list:
    """[(deltas (D,), shift (D,))] of the row and column windows, read from the parameters."""
    filt = mixer.filter_fn
    if isinstance(filt, hyena_nd.HyenaNDFilter):
        shift = filt.modulation.offset() * torch.ones(filt.bias.numel())
        return [(getattr(filt.modulation, name).flatten(), shift) for name in ("Xdeltas", "Ydeltas")]
    return [(window.deltas.flatten(), window.offset() * torch.ones(filt.bias.numel()))
            for window in (filt.Xmodulation, filt.Ymodulation)]


@pytest.mark.parametrize("threshold", [0.05, 0.3])
@torch.no_grad()
def test_window_coverage_is_one_sided_per_axis(golden, threshold):
    _, config, model, _ = golden
    length = config["img_size"] // config["patch_size"]
    result = compute_coverage(model, threshold=threshold)
    t = torch.linspace(0, 1, length)[:, None]
    for j, info in enumerate(list_mixers(model, config["img_size"])):
        if info.kind != HYENA_ND:
            continue
        mixer, extents = info.module, []
        for deltas, shift in _axis_windows_by_hand(mixer):  # along an axis the window peaks at the other axis' 0
            kept = torch.exp(-t * deltas.abs()) + shift >= threshold  # (L, D)
            reach = torch.where(kept, torch.arange(length)[:, None], -1).amax(0)
            extents.append(2 * reach + 1 if mixer.direction == "4dir" else reach + 1)
        expected = (torch.maximum(*extents).clamp_min(0) / length).numpy()
        assert len(np.unique(expected)) > 1
        np.testing.assert_allclose(result.arrays[f"channels_{j}"], expected, rtol=1e-6)


def test_erf_runs_at_the_build_size_and_sees_only_the_causal_quadrant():
    """A ViT runs only at its build size, so the replknet ERF uses it (not 1024 px) and says why. One causal
    (``standard``) block: its long convolution reaches only tokens above and left of the output, and the 3x3
    short filter before it one token further, so the centre token (4, 4) of the 8 x 8 grid sees tokens up to row
    and column 5 (pixels < 48) and nothing beyond; the patches further out lie in the ERF of a 3-block model."""
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.images import sample_images

    def erf_of(depth: int):
        torch.manual_seed(0)
        model = timm.create_model("hyena_deit_tiny_patch16_224", img_size=64, patch_size=8, directions="standard",
                                  **{**TINY_DIMS, "depth": depth}).eval()
        return effective_receptive_field(model, sample_images(2), progress=False)

    one = erf_of(1)
    erf = one.arrays["maps"][0]
    assert erf.shape == (64, 64) and one.meta["models"][0]["layer"] == "blocks.0"
    assert "runs only at its build size" in one.meta["options"]["transform"]
    assert erf[40:48, 40:48].sum() > 0 and erf[:8, :8].sum() > 0
    outside = max(erf[48:, :].max(), erf[:, 48:].max())
    assert outside < 1e-6 * erf.max()  # FFT round-off only (1e-11 of the maximum here)
    assert erf_of(3).arrays["maps"][0][56:, 56:].sum() > 0


@torch.no_grad()
def test_truncation_sweep_over_block_ranges_counts_what_full_forwards_count(golden, tmp_path):
    """A ViT has one stage, so the sweep's groups are blocks and block ranges: each entry's column counts what a
    full forward with that group cut counts (the activations entering the group's first block are shared); the
    default group is every Hyena N-D block; the coverage line is drawn only for centred (4dir) kernels."""
    from hpx_analysis.analyzers.truncation import truncation_sweep
    from hpx_analysis.datasets import labelled_images

    from .test_truncation import _naive_counts

    _, config, model, _ = golden
    random_image_folder(tmp_path, ("a", "b", "c"), size=(64, 64))
    samples, groups, sizes = labelled_images(tmp_path), ["S1B1-2", "S1B3"], [0.0, 0.3, 3.0]
    result = truncation_sweep(model, samples, groups, sizes, batch_size=4, n_resamples=50, progress=False)
    assert result.groups == ["S1 B1-2", "S1 B3"] and result.arrays["stages"].tolist() == [0, 0]
    assert np.array_equal(result.arrays["top1_correct"], _naive_counts(model, tmp_path, sizes, groups, "disc", 4))
    assert result.arrays["kept_fraction"][:, -1].tolist() == [1.0, 1.0]  # 3 > sqrt(2) (L-1) / (L/2) keeps all
    assert result.arrays["top1"][:, -1].tolist() == [result.arrays["reference"][0]] * 2
    assert np.isfinite(result.arrays["coverage"]).tolist() == [config["directional_mode"] == "4dir"] * 2
    default = truncation_sweep(model, samples, None, [0.0], n_resamples=50, progress=False)
    hyena_blocks = [f"S1 B{b + 1}" for b, kind in enumerate(config["block_kinds"]) if kind.startswith("hyena_nd")]
    assert default.groups == ["S1"] and default.meta["layers"] == {"S1": hyena_blocks}


@torch.no_grad()
def test_window_and_its_parameters_on_the_canvas(golden):
    """``window(info)`` lays the filter's window on the kernel's canvas (0 where the block applies no tap), and
    ``window_parameters`` rebuilds it: exp(-t |delta_rows|) exp(-t |delta_cols|) + shift (N-D form) or the product
    of the two shifted axis windows (product form), as read from the parameters by hand."""
    from hpx_analysis.inspection import window, window_parameters

    _, config, model, _ = golden
    length = config["img_size"] // config["patch_size"]
    for info in _hyena_layers(model):
        mixer, canvas = info.module, window(info)
        params = window_parameters(info)
        by_hand = _axis_windows_by_hand(mixer)
        np.testing.assert_allclose(params["delta"], torch.stack([d.abs() for d, _ in by_hand]))
        t = params["t"][None, :]
        rows, cols = (torch.exp(-t * delta[:, None]) for delta in params["delta"])  # (D, L) each
        if config["hyena2d_filter"]:
            quadrant = rows[:, :, None] * cols[:, None, :] + params["shift"][:, None, None]
        else:
            shift = params["shift"][:, :, None]
            quadrant = (rows + shift[0])[:, :, None] * (cols + shift[1])[:, None, :]
        centre = length - 1
        if mixer.direction == "seq":
            torch.testing.assert_close(canvas[:, :length, :length], quadrant.flip((-2, -1)))
            assert canvas[:, length:, :].abs().sum() == 0 and canvas[:, :, length:].abs().sum() == 0
        else:
            torch.testing.assert_close(canvas[:, centre:, centre:], quadrant)
            if mixer.direction == "standard":
                assert canvas[:, :centre, :].abs().sum() == 0 and canvas[:, :, :centre].abs().sum() == 0
            else:  # 4dir: every quadrant holds the window, mirrored
                torch.testing.assert_close(canvas[:, :length, :length], quadrant.flip((-2, -1)))


@pytest.mark.parametrize("window_mode", ["standard", "learn"])
@torch.no_grad()
def test_sqrt_decay_takes_the_root_of_the_nd_decay_product_and_leaves_the_product_form(window_mode):
    """The reference's ``hyena2d_sqrt_decay``: the N-D window is sqrt(exp(-t_i |dx|) exp(-t_j |dy|)) + shift; the
    product form's windows ignore it."""
    def windows(filter_form: str, sqrt_decay: bool) -> torch.Tensor:
        torch.manual_seed(0)
        mixer = HyenaNDMixer(8, 6, filter_form=filter_form, filter_width=16, window=window_mode,
                             sqrt_decay=sqrt_decay).double()
        if window_mode == "learn":
            for module in mixer.modules():
                if isinstance(module, hyena_nd.Window):
                    module.shift.fill_(0.25)
        return mixer.filter_fn.window()

    shift = 0.25 if window_mode == "learn" else 0.0
    torch.testing.assert_close(windows("nd", True), (windows("nd", False) - shift).sqrt() + shift)
    torch.testing.assert_close(windows("product", True), windows("product", False))
