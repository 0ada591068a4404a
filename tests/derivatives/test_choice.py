"""Tests of ``backpack_tn.derivatives.choice``: what ``auto`` picks, and autotuning."""

from functools import partial

import pytest
import torch
from torch import nn

from backpack_tn import set_autotune, set_host_probe
from backpack_tn.derivatives import (
    Conv2DDerivativesTN,
    Conv3DDerivativesTN,
    LinearDerivativesTN,
    choice,
    host,
)
from backpack_tn.derivatives.base import PRODUCT_ARGUMENTS
from backpack_tn.derivatives.implementations import IMPLEMENTATIONS, is_grouped_strided
from test_problems import references
from test_problems.compare import assert_allclose_report

#: (layer, input shape, op, expected choice)
RULE_CASES = [
    (lambda: nn.Conv2d(4, 6, 2, stride=2), (2, 4, 8, 8), "weight_jac_t_mat_prod", "tn"),
    (
        lambda: nn.Conv2d(4, 4, 3, groups=4),
        (2, 4, 8, 8),
        "weight_jac_t_mat_prod",
        "same_conv",
    ),
    (
        lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1),
        (2, 4, 48, 48),
        "weight_jac_t_mat_prod",
        "kernel",
    ),
    (
        lambda: nn.Conv2d(4, 4, 5, groups=4),
        (2, 4, 8, 8),
        "weight_jac_t_mat_prod",
        "same_conv",
    ),
    (
        lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2),
        (2, 4, 8, 8),
        "weight_jac_t_mat_prod",
        "same_conv",
    ),
    (
        lambda: nn.Conv2d(3, 6, 3),
        (2, 3, 16, 16),
        "weight_jac_t_mat_prod",
        "higher_conv",
    ),
    (lambda: nn.Conv2d(3, 6, 3), (2, 3, 64, 64), "weight_jac_t_mat_prod", "kernel"),
    (lambda: nn.Conv2d(16, 6, 3), (2, 16, 20, 20), "weight_jac_t_mat_prod", "kernel"),
    (
        lambda: nn.Conv2d(16, 6, 3, stride=2, padding=1),
        (2, 16, 20, 20),
        "weight_jac_t_mat_prod",
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(3, 6, 3, padding_mode="reflect", padding=1),
        (2, 3, 32, 32),
        "weight_jac_t_mat_prod",
        "kernel",
    ),
    (
        lambda: nn.Conv2d(16, 6, 3),
        (2, 16, 6, 6),
        "weight_jac_t_mat_prod",
        "tn_lowered",
    ),
    (lambda: nn.Conv3d(16, 6, 3), (2, 16, 4, 4, 4), "weight_jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(4, 6, 3), (2, 4, 8, 8), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(1, 6, 5, padding=2), (2, 1, 28, 28), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(8, 6, 3), (2, 8, 8, 8), "jac_t_mat_prod", "kernel"),
    (
        lambda: nn.Conv2d(3, 6, 3, padding=1),
        (2, 3, 128, 128),
        "jac_t_mat_prod",
        "kernel",
    ),
    (lambda: nn.Conv3d(1, 6, 3), (2, 1, 8, 8, 8), "jac_t_mat_prod", "kernel"),
    (lambda: nn.Conv2d(3, 6, 4, stride=4), (2, 3, 16, 16), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv1d(1, 6, 2, stride=3), (2, 1, 16), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(16, 6, 1), (2, 16, 8, 8), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(32, 6, 1), (2, 32, 8, 8), "jac_t_mat_prod", "kernel"),
    (lambda: nn.Conv2d(192, 32, 1), (2, 192, 35, 35), "jac_t_mat_prod", "kernel"),
    (lambda: nn.Conv2d(192, 32, 1), (32, 192, 35, 35), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(192, 32, 1), (16, 192, 35, 35), "jac_t_mat_prod", "tn"),
    (lambda: nn.Conv2d(64, 8, 1, stride=2), (2, 64, 8, 8), "jac_t_mat_prod", "tn"),
    (
        lambda: nn.Conv2d(512, 8, 1, stride=2),
        (2, 512, 4, 4),
        "jac_t_mat_prod",
        "kernel",
    ),
    (lambda: nn.Conv2d(8, 6, 2, stride=2), (2, 8, 8, 8), "jac_t_mat_prod", "kernel"),
    (
        lambda: nn.Conv2d(4, 6, 2, stride=2, groups=2),
        (2, 4, 8, 8),
        "jac_t_mat_prod",
        "kernel",
    ),
    (lambda: nn.Conv2d(4, 6, 3), (2, 4, 8, 8), "kfac_expand", "tn_lowered"),
    (
        lambda: nn.Conv2d(64, 8, 3, padding=1),
        (8, 64, 32, 32),
        "kfac_expand",
        "lag",
    ),
    (
        lambda: nn.Conv2d(64, 8, 3, stride=2, padding=1),
        (8, 64, 32, 32),
        "kfac_expand",
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(8, 8, 3, padding=1),
        (8, 8, 32, 32),
        "kfac_expand",
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
        (8, 64, 56, 56),
        "kfac_expand",
        "lag",
    ),
    (
        lambda: nn.Conv2d(64, 64, 7, padding=3, groups=64),
        (8, 64, 28, 28),
        "kfac_expand",
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(96, 8, 3, padding=1),
        (8, 96, 6, 6),
        "kfac_expand",
        "tn_lowered",
    ),
    (lambda: nn.Conv1d(4, 6, 5), (2, 4, 1024), "kfac_reduce", "tn_lowered"),
    (lambda: nn.Conv2d(4, 6, 3), (2, 4, 8, 8), "kfac_reduce", "tn"),
]


