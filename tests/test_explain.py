"""FGVis with activation bounds, captum attributions, the randomisation sanity check and `hpx-analyze explain`."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import List

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hpx_analysis.analyzers.attribution import attribute, reference_image, to_rgb
from hpx_analysis.analyzers.fgvis import (ALL_ACTIVATIONS, FgvisSettings, NoiseStreams, activation_bounds,
                                         activation_modules, fgvis)
from hpx_analysis.analyzers.sanity import cascade_groups, sanity_check

from .conftest import one_process, torchrun

SIZE = 32
REGION = (slice(8, 20), slice(10, 22))  # rows, columns the constructed class score reads
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class RegionModel(nn.Module):
    """Two classes; logit 0 = gain * mean over REGION of GELU(3x3 average of the image), logit 1 constant.

    Only pixels in REGION (plus its 1-pixel conv border) can change the class.
    """

    def __init__(self, gain: float = 6.0, threshold: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 27)
        self.act = nn.GELU()
        region = torch.zeros(1, 1, SIZE, SIZE)
        region[(..., *REGION)] = 1
        self.register_buffer("region", region)
        self.gain, self.threshold = gain, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (self.act(self.conv(x)) * self.region).sum((1, 2, 3)) / self.region.sum()
        return torch.stack([self.gain * score, torch.full_like(score, self.threshold)], 1)


def region_images(count: int) -> torch.Tensor:
    """Normalised images (count, 3, SIZE, SIZE): random background, bright region (class 0)."""
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(count, 3, SIZE, SIZE, generator=generator) * 0.5
    images[(..., *REGION)] = 0.8 + 0.2 * torch.rand(count, 3, 12, 12, generator=generator)
    return (images - 0.5) / 0.25


def region_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[REGION] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_activation_modules_of_timm_models() -> None:
    """The ReLU rule (default) finds ResNet's ReLUs and none of ConvNeXt's GELUs; "all" finds the GELUs."""
    import timm

    with torch.device("meta"):
        convnext, resnet = timm.create_model("convnext_atto"), timm.create_model("resnet18")
    assert activation_modules(convnext) == []
    gelus = activation_modules(convnext, ALL_ACTIVATIONS)
    assert gelus and {type(m).__name__ for _, m in gelus} == {"GELU"}
    assert len(activation_modules(resnet)) == sum(isinstance(m, nn.ReLU) for m in resnet.modules())


def test_bound_rule_zeroes_exactly_outside_the_band() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.GELU(), nn.Linear(16, 1))
    clean = torch.randn(2, 16)
    rows = torch.tensor([1, 0, 1])
    current = clean[rows] + 1.5 * torch.randn(3, 16)
    x = current.clone().requires_grad_()
    (plain,) = torch.autograd.grad(net(x).sum(), x)
    with activation_bounds(net, ALL_ACTIVATIONS) as bounds:
        with bounds.record():
            net(clean)
        bounds.select(rows)
        x = current.clone().requires_grad_()
        (bounded,) = torch.autograd.grad(net(x).sum(), x)
    a0, a = nn.functional.gelu(clean[rows]), nn.functional.gelu(current)
    inside = (a >= a0.clamp(max=0)) & (a <= a0.clamp(min=0))
    assert 0 < inside.sum() < inside.numel()  # both cases occur
    assert torch.all(bounded[~inside] == 0)
    assert torch.equal(bounded[inside], plain[inside])
    assert no_hooks(net)


def test_fgvis_deletes_the_region_the_class_depends_on_and_saliency_agrees() -> None:
    model = RegionModel().eval()
    images = region_images(2)
    assert (model(images).argmax(1) == 0).all()
    settings = FgvisSettings(iterations=60, lambda_tries=2, bound_activations="all")  # bound the GELU too
    result = fgvis(model, images, settings=settings, mean=MEAN, std=STD)
    assert result.meta["options"]["bounded_activations"] == 1
    for n, record in enumerate(result.records):
        assert record["success"] and record["final_class"] == 1 and record["original_class"] == 0
        deleted = result.maps[n] >= 0.5 * result.maps[n].max()
        assert iou(deleted, region_mask()) >= 0.5
        reach = np.zeros((SIZE, SIZE), bool)  # REGION grown by the 3x3 conv's 1-pixel border
        reach[REGION[0].start - 1:REGION[0].stop + 1, REGION[1].start - 1:REGION[1].stop + 1] = True
        assert result.maps[n][~reach].max() == 0  # the mask stays 1 wherever the class cannot look
    saliency = attribute(model, images, "saliency", mean=MEAN, std=STD)
    for n in range(2):
        assert iou(saliency.maps[n] > 0, region_mask()) >= 0.5
    assert no_hooks(model)


def test_batched_equals_one_at_a_time() -> None:
    model = RegionModel().eval()
    images = region_images(2)
    settings = FgvisSettings(iterations=15, lambda_tries=3, lambda_start=3.0, lambda_factor=0.1)
    batched = fgvis(model, images, settings=settings, seed=5, batch_size=6, mean=MEAN, std=STD)
    tries = [r["tries"] for r in batched.records]
    assert max(tries) > 1  # the search had to go beyond the first lambda (lambda 3 keeps the mask at 1)
    for n in range(2):
        single = fgvis(model, images[n:n + 1], settings=settings, seed=[5 + n], batch_size=1, mean=MEAN, std=STD)
        np.testing.assert_allclose(single.masks[0], batched.masks[n], atol=1e-5)
        for key in ("lambda", "iterations", "tries", "final_class", "success"):
            assert single.records[0][key] == batched.records[n][key]


class RunnerUpModel(nn.Module):
    """Three classes: logit 0 = 10 (always the top-1), logits 1 and 2 = RegionModel's (class 1 second on
    region images, overtaken by the constant class 2 once the region is deleted)."""

    def __init__(self) -> None:
        super().__init__()
        self.region = RegionModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.region(x)
        return torch.cat([torch.full_like(scores[:, :1], 10.0), scores], 1)


def test_fgvis_for_a_class_below_the_top1_deletes_until_it_loses_its_rank() -> None:
    """A given target that is not the top-1 (as the sanity check explains on randomised models) stops
    when it falls one rank, which here needs the region deleted; the top-1 stays class 0 throughout."""
    model = RunnerUpModel().eval()
    images = region_images(2)
    probs = model(images).softmax(-1)
    assert (probs.argmax(1) == 0).all() and (probs[:, 1] > probs[:, 2]).all()
    result = fgvis(model, images, target=1, settings=FgvisSettings(iterations=60, lambda_tries=2), mean=MEAN, std=STD)
    for n, record in enumerate(result.records):
        assert record["success"] and record["original_rank"] == 1 and record["iterations"] > 0
        assert record["final_class"] == 0
        assert iou(result.maps[n] >= 0.5 * result.maps[n].max(), region_mask()) >= 0.5


class NoiseSensitiveModel(nn.Module):
    """Two classes: logit 0 = 1e-3, logit 1 = 100 * variance of the input. A constant image is class 0;
    noise of std 0.1 alone (variance 0.01, logit 1 near 1) makes it class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.logit0 = nn.Parameter(torch.tensor(1e-3))  # the analysis engine runs models with parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.logit0.expand(len(x)), 100 * x.var((1, 2, 3))], 1)


