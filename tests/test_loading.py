"""Weights: pretrained (local HF cache), random, local files in every wrapper; readable errors; CLI exit codes."""

from __future__ import annotations

import dataclasses
import pickle
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import save_file
from timm.models import _registry
from typer.testing import CliRunner

from hpx_analysis.errors import HpxError
from hpx_analysis.models import zoo
from hpx_analysis.models.zoo import load_model, read_checkpoint, training_checkpoint
from hpx_analysis_cli.app import app

from .conftest import TINY


def _outputs(model, size=64):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size))


@pytest.fixture(scope="module")
def tiny_reference(tiny_weights):
    model = load_model(str(TINY / "tiny_hpx.json"), tiny_weights("tiny_hpx"))
    return model, _outputs(model)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
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


def test_ema_weights_win_over_the_raw_ones(tmp_path, tiny_reference):
    """A training checkpoint with both: timm's rule, the EMA weights are the ones analysed."""
    model, expected = tiny_reference
    other = load_model(str(TINY / "tiny_hpx.json"), "random", seed=5).state_dict()
    torch.save({"state_dict": other, "state_dict_ema": model.state_dict()}, tmp_path / "train.pth")
    torch.testing.assert_close(_outputs(load_model(str(TINY / "tiny_hpx.json"), str(tmp_path / "train.pth"))),
                               expected, atol=0, rtol=0)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    with pytest.raises(HpxError, match="not a readable checkpoint"):
        read_checkpoint(path)


def test_training_script_checkpoints_load_with_their_args_and_nothing_else(tmp_path):
    """DeiT-style main.py saves {"model", "optimizer", "epoch", "model_ema", "args": Namespace}: the weights and
    the args load (weights_only=True plus argparse.Namespace); any other pickled object is refused."""
    import argparse
    import datetime

    state = {"weight": torch.arange(4.0), "bias": torch.zeros(2)}
    ema = {"weight": torch.ones(4), "bias": torch.ones(2)}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "epoch": 3, "args": argparse.Namespace(model="deit_tiny", nb_classes=40)}, path)
    entries = training_checkpoint(path)
    assert entries["args"] == {"model": "deit_tiny", "nb_classes": 40} and entries["epoch"] == 3
    assert torch.equal(entries["model"]["weight"], state["weight"]) and torch.equal(entries["model_ema"]["bias"], ema["bias"])
    assert torch.equal(read_checkpoint(path)["weight"], ema["weight"])  # timm's rule: the EMA weights when present
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    assert set(training_checkpoint(bare)) == {"model"}
    other = tmp_path / "other.pth"
    torch.save({"model": state, "args": argparse.Namespace(), "saved": datetime.datetime(2024, 1, 1)}, other)
    for reader in (training_checkpoint, read_checkpoint):
        with pytest.raises(HpxError, match="not a readable checkpoint"):
            reader(other)


def test_random_weights_are_seeded():
    a = load_model(str(TINY / "tiny_hb.json"), "random", seed=3)
    b = load_model(str(TINY / "tiny_hb.json"), "random", seed=3)
    c = load_model(str(TINY / "tiny_hb.json"), "random", seed=4)
    assert torch.equal(_outputs(a), _outputs(b)) and not torch.equal(_outputs(a), _outputs(c))


def _publish(monkeypatch, name: str, **cfg_fields) -> None:
    """Give the registered model ``name`` a published weights location (fields of its pretrained cfg)."""
    cfg = dataclasses.replace(_registry._model_pretrained_cfgs[name], **cfg_fields)
    monkeypatch.setitem(_registry._model_pretrained_cfgs, name, cfg)
    monkeypatch.setattr(_registry, "_model_has_pretrained", _registry._model_has_pretrained | {name})


def _hub_calls(monkeypatch) -> list:
    """Record every (repo, filename, local_files_only) the loader asks huggingface_hub for."""
    calls = []
    download = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("local_files_only", False)))
        return download(repo_id, filename, **kwargs)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return calls