def _tensors(module, x, op):
    module.input0, module.output = x, module(x).detach()
    if op in ("kfac_expand", "kfac_reduce"):
        return {"x": x}
    mat = torch.randn(1, *module.output.shape)
    if op == "jac_t_mat_prod":
        return {"mat": mat}
    return {"x": x, "mat": mat, "sum_batch": False}


@pytest.mark.parametrize("module_fn, shape, op, expected", RULE_CASES)
def test_auto_rules(module_fn, shape, op, expected):
    """``explain`` names the evaluation the cost model picks, with a reason."""
    torch.manual_seed(0)
    module, x = module_fn(), torch.randn(shape)
    key, reason = Conv2DDerivativesTN().explain(op, module, **_tensors(module, x, op))
    assert key == expected, reason
    assert reason


def test_product_arguments_cover_every_product():
    """``explain`` knows the arguments of every product there is an evaluation of."""
    assert set(PRODUCT_ARGUMENTS) == set(IMPLEMENTATIONS)


def test_explain_defaults_the_input_and_sum_batch():
    """Without ``x`` and ``sum_batch``, ``explain`` uses ``input0`` and ``True``."""
    torch.manual_seed(0)
    module, x = nn.Conv2d(16, 6, 3), torch.randn(2, 16, 20, 20)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    explicit = Conv2DDerivativesTN().explain(
        "weight_diag_ggn", module, **{**tensors, "sum_batch": True}
    )
    implicit = Conv2DDerivativesTN().explain(
        "weight_diag_ggn", module, mat=tensors["mat"]
    )
    assert implicit == explicit


#: (product, arguments, words the error must contain)
EXPLAIN_ERROR_CASES = [
    ("weight_ggn", {}, ["unknown product", "'weight_ggn'", "weight_diag_ggn"]),
    ("weight_diag_ggn", {}, ["needs ['mat']", "Conv2d"]),
    ("kfac_reduce", {"mat": None}, ["['mat']", "does not take", "['x']"]),
]


@pytest.mark.parametrize("op, arguments, words", EXPLAIN_ERROR_CASES)
def test_explain_rejects_bad_arguments(op, arguments, words):
    """Unknown products and missing or foreign arguments raise a clear error."""
    module, x = nn.Conv2d(4, 6, 3), torch.randn(2, 4, 8, 8)
    module.input0, module.output = x, module(x).detach()
    with pytest.raises(ValueError) as info:
        Conv2DDerivativesTN().explain(op, module, **arguments)
    for word in words:
        assert word in str(info.value), str(info.value)