def test_flip_by_noise_at_iteration_0_is_not_a_success() -> None:
    settings = FgvisSettings(iterations=5, reference="mean")
    result = fgvis(NoiseSensitiveModel(), torch.zeros(2, 3, 8, 8), settings=settings, mean=MEAN, std=STD)
    for n, record in enumerate(result.records):
        assert record["flipped_by_noise"] and not record["success"] and "noise" in record["note"]
        assert record["iterations"] == 0 and record["tries"] == 1  # lambda plays no part at iteration 0
        assert (result.masks[n] == 1).all()


def test_tries_the_search_can_no_longer_choose_stop_at_once() -> None:
    """Two tries of one image side by side: when the earlier try (the larger lambda) stops, the later one, which
    the search can no longer choose, is dropped in that very iteration (no outcome, no further forward pass);
    a try of another image runs on. Here try 0 of image 0 counts as flipped at once (its target must rank below
    -1), image 0's try 1 and image 1's try 1 never can (their targets must rank below 99)."""
    from hpx_analysis.analyzers.fgvis import activation_bounds, optimise_masks

    model = RegionModel().eval()
    images = region_images(2)[[0, 0, 1]]
    references = reference_image(images, "black", MEAN, STD)
    settings = FgvisSettings(iterations=5)
    forwards: List[int] = []
    model.register_forward_hook(lambda _m, args, _out: forwards.append(len(args[0])))
    with activation_bounds(model, ()) as bounds:
        with bounds.record():
            model(region_images(2))
        forwards.clear()
        outcomes = optimise_masks(model, bounds, images, references, torch.zeros(3, dtype=torch.long),
                                  torch.full((3,), 1e-3), [1, 2, 3], torch.tensor([0, 0, 1]), settings,
                                  torch.tensor([-1, 99, 99]), tries=torch.tensor([0, 1, 1]))
    assert outcomes[0].stopped and outcomes[0].iterations == 0 and outcomes[1] is None
    assert not outcomes[2].stopped and outcomes[2].iterations == settings.iterations
    assert forwards == [3] + [1] * settings.iterations  # image 0's try 1 left with its try 0


