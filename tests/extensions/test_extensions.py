"""Compare ``backpack_tn.extensions`` with brute-force references and stock BackPACK.

Every network case runs every extension setting. Monte Carlo extensions draw the
same samples as the reference and as stock BackPACK because the random state is
seeded right before ``backward()`` and the loss modules are stock; the tests marked
slow check that they converge to the exact quantities.
"""

from typing import Any

import torch
from pytest import FixtureRequest, mark, skip

from backpack_tn.derivatives import plans
from backpack_tn.engine import contract
from test_problems.compare import assert_allclose_report
from test_problems.networks import KRONECKER
from tests.extensions.utils import (
    EXTENSION_IDS,
    EXTENSION_SETTINGS,
    assert_attributes_match,
    make_extension,
    network_reference,
    output_positions,
    prepare_tn_test,
    reference_values,
    run_extension,
    stock_unsupported,
)

pytestmark = mark.filterwarnings(
    "ignore:The Kronecker factors stored in the weight parameters of transpose "
    "convolutions:UserWarning"
)

MANY_MC_SAMPLES = 5_000
"""MC samples of the tests that check convergence to the exact quantity."""

MC_TOLS = {"rtol": 0.1, "atol": 0.05}
"""Tolerances of the MC convergence tests, on values divided by their maximum."""


@mark.parametrize("setting", EXTENSION_SETTINGS, ids=EXTENSION_IDS)
def test_extension_matches_reference(
    request: FixtureRequest, network_case: dict[str, Any], setting: dict[str, Any]
):
    """Every attribute equals its brute-force reference.

    Args:
        request: Pytest request.
        network_case: Expanded network case.
        setting: Extension setting.
    """
    prepare_tn_test(request, network_case, setting["name"])
    ref = network_reference(network_case)
    actual = run_extension(network_case, make_extension(setting, "tn"))
    expected = reference_values(ref, setting)
    assert_attributes_match(
        actual, expected, setting, ref.params, network_case["tols"] or {}
    )


#: Settings whose products run contraction steps on small operands.
SMALL_STEP_SETTINGS = [
    (setting, setting_id)
    for setting, setting_id in zip(EXTENSION_SETTINGS, EXTENSION_IDS, strict=True)
    if setting_id in ("BatchL2Grad", "DiagGGNExact", "KFLR-kfac_approx=expand")
]


@mark.parametrize("replay", [True, False], ids=["record", "eager"])
@mark.parametrize(
    "setting",
    [setting for setting, _ in SMALL_STEP_SETTINGS],
    ids=[setting_id for _, setting_id in SMALL_STEP_SETTINGS],
)
def test_small_steps_match_reference(
    request: FixtureRequest,
    network_case: dict[str, Any],
    setting: dict[str, Any],
    replay: bool,
    monkeypatch,
):
    """Small contraction steps take their own routes and give the reference too.

    The other tests run every step through the GEMM executor (see ``conftest``).
    Here, as in use, small steps of batched dot products are a product and a sum,
    and other small steps run through ``torch.einsum`` when evaluated eagerly and
    as plain GEMM calls when recorded.

    Args:
        request: Pytest request.
        network_case: Expanded network case.
        setting: Extension setting.
        replay: Whether evaluations are recorded (else eager).
        monkeypatch: Pytest's monkeypatch fixture.
    """
    monkeypatch.setattr(contract, "SMALL_STEP", 1 << 16)
    prepare_tn_test(request, network_case, setting["name"])
    ref = network_reference(network_case)
    plans.set_replay(replay)
    try:
        actual = run_extension(network_case, make_extension(setting, "tn"))
    finally:
        plans.set_replay(True)
    expected = reference_values(ref, setting)
    assert_attributes_match(
        actual, expected, setting, ref.params, network_case["tols"] or {}
    )