#: (layer, input shape, number of vectors, expected weight-VJP evaluation)
VECTOR_RULE_CASES = [
    (
        lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        (2, 8, 16, 16),
        10,
        "unfold",
    ),
    # one vector, strided: the kernel route from 512 input positions on (the
    # same-order convolution dilates its kernel by the stride), not for large kernels
    (
        lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        (2, 8, 24, 24),
        1,
        "kernel",
    ),
    (
        lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        (2, 8, 16, 16),
        1,
        "same_conv",
    ),
    (
        lambda: nn.Conv2d(64, 64, 5, stride=2, padding=2, groups=64),
        (2, 64, 48, 48),
        1,
        "same_conv",
    ),
    # several vectors: the lowered network on mid-sized maps, kernels on large
    # strided ones, the same-order convolution on tiny ones
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 16, 16), 10, "tn_lowered"),
    (
        lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        (2, 8, 64, 64),
        10,
        "kernel",
    ),
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 7, 7), 10, "same_conv"),
    (lambda: nn.Conv2d(8, 8, 7, padding=3, groups=8), (2, 8, 16, 16), 10, "same_conv"),
    # the same-order convolution's repeated input reaches 8 MiB (V = 10) / 16 MiB
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 8, 64, 64), 10, "kernel"),
    (
        lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
        (32, 64, 32, 32),
        1,
        "same_conv",
    ),
    (lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64), (64, 64, 32, 32), 1, "kernel"),
    (lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8), (8, 8, 64, 64), 10, "same_conv"),
    (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=4), (2, 32, 32, 32), 10, "kernel"),
    (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=2), (8, 32, 12, 12), 1, "kernel"),
    (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=2), (8, 32, 8, 8), 1, "kernel"),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 32, 32), 10, "higher_conv"),
    # a single input channel is not depthwise: the higher-order convolution, except
    # for several vectors of one sample on small maps (lowered) and strided layers
    (lambda: nn.Conv2d(1, 8, 5, padding=2), (4, 1, 28, 28), 1, "higher_conv"),
    (lambda: nn.Conv2d(1, 8, 3, padding=1), (1, 1, 128, 128), 10, "higher_conv"),
    (lambda: nn.Conv2d(1, 8, 3, padding=1), (1, 1, 64, 64), 10, "tn_lowered"),
    (lambda: nn.Conv2d(1, 8, 5), (1, 1, 28, 28), 10, "tn_lowered"),
    (lambda: nn.Conv2d(1, 8, 3, padding=1), (2, 1, 64, 64), 10, "higher_conv"),
    (lambda: nn.Conv2d(1, 8, 3, 2, padding=1), (1, 1, 28, 28), 10, "unfold"),
    # non-overlapping: the GEMM view, except for several vectors of several samples
    # on large maps with few weight entries per output channel
    (lambda: nn.Conv2d(8, 16, 1), (2, 8, 24, 24), 10, "kernel"),
    (lambda: nn.Conv2d(3, 16, 4, stride=4), (2, 3, 96, 96), 10, "kernel"),
    (lambda: nn.Conv2d(8, 16, 1), (1, 8, 24, 24), 10, "tn"),
    (lambda: nn.Conv2d(8, 16, 1), (2, 8, 14, 14), 10, "tn"),
    (lambda: nn.Conv2d(8, 16, 1), (2, 8, 24, 24), 1, "tn"),
    (lambda: nn.Conv2d(64, 16, 1), (2, 64, 24, 24), 10, "tn"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 32, 32), 10, "kernel"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 8, 8), 10, "tn_lowered"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (1, 16, 24, 24), 10, "kernel"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (1, 16, 12, 12), 10, "unfold"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8), 10, "unfold"),
    (lambda: nn.Conv2d(3, 16, 3, padding=1), (1, 3, 32, 32), 10, "kernel"),
    # strided with few input channels and several vectors: lowered from 48 unfolded
    # entries per output position (C_in * prod(K)) on, the kernel route below
    (lambda: nn.Conv2d(3, 16, 7, 2, padding=3), (4, 3, 64, 64), 10, "tn_lowered"),
    (lambda: nn.Conv2d(3, 16, 11, 4, padding=2), (1, 3, 96, 96), 10, "tn_lowered"),
    (lambda: nn.Conv2d(8, 16, 3, 2, padding=1), (4, 8, 56, 56), 10, "tn_lowered"),
    (lambda: nn.Conv2d(3, 16, 3, 2, padding=1), (4, 3, 112, 112), 10, "kernel"),
    # ... unless blocks of one sample would copy more than 8 MiB of its vectors
    (lambda: nn.Conv2d(3, 64, 7, 2, padding=3), (2, 3, 224, 224), 10, "kernel"),
    (lambda: nn.Conv2d(3, 64, 7, 2, padding=3), (1, 3, 224, 224), 10, "tn_lowered"),
    (lambda: nn.Conv2d(5, 16, 3, 2, padding=1), (4, 5, 64, 64), 10, "kernel"),
    (lambda: nn.Conv2d(16, 16, 3, 2, padding=1), (4, 16, 64, 64), 10, "kernel"),
    (lambda: nn.Conv2d(3, 16, 11, 4, padding=2), (4, 3, 96, 96), 1, "higher_conv"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (8, 16, 12, 12), 1, "kernel"),
    # medium maps with many channels: the lowered network from 4 samples on
    (lambda: nn.Conv2d(64, 96, 3), (4, 64, 14, 14), 1, "tn_lowered"),
    (lambda: nn.Conv2d(64, 96, 3), (2, 64, 14, 14), 1, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 64, 17, 17), 1, "kernel"),
    (lambda: nn.Conv2d(32, 64, 5, padding=2), (4, 32, 14, 14), 1, "kernel"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (4, 16, 12, 12), 1, "kernel"),
    (lambda: nn.Conv2d(16, 16, 3, 2, padding=1), (4, 16, 24, 24), 1, "tn_lowered"),
    (lambda: nn.Conv2d(16, 16, 3, 2), (4, 16, 37, 37), 1, "kernel"),
    (lambda: nn.Conv2d(16, 16, (7, 1), padding=(3, 0)), (4, 16, 17, 17), 1, "kernel"),
    (lambda: nn.Conv2d(16, 16, (1, 7), padding=(0, 3)), (4, 16, 17, 17), 1, "kernel"),
    (
        lambda: nn.Conv2d(3, 16, (1, 7), padding=(0, 3)),
        (4, 3, 17, 17),
        1,
        "higher_conv",
    ),
    (lambda: nn.Conv2d(16, 192, 3, padding=1), (4, 16, 17, 17), 1, "kernel"),
    (lambda: nn.Conv2d(3, 16, 7, 2, padding=3), (4, 3, 64, 64), 1, "higher_conv"),
    (lambda: nn.Conv2d(3, 16, 7, 2, padding=3), (4, 3, 224, 224), 1, "kernel"),
    (lambda: nn.Conv2d(16, 16, 3, padding=1), (4, 16, 8, 8), 1, "tn_lowered"),
]


