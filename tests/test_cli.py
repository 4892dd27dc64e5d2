"""The command line as one surface: one name and one default per concept (``--model``, ``--weights``, ``--layers``),
one ``wrote PATH`` line per written file, the torchrun session around every distributed command, and the workflows
the commands call, run from Python."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from hpx_analysis import distributed
from hpx_analysis.errors import HpxError
from hpx_analysis.layer_names import LayerRef
from hpx_analysis.workflows import ModelSpec, erf_models, explain_models
from hpx_analysis_cli import options
from hpx_analysis_cli.app import app, main, run

from .conftest import free_port, random_image_folder

ANALYSES = ("inspect", "kernels", "coverage", "erf", "truncate", "explain")


class Stop(Exception):
    """Raised by a stand-in analyzer once it has seen its arguments."""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder tree: 2 classes x 1 random image."""
    return random_image_folder(tmp_path_factory.mktemp("data") / "val", ("a", "b"), per_class=1, size=(40, 40))


def _command_args(name: str, data: Path) -> List[str]:
    """The options besides --model that each analysis needs."""
    return ["--data", str(data)] if name == "truncate" else []


# -- the torchrun session -----------------------------------------------------------------------------------------

def test_session_yields_setup_and_tears_down_when_the_body_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process group joined before (a world of one, over gloo on loopback) is left when the body raises."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="inside"):
        with distributed.session(cpu) as joined:
            assert joined == (cpu, 0, 1) and dist.is_initialized()
            raise RuntimeError("inside")
    assert not dist.is_initialized()


