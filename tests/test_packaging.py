"""The package as a user meets it: entry points at the top, models that pickle, a wheel that ships every subpackage."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import hpx_analysis
from hpx_analysis.models.zoo import load_model

from .conftest import TINY_NAMES, library_imports


def test_main_entry_points_import_from_the_package_top() -> None:
    from hpx_analysis import effective_receptive_field, fgvis, load_model as top_level_load_model
    from hpx_analysis.analyzers.erf import effective_receptive_field as erf_in_module

    assert top_level_load_model is load_model
    assert effective_receptive_field is erf_in_module and callable(fgvis)
    for name in hpx_analysis.__all__:
        assert getattr(hpx_analysis, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        hpx_analysis.load_modle  # noqa: B018


def test_importing_the_package_does_not_import_the_analyzers() -> None:
    code = "import sys, hpx_analysis; print(sorted(m for m in sys.modules if m.startswith('hpx_analysis.analyzers.')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("name", [n for n in TINY_NAMES if n in ("tiny_hpx", "tiny_hb_a", "tiny_c_hpx", "tiny_hpx_sc")])
def test_whole_models_pickle_and_compute_the_same(tiny_config, name: str) -> None:
    model = load_model(tiny_config(name), "random", seed=3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(images)  # fills the long filters' FFT caches, which must pickle too
        restored = pickle.loads(pickle.dumps(model))
        assert torch.equal(restored(images), logits)
    mixers = [type(block.token_mixer) for stage in restored.stages for block in stage.blocks]
    assert all(not hasattr(cls, "configured_base") for cls in mixers)


def test_importing_plotting_keeps_the_users_matplotlib_backend() -> None:
    code = ("import matplotlib; matplotlib.use('svg'); import hpx_analysis.plotting, hpx_analysis.plotting.erf; "
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "svg"


def test_the_library_imports_without_cycles_and_flows_one_way() -> None:
    """No import cycle among the library's modules (imports inside functions included), and the layers only
    import downwards: analyzers never import plotting or the demo, plotting never the demo."""
    graph = library_imports()
    remaining = dict(graph)
    while remaining:  # peel off modules that import nothing still remaining
        leaves = {name for name, imported in remaining.items() if not imported & remaining.keys()}
        assert leaves, f"import cycle among {sorted(remaining)}"
        remaining = {name: imported for name, imported in remaining.items() if name not in leaves}
    def layer(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    upward = {"analyzers": {"plotting", "demo"}, "plotting": {"demo"}, "models": {"analyzers", "plotting", "demo"}}
    wrong = [(name, target) for name, imported in graph.items() for target in imported
             if layer(target) in upward.get(layer(name), set())]
    assert not wrong


def test_cli_choices_are_the_librarys() -> None:
    from hpx_analysis import interventions
    from hpx_analysis.analyzers import erf, fgvis, kernels
    from hpx_analysis.analyzers.attribution import METHODS
    from hpx_analysis.analyzers.methods import REFERENCES
    from hpx_analysis_cli import options

    def values(enum) -> list:
        return [member.value for member in enum]

    assert values(options.Convention) == list(erf.CONVENTIONS)
    assert values(options.Amp) == list(erf.AMP_DTYPES)
    assert values(options.Gradient) == list(erf.GRADIENTS)
    assert values(options.Method) == list(METHODS)
    assert values(options.Reference) == list(REFERENCES)
    assert values(options.BoundActivations) == list(fgvis.BOUND_ACTIVATIONS)
    assert values(options.Shape) == list(interventions.SHAPES)
    assert values(options.HbCut) == list(interventions.HB_CUTS)
    assert values(options.Normalisation) == list(kernels.NORMALISATIONS)
    assert values(options.Orientation) == list(kernels.ORIENTATIONS)