@pytest.mark.parametrize("module_fn, shape, vectors, expected", VECTOR_RULE_CASES)
def test_auto_weight_vjp_rules_by_vectors(module_fn, shape, vectors, expected):
    """The weight-VJP evaluation depends on the number of vectors and the layer."""
    torch.manual_seed(0)
    module, x = module_fn(), torch.randn(shape)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    tensors["mat"] = torch.randn(vectors, *module.output.shape)
    key, reason = Conv2DDerivativesTN().explain(
        "weight_jac_t_mat_prod", module, **tensors
    )
    assert key == expected, reason


#: (layer, input shape, expected choice, part of the reason) for per-sample norms:
#: squared kernel VJPs win at up to ``KERNEL_SPEEDUP`` times the single network's
#: FLOPs; the single network lowers its patterns, padded or not, where that costs
#: fewer weighted FLOPs, and keeps them dense on small unstrided maps.
NORM_RULE_CASES = [
    (
        lambda: nn.Conv2d(160, 160, (1, 7), padding=(0, 3)),
        (4, 160, 17, 17),
        "kernel+square",
        "counted 2x faster by kernels",
    ),
    (
        lambda: nn.Conv2d(256, 256, 3, padding=1),
        (2, 256, 14, 14),
        "tn",
        "counted 2x faster by kernels",
    ),
    (
        lambda: nn.Conv2d(192, 192, 3, stride=2),
        (4, 192, 17, 17),
        "tn_lowered",
        "its patterns as strided views",
    ),
    (
        lambda: nn.Conv2d(192, 192, 3, stride=2, padding=1),
        (4, 192, 14, 14),
        "tn_lowered",
        "cheaper than with dense patterns",
    ),
    (lambda: nn.Conv2d(512, 512, 3, padding=1), (4, 512, 7, 7), "tn", "without"),
    # lowered VJPs decide near-ties against the single network
    (
        lambda: nn.Conv2d(96, 192, 3, padding=1),
        (4, 96, 16, 16),
        "tn_lowered+square",
        "counted 1.25x faster by one GEMM",
    ),
]


