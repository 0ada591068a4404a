"""Randomized (transpose) convolutions: per-sample weight VJPs and input VJPs.

``hypothesis`` draws valid layer configurations (dimension 1 to 3, channels, groups,
kernel size, stride, padding including ``'same'``/``'valid'``, dilation, padding mode,
output padding) and inputs, and the tensor-network derivatives are compared with
``torch.func`` for every strategy.
"""

import re
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest import mark, raises

from backpack_tn.derivatives import STRATEGIES
from test_problems import references
from test_problems.cases import build_problem, expand_cases
from test_problems.compare import assert_allclose_report
from test_problems.random_layers import conv_layers
from test_problems.registry import tn_derivatives_class, weight_vjp_unsupported

FAST_SETTINGS = settings(max_examples=40, deadline=None)
THOROUGH_SETTINGS = settings(FAST_SETTINGS, max_examples=400)


@st.composite
def conv_problems(draw: st.DrawFn) -> tuple[dict[str, Any], int, list[int] | None]:
    """Draw a valid ``ConvNd`` or ``ConvTransposeNd`` case, ``V`` and sub-sampling.

    Args:
        draw: Hypothesis draw function.

    Returns:
        Case (see :mod:`test_problems.cases`) expanded to CPU and float64, the
        number of vectors and the sub-sampling indices (``None`` for all samples).
    """
    layer = draw(conv_layers())
    batch_size = draw(st.integers(1, 3))
    subsampling = draw(
        st.none()
        | st.lists(
            st.integers(0, batch_size - 1), min_size=1, max_size=batch_size, unique=True
        )
    )
    case = {
        "seed": draw(st.integers(0, 2**16)),
        "module_fn": layer.module_fn,
        "input_fn": lambda: torch.randn(batch_size, layer.in_channels, *layer.sizes),
    }
    (case,), _ = expand_cases([case], devices=["cpu"])
    return case, draw(st.integers(1, 3)), subsampling


def _check(
    case: dict[str, Any], num_vectors: int, subsampling: list[int] | None, strategy: str
):
    """Compare per-sample weight VJPs and input VJPs with ``torch.func``.

    Args:
        case: Expanded case.
        num_vectors: Number of vectors ``V``.
        subsampling: Indices of active samples, ``None`` for all.
        strategy: Strategy name.
    """
    problem = build_problem(case)
    module, x = problem.module, problem.x
    output = module.output if subsampling is None else module.output[subsampling]
    mat = torch.randn(num_vectors, *output.shape, dtype=x.dtype)
    derivatives = tn_derivatives_class(type(module))(strategy=strategy)
    name = f"{problem.case_id}, sub={subsampling}"

    result = derivatives.jac_t_mat_prod(
        module, None, None, mat.clone(), subsampling=subsampling
    )
    expected = references.jac_t_mat_prod(module, x, mat, subsampling=subsampling)
    assert_allclose_report(result, expected, name=f"jac_t_mat_prod {name}")

    def weight_vjp():
        return derivatives.param_mjp(
            "weight",
            module,
            None,
            None,
            mat.clone(),
            sum_batch=False,
            subsampling=subsampling,
        )

    if weight_vjp_unsupported(module, strategy):
        with raises(NotImplementedError, match=re.escape(repr(strategy))):
            weight_vjp()
        return

    expected = references.weight_jac_t_mat_prod(
        module, x, mat, sum_batch=False, subsampling=subsampling
    )
    assert_allclose_report(weight_vjp(), expected, name=f"weight VJP {name}")


@mark.parametrize("strategy", STRATEGIES)
@FAST_SETTINGS
@given(problem=conv_problems())
def test_random_conv(problem: tuple, strategy: str):
    """Random layers agree with ``torch.func`` (few examples).

    Args:
        problem: Drawn case, number of vectors and sub-sampling.
        strategy: Strategy name.
    """
    _check(*problem, strategy)


@mark.slow
@mark.parametrize("strategy", STRATEGIES)
@THOROUGH_SETTINGS
@given(problem=conv_problems())
def test_random_conv_thorough(problem: tuple, strategy: str):
    """Random layers agree with ``torch.func`` (many examples).

    Args:
        problem: Drawn case, number of vectors and sub-sampling.
        strategy: Strategy name.
    """
    _check(*problem, strategy)