def _kronecker_indices(
    case: dict[str, Any], setting: dict[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Kronecker factors that stock BackPACK computes the same way.

    Stock BackPACK's output factor ``B`` (and the bias factor) is backpack_tn's for
    both approximations; its input factor ``A`` is KFAC-expand's, which equals
    KFAC-reduce's for a single output position.

    Args:
        case: Expanded network case.
        setting: Extension setting of KFAC, KFLR or KFRA.

    Returns:
        Indices of the factors to compare, keyed by parameter name.
    """
    expand = setting["tn_kwargs"]["kfac_approx"] == "expand"
    indices = {}
    for name, positions in output_positions(case).items():
        if name.endswith("bias"):
            indices[name] = (0,)
        else:
            indices[name] = (0, 1) if expand or positions == 1 else (0,)
    return indices


@mark.parametrize("setting", EXTENSION_SETTINGS, ids=EXTENSION_IDS)
def test_extension_matches_stock(network_case: dict[str, Any], setting: dict[str, Any]):
    """Every attribute equals stock BackPACK's where stock BackPACK is right.

    Args:
        network_case: Expanded network case.
        setting: Extension setting.
    """
    reason = stock_unsupported(network_case, setting["name"])
    if reason is not None:
        skip(reason)
    ref = network_reference(network_case)
    actual = run_extension(network_case, make_extension(setting, "tn"))
    expected = run_extension(network_case, make_extension(setting, "stock"))
    compare = (
        _kronecker_indices(network_case, setting)
        if setting["name"] in KRONECKER
        else None
    )
    assert_attributes_match(
        actual,
        expected,
        setting,
        ref.params,
        network_case["tols"] or {},
        compare=compare,
    )


def test_sqrt_ggn_exact_gram_is_ggn(
    request: FixtureRequest, network_case: dict[str, Any]
):
    """``Σ_c Σ_n sqrt[c, n] sqrt[c, n]ᵀ`` is the GGN block, whatever the square root.

    Args:
        request: Pytest request.
        network_case: Expanded network case.
    """
    setting = {"name": "SqrtGGNExact"}
    prepare_tn_test(request, network_case, setting["name"])
    ref = network_reference(network_case)
    sqrt = run_extension(network_case, make_extension(setting, "tn"))
    for name, block in ref.ggn_blocks.items():
        flat = sqrt[name].flatten(start_dim=2)
        gram = torch.einsum("vnp,vnq->pq", flat, flat)
        assert_allclose_report(
            gram, block, name=f"sqrt_ggn_exact: {name}", **(network_case["tols"] or {})
        )


def _assert_mc_close(actual: torch.Tensor, expected: torch.Tensor, name: str):
    """Compare a Monte Carlo estimate with the exact value, relative to its maximum.

    Args:
        actual: MC estimate.
        expected: Exact value of the same shape.
        name: Name for the report.
    """
    scale = expected.abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    assert_allclose_report(actual / scale, expected / scale, name=name, **MC_TOLS)


@mark.slow
@mark.parametrize("name", ["DiagGGNMC", "BatchDiagGGNMC", "SqrtGGNMC", "KFAC"])
def test_mc_extension_converges(
    request: FixtureRequest, network_case: dict[str, Any], name: str
):
    """With many samples, the MC extensions approach their exact counterparts.

    DiagGGNMC and BatchDiagGGNMC approach the (per-sample) GGN diagonal, the Gram
    matrix of SqrtGGNMC the GGN block, KFAC's output factor KFLR's (its input
    factor does not depend on samples and must be equal).

    Args:
        request: Pytest request.
        network_case: Expanded network case.
        name: Extension name.
    """
    setting = {"name": name, "kwargs": {"mc_samples": MANY_MC_SAMPLES}}
    prepare_tn_test(request, network_case, name)
    ref = network_reference(network_case)
    actual = run_extension(network_case, make_extension(setting, "tn"))
    for param, value in actual.items():
        label = f"{name}: {param}"
        if name == "DiagGGNMC":
            _assert_mc_close(value, ref.diag_ggn_exact[param], label)
        elif name == "BatchDiagGGNMC":
            _assert_mc_close(value, ref.diag_ggn_exact_batch[param], label)
        elif name == "SqrtGGNMC":
            flat = value.flatten(start_dim=2)
            gram = torch.einsum("vnp,vnq->pq", flat, flat)
            _assert_mc_close(gram, ref.ggn_blocks[param], label)
        else:
            kflr = ref.kronecker_factors("KFLR")[param]
            _assert_mc_close(value[0], kflr[0], f"{label}: B")
            if len(kflr) > 1:
                assert_allclose_report(value[1], kflr[1], name=f"{label}: A")