@pytest.mark.parametrize("module_fn, shape, expected, fragment", NORM_RULE_CASES)
def test_auto_batch_l2_rules(module_fn, shape, expected, fragment):
    """Per-sample norms: squared VJPs or the single network, dense or lowered."""
    torch.manual_seed(0)
    module, x = module_fn(), torch.randn(shape)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    del tensors["sum_batch"]
    key, reason = Conv2DDerivativesTN().explain("weight_batch_l2", module, **tensors)
    assert key == expected, reason
    assert fragment in reason


#: (layer, input shape, vectors, probe result, expected weight-VJP evaluation):
#: the higher-order convolution where the host probe ran it faster than the kernel
#: route, on many-channel maps of several samples with more than ``SMALL_MAP``
#: positions, or strided without padding from ``STRIDED_MAP`` positions on.
PROBE_RULE_CASES = [
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 64, 17, 17), 1, 1.2, "higher_conv"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 64, 17, 17), 1, 0.5, "kernel"),
    (lambda: nn.Conv2d(96, 192, 3, padding=1), (4, 96, 16, 16), 1, 1.05, "higher_conv"),
    (lambda: nn.Conv2d(96, 192, 3, padding=1), (4, 96, 16, 16), 1, 1.0, "tn_lowered"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 17, 17), 1, 1.2, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, 2, padding=1), (4, 64, 34, 34), 1, 1.2, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, 2), (4, 64, 35, 35), 1, 1.2, "higher_conv"),
    (lambda: nn.Conv2d(64, 64, 3, 2), (4, 64, 35, 35), 1, 0.5, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, 2), (4, 64, 17, 17), 1, 1.2, "tn_lowered"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 64, 8, 8), 1, 1.2, "tn_lowered"),
    (
        lambda: nn.Conv2d(64, 64, (7, 1), padding=(3, 0)),
        (4, 64, 17, 17),
        1,
        1.2,
        "kernel",
    ),
    # several vectors: unstrided, from MANY_POSITIONS on
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 24, 24), 10, 1.2, "higher_conv"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 24, 24), 10, 0.5, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 24, 24), 10, 1.2, "higher_conv"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 16, 16), 10, 1.2, "unfold"),
    (lambda: nn.Conv2d(64, 64, 3, 2), (2, 64, 49, 49), 10, 1.2, "kernel"),
]


@pytest.mark.parametrize(
    "module_fn, shape, vectors, speedup, expected", PROBE_RULE_CASES
)
def test_auto_follows_host_probe(module_fn, shape, vectors, speedup, expected):
    """The host probe's result moves many-channel layers between routes."""
    torch.manual_seed(0)
    module, x = module_fn(), torch.randn(shape)
    set_host_probe(False, speedup)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    tensors["mat"] = torch.randn(vectors, *module.output.shape)
    key, reason = Conv2DDerivativesTN().explain(
        "weight_jac_t_mat_prod", module, **tensors
    )
    assert key == expected, reason
    if key == "higher_conv":
        assert f"ran {speedup:.2f}x as fast" in reason


