"""Weights: pretrained (local HF cache), random, local files in every wrapper; readable errors; CLI exit codes."""

from __future__ import annotations

import pickle
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from hpx_analysis.errors import HpxError
from hpx_analysis.models.zoo import load_model, read_checkpoint
from hpx_analysis_cli.app import app

from .conftest import TINY


def _outputs(model, size=64):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size))


@pytest.fixture(scope="module")
def tiny_reference():
    model = load_model(str(TINY / "tiny_hpx.json"), str(TINY / "tiny_hpx.safetensors"))
    return model, _outputs(model)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_pickle_checkpoints_in_every_wrapper(tmp_path, tiny_reference, wrapper, prefix):
    model, expected = tiny_reference
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
    loaded = load_model(str(TINY / "tiny_hpx.json"), str(path))
    torch.testing.assert_close(_outputs(loaded), expected, atol=0, rtol=0)
    assert loaded.hpx_provenance["weights_sha256"] and loaded.hpx_provenance["weights"] == "file"


def test_safetensors_and_bin(tmp_path, tiny_reference):
    model, expected = tiny_reference
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for name in ("w.safetensors", "pytorch_model.bin"):
        torch.testing.assert_close(_outputs(load_model(str(TINY / "tiny_hpx.json"), str(tmp_path / name))), expected)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    with pytest.raises(HpxError, match="not a readable checkpoint"):
        read_checkpoint(path)


def test_random_weights_are_seeded():
    a = load_model(str(TINY / "tiny_hb.json"), "random", seed=3)
    b = load_model(str(TINY / "tiny_hb.json"), "random", seed=3)
    c = load_model(str(TINY / "tiny_hb.json"), "random", seed=4)
    assert torch.equal(_outputs(a), _outputs(b)) and not torch.equal(_outputs(a), _outputs(c))


def test_pretrained_from_local_hf_cache_while_offline(tmp_path, monkeypatch):
    """A published model found in the Hugging Face cache loads without any network access."""
    model = load_model("hpx_former_s4", "random", seed=1)
    monkeypatch.setitem(__import__("hpx_analysis.models.hyenapixel", fromlist=["HUB_REPOS"]).HUB_REPOS,
                        "hpx_former_s4", ["Spravil/hpx_former_s4.test"])
    snapshot = tmp_path / "models--Spravil--hpx_former_s4.test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    (tmp_path / "models--Spravil--hpx_former_s4.test" / "refs").mkdir()
    (tmp_path / "models--Spravil--hpx_former_s4.test" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("hpx_former_s4", "pretrained")
    torch.testing.assert_close(_outputs(loaded), _outputs(model))
    assert loaded.hpx_provenance["weights_file"].endswith("pytorch_model.bin")


@pytest.mark.parametrize("name,weights,message", [
    ("hpx_formr_s18", "random", "unknown model 'hpx_formr_s18'; did you mean hpx_former_s18"),
    (str(TINY / "tiny_hpx.json"), "/nonexistent/w.pth", "checkpoint file not found"),
    (str(TINY / "tiny_hpx.json"), str(TINY / "tiny_hb.safetensors"), "does not fit this architecture: missing 64"),
    ("hpx_former_s18", "pretrained", "download https://huggingface.co/Spravil/hpx_former_s18.westai_in1k"),
    ("hpx_former_s18", "sometimes", "weights must be 'pretrained', 'random' or a checkpoint file"),
])
def test_load_errors_are_one_readable_line(name, weights, message):
    with pytest.raises(HpxError) as info:
        load_model(name, weights)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mis_shaped_keys_are_named(tmp_path):
    other = load_model(str(TINY / "tiny_hpx.json"), "random")
    state = other.state_dict()
    state["head.fc.fc2.weight"] = torch.zeros(5, 256)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(HpxError, match=r"mis-shaped 1 \(head.fc.fc2.weight \(5, 256\) vs \(10, 256\)\)"):
        load_model(str(TINY / "tiny_hpx.json"), str(tmp_path / "w.pth"))


def test_cli_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    for args in (["inspect", "-m", "convnxt_tiny"], ["inspect", "-m", "hpx_former_s18", "-w", str(bad)]):
        run = subprocess.run([sys.executable, "-c", "from hpx_analysis_cli.app import main; main()", *args],
                             capture_output=True, text=True)
        assert run.returncode == 2
        assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_cli_models_version_and_inspect():
    runner = CliRunner()
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0
    for name in ("hpx_former_s18", "hb_former_b36", "convformer_s18", "vgg16"):
        assert name in listing.output
    assert "27.47M" in listing.output  # hpx_former_s18 learnable parameters
    assert "proxy_hpx_former" in listing.output and "trained by `hpx-analyze demo`" in listing.output
    assert runner.invoke(app, ["--version"]).output.startswith("hpx-analyze ")
    table = runner.invoke(app, ["inspect", "-m", str(TINY / "tiny_hpx_a.json"), "--size", "96"])
    assert table.exit_code == 0, table.output
    assert "S1 B1   hyenapixel_2d        24x24        31x31" in table.output
    assert "S4 B1   attention            3x3" in table.output


def test_help_does_not_import_torch():
    code = "import sys; from hpx_analysis_cli.app import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
