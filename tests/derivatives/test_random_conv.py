"""Randomized (transpose) convolutions: per-sample weight VJPs and input VJPs.

``hypothesis`` draws valid layer configurations (dimension 1 to 3, channels, groups,
kernel size, stride, padding including ``'same'``/``'valid'``, dilation, padding mode,
output padding) and inputs, and the tensor-network derivatives are compared with
``torch.func`` for every strategy.
"""

import re
from math import ceil
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest import mark, raises
from torch import nn

from backpack_tn.derivatives import STRATEGIES
from test_problems import references
from test_problems.cases import build_problem, expand_cases
from test_problems.compare import assert_allclose_report
from test_problems.registry import tn_derivatives_class, weight_vjp_unsupported

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
MAX_EXTRA_SIZE = {1: 4, 2: 3, 3: 1}
"""How much larger than the smallest valid size an input may be, per dimension."""

FAST_SETTINGS = settings(max_examples=40, deadline=None)
THOROUGH_SETTINGS = settings(FAST_SETTINGS, max_examples=400)


def _conv_sizes(
    draw: st.DrawFn,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    pads: list[tuple[int, int]],
    padding_mode: str,
) -> tuple[int, ...]:
    """Draw spatial input sizes for which a convolution is valid.

    Args:
        draw: Hypothesis draw function.
        kernel: Kernel size per axis.
        dilation: Dilation per axis.
        pads: Padding ``(left, right)`` per axis.
        padding_mode: Padding mode; ``reflect`` needs inputs larger than the padding,
            ``circular`` inputs at least as large.

    Returns:
        Input sizes per axis.
    """
    dim = len(kernel)
    sizes = []
    for k, d, (left, right) in zip(kernel, dilation, pads, strict=True):
        smallest = max(1, d * (k - 1) + 1 - left - right)
        if padding_mode == "reflect":
            smallest = max(smallest, max(left, right) + 1)
        elif padding_mode == "circular":
            smallest = max(smallest, left, right)
        sizes.append(smallest + draw(st.integers(0, MAX_EXTRA_SIZE[dim])))
    return tuple(sizes)


@st.composite
def conv_problems(draw: st.DrawFn) -> tuple[dict[str, Any], int, list[int] | None]:
    """Draw a valid ``ConvNd`` or ``ConvTransposeNd`` case, ``V`` and sub-sampling.

    Args:
        draw: Hypothesis draw function.

    Returns:
        Case (see :mod:`test_problems.cases`) expanded to CPU and float64, the
        number of vectors and the sub-sampling indices (``None`` for all samples).
    """
    dim = draw(st.integers(1, 3))
    transpose = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    batch_size = draw(st.integers(1, 3))
    bias = draw(st.booleans())

    def per_axis(low: int, high: int) -> tuple[int, ...]:
        return tuple(draw(st.integers(low, high)) for _ in range(dim))

    kernel, stride, dilation = per_axis(1, 3), per_axis(1, 3), per_axis(1, 2)

    if transpose:
        padding = per_axis(0, 2)
        output_padding = tuple(
            draw(st.integers(0, max(s, d) - 1))
            for s, d in zip(stride, dilation, strict=True)
        )
        # output size (L - 1) * s - 2 * p + d * (k - 1) + op + 1 must be positive
        sizes = tuple(
            max(1, 1 + ceil((2 * p - d * (k - 1) - op) / s))
            + draw(st.integers(0, MAX_EXTRA_SIZE[dim]))
            for k, s, d, p, op in zip(
                kernel, stride, dilation, padding, output_padding, strict=True
            )
        )

        def module_fn() -> nn.Module:
            return CONV_TRANSPOSE[dim](
                c_in,
                c_out,
                kernel,
                stride=stride,
                padding=padding,
                output_padding=output_padding,
                groups=groups,
                bias=bias,
                dilation=dilation,
            )

    else:
        choices = ["int", "valid"] + (["same"] if set(stride) == {1} else [])
        padding_kind = draw(st.sampled_from(choices))
        if padding_kind == "int":
            padding = per_axis(0, 2)
            pads = [(p, p) for p in padding]
        elif padding_kind == "valid":
            padding, pads = "valid", [(0, 0)] * dim
        else:
            totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            padding, pads = "same", [(t // 2, t - t // 2) for t in totals]
        padding_mode = draw(st.sampled_from(PADDING_MODES))
        sizes = _conv_sizes(draw, kernel, dilation, pads, padding_mode)

        def module_fn() -> nn.Module:
            return CONV[dim](
                c_in,
                c_out,
                kernel,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
                padding_mode=padding_mode,
            )

    subsampling = draw(
        st.none()
        | st.lists(
            st.integers(0, batch_size - 1), min_size=1, max_size=batch_size, unique=True
        )
    )
    case = {
        "seed": draw(st.integers(0, 2**16)),
        "module_fn": module_fn,
        "input_fn": lambda: torch.randn(batch_size, c_in, *sizes),
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