def _explain_vectors(module_fn, shape, vectors: int, *probes: float) -> tuple[str, str]:
    """``auto``'s weight-VJP choice for several vectors, with pinned probe results.

    Args:
        module_fn: Builds the layer.
        shape: Its input's shape.
        vectors: Number of vectors.
        *probes: Results pinned by ``set_host_probe(False, *probes)``.

    Returns:
        The evaluation's name and the reason.
    """
    torch.manual_seed(0)
    module, x = module_fn(), torch.randn(shape)
    set_host_probe(False, *probes)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    tensors["mat"] = torch.randn(vectors, *module.output.shape)
    return Conv2DDerivativesTN().explain("weight_jac_t_mat_prod", module, **tensors)


#: (layer, input shape, lowered-probe result, expected weight-VJP evaluation of
#: V = 10 vectors): the lowered network where the second host probe ran it faster
#: than the kernel route, on many-channel 2d maps from ``MANY_POSITIONS`` on
#: (grouped layers: one sample only); few channels and small maps keep their rules.
LOWERED_PROBE_CASES = [
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 24, 24), 1.4, "tn_lowered"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 24, 24), 1.1, "tn_lowered"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 24, 24), 0.95, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 24, 24), 1.4, "tn_lowered"),
    (lambda: nn.Conv2d(64, 64, 3, 2, padding=1), (2, 64, 48, 48), 1.4, "tn_lowered"),
    (lambda: nn.Conv2d(64, 64, 3, 2, padding=1), (2, 64, 48, 48), 0.6, "kernel"),
    (
        lambda: nn.Conv2d(64, 64, 3, 2, padding=1, groups=4),
        (1, 64, 48, 48),
        1.4,
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(64, 64, 3, 2, padding=1, groups=4),
        (2, 64, 48, 48),
        1.4,
        "kernel",
    ),
    (lambda: nn.Conv2d(3, 64, 3, padding=1), (1, 3, 32, 32), 1.4, "kernel"),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 16, 16), 1.4, "unfold"),
    (lambda: nn.Conv2d(1, 32, 5, padding=2), (2, 1, 28, 28), 1.4, "higher_conv"),
]


@pytest.mark.parametrize("module_fn, shape, speedup, expected", LOWERED_PROBE_CASES)
def test_auto_follows_lowered_probe(module_fn, shape, speedup, expected):
    """The second probe moves several vectors from the kernel route to the network."""
    key, reason = _explain_vectors(module_fn, shape, 10, 1.0, speedup)
    assert key == expected, reason
    if key == "tn_lowered":
        assert f"ran {speedup:.2f}x as fast" in reason


#: (module, input shape, vectors, depthwise probe result, expected evaluation)
DEPTHWISE_PROBE_CASES = [
    # 7x7 and 112x112 maps, outside the depthwise lowered range
    (
        lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
        (1, 64, 7, 7),
        10,
        2.2,
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
        (1, 64, 7, 7),
        10,
        1.0,
        "same_conv",
    ),
    (
        lambda: nn.Conv2d(8, 8, 3, 2, padding=1, groups=8),
        (1, 8, 112, 112),
        10,
        2.2,
        "tn_lowered",
    ),
    (
        lambda: nn.Conv2d(8, 8, 3, 2, padding=1, groups=8),
        (1, 8, 112, 112),
        10,
        1.0,
        "kernel",
    ),
    # large maps too: the lowered network's blocks split the groups
    (
        lambda: nn.Conv2d(96, 96, 3, 2, padding=1, groups=96),
        (1, 96, 112, 112),
        2,
        2.2,
        "tn_lowered",
    ),
    # kernels larger than 3x3, and one vector, do not follow the probe
    (
        lambda: nn.Conv2d(32, 32, 7, padding=3, groups=32),
        (1, 32, 14, 14),
        10,
        2.2,
        "same_conv",
    ),
    (
        lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
        (4, 64, 7, 7),
        1,
        2.2,
        "same_conv",
    ),
]


@pytest.mark.parametrize(
    "module_fn, shape, vectors, speedup, expected", DEPTHWISE_PROBE_CASES
)
def test_auto_follows_depthwise_probe(module_fn, shape, vectors, speedup, expected):
    """The depthwise probe moves several vectors of depthwise 3x3 layers to the TN."""
    key, reason = _explain_vectors(module_fn, shape, vectors, 1.0, 1.0, speedup)
    assert key == expected, reason
    assert ("host probe" in reason) == (key == "tn_lowered"), reason


