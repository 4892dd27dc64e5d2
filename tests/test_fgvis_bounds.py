"""FGVis activation bounds follow the spravil/FGVis reference: the rule bounds ReLU outputs, which in a
MetaFormer are the ReLUs inside timm's StarReLU (``s * relu(x)**2 + b``) and SquaredReLU.

Known answer by hand, StarReLU with s = 1, b = -0.5 on six pre-activations (clean x0 -> current x):

====  =====  =====  ========================  ===========================  ==========
case  x0     x      ReLU: r in [0, relu(x0)]   outer: a in [min(a0,0), max]  expected
====  =====  =====  ========================  ===========================  ==========
A     0.5    0.25   0.25 in [0, 0.5]: pass     -0.4375 vs [-0.25, 0]: block  2 r = 0.5
B     0.5    0.625  0.625 > 0.5: block         -0.109 in [-0.25, 0]: pass    0
C     1.0    0.75   pass                       0.0625 in [0, 0.5]: pass      2 r = 1.5
D     1.0    1.25   block                      1.0625 > 0.5: block           0
E     -1.0   0.5    0.5 > 0: block             -0.25 in [-0.5, 0]: pass      0
F     -1.0   -0.5   pass (r = 0)               -0.5 in [-0.5, 0]: pass       0 (ReLU's slope)
====  =====  =====  ========================  ===========================  ==========

The gradient of sum(StarReLU(x)) is ``2 s relu(x)`` where the bound passes, 0 elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.metaformer import SquaredReLU, StarReLU
from torch import nn

from hpx_analysis.analyzers.fgvis import ALL_ACTIVATIONS, RELU_ACTIVATIONS, activation_bounds, activation_modules

CLEAN = torch.tensor([[0.5, 0.5, 1.0, 1.0, -1.0, -1.0]])
CURRENT = torch.tensor([[0.25, 0.625, 0.75, 1.25, 0.5, -0.5]])
EXPECTED_GRAD = torch.tensor([[0.5, 0.0, 1.5, 0.0, 0.0, 0.0]])
OUTER_RULE_GRAD = torch.tensor([[0.0, 1.25, 1.5, 0.0, 1.0, 0.0]])  # what bounding s * relu(x)**2 + b gives


def bounded_gradient(model: nn.Module, clean: torch.Tensor, current: torch.Tensor, types) -> torch.Tensor:
    """d sum(model(current)) / d current with the bounds recorded on ``clean``."""
    with activation_bounds(model, types) as bounds:
        with bounds.record(), torch.no_grad():
            model(clean)
        bounds.select(torch.arange(len(current)))
        x = current.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(x).sum(), x)
    return grad


@pytest.mark.parametrize("types", [RELU_ACTIVATIONS, ALL_ACTIVATIONS], ids=["relu", "all"])
def test_star_relu_with_negative_bias_is_bounded_at_its_relu(types) -> None:
    star = StarReLU(scale_value=1.0, bias_value=-0.5)
    assert [path for path, _ in activation_modules(star, types)] == ["relu"]
    grad = bounded_gradient(star, CLEAN, CURRENT, types)
    torch.testing.assert_close(grad, EXPECTED_GRAD, rtol=0, atol=0)
    assert not torch.equal(grad, OUTER_RULE_GRAD)  # the two rules disagree on A, B and E


def test_outer_rule_is_what_the_table_says() -> None:
    """The table's outer column, computed by bounding the whole StarReLU as a (wrong) single activation."""
    star = StarReLU(scale_value=1.0, bias_value=-0.5)
    torch.testing.assert_close(bounded_gradient(star, CLEAN, CURRENT, (StarReLU,)), OUTER_RULE_GRAD, rtol=0, atol=0)


def test_squared_relu_and_plain_relu_follow_the_same_rule() -> None:
    squared = SquaredReLU()
    assert [path for path, _ in activation_modules(squared)] == ["relu"]
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0]])  # r <= relu(x0): A and C (F has slope 0)
    torch.testing.assert_close(bounded_gradient(squared, CLEAN, CURRENT, RELU_ACTIVATIONS),
                               keep * 2 * CURRENT.clamp(min=0), rtol=0, atol=0)
    torch.testing.assert_close(bounded_gradient(nn.ReLU(), CLEAN, CURRENT, RELU_ACTIVATIONS), keep, rtol=0, atol=0)


def test_relu_rule_leaves_gelu_unbounded_and_all_bounds_it() -> None:
    net = nn.Sequential(StarReLU(bias_value=-0.5), nn.GELU(), nn.Sequential(SquaredReLU()))
    assert [p for p, _ in activation_modules(net, RELU_ACTIVATIONS)] == ["0.relu", "2.0.relu"]
    assert [p for p, _ in activation_modules(net, ALL_ACTIVATIONS)] == ["0.relu", "1", "2.0.relu"]
    star = StarReLU()
    assert activation_modules(star, (StarReLU, nn.ReLU)) == [("", star)]  # a listed module covers what it holds


def test_activations_inside_long_filters_stay_unbounded(tiny_config, tiny_weights) -> None:
    """The implicit filters' sine activations depend on positions only: even when listed they are not bounded."""
    from hpx_analysis.models.long_filters import Sin
    from hpx_analysis.models.zoo import load_model

    tiny = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    assert any(isinstance(m, Sin) for m in tiny.modules())
    assert activation_modules(tiny, (Sin,)) == []
    found = activation_modules(tiny, ALL_ACTIVATIONS)
    assert [p for p, _ in found] == [p for p, _ in activation_modules(tiny, RELU_ACTIVATIONS)]
    parents = [type(tiny.get_submodule(path.rsplit(".", 1)[0])) for path, _ in found]
    assert parents == [StarReLU] * 4 + [SquaredReLU]  # four MLPs, then the head
