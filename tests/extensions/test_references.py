"""Guard the brute-force references of :mod:`test_problems.extension_references`.

The references are checked against each other (two independent routes to the same
quantity) and against stock BackPACK wherever stock BackPACK is right.
"""

import re
from typing import Any

import torch
from pytest import mark, raises, skip
from torch.nn import CrossEntropyLoss, L1Loss, Linear, Module, Sequential, Softmax

from test_problems.compare import assert_allclose_report
from test_problems.extension_references import (
    NetworkReference,
    exact_loss_sqrt,
    kronecker_input_factor,
    kronecker_output_factor,
    sampled_loss_sqrt,
)
from test_problems.networks import (
    NETWORK_BASE_CASES,
    build_network,
    check_network_case,
)
from tests.extensions.utils import (
    EXTENSION_SETTINGS,
    assert_attributes_match,
    make_extension,
    network_reference,
    reference_values,
    run_extension,
    setting_id,
    stock_unsupported,
)

pytestmark = mark.filterwarnings(
    "ignore:The Kronecker factors stored in the weight parameters of transpose "
    "convolutions:UserWarning"
)

STOCK_SETTINGS = [
    setting
    for setting in EXTENSION_SETTINGS
    if setting.get("tn_kwargs", {}).get("kfac_approx", "expand") == "expand"
]
"""Settings stock BackPACK can run: it has no ``kfac_approx`` (it uses expand)."""

PIECEWISE_LINEAR = ("ReLU", "MaxPool1d", "MaxPool2d", "AvgPool2d", "AvgPool3d")


@mark.parametrize(
    "setting", STOCK_SETTINGS, ids=[setting_id(s) for s in STOCK_SETTINGS]
)
def test_reference_matches_stock(network_case: dict[str, Any], setting: dict):
    """Stock BackPACK agrees with the reference where it is known to be right.

    Args:
        network_case: Expanded network case.
        setting: Extension setting.
    """
    reason = stock_unsupported(network_case, setting["name"])
    if reason is not None:
        skip(reason)
    ref = network_reference(network_case)
    actual = run_extension(network_case, make_extension(setting, "stock"))
    expected = reference_values(ref, setting, stock_convention=True)
    assert_attributes_match(
        actual, expected, setting, ref.params, network_case["tols"] or {}
    )


def test_grad_batch_sums_to_grad(network_case: dict[str, Any]):
    """Per-sample gradients add up to the gradient of the loss.

    Args:
        network_case: Expanded network case.
    """
    ref = network_reference(network_case)
    summed = {name: g.sum(0) for name, g in ref.grad_batch.items()}
    for name, g in ref.grad.items():
        assert_allclose_report(summed[name], g, name=name)


def test_hessian_backpropagation_is_hessian(network_case: dict[str, Any]):
    """Backpropagating the exact curvature layer by layer gives the Hessian blocks.

    Args:
        network_case: Expanded network case.
    """
    ref = network_reference(network_case)
    blocks = ref.curvature_blocks("hessian")
    for name, block in ref.hessian_blocks.items():
        assert_allclose_report(blocks[name], block, name=name)


def test_ggn_backpropagation_is_ggn(network_case: dict[str, Any]):
    """Backpropagating the GGN layer by layer gives ``Σ_n J_nᵀ H_n J_n``.

    Args:
        network_case: Expanded network case.
    """
    ref = network_reference(network_case)
    blocks = ref.curvature_blocks("ggn")
    for name, block in ref.ggn_blocks.items():
        assert_allclose_report(blocks[name], block, name=name)


def test_piecewise_linear_curvatures_agree(network_case: dict[str, Any]):
    """Without curved activations, Hessian, GGN and positive-curvature Hessian agree.

    Args:
        network_case: Expanded network case.
    """
    net = build_network(network_case)
    curved = [
        type(m).__name__
        for m in net.model
        if not hasattr(m, "weight") and type(m).__name__ not in PIECEWISE_LINEAR
    ]
    curved = [name for name in curved if name != "Flatten"]
    if curved:
        skip(f"Curved activations {curved}.")
    ref = network_reference(network_case)
    for mode in ("clip", "abs"):
        blocks = ref.curvature_blocks(mode)
        for name, block in ref.ggn_blocks.items():
            assert_allclose_report(blocks[name], block, name=f"{mode}: {name}")
            assert_allclose_report(
                ref.hessian_blocks[name], block, name=f"hessian: {name}"
            )


def test_sqrt_ggn_gram_is_ggn(network_case: dict[str, Any]):
    """``Σ_v Σ_n sqrt[v, n] sqrt[v, n]ᵀ`` of the exact square root is the GGN block.

    Args:
        network_case: Expanded network case.
    """
    ref = network_reference(network_case)
    sqrt = ref.sqrt_ggn(exact_loss_sqrt(ref.loss_func, ref.output, ref.y))
    for name, block in ref.ggn_blocks.items():
        flat = sqrt[name].flatten(start_dim=2)
        gram = torch.einsum("vnp,vnq->pq", flat, flat)
        assert_allclose_report(gram, block, name=name)


@mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_with_exact_sqrt_is_kflr(network_case: dict[str, Any], approx: str):
    """KFAC with the exact loss square root in place of samples is KFLR.

    Args:
        network_case: Expanded network case.
        approx: KFAC approximation.
    """
    ref = network_reference(network_case)
    exact = exact_loss_sqrt(ref.loss_func, ref.output, ref.y)
    kfac = ref.kronecker_factors("KFAC", approx, loss_sqrt=exact)
    for name, factors in ref.kronecker_factors("KFLR", approx).items():
        assert_allclose_report(kfac[name], factors, name=name)


def test_kflr_bias_factor_is_bias_ggn(network_case: dict[str, Any]):
    """The KFLR bias factor of an ungrouped layer is the bias GGN block.

    Args:
        network_case: Expanded network case.
    """
    ref = network_reference(network_case)
    factors = ref.kronecker_factors("KFLR")
    checked = 0
    for name, (_, child, param) in ref.param_layers.items():
        if param == "bias" and getattr(child, "groups", 1) == 1:
            assert_allclose_report(factors[name][0], ref.ggn_blocks[name], name=name)
            checked += 1
    if checked == 0:
        skip("No ungrouped layer with bias.")


def test_kflr_is_exact_for_one_sample_one_position(network_case: dict[str, Any]):
    """With one sample and one output position, ``kron(B, A)`` is the GGN block.

    Args:
        network_case: Expanded network case.
    """
    ref = network_reference(network_case)
    if ref.batch_size != 1:
        skip("Needs batch size 1.")
    factors = ref.kronecker_factors("KFLR")
    checked = 0
    for name, (index, child, param) in ref.param_layers.items():
        out = ref.layer_output_grads[index]
        channels = getattr(child, "out_features", None) or child.out_channels
        if param == "weight" and out[0].numel() == channels:
            dense = ref.kron_dense(name, factors[name])
            assert_allclose_report(dense, ref.ggn_blocks[name], name=name)
            checked += 1
    if checked == 0:
        skip("No layer with a single output position.")


def _tiny_reference(model: Module) -> NetworkReference:
    """A reference of a model with input ``[2, 3]`` and a cross-entropy loss.

    Args:
        model: Sequential model with input features 3 and 2 outputs.

    Returns:
        The reference.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1])
    return NetworkReference(model.double(), CrossEntropyLoss(), x, y)


def test_check_network_case_rejects_typo_and_missing_key():
    """Unknown and missing keys of a network case raise and are listed."""
    case = NETWORK_BASE_CASES[0]
    with raises(ValueError, match=re.escape("Unknown network case keys ['lossfn']")):
        check_network_case({**case, "lossfn": case["loss_fn"]})
    missing = {k: v for k, v in case.items() if k != "target_fn"}
    with raises(ValueError, match=re.escape("Missing network case keys ['target_fn']")):
        check_network_case(missing)


def test_reference_rejects_unknown_options():
    """Unknown modes, kinds and approximations raise and list the allowed ones."""
    ref = _tiny_reference(Sequential(Linear(3, 2)))
    layer = ref.model[0]
    with raises(ValueError, match=r"Unknown mode 'bogus'.*'ggn'"):
        ref.output_curvatures(ref.loss_hessians, "bogus")
    with raises(ValueError, match=r"Unknown kind 'bogus'.*'KFLR'"):
        ref.kronecker_factors("bogus")
    with raises(ValueError, match="KFAC needs the sampled loss_sqrt"):
        ref.kronecker_factors("KFAC")
    with raises(ValueError, match=r"Unknown positions 'bogus'.*'all'"):
        kronecker_output_factor(layer, ref.loss_hessians, positions="bogus")
    with raises(ValueError, match=r"Unknown approximation 'bogus'.*'expand'"):
        kronecker_input_factor(layer, ref.x, "bogus")


def test_reference_rejects_unsupported_loss():
    """Only the losses with stock BackPACK derivatives can be sampled."""
    output = torch.randn(2, 3)
    with raises(NotImplementedError, match=r"Unsupported loss L1Loss.*MSELoss"):
        sampled_loss_sqrt(L1Loss(), output, torch.randn(2, 3), mc_samples=1)


def test_positive_curvature_needs_elementwise_layers():
    """Modifying the residual of a layer that mixes features raises."""
    ref = _tiny_reference(Sequential(Linear(3, 2), Softmax(dim=1)))
    with raises(ValueError, match=r"'clip' needs element-wise layers.*Softmax"):
        ref.curvature_blocks("clip")


def test_helpers_reject_unknown_names():
    """The test helpers name what they do not know."""
    with raises(ValueError, match=r"Unknown implementation 'bogus'"):
        make_extension({"name": "BatchGrad"}, "bogus")
    ref = _tiny_reference(Sequential(Linear(3, 2)))
    with raises(ValueError, match=r"Unknown extension 'Bogus'"):
        reference_values(ref, {"name": "Bogus"})
