"""SLaK and RepLKNet: golden parity with the official code, manifests, both RepLKNet layouts, old SLaK names,
checkpoints as the repositories save them (through load_model and the CLI), and the pretrained-weights message."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from hpx_analysis.errors import HpxError
from hpx_analysis.models.large_kernel import (checkpoint_filter_fn, embed_kernel, fuse_conv_bn, large_kernel_modules,
                                              model_names)
from hpx_analysis.models.zoo import load_model
from hpx_analysis_cli.app import app

from .conftest import GOLDEN, golden_state_dict, meta_model_and_state_dict

LARGE_KERNEL = GOLDEN / "large_kernel"
TINY_SLAK = dict(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 5), small_kernel=3,
                 num_classes=10)
TINY_REPLKNET = dict(layers=(2, 2, 2, 2), channels=(16, 32, 64, 128), large_kernel_sizes=(13, 11, 9, 5),
                     small_kernel=3, num_classes=10)
# golden file -> (registered name, constructor options giving the golden tiny configuration)
TINY = {"slak": ("slak_tiny", TINY_SLAK), "replknet": ("replknet_31b", TINY_REPLKNET),
        "replknet_deploy": ("replknet_31b", TINY_REPLKNET)}


def _golden(name: str) -> Dict[str, torch.Tensor]:
    return load_file(str(LARGE_KERNEL / "tiny" / f"{name}.safetensors"))


def _tiny_model(name: str, state_dict: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """The golden tiny model under its registered name with ``state_dict`` loaded strictly (through the filter)."""
    arch, options = TINY[name]
    model = timm.create_model(arch, **options).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    return model


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module", params=sorted(TINY))
def golden(request):
    data = _golden(request.param)
    return request.param, _tiny_model(request.param, golden_state_dict(data)), data


def test_golden_logits_features_and_pre_logits(golden):
    _, model, data = golden
    for inputs, logits in (("input", "logits"), ("input_alt", "logits_alt"), ("input_rect", "logits_rect")):
        torch.testing.assert_close(_logits(model, data[inputs]), data[logits], atol=1e-4, rtol=0)
    features = {}
    hooks = [stage.register_forward_hook(lambda _m, _i, out, i=i: features.__setitem__(i, out))
             for i, stage in enumerate(model.stages)]
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(data["input"]), pre_logits=True)
    for hook in hooks:
        hook.remove()
    for index in range(4):
        torch.testing.assert_close(features[index], data[f"features.stage{index}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pre_logits, data["pre_logits"], atol=1e-4, rtol=0)


def test_golden_effective_kernels_of_every_block(golden):
    name, model, data = golden
    modules = large_kernel_modules(model)
    assert sorted(modules) == sorted(k[len("kernel."):] for k in data if k.startswith("kernel."))
    for path, module in modules.items():
        with torch.no_grad():
            kernel, bias = module.effective_kernel()
        torch.testing.assert_close(kernel, data[f"kernel.{path}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(bias, data[f"kernel_bias.{path}"], atol=1e-5, rtol=0)


def test_block_equals_one_conv_with_its_effective_kernel_and_slak_kernels_are_crosses():
    model = _tiny_model("slak", golden_state_dict(_golden("slak")))
    module = model.stages[0][0].large_kernel
    x = torch.randn(1, module.channels, 20, 24)
    with torch.no_grad():
        kernel, bias = module.effective_kernel()
        single = F.conv2d(x, kernel, bias, padding=module.kernel_size // 2, groups=module.channels)
        torch.testing.assert_close(module(x), single, atol=1e-5, rtol=0)
    centre = (module.kernel_size - 3) // 2
    cross = torch.zeros(module.kernel_size, module.kernel_size, dtype=torch.bool)
    cross[centre:centre + 3, :] = cross[:, centre:centre + 3] = True
    assert (kernel[..., ~cross] == 0).all() and (kernel[..., cross] != 0).any()


@pytest.mark.parametrize("manifest, arch", [("slak_tiny", "slak_tiny"), ("replknet_31b", "replknet_31b"),
                                            ("replknet_31b_deploy", "replknet_31b")])
def test_manifest_loads_strictly_with_exact_parameter_count(manifest, arch):
    spec = json.loads((LARGE_KERNEL / "manifests" / f"{manifest}.json").read_text())
    model, state_dict = meta_model_and_state_dict(arch, spec["entries"])
    mapped = checkpoint_filter_fn(state_dict, model)
    assert list(mapped) == list(model.state_dict())
    model.load_state_dict(mapped, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]


def test_registered_sizes():
    """Widths int(dims * 1.3) (truncated), kernels 51/49/47/13 with strips and small kernel 5; RepLKNet-XL has
    no small kernel and dw_ratio 1.5."""
    assert sorted(model_names()) == ["replknet_31b", "replknet_31l", "replknet_xl", "slak_base", "slak_small",
                                     "slak_tiny"]
    with torch.device("meta"):
        slak = {name: timm.create_model(name) for name in ("slak_tiny", "slak_small", "slak_base")}
        xl = timm.create_model("replknet_xl")
    first = large_kernel_modules(slak["slak_tiny"])["stages.0.0.large_kernel"]
    assert first.LoRA1.conv.weight.shape == (124, 1, 51, 5) and first.LoRA2.conv.weight.shape == (124, 1, 5, 51)
    assert first.small_conv.conv.weight.shape == (124, 1, 5, 5)
    assert [len(stage) for stage in slak["slak_small"].stages] == [3, 3, 27, 3]
    for model, widths in ((slak["slak_tiny"], [124, 249, 499, 998]), (slak["slak_base"], [166, 332, 665, 1331])):
        modules = large_kernel_modules(model).values()
        assert sorted({(m.channels, m.kernel_size) for m in modules}) == list(zip(widths, [51, 49, 47, 13]))
    blocks = large_kernel_modules(xl).values()
    assert {(m.kernel_size, m.small_kernel) for m in blocks} == {(27, None), (13, None)}
    assert xl.stages[0].blocks[0].large_kernel.channels == 384


def test_reparameterize_turns_training_form_into_deploy_form():
    model = _tiny_model("replknet", golden_state_dict(_golden("replknet")))
    deploy = _golden("replknet_deploy")
    before = _logits(model, deploy["input_alt"])
    model.reparameterize()
    spec = json.loads((LARGE_KERNEL / "tiny" / "replknet_deploy.json").read_text())
    assert list(model.state_dict()) == [key for key, _ in spec["state_dict_keys"]]  # official order too
    for key, value in golden_state_dict(deploy).items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(model, deploy["input_alt"]), before, atol=1e-4, rtol=0)


def test_old_slak_branch_names_and_dense_lkb_origin_load():
    """Decom1/Decom2 are LoRA1/LoRA2; an lkb_origin file (Decom=False) holding the sum of the two strips loads into
    the same name (its K read from the shape) and computes the same logits."""
    data = _golden("slak")
    state = golden_state_dict(data)
    renamed = {key.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2."): value for key, value in state.items()}
    torch.testing.assert_close(_logits(_tiny_model("slak", renamed), data["input"]), data["logits"], atol=1e-4, rtol=0)
    reference = _tiny_model("slak", state)
    dense = {key: value for key, value in state.items() if ".LoRA" not in key}
    for path, module in large_kernel_modules(reference).items():
        strips = [fuse_conv_bn(branch) for branch in (module.LoRA1, module.LoRA2)]
        bn = {"weight": torch.ones(module.channels), "bias": strips[0][1] + strips[1][1],
              "running_mean": torch.zeros(module.channels), "running_var": torch.full((module.channels,), 1 - 1e-5),
              "num_batches_tracked": torch.tensor(0)}
        dense[f"{path}.lkb_origin.conv.weight"] = sum(embed_kernel(w, module.kernel_size) for w, _ in strips).detach()
        dense.update({f"{path}.lkb_origin.bn.{key}": value.detach() for key, value in bn.items()})
    model = _tiny_model("slak", dense)
    assert {m.layout for m in large_kernel_modules(model).values()} == {"square"}
    torch.testing.assert_close(_logits(model, data["input"]), data["logits"], atol=1e-4, rtol=0)


def test_kernel_sizes_come_from_the_weight_shapes(tmp_path):
    source = timm.create_model("slak_tiny", **{**TINY_SLAK, "kernel_sizes": (15, 11, 9, 7)}).eval()
    torch.save(source.state_dict(), tmp_path / "k15.pth")
    loaded = load_model("slak_tiny", str(tmp_path / "k15.pth"), **TINY_SLAK)
    assert loaded.stages[0][0].large_kernel.kernel_size == 15 and loaded.stages[3][0].large_kernel.kernel_size == 7
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_logits(loaded, x), _logits(source, x))


def _save_as_repository(name: str, state: Dict[str, torch.Tensor], wrapper: str, path: Path) -> None:
    """SLaK's utils.save_model dict (with a pickled argparse.Namespace), or RepLKNet's bare / {"model": ...} file."""
    if wrapper == "slak_main":
        args = argparse.Namespace(model="SLaK_tiny", kernel_size=[13, 11, 9, 5, 3], Decom=True, width_factor=1.3,
                                  sparse=True, sparsity=0.4)
        torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3, "params": [0, 1]}]},
                    "epoch": 299, "scaler": {"scale": 65536.0, "_growth_tracker": 7}, "args": args}, path)
    else:
        torch.save(state if wrapper == "bare" else {"model": state}, path)


CASES = [("slak", "slak_main"), ("replknet", "bare"), ("replknet", "model"), ("replknet_deploy", "bare"),
         ("replknet_deploy", "model")]


@pytest.mark.parametrize("name, wrapper", CASES)
def test_repository_checkpoints_load_through_load_model(tmp_path, name, wrapper):
    data = _golden(name)
    path = tmp_path / f"{name}.pth"
    _save_as_repository(name, golden_state_dict(data), wrapper, path)
    arch, options = TINY[name]
    model = load_model(arch, str(path), **options)
    torch.testing.assert_close(_logits(model, data["input"]), data["logits"], atol=1e-4, rtol=0)
    layouts = {m.layout for m in large_kernel_modules(model).values()}
    assert layouts == {"decomposed" if name == "slak" else "fused" if name.endswith("deploy") else "square"}
    if name == "slak":  # sparsity is exact zeros in the dense weights, kept as they are
        weight = model.stages[0][0].large_kernel.LoRA1.conv.weight
        assert torch.equal(weight, data["state_dict.stages.0.0.large_kernel.LoRA1.conv.weight"])
        assert 0.3 < (weight == 0).float().mean() < 0.5


def test_slak_training_file_with_ema_loads_either_copy(tmp_path):
    """SLaK's main.py --eval reads ``model``; read like other timm files, the EMA copy wins unless
    weights_key="model" is given."""
    data = _golden("slak")
    state = golden_state_dict(data)
    ema = timm.create_model("slak_tiny", **TINY_SLAK).state_dict()
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": state, "model_ema": ema, "epoch": 299, "args": argparse.Namespace(model_ema=True)}, path)
    chosen = load_model("slak_tiny", str(path), weights_key="model", **TINY_SLAK)
    torch.testing.assert_close(_logits(chosen, data["input"]), data["logits"], atol=1e-4, rtol=0)
    default = load_model("slak_tiny", str(path), **TINY_SLAK)
    assert torch.equal(default.head.weight, ema["head.weight"])


@pytest.mark.parametrize("arch, wrapper, fused", [("slak_tiny", "slak_main", False), ("replknet_31b", "bare", False),
                                                  ("replknet_31b", "model", True)])
def test_repository_checkpoints_load_through_the_cli(tmp_path, arch, wrapper, fused):
    """Full-size models (the CLI takes no constructor options), a small input."""
    torch.manual_seed(0)
    model = timm.create_model(arch)
    if fused:
        model.reparameterize()
    path = tmp_path / f"{arch}.pth"
    _save_as_repository(arch, model.state_dict(), wrapper, path)
    del model
    run = CliRunner().invoke(app, ["inspect", "-m", arch, "--checkpoint", str(path), "--input-size", "64"])
    assert run.exit_code == 0, run.output


@pytest.mark.parametrize("name, file_id", [("slak_tiny", "1Iut2f5FMS_77jGPYoUJDQzDIXOsax1u4"),
                                           ("replknet_31b", "1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S"),
                                           ("replknet_xl", "1tPC60El34GntXByIRHb-z-Apm4Y5LX1T")])
def test_pretrained_says_where_to_download_in_one_line(name, file_id):
    with pytest.raises(HpxError) as err:
        load_model(name, "pretrained")
    message = str(err.value)
    assert f"https://drive.google.com/file/d/{file_id}/view" in message and "--checkpoint PATH" in message
    assert "\n" not in message


def test_cli_pretrained_is_one_line_error_with_exit_2():
    run = subprocess.run([sys.executable, "-c", "from hpx_analysis_cli.app import main; main()",
                          "inspect", "-m", "replknet_31b", "-w", "pretrained"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert "drive.google.com/file/d/1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S" in run.stderr
    assert "--checkpoint PATH" in run.stderr


# -- the effective kernel as a long filter (inspection kind ``large_conv``) ------------------------------------------

def _centre_only(kernel: torch.Tensor, _info) -> torch.Tensor:
    """Keep only the centre tap of a (C, K, K) kernel."""
    mask = torch.zeros_like(kernel)
    mask[:, kernel.shape[-2] // 2, kernel.shape[-1] // 2] = 1
    return kernel * mask


@pytest.mark.parametrize("name", sorted(TINY))
def test_list_mixers_finds_every_large_kernel_as_large_conv(name):
    from hpx_analysis.inspection import kernel, list_mixers
    from hpx_analysis.models.large_kernel import EffectiveKernelFilter
    model = _tiny_model(name, golden_state_dict(_golden(name)))
    infos = list_mixers(model, 64)
    modules = large_kernel_modules(model)
    assert [info.path for info in infos] == list(modules)
    assert {info.kind for info in infos} == {EffectiveKernelFilter.kind}
    sides = {0: 16, 1: 8, 2: 4, 3: 2}  # SLaK: stride 4 stem then 2; RepLKNet: stride 4 stem then 2 (64 px)
    for info in infos:
        module = modules[info.path]
        assert info.kernel_size == (module.kernel_size,) * 2 and info.feature_size == (sides[info.stage],) * 2
        assert info.long_filter is module.effective_filter and info.filter_path == f"{info.path}.effective_filter"
        weight, _ = module.effective_kernel()
        torch.testing.assert_close(kernel(info), weight[:, 0].flip(-2, -1).detach(), rtol=0, atol=0)
    blocks = sorted({(info.stage, info.block) for info in infos})
    assert blocks == ([(s, b) for s in range(4) for b in (0, 1)] if name == "slak" else
                      [(s, b) for s in range(4) for b in (0, 2)])  # RepLKNet: ConvFFN blocks have no mixer


@pytest.mark.parametrize("name", sorted(TINY))
def test_modified_large_kernels_run_as_one_convolution_and_are_restored(name):
    from hpx_analysis.interventions import modify_kernels
    data = _golden(name)
    model = _tiny_model(name, golden_state_dict(data))
    x = data["input"]
    before = _logits(model, x)
    # the unmodified round trip: one convolution instead of the branches, equal up to float rounding
    with modify_kernels(model, lambda k, info: k) as chosen:
        assert len(chosen) == len(large_kernel_modules(model))
        torch.testing.assert_close(_logits(model, x), before, atol=1e-4, rtol=0)
    # by hand: the deploy form whose large kernels keep only their centre tap (x * w_centre + bias per channel)
    import copy
    by_hand = copy.deepcopy(model).reparameterize()
    with torch.no_grad():
        for module in large_kernel_modules(by_hand).values():
            weight = module.lkb_reparam.weight
            weight.copy_(_centre_only(weight[:, 0], None)[:, None])
    with modify_kernels(model, _centre_only):
        cut = _logits(model, x)
    torch.testing.assert_close(cut, _logits(by_hand, x), atol=1e-4, rtol=0)
    assert not torch.allclose(cut, before, atol=1e-3)
    assert torch.equal(_logits(model, x), before)  # exactly restored: the branches run again
    assert not any(m.effective_filter.active for m in large_kernel_modules(model).values())


def test_override_runs_one_convolution_with_the_given_kernel_and_bias():
    module = timm.create_model("slak_tiny", **TINY_SLAK).eval().stages[0][0].large_kernel
    x = torch.randn(2, module.channels, 9, 9)
    given = torch.randn(module.channels, module.kernel_size, module.kernel_size)
    with torch.no_grad(), module.effective_filter.override_kernel(given):
        out = module(x)
    bias = module.effective_kernel()[1]
    # a true convolution with ``given`` is a cross-correlation with it point-reflected
    expected = F.conv2d(x, given.flip(-2, -1)[:, None], bias, padding=module.kernel_size // 2, groups=module.channels)
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["slak", "replknet"])
def test_erf_runs_and_the_first_block_sees_only_its_effective_kernel(name):
    """ERF smoke test at 64 px. Known answer: the output of S1 B1 at token (8, 8) of the 16 x 16 map depends only
    on the tokens 2..14 its effective kernel reaches (per-pixel LN / MLP / 1x1 convs around it): a cross of arms
    13 x 3 tokens for SLaK (13 x 13, strips 3 wide), each token its 4 x 4 stem patch; the 13 x 13 square for
    RepLKNet, each token the 11 x 11 pixels its stem sees. The ERF map is zero outside that and reaches the arms."""
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.inspection import LayerRef
    data = _golden(name)
    model = _tiny_model(name, golden_state_dict(data))
    images = torch.cat([data["input"], torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))])
    whole = effective_receptive_field(model, images, progress=False)
    assert whole.meta["models"][0]["layer"] == "stages.3" and whole.arrays["maps"].shape == (1, 64, 64)
    assert np.isfinite(whole.arrays["maps"]).all() and whole.arrays["maps"].sum() > 0
    first = effective_receptive_field(model, images, layer=LayerRef(0, 0), progress=False).arrays["maps"][0]
    if name == "slak":
        tokens = np.zeros((16, 16), dtype=bool)
        tokens[2:15, 7:10] = tokens[7:10, 2:15] = True
        support = np.kron(tokens, np.ones((4, 4), dtype=bool))
    else:  # RepLKNet's stem (3x3 s2, dw 3x3, 1x1, dw 3x3 s2, padding 1) gives token t the pixels 4t - 5 .. 4t + 5
        support = np.zeros((64, 64), dtype=bool)
        support[4 * 2 - 5:4 * 14 + 6, 4 * 2 - 5:4 * 14 + 6] = True
    assert np.all(first[~support] == 0)
    assert first[:12].sum() > 0 and first[52:].sum() > 0 and first[:, :12].sum() > 0 and first[:, 52:].sum() > 0
