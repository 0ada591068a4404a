"""Tests of ``backpack_tn.expressions``: every builder, simplified and not.

Each expression's ``einsum_expression`` must evaluate (with plain
``torch.einsum``) to the same tensor with and without simplification, and to the
same tensor as its network contracted with output-side rewiring and full
lowering. The input-side factors are also checked against their definitions.
"""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from backpack_tn.expressions import (
    bias_jac_t_mat_prod,
    fold_input,
    jac_mat_prod,
    jac_t_mat_prod,
    kfac_expand,
    kfac_reduce,
    unfold_input,
    weight_batch_l2,
    weight_diag_ggn,
    weight_jac_mat_prod,
    weight_jac_t_mat_prod,
)
from backpack_tn.expressions.layer_spec import LayerSpec, spec_of
from test_problems import references
from test_problems.cases import Problem
from test_problems.compare import assert_allclose_report

V = 2


def _out_mat(problem: Problem) -> Tensor:
    return torch.randn(V, *problem.module.output.shape).to(problem.x)


#: name -> (module, build(spec, problem) -> positional args after spec)
EXPRESSIONS: dict[str, tuple[object, Callable]] = {
    "jac_mat_prod": (
        jac_mat_prod,
        lambda p: (p.module.weight, torch.randn(V, *p.x.shape).to(p.x)),
    ),
    "jac_t_mat_prod": (jac_t_mat_prod, lambda p: (p.module.weight, _out_mat(p))),
    "weight_jac_mat_prod": (
        weight_jac_mat_prod,
        lambda p: (p.x, torch.randn(V, *p.module.weight.shape).to(p.x)),
    ),
    "weight_jac_t_mat_prod": (weight_jac_t_mat_prod, lambda p: (p.x, _out_mat(p))),
    "per_sample_weight_jac_t_mat_prod": (
        weight_jac_t_mat_prod,
        lambda p: (p.x, _out_mat(p), False),
    ),
    "bias_jac_t_mat_prod": (bias_jac_t_mat_prod, lambda p: (_out_mat(p),)),
    "unfold_input": (unfold_input, lambda p: (p.x,)),
    "kfac_expand": (kfac_expand, lambda p: (p.x,)),
    "kfac_reduce": (kfac_reduce, lambda p: (p.x,)),
    "weight_diag_ggn": (weight_diag_ggn, lambda p: (p.x, _out_mat(p), False)),
    "weight_batch_l2": (weight_batch_l2, lambda p: (p.x, _out_mat(p))),
}


@pytest.mark.parametrize("name", EXPRESSIONS)
def test_simplified_equals_unsimplified(layer_problem: Problem, name: str):
    """Simplification, lowering and output-side rewiring are exact."""
    module, build = EXPRESSIONS[name]
    spec = spec_of(layer_problem.module)
    torch.manual_seed(0)
    args = build(layer_problem)
    raw_eq, raw_ops, shape = module.einsum_expression(spec, *args, simplify=False)
    expected = torch.einsum(raw_eq, *raw_ops).reshape(shape)
    simp_eq, simp_ops, simp_shape = module.einsum_expression(spec, *args)
    assert simp_shape == shape
    tols = layer_problem.tols
    actual = torch.einsum(simp_eq, *simp_ops).reshape(shape)
    assert_allclose_report(actual, expected, name=f"{name} simplified", **tols)
    net, _ = module.tensor_network(spec, *args)
    for lower_all in (False, True):
        actual = net.simplify(lower_all=lower_all).contract().reshape(shape)
        assert_allclose_report(
            actual, expected, name=f"{name} lower_all={lower_all}", **tols
        )


def test_fold_is_adjoint_of_unfold(conv_problem: Problem):
    """<fold(U), x> = <U, unfold(x)> for random patches U."""
    spec = spec_of(conv_problem.module)
    x = conv_problem.x
    torch.manual_seed(1)
    patches = torch.randn(fold_input.unfolded_shape(spec, x.shape[0])).to(x)
    for simplify in (False, True):
        equation, operands, shape = unfold_input.einsum_expression(spec, x, simplify)
        unfolded = torch.einsum(equation, *operands).reshape(shape)
        net, shape = fold_input.tensor_network(spec, patches)
        folded = net.simplify(lower_all=simplify).contract().reshape(shape)
        assert_allclose_report(
            (folded * x).sum(), (patches * unfolded).sum(), name="adjoint"
        )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_input_factor_definition(conv_problem: Problem, approx: str):
    """KFAC-expand/-reduce input factors match their definitions."""
    spec = spec_of(conv_problem.module)
    module = {"expand": kfac_expand, "reduce": kfac_reduce}[approx]
    equation, operands, shape = module.einsum_expression(spec, conv_problem.x)
    actual = torch.einsum(equation, *operands).reshape(shape)
    expected = references.kfac_input_factor(conv_problem.module, conv_problem.x, approx)
    assert_allclose_report(actual, expected, name=approx, **conv_problem.tols)


def test_linear_weight_sharing_factors():
    """Linear with inputs [N, *, d] treats the shared positions as positions."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    spec = LayerSpec.from_module(torch.nn.Linear(5, 2), x.shape)
    flat = x.flatten(1, 2)  # [N, R, d]
    expand = torch.einsum("nri,nrj->ij", flat, flat) / 3
    mean = flat.mean(1)
    reduce = torch.einsum("ni,nj->ij", mean, mean) / 3
    for module, expected in ((kfac_expand, expand), (kfac_reduce, reduce)):
        equation, operands, shape = module.einsum_expression(spec, x)
        actual = torch.einsum(equation, *operands).reshape(shape)[0]
        assert_allclose_report(actual, expected, name=module.__name__)


@pytest.mark.parametrize(
    "module_fn, shape, error, match",
    [
        (lambda: torch.nn.Linear(3, 2), (4, 5), ValueError, "in_features=3"),
        (lambda: torch.nn.Conv2d(3, 2, 1), (4, 3, 5), ValueError, "4 dimensions"),
        (lambda: torch.nn.Conv2d(3, 2, 1), (4, 2, 5, 5), ValueError, "in_channels=3"),
        (
            lambda: torch.nn.ConvTranspose2d(2, 2, 2, padding_mode="zeros"),
            (1, 2, 3),
            ValueError,
            "4 dimensions",
        ),
        (torch.nn.ReLU, (1, 2), NotImplementedError, "no tensor network"),
    ],
)
def test_layer_spec_errors(module_fn, shape, error, match):
    """Unsupported layers and wrong shapes get clear errors."""
    with pytest.raises(error, match=match):
        LayerSpec.from_module(module_fn(), shape)