@pytest.mark.parametrize("source", ["hub", "url"])
def test_pretrained_cache_hit_loads_without_any_network(tmp_path, monkeypatch, source):
    """Weights in the local cache load while online too, with no network use at all (no probe, no
    download, not even a name look-up; conftest makes any connection an error)."""
    model = load_model("proxy_hpx_former", "random", seed=1)
    if source == "hub":
        _publish(monkeypatch, "proxy_hpx_former", hf_hub_id="Spravil/proxy_hpx_former.test",
                 hf_hub_filename="pytorch_model.bin")
        repo = tmp_path / "models--Spravil--proxy_hpx_former.test"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    else:
        _publish(monkeypatch, "proxy_hpx_former", url="https://example.org/weights/proxy_hpx_former-0a1b2c.pth")
        snapshot = tmp_path / "hub" / "checkpoints"
        snapshot.mkdir(parents=True)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = snapshot / ("pytorch_model.bin" if source == "hub" else "proxy_hpx_former-0a1b2c.pth")
    torch.save(model.state_dict(), weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", mock.Mock(side_effect=AssertionError("name look-up")))
    calls = _hub_calls(monkeypatch)
    loaded = load_model("proxy_hpx_former", "pretrained")
    torch.testing.assert_close(_outputs(loaded), _outputs(model), atol=0, rtol=0)
    assert calls == ([("Spravil/proxy_hpx_former.test", "pytorch_model.bin", True)] if source == "hub" else [])
    assert loaded.hpx_provenance["weights_file"] == str(weights)
    assert loaded.hpx_provenance["pretrained_tag"] == "proxy_hpx_former"


S18_384_REPOS = ["Spravil/hpx_former_s18.westai_in1k_384", "Spravil/hpx_former_s18.westai_in1k_ema_384"]
S18_384_URLS = " or ".join(f"https://huggingface.co/{repo}/resolve/main/pytorch_model.bin" for repo in S18_384_REPOS)


def test_both_hub_ids_of_the_384_model_are_looked_up_in_the_cache_while_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    calls = _hub_calls(monkeypatch)
    with pytest.raises(HpxError) as info:
        load_model("hpx_former_s18_384", "pretrained")
    assert calls == [(repo, "pytorch_model.bin", True) for repo in S18_384_REPOS]
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and f"download {S18_384_URLS} and pass it with --checkpoint PATH" in message
    assert "\n" not in message


@pytest.mark.parametrize("first_repo", ["missing", "unreachable"])
def test_384_downloads_in_order_after_the_cache(monkeypatch, first_repo):
    """Online: both cache look-ups first, then downloads in tag order; a repository the hub lacks
    passes to the next id, a hub that does not answer ends the search (each try would wait for retries)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(zoo, "_probe_connection", lambda url, timeout=zoo.PROBE_TIMEOUT_S: None)  # the hub "answers"
    calls = []

    def hub(repo_id, filename, **kwargs):
        calls.append((repo_id, kwargs["local_files_only"]))
        if kwargs["local_files_only"] or first_repo == "unreachable" or repo_id != S18_384_REPOS[0]:
            raise LocalEntryNotFoundError("not in the cache and the hub did not answer")
        raise RepositoryNotFoundError("404 Repository Not Found", response=mock.Mock())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(HpxError, match=f"the download failed .*; download {S18_384_URLS} and pass it"):
        load_model("hpx_former_s18_384", "pretrained")
    downloads = S18_384_REPOS if first_repo == "missing" else S18_384_REPOS[:1]
    assert calls == [(repo, True) for repo in S18_384_REPOS] + [(repo, False) for repo in downloads]


S18_URL = "https://huggingface.co/Spravil/hpx_former_s18.westai_in1k/resolve/main/pytorch_model.bin"


@pytest.mark.parametrize("network", ["hangs", "refuses"])
def test_pretrained_without_network_fails_within_seconds(tmp_path, monkeypatch, network):
    """Online mode (HF_HUB_OFFLINE unset) on a machine without network: not the hub client's ~27 s of retries but
    the one-line error within 5 s, after one connection probe to the hub host that hangs (a name look-up or a
    connect that never answers) or fails at once; the hub client is never asked to download."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    released, probed = threading.Event(), []

    def create_connection(address, timeout=None, *args, **kwargs):
        probed.append((address, timeout))
        if network == "hangs":
            released.wait(30)
            raise TimeoutError("timed out")
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "create_connection", create_connection)
    calls = _hub_calls(monkeypatch)
    started = time.perf_counter()
    try:
        with pytest.raises(HpxError) as info:
            load_model("hpx_former_s18", "pretrained")
        elapsed = time.perf_counter() - started
    finally:
        released.set()
    message = str(info.value)
    assert elapsed < 5 and probed == [(("huggingface.co", 443), zoo.PROBE_TIMEOUT_S)], (elapsed, probed)
    assert calls == [("Spravil/hpx_former_s18.westai_in1k", "pytorch_model.bin", True)]  # the cache only
    assert message.startswith("pretrained weights for 'hpx_former_s18' are not in the local cache and the download "
                              "failed (OSError: cannot reach huggingface.co:443 (")
    assert ("no answer within 3 s" if network == "hangs" else "Name or service not known") in message
    assert f"; download {S18_URL} and pass it with --checkpoint PATH (Python: weights=PATH)" in message
    assert "\n" not in message