def test_lambda_search_reaches_the_reference_weight() -> None:
    """spravil/FGVis weighs the mask by 1e-9: the default search 1e-4, 1e-5, ..., 1e-9 is 6 tries, in the CLI too."""
    import inspect
    from hpx_analysis_cli import explain_cmd

    settings = FgvisSettings()
    assert settings.lambda_tries == 6 and settings.lambda_of(settings.lambda_tries - 1) == pytest.approx(1e-9)
    assert inspect.signature(explain_cmd.explain).parameters["lambda_tries"].default == settings.lambda_tries


def test_fgvis_leaves_the_model_unchanged(tiny_config, tiny_weights, tmp_path) -> None:
    from hpx_analysis.models.zoo import load_model

    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    result = fgvis(model, x, settings=FgvisSettings(iterations=3, lambda_tries=2), resume_dir=tmp_path)
    assert no_hooks(model) and not model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # the finished run is reused as it is: a rerun with the same options computes nothing
    again = fgvis(model, x, settings=FgvisSettings(iterations=3, lambda_tries=2), resume_dir=tmp_path)
    np.testing.assert_array_equal(again.masks, result.masks)
    assert again.records == result.records
    assert again.meta["options"]["batches_resumed"] == 1 and again.meta["options"]["batches_computed"] == 0


class InterruptibleRegionModel(RegionModel):
    """RegionModel that raises (like Ctrl-C or a crash) when ``poison`` is one of the images it sees."""

    poison = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.poison is not None and any(torch.equal(image, self.poison) for image in x):
            raise RuntimeError("interrupted")
        return super().forward(x)


def test_interrupted_fgvis_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    """Batch 2 of 3 fails; the rerun keeps batch 1 (resumed, not recomputed) and equals a run without a store."""
    model = InterruptibleRegionModel().eval()
    images = region_images(3)
    settings = FgvisSettings(iterations=15, lambda_tries=3, lambda_start=3.0)
    uninterrupted = fgvis(model, images, settings=settings, seed=5, batch_size=1, mean=MEAN, std=STD)
    assert uninterrupted.meta["options"]["batches_resumed"] == 0
    model.poison = images[1]
    with pytest.raises(RuntimeError, match="interrupted"):
        fgvis(model, images, settings=settings, seed=5, batch_size=1, mean=MEAN, std=STD, resume_dir=tmp_path)
    model.poison = None
    resumed = fgvis(model, images, settings=settings, seed=5, batch_size=1, mean=MEAN, std=STD, resume_dir=tmp_path)
    options = resumed.meta["options"]
    assert (options["batches_resumed"], options["batches_computed"], options["world_size"]) == (1, 2, 1)
    np.testing.assert_array_equal(resumed.masks, uninterrupted.masks)
    assert resumed.records == uninterrupted.records and max(r["tries"] for r in resumed.records) > 1
    other = fgvis(model, images, settings=settings, seed=6, batch_size=1, mean=MEAN, std=STD, resume_dir=tmp_path)
    assert other.meta["options"]["batches_resumed"] == 0  # other seeds: another run key, computed afresh