#: (module, input shape, narrow probe result, expected evaluation); 10 vectors
NARROW_PROBE_CASES = [
    (lambda: nn.Conv2d(24, 144, 1, bias=False), (2, 24, 32, 32), 2.0, "tn"),
    (lambda: nn.Conv2d(24, 144, 1, bias=False), (2, 24, 32, 32), 1.0, "kernel"),
    # larger non-overlapping kernels and single samples do not follow the probe
    (lambda: nn.Conv2d(3, 32, 4, 4), (2, 3, 128, 128), 2.0, "kernel"),
    (lambda: nn.Conv2d(24, 144, 1, bias=False), (1, 24, 32, 32), 0.5, "tn"),
]


@pytest.mark.parametrize("module_fn, shape, speedup, expected", NARROW_PROBE_CASES)
def test_auto_follows_narrow_probe(module_fn, shape, speedup, expected):
    """The narrow probe keeps several vectors of narrow 1x1 layers on the GEMM view."""
    key, reason = _explain_vectors(module_fn, shape, 10, 1.0, 1.0, 1.0, speedup)
    assert key == expected, reason
    assert ("host probe" in reason) == (key == "tn" and shape[0] > 1), reason


@pytest.mark.parametrize("speedup", [0.9, 1.4])
def test_single_channel_lowers_one_sample_on_any_probe(speedup: float):
    """One sample of a single input channel is lowered whatever the probe says."""
    layer = partial(nn.Conv2d, 1, 32, 5, padding=2)
    key, reason = _explain_vectors(layer, (1, 1, 28, 28), 10, 1.0, speedup)
    assert key == "tn_lowered", reason
    assert "single input channel" in reason and "host probe" not in reason


def test_lowered_probe_rule_bounds_the_unfolded_input(monkeypatch):
    """Past ``LOWERED_UNFOLDED_BYTES`` of unfolded input the kernel route stays."""
    module, x = nn.Conv2d(64, 64, 3, padding=1), torch.randn(2, 64, 24, 24)
    set_host_probe(False, 1.0, 1.4)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    tensors["mat"] = torch.randn(10, *module.output.shape)
    unfolded = 2 * 64 * 9 * 24 * 24 * 4
    derivatives = Conv2DDerivativesTN()
    for bound, expected in [(unfolded, "tn_lowered"), (unfolded - 1, "kernel")]:
        monkeypatch.setattr(choice, "LOWERED_UNFOLDED_BYTES", bound)
        set_host_probe(False, 1.0, 1.4)  # clears the cached decisions
        key, reason = derivatives.explain("weight_jac_t_mat_prod", module, **tensors)
        assert key == expected, reason


@pytest.mark.parametrize(
    "speedup",
    [
        host.higher_conv_speedup,
        host.lowered_speedup,
        host.depthwise_lowered_speedup,
        host.narrow_speedup,
    ],
    ids=lambda f: f.__name__,
)
def test_host_probe_measures_once_and_can_be_turned_off(speedup):
    """A probe times both routes once per process; off, the ratio is neutral.

    It leaves the global random state as it found it.
    """
    assert speedup() == 1.0
    set_host_probe(True)
    state = torch.get_rng_state()
    measured = speedup()
    assert torch.equal(torch.get_rng_state(), state)
    assert 0.0 < measured < float("inf")
    assert speedup() == measured
    set_host_probe(False)
    assert speedup() == 1.0


