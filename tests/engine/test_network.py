"""Tests of ``backpack_tn.engine.network`` and ``backpack_tn.engine.contract``."""

import pytest
import torch

from backpack_tn.engine import contract
from backpack_tn.engine.index_pattern import IndexPattern
from backpack_tn.engine.network import TensorNetwork, flops
from test_problems.compare import assert_allclose_report


def _conv_network(pattern: IndexPattern, input_side: bool) -> TensorNetwork:
    torch.manual_seed(0)
    if input_side:  # y[n, o] = Σ x[n, i] Π[k, o, i] w[k]
        x = torch.randn(2, pattern.input_size, dtype=torch.float64)
        legs = [("n", "i"), ("k",), ("k", "o", "i")]
        output = ("n", "o")
    else:  # x[n, i] = Σ y[n, o] Π[k, o, i] w[k]
        x = torch.randn(2, pattern.output_size, dtype=torch.float64)
        legs = [("n", "o"), ("k",), ("k", "o", "i")]
        output = ("n", "i")
    w = torch.randn(pattern.kernel_size, dtype=torch.float64)
    return TensorNetwork([x, w, pattern], legs, output)


NETWORK_PATTERNS = [
    IndexPattern(8, 2, stride=2),
    IndexPattern(9, 2, stride=3),
    IndexPattern(9, 1, stride=2),
    IndexPattern(7, 1),
    IndexPattern(8, 3, stride=2, padding=(1, 1)),
    IndexPattern(9, 3, dilation=2, padding=(2, 1)),
    IndexPattern(6, 2, stride=2, padding=(1, 1), padding_mode="reflect"),
    IndexPattern(6, 3, padding=(2, 2), padding_mode="circular"),
]


@pytest.mark.parametrize("input_side", [True, False], ids=["input", "output"])
@pytest.mark.parametrize("lower_all", [False, True], ids=["simplify", "lower"])
@pytest.mark.parametrize("pattern", NETWORK_PATTERNS, ids=str)
def test_simplification_is_exact(pattern, lower_all, input_side):
    """Simplified and unsimplified networks agree on the same inputs."""
    net = _conv_network(pattern, input_side)
    simplified = net.simplify(lower_all=lower_all)
    if lower_all or pattern.is_non_overlapping:
        assert not simplified.patterns, "pattern should have been rewired"
    assert_allclose_report(simplified.contract(), net.contract(), name="simplified")


def test_einsum_expression_matches_contract():
    """The einsum form of a network evaluates to the same tensor."""
    net = _conv_network(IndexPattern(8, 3, stride=2, padding=(1, 1)), True)
    equation, operands = net.einsum_expression()
    assert_allclose_report(torch.einsum(equation, *operands), net.contract())


def test_einsum_expression_refuses_output_side_simplification():
    """An output-side rewiring has no einsum form and says so."""
    net = _conv_network(IndexPattern(8, 2, stride=2), False).simplify()
    with pytest.raises(ValueError, match="not a single einsum"):
        net.einsum_expression()


def test_network_validation():
    """Mismatched legs are rejected."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="Got 1 operands but 2 leg tuples"):
        TensorNetwork([x], [("a", "b"), ("c",)], ("a",))
    with pytest.raises(ValueError, match="was given 1 legs"):
        TensorNetwork([x], [("a",)], ("a",))
    with pytest.raises(ValueError, match="belong to no operand"):
        TensorNetwork([x], [("a", "b")], ("z",))


def test_optimizer_setting_and_path_cache():
    """The path optimiser is a setting; flops come from the cached path."""
    net = _conv_network(IndexPattern(8, 3), True)
    assert contract.get_optimizer() == "dp-combo"
    with contract.optimizer("greedy"):
        assert contract.get_optimizer() == "greedy"
        assert_allclose_report(net.contract(), net.contract(optimize="dp"))
    assert contract.get_optimizer() == "dp-combo"
    assert flops(net) > 0
    with pytest.raises(ValueError, match="Unsupported optimize 'fastest'"):
        contract.set_optimizer("fastest")
