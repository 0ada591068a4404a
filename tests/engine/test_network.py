"""Tests of ``backpack_tn.engine.network`` and ``backpack_tn.engine.contract``."""

import pytest
import torch

from backpack_tn.engine import contract
from backpack_tn.engine.index_pattern import IndexPattern
from backpack_tn.engine.network import TensorNetwork, flops, pad
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
    IndexPattern(6, 2, stride=2, padding=(1, 1)),
    IndexPattern(9, 2, stride=2),
    IndexPattern(5, 1, padding=(1, 0)),
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


PATTERN_PAIRS = [
    (IndexPattern(7, 3, padding=(1, 1)), IndexPattern(6, 2, stride=2, padding=(1, 0))),
    (
        IndexPattern(7, 3, padding=(1, 2)),
        IndexPattern(6, 3, padding=(2, 2), padding_mode="reflect"),
    ),
    (IndexPattern(6, 3, padding=(2, 2), padding_mode="circular"), IndexPattern(5, 2)),
    (IndexPattern(6, 1), IndexPattern(9, 3, dilation=2, padding=(2, 1))),
]


@pytest.mark.parametrize("lower_all", [False, True], ids=["simplify", "lower"])
@pytest.mark.parametrize("patterns", PATTERN_PAIRS, ids=str)
def test_two_patterns_on_one_operand(patterns, lower_all):
    """Patterns sharing an operand are padded together and stay exact."""
    torch.manual_seed(0)
    first, second = patterns
    x = torch.randn(2, first.input_size, 3, second.input_size, dtype=torch.float64)
    w = torch.randn(first.kernel_size, second.kernel_size, dtype=torch.float64)
    legs = [("n", "i", "c", "j"), ("k", "l"), ("k", "o", "i"), ("l", "p", "j")]
    net = TensorNetwork([x, w, first, second], legs, ("n", "c", "o", "p"))
    simplified = net.simplify(lower_all=lower_all)
    lowered = {p for p in (first, second) if lower_all or p.is_non_overlapping}
    assert len(simplified.patterns) == 2 - len(lowered)
    assert_allclose_report(simplified.contract(), net.contract(), name="simplified")


@pytest.mark.parametrize("pattern", NETWORK_PATTERNS, ids=str)
def test_one_pad_for_an_operand_used_twice(pattern):
    """Both copies of an operand become one view of one padded tensor (a Gram step).

    ``Σ_{o, p} (Σ_{k, c} x[n, c, i] Π[k, o, i]) (Σ_{k, c} x[n, c, j] Π[k, p, j])
    g[o, p]`` holds ``x`` twice, as squared networks of per-sample VJPs do.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 3, pattern.input_size, dtype=torch.float64)
    g = torch.randn(pattern.output_size, pattern.output_size, dtype=torch.float64)
    legs = [("n", "c", "i"), ("k", "o", "i"), ("n", "c", "j"), ("k", "p", "j")]
    net = TensorNetwork([x, pattern, x, pattern, g], [*legs, ("o", "p")], ("n",))
    lowered = net.simplify(lower_all=True)
    first, second = lowered.operands[:2]
    assert not lowered.patterns
    assert first.data_ptr() == second.data_ptr()
    assert (first.shape, first.stride()) == (second.shape, second.stride())
    assert_allclose_report(lowered.contract(), net.contract(), name="lowered")


#: Pairs of non-overlapping patterns on the result's legs: both tile the input
#: exactly (a reshape), only one does, zero padding, and a scatter-added mode.
OUTPUT_PATTERN_PAIRS = [
    (IndexPattern(8, 2, stride=2), IndexPattern(7, 1)),
    (IndexPattern(8, 2, stride=2), IndexPattern(9, 2, stride=3)),
    (IndexPattern(6, 2, stride=2, padding=(1, 1)), IndexPattern(5, 1, stride=2)),
    (
        IndexPattern(6, 2, stride=2, padding=(1, 1), padding_mode="replicate"),
        IndexPattern(9, 3, stride=3),
    ),
]


@pytest.mark.parametrize("patterns", OUTPUT_PATTERN_PAIRS, ids=str)
def test_two_patterns_on_the_result(patterns):
    """Patterns on the result's legs become one write, a reshape or scatters."""
    torch.manual_seed(0)
    first, second = patterns
    y = torch.randn(2, first.output_size, second.output_size, 3, 4, dtype=torch.float64)
    w = torch.randn(first.kernel_size, second.kernel_size, 3, dtype=torch.float64)
    legs = [
        ("n", "o", "p", "a", "b"),
        ("k", "l", "a"),
        ("k", "o", "i"),
        ("l", "p", "j"),
    ]
    net = TensorNetwork([y, w, first, second], legs, ("n", "b", "i", "j"))
    simplified = net.simplify()
    assert not simplified.patterns
    assert_allclose_report(simplified.contract(), net.contract(), name="simplified")


def _pad_by_map(tensor, dim, pattern):
    """Reference padding: gather the padding map, zeros where it reads -1.

    Returns:
        ``tensor`` padded along ``dim``.
    """
    source = pattern.padding_map()
    gathered = tensor.index_select(dim, source.clamp(min=0))
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return gathered * (source >= 0).reshape(shape)


def test_pad_several_dimensions():
    """Padding several dimensions at once equals padding them one at a time."""
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    patterns = {
        1: IndexPattern(5, 3, padding=(2, 1)),
        2: IndexPattern(3, 2, padding=(1, 1), padding_mode="replicate"),
        3: IndexPattern(6, 3, padding=(0, 2)),
    }
    expected = x
    for dim, pattern in patterns.items():
        expected = _pad_by_map(expected, dim, pattern)
    assert_allclose_report(pad(x, patterns), expected, name="padded")
    assert pad(x, {1: IndexPattern(5, 3)}) is x


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