@pytest.mark.parametrize("switch", ["set_autotune", "strategy"])
def test_autotune_measures_and_stays_exact(switch: str):
    """Autotuning measures the candidates, explains the times and stays exact.

    Either ``auto`` after ``set_autotune(True)`` or the strategy ``autotune``.
    """
    torch.manual_seed(0)
    module = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    tensors = _tensors(module, x, "weight_jac_t_mat_prod")
    tensors["mat"] = tensors["mat"].double()
    strategy = "autotune" if switch == "strategy" else "auto"
    derivatives = Conv2DDerivativesTN(strategy=strategy)
    set_autotune(switch == "set_autotune")
    try:
        key, reason = derivatives.explain("weight_jac_t_mat_prod", module, **tensors)
        assert reason.startswith("fastest candidate measured"), reason
        for candidate in ("kernel", "unfold", "tn_lowered"):
            assert f"{candidate} " in reason, reason
        assert key in reason, reason
        actual = derivatives.param_mjp(
            "weight", module, None, None, tensors["mat"], sum_batch=False
        )
        again = derivatives.explain("weight_jac_t_mat_prod", module, **tensors)
        assert again == (key, reason), "the measurement is cached"
    finally:
        set_autotune(False)
    expected = references.weight_jac_t_mat_prod(
        module, x, tensors["mat"], sum_batch=False
    )
    assert_allclose_report(actual, expected, name=f"autotuned {key}")


def test_unknown_strategy_and_unavailable_stock_route():
    """Unknown strategies and stock routes that cannot apply raise clearly."""
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        Conv2DDerivativesTN(strategy="fast")
    module = nn.Conv3d(2, 3, 2)
    x = torch.randn(1, 2, 4, 4, 4)
    module.input0, module.output = x, module(x).detach()
    mat = torch.randn(1, *module.output.shape)
    with pytest.raises(NotImplementedError, match="'higher_conv' needs a 4d"):
        Conv3DDerivativesTN(strategy="higher_conv").param_mjp(
            "weight", module, None, None, mat
        )


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.Conv2d(8, 8, 3, stride=2, groups=4), True),
        (nn.Conv2d(8, 8, 3, stride=(1, 2), groups=2), True),
        (nn.Conv2d(8, 8, 3, groups=4), False),
        (nn.Conv2d(8, 8, 3, stride=2, groups=8), False),
        (nn.Conv2d(8, 8, 3, stride=2), False),
    ],
)
def test_grouped_strided_input_vjp_route(module, expected):
    """Strided convolutions with multi-channel groups take autograd's input VJP."""
    assert is_grouped_strided(module) == expected


#: (layer, input shape, op, expected choice on GPU, part of the reason)
GPU_RULE_CASES = [
    (lambda: nn.Linear(512, 256), (8, 512), "weight_batch_l2", "tn+square", "entries"),
    (lambda: nn.Linear(2048, 2048), (8, 2048), "weight_batch_l2", "tn_lowered", ""),
    (lambda: nn.Linear(256, 10), (2, 256), "weight_diag_ggn", "tn+square", "entries"),
    (
        lambda: nn.Conv2d(64, 64, 3, padding=1),
        (8, 64, 16, 16),
        "weight_batch_l2",
        "tn_lowered+square",
        "strided view",
    ),
    (
        lambda: nn.Conv2d(4, 6, 3),
        (2, 4, 8, 8),
        "weight_jac_t_mat_prod",
        "tn_lowered",
        "",
    ),
    (lambda: nn.Conv2d(4, 6, 3), (2, 4, 8, 8), "kfac_reduce", "tn_lowered", ""),
]


@pytest.mark.parametrize("module_fn, shape, op, expected, fragment", GPU_RULE_CASES)
def test_auto_rules_on_gpu(module_fn, shape, op, expected, fragment, monkeypatch):
    """On GPU, launches decide: lowered networks, squared small Linear gradients."""
    monkeypatch.setattr(choice, "_on_gpu", lambda tensors: True)
    monkeypatch.setattr(choice, "_CHOSEN", {})
    torch.manual_seed(0)
    module, x = module_fn(), torch.randn(shape)
    tensors = _tensors(module, x, op)
    if op == "weight_batch_l2":
        del tensors["sum_batch"]
    if op == "weight_diag_ggn":
        tensors["mat"] = torch.randn(10, *module.output.shape)
    derivatives = (
        LinearDerivativesTN()
        if isinstance(module, nn.Linear)
        else Conv2DDerivativesTN()
    )
    key, reason = derivatives.explain(op, module, **tensors)
    assert key == expected, reason
    assert "GPU" in reason and fragment in reason
