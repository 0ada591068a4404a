"""Random small networks around a drawn (transposed) convolution, every extension.

``hypothesis`` draws a layer from :func:`test_problems.random_layers.conv_layers`
(any dimension, groups, stride, padding including ``'same'``, padding mode,
dilation, output padding), an activation, optionally a second convolution, a
batch size and a loss; each extension of ``backpack_tn.extensions`` must then match
its brute-force reference on every parameter, as in ``test_extensions``.
"""

import math
from typing import Any

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pytest import mark
from torch import nn

from test_problems.cases import expand_cases
from test_problems.extension_references import NetworkReference
from test_problems.networks import (
    build_network,
    check_network_case,
    make_network_id,
    stock_limit,
)
from test_problems.random_layers import CONV, conv_layers
from tests.extensions.utils import (
    EXTENSION_IDS,
    EXTENSION_SETTINGS,
    assert_attributes_match,
    make_extension,
    reference_values,
    run_extension,
    tn_unsupported,
)

pytestmark = mark.filterwarnings(
    "ignore:The Kronecker factors stored in the weight parameters of transpose "
    "convolutions:UserWarning"
)

FAST_SETTINGS = settings(max_examples=6, deadline=None)
THOROUGH_SETTINGS = settings(FAST_SETTINGS, max_examples=150)
MAX_FEATURES = 200
"""Largest flattened feature count before the classifier (references are dense)."""

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}


@st.composite
def random_networks(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a network case: convolution, activation, (convolution,) flatten, linear.

    Args:
        draw: Hypothesis draw function.

    Returns:
        A network case (see :mod:`test_problems.networks`) expanded to CPU and
        float64.
    """
    layer = draw(conv_layers())
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    loss, reduction = (
        draw(st.sampled_from(sorted(LOSSES))),
        draw(st.sampled_from(["mean", "sum"])),
    )
    batch_size, classes = draw(st.integers(1, 3)), draw(st.integers(2, 3))
    first = layer.module_fn()
    with torch.no_grad():
        shape = first(torch.zeros(1, layer.in_channels, *layer.sizes)).shape
    dim = len(layer.sizes)
    second = draw(st.none() | st.integers(1, min(2, *shape[2:])))
    if second is not None:  # two channels out
        shape = (1, 2, *(size - second + 1 for size in shape[2:]))
    features = math.prod(shape[1:])
    assume(features <= MAX_FEATURES)

    def model_fn() -> nn.Sequential:
        modules = [layer.module_fn(), ACTIVATIONS[activation]()]
        if second is not None:
            modules += [CONV[dim](first.out_channels, 2, second), nn.ReLU()]
        return nn.Sequential(*modules, nn.Flatten(), nn.Linear(features, classes))

    def target_fn() -> torch.Tensor:
        if loss == "ce":
            return torch.randint(0, classes, (batch_size,))
        return torch.randn(batch_size, classes)

    case = {
        "seed": draw(st.integers(0, 2**16)),
        "model_fn": model_fn,
        "input_fn": lambda: torch.randn(batch_size, layer.in_channels, *layer.sizes),
        "target_fn": target_fn,
        "loss_fn": lambda: LOSSES[loss](reduction=reduction),
        "id": f"{first!r}-{activation}-second={second}-{loss}-{reduction}",
    }
    (case,), _ = expand_cases(
        [case],
        devices=["cpu"],
        check=check_network_case,
        make_case_id=make_network_id,
    )
    return case


def _check_every_extension(case: dict[str, Any]):
    """Every extension that ``backpack_tn`` runs on the network matches the reference.

    Extensions whose result on some module backpack_tn inherits from stock BackPACK
    with a known defect (``STOCK_LIMITS``) are left out, as ``test_extensions``
    marks them as expected failures.

    Args:
        case: Expanded network case.

    Raises:
        AssertionError: Naming the extension and the network, if one differs.
    """
    net = build_network(case)
    ref = NetworkReference(net.model, net.loss_func, net.x, net.y)
    checked = 0
    for setting, setting_id in zip(EXTENSION_SETTINGS, EXTENSION_IDS, strict=True):
        name = setting["name"]
        inherited = stock_limit(
            net.model, net.loss_func, net.x, name, inherited_only=True
        )
        if tn_unsupported(case, name) is not None or inherited is not None:
            continue
        actual = run_extension(case, make_extension(setting, "tn"))
        expected = reference_values(ref, setting)
        try:
            assert_attributes_match(actual, expected, setting, ref.params, net.tols)
        except AssertionError as error:
            raise AssertionError(
                f"{setting_id} on {case['case_id']}: {error}"
            ) from None
        checked += 1
    assert checked > 0, f"no extension ran on {case['case_id']}: {net.model}"


@FAST_SETTINGS
@given(case=random_networks())
def test_random_network(case: dict[str, Any]):
    """Random networks match their references (few examples).

    Args:
        case: Drawn network case.
    """
    _check_every_extension(case)


@mark.slow
@THOROUGH_SETTINGS
@given(case=random_networks())
def test_random_network_thorough(case: dict[str, Any]):
    """Random networks match their references (many examples).

    Args:
        case: Drawn network case.
    """
    _check_every_extension(case)