def test_references_and_integrated_gradients_completeness() -> None:
    images = region_images(2)
    assert np.allclose(to_rgb(reference_image(images, "black", MEAN, STD), MEAN, STD), 0)
    assert torch.equal(reference_image(images, "mean", MEAN, STD), torch.zeros_like(images))
    blurred = reference_image(images, "blur", MEAN, STD)
    assert blurred.std() < images.std()
    model = RegionModel().eval()
    result = attribute(model, images, "integrated-gradients", target=0, mean=MEAN, std=STD, ig_steps=64)
    with torch.no_grad():
        expected = (model(images) - model(reference_image(images, "black", MEAN, STD)))[:, 0]
    np.testing.assert_allclose(result.arrays["attributions"].sum((1, 2, 3)), expected.numpy(), rtol=2e-2)


def test_sanity_correlation_is_one_for_identical_weights_and_drops_for_random(tiny_config, tiny_weights) -> None:
    import copy
    from hpx_analysis.models.zoo import load_model

    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert cascade_groups(model)[0].startswith("head") and cascade_groups(model)[-1] == "stem"
    same = sanity_check(model, x, "saliency", random_model=copy.deepcopy(model))
    np.testing.assert_allclose(same.correlations, 1.0, atol=1e-6)
    randomised = sanity_check(model, x, "saliency")
    assert randomised.steps[0] == "trained" and np.allclose(randomised.correlations[0], 1.0)
    assert randomised.correlations[-1].mean() < 0.95


