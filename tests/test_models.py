"""Model zoo: golden parity with the published reference, manifests, registry, options, long-filter maths."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hpx_analysis  # noqa: F401  (registers the models with timm)
from hpx_analysis import inspection
from hpx_analysis.models import PUBLISHED, checkpoint_filter_fn, fft_conv_same, long_filters, model_names
from hpx_analysis.models.zoo import REFERENCE_BACKBONES, load_model

from .conftest import GOLDEN, TINY_NAMES, golden_state_dict, meta_model_and_state_dict

MANIFESTS = sorted((GOLDEN / "manifests").glob("*.json"))


@pytest.fixture(scope="module", params=TINY_NAMES)
def golden(request, tiny_weights):
    """(name, model loaded through the checkpoint path, golden tensors)."""
    name = request.param
    path = GOLDEN / "tiny" / name
    model = load_model(str(path.with_suffix(".json")), tiny_weights(name))
    return name, model, load_file(str(path.with_suffix(".safetensors")))


@torch.no_grad()
def test_golden_logits_and_features(golden):
    _, model, data = golden
    logits, features = model.forward_intermediates(data["input"])
    logits = model.forward_head(logits)
    torch.testing.assert_close(logits, data["logits"], atol=1e-4, rtol=0)
    for i, feature in enumerate(features):
        torch.testing.assert_close(feature, data[f"features.stage{i}"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_golden_other_resolution(golden):
    name, model, data = golden
    if "input_alt" not in data:
        pytest.skip(f"{name} runs only at its build length")
    torch.testing.assert_close(model(data["input_alt"]), data["logits_alt"], atol=1e-4, rtol=0)


def test_golden_kernels_and_windows_match_inspection(golden):
    _, model, data = golden
    stored = {key.split(".", 1)[1] for key in data if key.startswith("kernel.")}
    layers = inspection.long_filter_layers(model)
    reference_paths = {info.filter_path.replace("blocks.", ""): info for info in layers}
    assert set(reference_paths) == stored
    for path, info in reference_paths.items():
        torch.testing.assert_close(inspection.kernel(info), data[f"kernel.{path}"], atol=1e-6, rtol=1e-5)
        if f"window.{path}" in data:
            torch.testing.assert_close(inspection.window(info), data[f"window.{path}"], atol=1e-6, rtol=1e-5)


def test_every_golden_tensor_lands_in_the_model(golden):
    _, model, data = golden
    mapped = checkpoint_filter_fn(golden_state_dict(data), model)
    own = model.state_dict()
    assert set(mapped) == set(own)
    for key, value in mapped.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_loads_strictly_with_exact_parameter_count(manifest):
    spec = json.loads(manifest.read_text())
    model, state_dict = meta_model_and_state_dict(spec["model"], spec["state_dict"])
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True, assign=True)
    assert sum(t.numel() for t in model.state_dict().values()) == spec["num_params"]


def test_all_entrypoints_registered_with_timm():
    layouts = ("hpx_former", "hb_former", "c_hpx_former", "hpx_a_former", "hb_a_former")
    sizes = {"hpx_former": ("s4", "s12", "s18", "s18_384", "b36"), "hb_former": ("s4", "s12", "s18", "b36")}
    expected = {f"{layout}_{size}" for layout in layouts for size in sizes.get(layout, ("s18",))}
    assert set(model_names()) == expected and all(timm.is_model(name) for name in expected)
    for name in PUBLISHED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id.startswith("Spravil/") and cfg.hf_hub_filename == "pytorch_model.bin"
    assert set(timm.list_models(module="hyenapixel", pretrained=True, include_tags=False)) == set(PUBLISHED)
    tags = timm.models.get_arch_pretrained_cfgs("hpx_former_s18_384")
    assert [cfg.hf_hub_id for cfg in tags.values()] == ["Spravil/hpx_former_s18.westai_in1k_384",
                                                        "Spravil/hpx_former_s18.westai_in1k_ema_384"]
    assert all(cfg.input_size == (3, 384, 384) for cfg in tags.values())


def test_paper_hyperparameters_of_s18_variants():
    with torch.device("meta"):
        hpx = timm.create_model("hpx_former_s18")
        hb = timm.create_model("hb_former_s18")
    assert [i.kernel_size[0] for i in inspection.long_filter_layers(hpx)] == [111] * 3 + [55] * 3 + [27] * 9 + [13] * 3
    assert sorted({i.kernel_size[0] for i in inspection.long_filter_layers(hb)}) == [
        2 * 7 ** 2 - 1, 2 * 14 ** 2 - 1, 2 * 28 ** 2 - 1, 2 * 56 ** 2 - 1]
    assert [len(s.blocks) for s in hpx.stages] == [3, 3, 9, 3]


def test_ablation_options():
    with torch.device("meta"):
        small = timm.create_model("hpx_former_s12", long_kernel_sizes=(31, None, 9, 5))
        separable = timm.create_model("hpx_former_s4", use_separable_conv=True)
        causal = timm.create_model("hb_former_s4", is_causal=True)
    sizes = [i.kernel_size[0] for i in inspection.list_mixers(small)]
    assert sizes == [31, 31, 55, 55] + [9] * 6 + [5, 5]
    assert {i.kind for i in inspection.list_mixers(separable)} == {inspection.SEPARABLE_LONG_CONV}
    assert [i.kernel_size[0] for i in inspection.list_mixers(causal)] == [3136, 784, 196, 49]


@pytest.mark.parametrize("name", REFERENCE_BACKBONES)
def test_reference_backbones_construct_and_expose_mixers(name):
    model = load_model(name, "random")
    infos = inspection.list_mixers(model, 64)
    assert infos and all(info.feature_size is not None for info in infos)
    assert inspection.feature_layer(model) in dict(model.named_modules())


def _direct_true_conv2d(signal, kernel):
    """Reference: zero-padded true convolution via conv2d with the flipped kernel (odd S)."""
    pad = kernel.shape[-1] // 2
    flipped = kernel.flip(-1, -2)[:, None]
    padded = F.pad(signal, (pad, pad, pad, pad))
    return F.conv2d(padded, flipped, groups=signal.shape[1])


@pytest.mark.parametrize("size,kernel_size", [(9, 5), (8, 15), (5, 31), (12, 23)])
def test_fft_conv_equals_direct_true_convolution_2d(size, kernel_size):
    gen = torch.Generator().manual_seed(size)
    signal = torch.randn(2, 3, size, size + 1, generator=gen, dtype=torch.float64)
    kernel = torch.randn(3, kernel_size, kernel_size, generator=gen, dtype=torch.float64)
    centre = (kernel_size // 2, kernel_size // 2)
    expected = _direct_true_conv2d(signal, kernel)
    torch.testing.assert_close(fft_conv_same(signal, kernel, centre).double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_fft_conv_keeps_a_channels_last_layout(native_kernels, monkeypatch):
    """A channels-last signal gives a channels-last output with the values of the NCHW one (mixed layouts after the
    long filter made every elementwise operation of the mixer several times slower; the same bits by PyTorch's FFTs,
    float32 rounding by the native kernel); an NCHW signal stays NCHW."""
    monkeypatch.setenv("HPX_NATIVE", native_kernels)
    gen = torch.Generator().manual_seed(1)
    signal = torch.randn(2, 4, 10, 12, generator=gen)
    kernel = torch.randn(4, 7, 7, generator=gen)
    plain = fft_conv_same(signal, kernel, (3, 3))
    last = fft_conv_same(signal.contiguous(memory_format=torch.channels_last), kernel, (3, 3))
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert not plain.is_contiguous(memory_format=torch.channels_last)
    if native_kernels == "0":
        assert torch.equal(plain, last)
    torch.testing.assert_close(last, plain, rtol=0, atol=2e-6 * float(plain.abs().max()))


@pytest.mark.parametrize("sizes,kernel_size,centre", [((10, 12), (7, 7), (3, 3)), ((9, 9), (17, 17), (16, 0)),
                                                       ((31,), (61,), (30,)), ((6, 7, 5), (3, 5, 3), (1, 4, 0))])
def test_fft_conv_without_a_graph_gives_the_same_bits(sizes, kernel_size, centre):
    """Where no gradient flows the inverse FFT leaves the cropped rows out (split into irfftn's own steps): the output
    is bitwise the one computed with a graph (irfftn whole), which training and unfused gradients use."""
    untracked, tracked = _fft_conv_untracked_and_tracked(sizes, kernel_size, centre)
    assert tracked.requires_grad and torch.equal(untracked, tracked.detach())


@pytest.mark.parametrize("sizes,kernel_size,centre", [((10, 12), (7, 7), (3, 3)), ((9, 9), (17, 17), (16, 0)),
                                                       ((6, 7, 5), (3, 5, 3), (1, 4, 0))])
def test_fft_conv_in_channel_groups_gives_the_same_values(sizes, kernel_size, centre, monkeypatch):
    """With a 1 KB group budget every channel is filtered on its own: the values of the whole graph's to float32
    rounding (MKL's transforms in another batch size may round differently)."""
    monkeypatch.setattr(long_filters, "FFT_GROUP_BYTES", 1024)
    untracked, tracked = _fft_conv_untracked_and_tracked(sizes, kernel_size, centre)
    torch.testing.assert_close(untracked, tracked.detach(), rtol=0, atol=1e-6 * float(tracked.detach().abs().max()))


def _fft_conv_untracked_and_tracked(sizes, kernel_size, centre):
    """fft_conv_same of a seeded signal (2, 3, *sizes) and kernel without a graph and with one."""
    gen = torch.Generator().manual_seed(len(sizes))
    signal = torch.randn(2, 3, *sizes, generator=gen)
    kernel = torch.randn(3, *kernel_size, generator=gen)
    with torch.no_grad():
        untracked = fft_conv_same(signal, kernel, centre)
    return untracked, fft_conv_same(signal.requires_grad_(True), kernel, centre)


@pytest.mark.parametrize("shape, fft_shape, groups", [
    ((1, 64, 256, 256), (320, 320), [(start, 8) for start in range(0, 64, 8)]),  # stage 1 at 1024 px: 26 MB
    ((1, 320, 64, 64), (80, 80), [(start, 40) for start in range(0, 320, 40)]),
    ((2, 10, 256, 256), (320, 320), [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2)]),  # 10 / 8 rounded up
    ((1, 64, 512, 512), (640, 640), [(start, 2) for start in range(0, 64, 2)]),  # 2 planes of 1.6 MB in 4 MB
    ((1, 512, 32, 32), (40, 40), [(0, 512)]),  # 3.3 MB: whole
    ((1, 64, 65536), (70000,), [(0, 64)]),  # 1D: whole
])
def test_fft_channel_groups(shape, fft_shape, groups):
    """Channel groups of the FFT filtering without a graph on the CPU: about C / 8 channels, at most 4 MB of padded
    planes; off the CPU (a meta tensor stands in for a GPU's) every channel at once."""
    assert list(long_filters._channel_groups(torch.empty(shape), fft_shape)) == groups
    assert list(long_filters._channel_groups(torch.empty(shape, device="meta"), fft_shape)) == [(0, shape[1])]


def test_fft_conv_1d_centred_and_causal():
    gen = torch.Generator().manual_seed(0)
    length, taps = 11, 7
    signal = torch.randn(1, 2, length, generator=gen)
    kernel = torch.randn(2, taps, generator=gen)
    for centre in (taps // 2, 0):
        expected = torch.zeros_like(signal)
        for i in range(length):
            for k in range(taps):
                j = i - (k - centre)
                if 0 <= j < length:
                    expected[..., i] += kernel[:, k] * signal[..., j]
        torch.testing.assert_close(fft_conv_same(signal, kernel, (centre,)), expected, atol=1e-5, rtol=1e-5)


def test_hpx_filter_is_a_true_convolution_not_correlation():
    """A kernel with a single off-centre tap at (+1, +2) moves an impulse by (+1, +2)."""
    kernel = torch.zeros(1, 7, 7)
    kernel[0, 3 + 1, 3 + 2] = 1.0
    signal = torch.zeros(1, 1, 9, 9)
    signal[0, 0, 4, 4] = 1.0
    out = fft_conv_same(signal, kernel, (3, 3))
    assert out[0, 0].abs().argmax().item() == (4 + 1) * 9 + (4 + 2)