@pytest.mark.parametrize("environment,reached", [
    ({}, ("huggingface.co", 443)),
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128)),
    ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "huggingface.co"}, ("huggingface.co", 443)),
])
def test_the_connection_probe_goes_where_the_download_would(monkeypatch, environment, reached):
    """Direct to the hub host, or to the proxy the environment names (unless NO_PROXY exempts the host)."""
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    addresses = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: addresses.append(address) or
                        mock.Mock())
    zoo._probe_connection("https://huggingface.co")
    assert addresses == [reached]


@pytest.mark.parametrize("name,weights,message", [
    ("hpx_formr_s18", "random", "unknown model 'hpx_formr_s18'; did you mean hpx_former_s18"),
    (str(TINY / "tiny_hpx.json"), "/nonexistent/w.pth", "checkpoint file not found"),
    (str(TINY / "tiny_hpx.json"), str(TINY), "is a folder, not a checkpoint file"),
    ("hpx_former_s4", "pretrained", "no published weights for 'hpx_former_s4'; HyenaPixel models with published"),
    ("hpx_former_s18", "pretrained", "download https://huggingface.co/Spravil/hpx_former_s18.westai_in1k"),
    ("hpx_former_s18", "sometimes", "weights must be 'pretrained', 'random' or a checkpoint file"),
])
def test_load_errors_are_one_readable_line(name, weights, message):
    with pytest.raises(HpxError) as info:
        load_model(name, weights)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_renamed_safetensors_file_is_read_as_one(tmp_path, tiny_weights):
    """timm picks the reader by the file name; a safetensors file without its suffix is recognised by its header
    (it was reported as a refused pickle)."""
    renamed = tmp_path / "weights"
    renamed.write_bytes(open(tiny_weights("tiny_hpx"), "rb").read())
    model = load_model(str(TINY / "tiny_hpx.json"), str(renamed))
    reference = load_model(str(TINY / "tiny_hpx.json"), tiny_weights("tiny_hpx"))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_other_architecture_names_missing_and_unexpected_keys(tiny_weights):
    with pytest.raises(HpxError) as info:
        load_model(str(TINY / "tiny_hpx.json"), tiny_weights("tiny_hb"))
    message = str(info.value)
    assert "does not fit this architecture: missing 64 (" in message and "; unexpected 72 (" in message
    assert "\n" not in message


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
    assert "proxy_hpx_former" in listing.output and "shipped (`hpx-analyze demo`)" in listing.output
    assert runner.invoke(app, ["--version"]).output.startswith("hpx-analyze ")
    table = runner.invoke(app, ["inspect", "-m", str(TINY / "tiny_hpx_a.json"), "-w", "random", "--input-size", "96"])
    assert table.exit_code == 0, table.output
    assert "S1 B1   hyenapixel_2d        24x24        31x31" in table.output
    assert "S4 B1   attention            3x3" in table.output


def test_help_does_not_import_torch():
    code = "import sys; from hpx_analysis_cli.app import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_failing_checkpoint_filter_is_one_line_naming_it_and_foreign_keys_still_fall_back(tmp_path, monkeypatch,
                                                                                              tiny_weights):
    """A filter's own error surfaces as one line naming the model, the filter and the error; timm's ConvNeXt filter,
    which looks the key of a 2D weight up in the model (KeyError for a ResNet head), still leads to the key
    comparison of the unmapped state dict."""
    from hpx_analysis.models import hyenapixel

    def broken(state_dict, model):
        raise RuntimeError("boom")

    monkeypatch.setattr(hyenapixel, "checkpoint_filter_fn", broken)
    with pytest.raises(HpxError) as info:
        load_model(str(TINY / "tiny_hpx.json"), tiny_weights("tiny_hpx"))
    message = str(info.value)
    assert "\n" not in message and "tiny_hpx.json" in message and "RuntimeError: boom" in message
    assert f"{__name__}.{broken.__qualname__}" in message
    torch.save({"fc.weight": torch.zeros(3, 4)}, tmp_path / "resnet_head.pth")
    with pytest.raises(HpxError, match=r"does not fit this architecture: missing \d+ \(.*; unexpected 1 \(fc.weight\)"):
        load_model("convnext_atto", str(tmp_path / "resnet_head.pth"))