@pytest.mark.parametrize("command", ["erf", "truncate", "explain"])
def test_every_distributed_command_tears_down_after_a_failure(command: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              tiny_config: Any) -> None:
    calls: List[str] = []
    monkeypatch.setattr(distributed, "teardown", lambda: calls.append("teardown"))
    empty = tmp_path / "empty"
    empty.mkdir()
    inputs = ["--data", str(empty)] if command == "truncate" else ["--images", str(empty)]
    result = CliRunner().invoke(app, [command, "-m", tiny_config("tiny_hpx"), "-w", "random", *inputs,
                                      "--device", "cpu", "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, HpxError), result.output
    assert calls == ["teardown"]


# -- one name and one default per concept ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ANALYSES)
def test_a_missing_model_is_one_line_error_in_every_analysis(command: str, image_folder: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["hpx-analyze", command, *_command_args(command, image_folder)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: missing --model") and len(error.strip().splitlines()) == 1


def test_the_weights_default_is_pretrained_everywhere() -> None:
    import inspect

    assert options.DEFAULT_WEIGHTS == "pretrained"
    assert options.weights_per_model(["a", "b"], None) == ["pretrained", "pretrained"]
    for command in app.registered_commands:
        parameters = inspect.signature(command.callback).parameters
        if "weights" in parameters:
            assert parameters["weights"].default in (options.DEFAULT_WEIGHTS, None), command.name


def test_no_command_help_imports_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from hpx_analysis_cli.app import app; "
            f"codes = [CliRunner().invoke(app, [name, '--help']).exit_code for name in {ANALYSES + ('demo',)!r}]; "
            "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == f"{[0] * (len(ANALYSES) + 1)} False", done.stderr


@pytest.mark.parametrize("command", ["erf", "truncate", "kernels", "inspect"])
def test_help_names_layers_only_as_layers(command: str) -> None:
    help_text = CliRunner().invoke(app, [command, "--help"]).output
    assert "--layers" in help_text
    assert "--stage" not in help_text and not re.search(r"--layer\b", help_text)


def test_truncate_takes_layers_and_its_old_name_stage(tiny_config: Any, image_folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``--layers S2,4``, ``--layers S2 --layers 4`` and the hidden ``--stage S2 --stage 4`` sweep the same groups."""
    from hpx_analysis.analyzers import truncation

    seen: List[Any] = []

    def sweep(model: Any, samples: Any, stages: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(stages)
        raise Stop
    monkeypatch.setattr(truncation, "truncation_sweep", sweep)
    base = ["truncate", "-m", tiny_config("tiny_hpx"), "-w", "random", "--data", str(image_folder), "--device", "cpu",
            "-o", str(tmp_path)]
    outputs = []
    for given in (["--layers", "S2,4"], ["--layers", "S2", "--layers", "4"], ["--stage", "S2", "--stage", "4"]):
        result = CliRunner().invoke(app, base + given)
        assert isinstance(result.exception, Stop), result.output
        outputs.append(result.output)
    assert seen == [[[LayerRef(1)], [LayerRef(3)]]] * 3
    assert "note: --stage is now --layers" in outputs[2] and "note:" not in outputs[0]


def test_erf_takes_one_layer_as_layers_or_its_old_name_layer(tiny_config: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from hpx_analysis import workflows

    seen: List[Dict[str, Any]] = []

    def erf(specs: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise Stop
    monkeypatch.setattr(workflows, "erf_models", erf)
    base = ["erf", "-m", tiny_config("tiny_hpx"), "-w", "random", "--device", "cpu", "-o", str(tmp_path)]
    for given, layer in ((["--layers", "S2"], LayerRef(1)), (["--layer", "2.1"], LayerRef(1, 0)),
                         (["--layers", "stages.1.blocks.0.token_mixer"], "stages.1.blocks.0.token_mixer"), ([], None)):
        result = CliRunner().invoke(app, base + given)
        assert isinstance(result.exception, Stop), result.output
        assert seen[-1]["layer"] == layer
    several = CliRunner().invoke(app, base + ["--layers", "S2,S3"])
    assert isinstance(several.exception, Stop), several.output
    assert seen[-1]["layer"] == [LayerRef(1), LayerRef(2)] and len(seen) == 5


def test_kernels_and_inspect_take_repeated_layers_and_block_ranges(tiny_config: Any) -> None:
    base = ["inspect", "-m", tiny_config("tiny_hpx"), "-w", "random"]
    comma = CliRunner().invoke(app, base + ["--layers", "S2B1,3"])
    repeated = CliRunner().invoke(app, base + ["--layers", "S2B1", "--layers", "3"])
    ranged = CliRunner().invoke(app, base + ["--layers", "S2B1-1", "--layers", "S3"])
    assert comma.exit_code == 0, comma.output
    assert comma.output == repeated.output == ranged.output and len(comma.output.splitlines()) == 3


# -- one `wrote PATH` line per written file -------------------------------------------------------------------------

@pytest.mark.parametrize("command, extra", [
    ("kernels", []),
    ("coverage", ["--input-size", "64"]),
    ("erf", ["--input-size", "32", "--num-images", "1"]),
    ("truncate", ["--sizes", "0,1", "--bootstrap", "10", "--input-size", "32"]),
    ("explain", ["--method", "saliency", "--sanity", "--num-images", "1", "--input-size", "32"]),
])
def test_every_written_file_is_one_wrote_line(command: str, extra: List[str], tiny_config: Any, tiny_weights: Any,
                                              image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fresh = ["--no-resume"] if command in ("erf", "truncate", "explain") else []
    result = CliRunner().invoke(app, [command, "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"),
                                      *_command_args(command, image_folder), *extra, *fresh, "--device", "cpu",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    wrote = [line[len("wrote "):] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(wrote) == len(set(wrote)) == len(files) > 0
    assert {Path(path).resolve() for path in wrote} == {path.resolve() for path in files}
    assert not [line for line in result.stdout.splitlines() if line.startswith(str(out))]  # no bare paths


# -- the workflows, from Python -------------------------------------------------------------------------------------

def test_explain_models_from_python(tiny_config: Any, tiny_weights: Any) -> None:
    """Each model x method in order, with the sanity check when asked; FGVis settings as keywords."""
    spec = ModelSpec(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    explained = explain_models([spec], ["saliency", "fgvis"], num_images=1, input_size=32, sanity=True,
                               iterations=2, lambda_tries=1, reference="mean")
    assert [(item.spec.label, item.method) for item in explained] == [("tiny_hpx", "saliency"), ("tiny_hpx", "fgvis")]
    saliency, fgvis = explained
    assert saliency.result.maps.shape == (1, 32, 32) and saliency.result.meta["options"]["reference"] == "mean"
    assert fgvis.result.meta["options"]["iterations"] == 2 and fgvis.result.meta["options"]["reference"] == "mean"
    assert saliency.sanity.steps[0] == "trained" and np.allclose(saliency.sanity.correlations[0], 1.0)
    assert explain_models([spec], ["saliency"], num_images=1, input_size=32)[0].sanity is None


def test_explain_says_which_images_it_skipped(tiny_config: Any, tmp_path: Path, capsys) -> None:
    folder = random_image_folder(tmp_path / "val", ("a",), per_class=2, size=(40, 40))
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    explained = explain_models([ModelSpec(tiny_config("tiny_hpx"), "random")], ["saliency"], images=folder,
                               num_images=3, input_size=32)
    assert len(explained[0].result.maps) == 2
    assert "tiny_hpx: skipped 1 unreadable image(s): a/broken.png" in capsys.readouterr().err


def test_erf_models_from_python(tiny_config: Any) -> None:
    specs = [ModelSpec(tiny_config(name), "random") for name in ("tiny_hpx", "tiny_hpx_sc")]
    result = erf_models(specs, num_images=1, input_size=32, layer=LayerRef(1))
    assert result.labels == ["tiny_hpx", "tiny_hpx_sc"] and result.arrays["maps"].shape == (2, 32, 32)
    assert result.meta["options"]["weights"] == ["random", "random"] and result.meta["options"]["seed"] == 0
    assert [entry["layer"] for entry in result.meta["models"]] == ["stages.1", "stages.1"]


@pytest.mark.parametrize("argv,kept", [(["models"], True), (["erf", "--help"], False), (["--version"], False)])
def test_the_console_script_keeps_freed_memory_for_commands_only(argv: List[str], kept: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``hpx-analyze`` (``run``) makes the process keep freed memory before a command, not for help or the version,
    which stay free of torch."""
    calls: List[int] = []
    monkeypatch.setattr("hpx_analysis.devices.keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["hpx-analyze", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None) and bool(calls) == kept


def test_one_model_with_two_weights_gets_two_labels() -> None:
    """Two runs of one model in one command (trained and random weights) must not write over each other's files."""
    from hpx_analysis_cli.options import model_specs

    labels = [spec.label for spec in model_specs(["tiny.json", "tiny.json", "other", "other"],
                                                 ["random", "runs/best.safetensors", "random", "random"], None, None)]
    assert labels == ["tiny-random", "tiny-best", "other-random3", "other-random4"]


@pytest.mark.parametrize("args, message", [
    (["kernels", "--input-size", "1"], "Invalid value for '--input-size'"),
    (["kernels", "--input-size", "100000"], "Invalid value for '--input-size'"),
    (["erf", "--input-size", "1"], "input size must be 32 to 4096 px"),
    (["erf", "--seed", "-1"], "Invalid value for '--seed'"),
    (["kernels", "--top-k", "0"], "Invalid value for '--top-k'"),
    (["truncate", "--workers", "-1", "--data", "."], "Invalid value for '--workers'"),
    (["truncate", "--bootstrap", "0", "--data", "."], "Invalid value for '--bootstrap'"),
    (["truncate", "--sizes", "0:inf:1", "--data", "."], "--sizes must be"),
    (["truncate", "--sizes", "0:1:0.0000001", "--data", "."], "give 1 to 1000"),
    (["explain", "--exponent", "nan"], "Invalid value for '--exponent'"),
    (["kernels", "--device", "meta"], "unsupported device 'meta'"),
    (["kernels", "--device", "cpu:5"], "unsupported device 'cpu:5'"),
    (["explain", "--num-images", "0"], "Invalid value for '--num-images'"),
    (["erf", "--images", __file__], "is a file; give the folder that holds the images"),
    (["truncate", "--data", __file__], "is a file; --data takes the folder of images"),
    (["kernels", "--layers", "all,S9"], "--layers all names every layer; give it alone, not with S9"),
    (["demo", "--local-steps", "0"], "Invalid value for '--local-steps'"),
])
def test_impossible_options_stop_before_any_work(args: List[str], message: str, tiny_config: Any,
                                                  tmp_path: Path) -> None:
    """Each is refused up front with one message naming the option (the audit of this release found tracebacks or
    silent fallbacks for all of them)."""
    model = [] if args[0] == "demo" else ["-m", tiny_config("tiny_hpx"), "-w", "random"]
    result = CliRunner().invoke(app, [*args, *model, "-o", str(tmp_path / "out")])
    shown = result.output + (str(result.exception) if isinstance(result.exception, HpxError) else "")
    assert result.exit_code != 0 and message in shown, (result.exit_code, shown, result.exception)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_up_front(tiny_config: Any, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path / "a_file", "is a file, not a folder"),
                         (tmp_path / "a_file" / "below", "is a file, not a folder")):
        result = CliRunner().invoke(app, ["kernels", "-m", tiny_config("tiny_hpx"), "-w", "random", "-o", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_an_interrupt_inside_a_command_says_what_is_kept(monkeypatch, capsys) -> None:
    """typer turns Ctrl-C inside a command into a silent exit 130; the console script still says what is kept."""
    import hpx_analysis_cli.app as cli_app

    def interrupted() -> None:
        raise SystemExit(130)
    monkeypatch.setattr(cli_app, "app", interrupted)
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 130 and "interrupted; partial results already saved are kept" in capsys.readouterr().err
