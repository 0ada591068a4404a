"""Tests for ``backpack_tn.engine.contract``."""

import pytest
import torch

from backpack_tn.engine import contract
from test_problems.compare import assert_allclose_report


def test_equation_from_legs():
    """Named legs become letters in order of appearance."""
    assert contract.equation_from_legs([("n", "c_in"), ("c_in",)], ("n",)) == "ab,b->a"


def test_contract_presums_lonely_legs_and_keeps_diagonals():
    """Legs of one operand are summed early, repeated legs stay diagonals.

    Scalars multiply the result.
    """
    torch.manual_seed(0)
    m, v, w = torch.randn(3, 3), torch.randn(4), torch.randn(4, 5)
    scale = torch.tensor(0.5)
    actual = contract.contract(
        [("a", "a"), ("b",), ("b", "c"), ()], ("c",), [m, v, w, scale]
    )
    expected = 0.5 * torch.trace(m) * (v @ w)
    assert_allclose_report(actual, expected, rtol=1e-6, atol=1e-7)
    actual = contract.contract([("a", "b"), ("b",)], ("b",), [w.T, v])
    assert_allclose_report(actual, w.sum(1) * v, rtol=1e-6, atol=1e-7)


def _strided_patches(x: torch.Tensor) -> torch.Tensor:
    """Non-overlapping 2x2 patches of ``x [N, C, H, W]`` as a zero-copy view.

    Returns:
        View of shape ``[N, C, H/2, W/2, 2, 2]`` (legs ``n c o0 o1 k0 k1``).
    """
    return x.unfold(2, 2, 2).unfold(3, 2, 2)


#: Gram-type steps: the operand (built from a tensor of shape ``[2, 3, 8, 8]``),
#: its legs, the second legs and the output.
#: The operand is contracted with itself; legs that differ are free.
SELF_PRODUCT_CASES = [
    {  # contiguous operand: a view serves as GEMM matrices
        "operand": lambda x: x,
        "legs": ("n", "c", "h", "w"),
        "second": ("n", "c", "h_", "w_"),
        "output": ("n", "h", "w", "h_", "w_"),
        "id": "contiguous",
    },
    {  # strided patches, kernel and channel legs summed: copied once, free legs last
        "operand": _strided_patches,
        "legs": ("n", "c", "o0", "o1", "k0", "k1"),
        "second": ("n", "c", "o0_", "o1_", "k0", "k1"),
        "output": ("n", "o1_", "o0", "o1", "o0_"),
        "id": "patches",
    },
    {  # strided patches, positions summed, kernel legs free: summed legs last
        "operand": _strided_patches,
        "legs": ("n", "c", "o0", "o1", "k0", "k1"),
        "second": ("n", "c", "o0", "o1", "k0_", "k1_"),
        "output": ("k1_", "k0", "k1", "k0_", "n"),
        "id": "patches-kernel-free",
    },
    {  # no contracted leg: an outer product
        "operand": lambda x: x.transpose(1, 3),
        "legs": ("n", "w", "h", "c"),
        "second": ("n", "w", "h", "c_"),
        "output": ("n", "w", "h", "c", "c_"),
        "id": "outer",
    },
]
SELF_PRODUCT_IDS = [case["id"] for case in SELF_PRODUCT_CASES]


@pytest.mark.parametrize("case", SELF_PRODUCT_CASES, ids=SELF_PRODUCT_IDS)
def test_self_product_matches_einsum(case):
    """A tensor contracted with itself (Gram form) matches ``torch.einsum``."""
    torch.manual_seed(0)
    operand = case["operand"](torch.randn(2, 3, 8, 8, dtype=torch.float64))
    legs, second, output = case["legs"], case["second"], case["output"]
    equation = contract.equation_from_legs([legs, second], output)
    assert contract._self_product(equation) is not None
    for other in (operand, operand.clone()):  # one view twice, and two tensors
        actual = contract.contract([legs, second], output, [operand, other])
        expected = torch.einsum(equation, operand, other)
        assert_allclose_report(actual, expected)


@pytest.mark.parametrize(
    "equation",
    ["ab,ab->", "ab,ba->ab", "ab,ac->b", "abc,abd->ad", "ab,abc->abc"],
    ids=["no-free", "swapped", "free-summed", "lonely", "ranks"],
)
def test_steps_without_gram_form(equation):
    """Steps whose legs are not a Gram product's stay ordinary einsums."""
    assert contract._self_product(equation) is None
