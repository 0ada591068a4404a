"""Tests of the test infrastructure: case checks, ids, comparator and references."""

import re

import torch
from pytest import mark, raises
from torch import nn

from test_problems import references
from test_problems.cases import check_case, describe, expand_cases, make_id
from test_problems.compare import assert_allclose_report
from test_problems.extension_references import NetworkReference
from test_problems.networks import NETWORK_CASES, build_network
from test_problems.registry import tn_derivatives_class

CASE = {
    "seed": 0,
    "module_fn": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    "input_fn": lambda: torch.randn(2, 3, 8, 8),
}


def test_check_case_rejects_typo():
    """A misspelled key raises and lists the allowed keys."""
    case = {**CASE, "modul_fn": CASE["module_fn"]}
    with raises(ValueError, match=re.escape("Unknown case keys ['modul_fn']")):
        check_case(case)


def test_check_case_rejects_missing_key():
    """A missing required key raises and names it."""
    case = {k: v for k, v in CASE.items() if k != "seed"}
    with raises(ValueError, match=re.escape("Missing case keys ['seed']")):
        check_case(case)


def test_check_case_fills_defaults():
    """Optional keys get their defaults."""
    case = check_case(CASE)
    assert case["id"] is None
    assert case["tols"] is None


def test_make_id():
    """Ids describe the layer, include device and dtype, and leave the RNG alone."""
    state = torch.random.get_rng_state()
    case_id = make_id(CASE, "cuda", torch.float64)
    assert torch.equal(state, torch.random.get_rng_state())
    assert (
        case_id
        == "conv2d-in=2x3x8x8-k=3-s=2-p=1-d=1-g=1-pm=zeros-dev=cuda-dtype=float64"
    )


def test_make_id_uses_given_id():
    """A case's ``id`` replaces the generated description."""
    case_id = make_id({**CASE, "id": "my layer"}, "cpu", torch.float32)
    assert case_id == "mylayer-dev=cpu-dtype=float32"


def test_expand_cases_rejects_duplicate_ids():
    """Two cases with the same id raise."""
    with raises(ValueError, match="Case ids must be unique"):
        expand_cases([CASE, {**CASE, "seed": 1}], devices=["cpu"])


def test_describe_rejects_unknown_layer():
    """Layers without a description raise and name the supported ones."""
    with raises(NotImplementedError, match="No id description for ReLU"):
        describe(nn.ReLU(), torch.zeros(1))


def test_tn_derivatives_class_rejects_unknown_layer():
    """Layers without tensor-network derivatives raise and name the registered ones."""
    with raises(NotImplementedError, match="No tensor-network derivatives .* ReLU"):
        tn_derivatives_class(nn.ReLU)


def test_reference_rejects_missing_bias():
    """Bias references for a layer without bias raise."""
    module, x = nn.Linear(3, 2, bias=False), torch.randn(4, 3)
    with raises(ValueError, match="Linear has no parameter 'bias'"):
        references.bias_jac_mat_prod(module, x, torch.randn(1, 2))


X = torch.arange(6, dtype=torch.float64).reshape(2, 3)
Y = X.clone()
Y[1, 2] = 7.0

COMPARE_FAILURES = [
    (X, X[:1], r"x: shapes differ: actual \(2, 3\), expected \(1, 3\)\."),
    (X.float(), X, r"dtypes differ: actual torch.float32, expected torch.float64"),
    ([X], [X, X], r"lengths differ: actual has 1 entries, expected has 2"),
    ([X], X, r"cannot compare a list with a Tensor"),
    (None, X, r"expected two tensors, got a NoneType \(actual\)"),
    ((X, Y), (X, X), r"x\[1\]: 1 of 6 entries differ(.|\n)*\(1, 2\)(.|\n)*1\.4"),
]


@mark.parametrize("actual, expected, match", COMPARE_FAILURES)
def test_assert_allclose_report_raises(actual, expected, match: str):
    """Mismatches raise with a message that explains them.

    Args:
        actual: Computed value.
        expected: Reference value.
        match: Pattern the message must match.
    """
    with raises(AssertionError, match=match):
        assert_allclose_report(actual, expected, name="x")


def test_assert_allclose_report_passes():
    """Equal tensors, tuples and values within tolerance pass."""
    assert_allclose_report(X, X.clone())
    assert_allclose_report((X, X), [X.clone(), X.clone()])
    assert_allclose_report(X * (1 + 1e-12), X)


def test_network_reference_hessians_as_first_quantity():
    """Hessian blocks need no quantity computed before them.

    The model output that the per-sample losses read is computed on construction;
    computed lazily inside ``hessian``, it kept that transform's level and made it
    fail (depending on which test asked for which quantity first).
    """
    case = next(c for c in NETWORK_CASES if c["device"] == "cpu")
    net = build_network(case)
    ref = NetworkReference(net.model, net.loss_func, net.x, net.y)
    blocks = ref.hessian_blocks
    assert set(blocks) == set(ref.params)
    for name, block in blocks.items():
        size = ref.params[name].numel()
        assert block.shape == (size, size)
