"""Tests for ``backpack_tn.engine.layout``."""

import pytest
import torch

from backpack_tn.engine.layout import by_stride, flat_view, sum_in_memory_order
from test_problems.compare import assert_allclose_report

#: Tensors with different memory orders: (name, builder of a [4, 3, 5, 2] tensor).
LAYOUT_CASES = [
    ("contiguous", lambda t: t),
    ("permuted", lambda t: t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)),
    ("strided", lambda t: torch.cat([t, t], dim=2)[:, :, ::2]),
]
LAYOUT_IDS = [name for name, _ in LAYOUT_CASES]
SUMMED_DIMS = [(0,), (1, 3), (0, 1, 2, 3), ()]


@pytest.mark.parametrize("build", [b for _, b in LAYOUT_CASES], ids=LAYOUT_IDS)
@pytest.mark.parametrize("dims", SUMMED_DIMS, ids=str)
def test_sum_in_memory_order(build, dims):
    """The sum equals ``Tensor.sum`` in shape and values."""
    torch.manual_seed(0)
    x = build(torch.randn(4, 3, 5, 2, dtype=torch.float64))
    expected = x.sum(dims) if dims else x
    assert_allclose_report(sum_in_memory_order(x, dims), expected)


def test_by_stride_and_flat_view():
    """Dimensions sort by stride; only evenly strided groups merge into a view."""
    x = torch.randn(4, 3, 5, 2).permute(2, 0, 3, 1)  # strides (2, 30, 1, 10)
    assert by_stride(x, range(4)) == [1, 3, 0, 2]
    merged = flat_view(x, ([1, 3], [0, 2]))
    assert merged is not None
    assert merged.shape == (12, 10)
    assert_allclose_report(merged, x.permute(1, 3, 0, 2).reshape(12, 10))
    assert flat_view(x, ([1, 0], [3, 2])) is None