def test_sanity_randomises_the_architecture_the_model_was_built_with(tiny_config) -> None:
    """The fresh weights come from the same constructor options (here 5 classes, not the config's 10)."""
    from hpx_analysis.analyzers.sanity import _fresh_model
    from hpx_analysis.models.zoo import load_model

    model = load_model(tiny_config("tiny_hpx"), "random", seed=0, num_classes=5)
    fresh = _fresh_model(model, seed=1)
    assert fresh.num_classes == 5 and {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


def test_sanity_explains_the_trained_class_at_every_step(tiny_config, tiny_weights) -> None:
    """Without a target every step explains the trained model's top-1, also where the randomised
    model predicts another class (Adebayo et al. fix the class)."""
    from hpx_analysis.analyzers.attribution import predict
    from hpx_analysis.models.zoo import load_model

    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    fresh = load_model(tiny_config("tiny_hpx"), "random", seed=1)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    trained_classes = predict(model, x).argmax(-1).tolist()
    assert predict(fresh, x).argmax(-1).tolist() != trained_classes  # the fully randomised model disagrees
    check = sanity_check(model, x, "saliency", random_model=fresh)
    assert check.meta["targets"] == [trained_classes] * len(check.steps)
    fixed = sanity_check(model, x, "saliency", random_model=fresh, target=3)
    assert fixed.meta["targets"] == [[3] * 4] * len(fixed.steps)


def test_noise_stream_of_a_sample_ignores_its_batch() -> None:
    """A sample's noise is the same drawn alone or beside others that stop early, across chunk borders."""
    shape, std = (3, 4, 4), 0.1
    alone = NoiseStreams([11], shape, std, torch.device("cpu"), chunk=4)
    together = NoiseStreams([7, 11, 13], shape, std, torch.device("cpu"), chunk=4)
    draws_alone, draws_together = [], []
    for step in range(10):
        active = [0, 1, 2] if step < 3 else [1, 2] if step < 6 else [1]
        draws_alone.append(alone.draw([0], step)[0])
        draws_together.append(together.draw(active, step)[active.index(1)])
    assert torch.equal(torch.stack(draws_alone), torch.stack(draws_together))
    assert not torch.equal(draws_alone[0], draws_alone[1])
    # the noise is defined by the CPU generator of the seed, so a run on a GPU uses the same numbers
    cpu_stream = torch.randn((4, *shape), generator=torch.Generator().manual_seed(11)).mul_(std)
    assert torch.equal(torch.stack(draws_alone[:4]), cpu_stream)
    many = NoiseStreams([3], (3, 64, 64), std, torch.device("cpu")).draw([0], 0)
    assert abs(float(many.std()) - std) < 0.005


def test_fgvis_under_the_sanity_check(tiny_config, tiny_weights) -> None:
    """Cascading randomisation with FGVis: identical weights reproduce the masks exactly (same seeds),
    the trained step correlates 1 with itself, and the fully randomised model's masks differ."""
    import copy
    from hpx_analysis.models.zoo import load_model

    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    settings = FgvisSettings(iterations=6, lambda_tries=1, noise_std=0.0)  # noise alone can flip this tiny model
    same = sanity_check(model, x, "fgvis", random_model=copy.deepcopy(model), settings=settings, seed=3)
    assert same.steps[0] == "trained" and same.correlations.shape == (len(same.steps), 2)
    np.testing.assert_allclose(same.correlations, 1.0, atol=1e-9)
    randomised = sanity_check(model, x, "fgvis", settings=settings, seed=3)
    np.testing.assert_allclose(randomised.correlations[0], 1.0)
    assert np.nanmean(randomised.correlations[-1]) < 0.9
    assert randomised.meta["method"] == "fgvis" and randomised.meta["options"]["settings"]["iterations"] == 6


def test_cli_end_to_end(tiny_config, tiny_weights, tmp_path) -> None:
    from hpx_analysis_cli.app import app

    args = ["explain", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"), "--method", "fgvis",
            "--method", "gradcam", "--input-size", "64", "--num-images", "1", "--iterations", "4", "--lambda-tries", "2",
            "--device", "cpu", "-o", str(tmp_path)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    folder = tmp_path / "explain"
    meta = json.loads((folder / "tiny_hpx_fgvis.json").read_text())
    assert meta["kind"] == "fgvis" and meta["records"][0]["original_class"] == meta["targets"][0]
    assert meta["options"]["bound_activations"] == "relu" and meta["options"]["bounded_activations"] == 5
    assert meta["options"]["bound_activation_types"] == ["torch.nn.modules.activation.ReLU",
                                                         "torch.nn.modules.activation.ReLU6"]
    assert np.load(folder / "tiny_hpx_fgvis.npz")["masks"].shape == (1, 3, 64, 64)
    for suffix in (".pdf", ".png", ".figure.json"):
        assert (folder / f"explain_tiny_hpx_fgvis+gradcam{suffix}").is_file()
    assert meta["options"]["world_size"] == 1 and meta["options"]["batches_computed"] == 1
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 2  # one stored run per method
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and second.output.count("reusing") == 2
    reused = json.loads((folder / "tiny_hpx_fgvis.json").read_text())
    assert reused["options"]["batches_resumed"] == 1 and reused["options"]["batches_computed"] == 0
    assert reused["records"] == meta["records"]
    fresh = CliRunner().invoke(app, args + ["--no-resume"])
    assert fresh.exit_code == 0 and "reusing" not in fresh.output


@pytest.mark.distributed
def test_cli_fgvis_under_torchrun_equals_one_process(tiny_config, tiny_weights, tmp_path) -> None:
    """2-process gloo torchrun: each rank explains every other batch of images; the result is the
    single-process one (masks to 1e-6, identical records) and rank 0 alone writes it."""
    from hpx_analysis.analyzers.fgvis import FgvisResult

    args = ["explain", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"), "--method", "fgvis",
            "--input-size", "32", "--num-images", "3", "--iterations", "3", "--lambda-tries", "2", "--batch-size", "1",
            "--device", "cpu"]
    done = torchrun(args, tmp_path / "dist", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    single = one_process(args, tmp_path / "one", timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    dist = FgvisResult.load(tmp_path / "dist" / "explain" / "tiny_hpx_fgvis")
    one = FgvisResult.load(tmp_path / "one" / "explain" / "tiny_hpx_fgvis")
    assert dist.meta["options"]["world_size"] == 2 and one.meta["options"]["world_size"] == 1
    assert dist.masks.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(dist.masks, one.masks, atol=1e-6)
    assert dist.records == one.records and dist.meta["targets"] == one.meta["targets"]
    assert done.stdout.count("wrote") == single.stdout.count("wrote") > 0  # rank 0 alone writes


def test_cli_bad_method_is_one_line_error(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-c", "from hpx_analysis_cli.app import main; main()", "explain",
                          "--method", "lime", "-o", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "Invalid value for '--method'" in run.stderr and "'lime'" in run.stderr
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-c", "from hpx_analysis_cli.app import main; main()", "explain",
                          "--bound-activations", "gelu", "-o", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "Invalid value for '--bound-activations'" in run.stderr and "'gelu'" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_centre_crops_with_the_eval_transform(tiny_config, tiny_weights, tmp_path) -> None:
    """A 64 x 128 image, red in its outer quarters and blue in the middle half: the model's evaluation
    transform (64 px, crop_pct 1) keeps the middle 64 x 64, all blue; squashing would keep red columns."""
    from PIL import Image
    from hpx_analysis_cli.app import app

    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, :32, 0] = pixels[:, 96:, 0] = 255
    pixels[:, 32:96, 2] = 255
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "wide.png")
    run = CliRunner().invoke(app, ["explain", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"),
                                   "--method", "saliency", "--images", str(tmp_path / "images"), "--device", "cpu",
                                   "-o", str(tmp_path)])
    assert run.exit_code == 0, run.output
    inputs = np.load(tmp_path / "explain" / "tiny_hpx_saliency.npz")["inputs"]
    assert inputs.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(inputs[0], np.broadcast_to(np.array([0, 0, 1.0])[:, None, None], (3, 64, 64)),
                               atol=1e-3)


def test_cli_does_not_reuse_results_of_a_retrained_checkpoint(tiny_config, tiny_weights, tmp_path) -> None:
    """Results are keyed on the checkpoint's SHA-256: new weights written to the same path are explained again."""
    from safetensors.torch import load_file, save_file
    from hpx_analysis_cli.app import app

    weights = tmp_path / "model.safetensors"
    state = load_file(tiny_weights("tiny_hpx"))
    save_file(state, str(weights))
    args = ["explain", "-m", tiny_config("tiny_hpx"), "-w", str(weights), "--method", "saliency", "--input-size", "32",
            "--num-images", "1", "--device", "cpu", "-o", str(tmp_path)]
    assert "reusing" not in CliRunner().invoke(app, args).output
    assert "reusing" in CliRunner().invoke(app, args).output
    save_file({key: value + 0.01 if value.is_floating_point() else value for key, value in state.items()}, str(weights))
    retrained = CliRunner().invoke(app, args)
    assert retrained.exit_code == 0 and "reusing" not in retrained.output, retrained.output


def test_cli_passes_the_learning_rate_and_noise_on(tiny_config, tiny_weights, tmp_path) -> None:
    """``--lr`` and ``--noise-std`` reach FGVis (its options and its masks); impossible values: one line, exit 2."""
    from hpx_analysis_cli.app import app

    args = ["explain", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"), "--method", "fgvis",
            "--input-size", "32", "--num-images", "1", "--iterations", "3", "--lambda-tries", "1", "--device", "cpu"]
    masks = {}
    for lr, noise in (("0.1", "0.1"), ("0.02", "0")):
        out = tmp_path / f"{lr}_{noise}"
        run = CliRunner().invoke(app, [*args, "--lr", lr, "--noise-std", noise, "-o", str(out)])
        assert run.exit_code == 0, run.output
        meta = json.loads((out / "explain" / "tiny_hpx_fgvis.json").read_text())
        assert (meta["options"]["lr"], meta["options"]["noise_std"]) == (float(lr), float(noise))
        masks[lr] = np.load(out / "explain" / "tiny_hpx_fgvis.npz")["masks"]
    assert not np.array_equal(masks["0.1"], masks["0.02"])
    for option, value, message in (("--lr", "0", "learning rate (--lr) must be a finite number > 0"),
                                   ("--lr", "inf", "learning rate (--lr) must be a finite number > 0"),
                                   ("--lambda", "nan", "first lambda (--lambda) must be a finite number > 0"),
                                   ("--lambda", "-1", "first lambda (--lambda) must be a finite number > 0")):
        run = subprocess.run([sys.executable, "-c", "from hpx_analysis_cli.app import main; main()", *args, option,
                              value, "-o", str(tmp_path / "bad")], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
