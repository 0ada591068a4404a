"""Tests of ``backpack_tn._checks``: bad input gets a clear error before any work."""

import pytest
import torch
from torch import nn

from backpack_tn.derivatives import Conv2DDerivativesTN


@pytest.fixture
def conv() -> nn.Conv2d:
    """A convolution with ``input0`` and ``output`` stored.

    Returns:
        The layer, input ``[2, 3, 6, 6]``, output ``[2, 4, 4, 4]``.
    """
    module = nn.Conv2d(3, 4, 3)
    module.input0 = torch.randn(2, 3, 6, 6)
    module.output = module(module.input0).detach()
    return module


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda d, m: d.jac_t_mat_prod(m, None, None, torch.randn(1, 2, 5, 4, 4)),
            r"Conv2d.jac_t_mat_prod: mat has shape \[1, 2, 5, 4, 4\], expected"
            r" \[V, 2, 4, 4, 4\]",
        ),
        (
            lambda d, m: d.param_mjp(
                "weight", m, None, None, torch.randn(1, 2, 4, 4, 4), subsampling=[0]
            ),
            r"param_mjp: mat has shape \[1, 2, 4, 4, 4\], expected \[V, 1, 4, 4, 4\]",
        ),
        (
            lambda d, m: d.jac_mat_prod(m, None, None, torch.randn(3, 6, 6)),
            r"jac_mat_prod: mat has shape \[3, 6, 6\], expected \[V, 2, 3, 6, 6\]",
        ),
        (
            lambda d, m: d.weight_jac_mat_prod(m, None, None, torch.randn(2, 4, 3, 3)),
            r"weight_jac_mat_prod: mat has shape \[2, 4, 3, 3\]",
        ),
    ],
)
def test_wrong_shapes(conv, call, match):
    """Shapes are checked against the layer, naming the product and both shapes."""
    with pytest.raises(ValueError, match=match):
        call(Conv2DDerivativesTN(), conv)


def test_unknown_parameter(conv):
    """``param_mjp`` names the unknown parameter and the supported ones."""
    with pytest.raises(ValueError, match=r"unknown parameter 'scale'.*'weight'"):
        Conv2DDerivativesTN().param_mjp(
            "scale", conv, None, None, torch.randn(1, 2, 4, 4, 4)
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda d, m: d.bias_jac_mat_prod(m, None, None, torch.randn(1, 4)),
        lambda d, m: d.param_mjp("bias", m, None, None, torch.randn(1, 2, 4, 4, 4)),
    ],
    ids=["bias_jac_mat_prod", "param_mjp"],
)
def test_bias_products_without_bias(call):
    """A layer built with ``bias=False`` says so when asked for a bias product."""
    module = nn.Conv2d(3, 4, 3, bias=False)
    module.input0 = torch.randn(2, 3, 6, 6)
    module.output = module(module.input0).detach()
    with pytest.raises(ValueError, match=r"Conv2d\..*: the layer has no bias"):
        call(Conv2DDerivativesTN(), module)


def test_wrong_dtype_and_device(conv):
    """Dtype and device must match the weight's."""
    derivatives = Conv2DDerivativesTN()
    with pytest.raises(TypeError, match="mat has dtype torch.float64, but the weight"):
        derivatives.jac_t_mat_prod(
            conv, None, None, torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="mat is on device meta, but the weight"):
        derivatives.jac_t_mat_prod(
            conv, None, None, torch.randn(1, 2, 4, 4, 4, device="meta")
        )


def test_missing_hooks():
    """A layer that never ran through an extended forward pass says so."""
    with pytest.raises(ValueError, match="Conv2d has no 'input0'.*backpack.extend"):
        Conv2DDerivativesTN().jac_t_mat_prod(
            nn.Conv2d(3, 4, 3), None, None, torch.randn(1, 2, 4, 4, 4)
        )


@pytest.mark.parametrize("strategy", ["auto", "tn"])
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(2, 3, 6, 6, dtype=torch.float64), TypeError, "x has dtype"),
        (torch.randn(2, 3, 6, 6, device="meta"), ValueError, "x is on device meta"),
        ([[1.0]], TypeError, "x must be a Tensor"),
    ],
    ids=["dtype", "device", "not-a-tensor"],
)
def test_forward_rejects_mismatched_input(strategy, x, error, match):
    """``forward`` names the layer and the mismatch, whichever evaluation runs."""
    with pytest.raises(error, match=f"Conv2d: {match}"):
        Conv2DDerivativesTN(strategy=strategy).forward(nn.Conv2d(3, 4, 3), x)
