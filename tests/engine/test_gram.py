"""Tests of ``backpack_tn.engine.gram``."""

import pytest
import torch

from backpack_tn.engine.gram import (
    MAX_BLOCKS,
    MIN_BLOCK_ROWS,
    MIN_COLUMNS,
    gram,
    num_blocks,
)
from test_problems.compare import assert_allclose_report

#: (batch, rows, columns): one block, uneven splits, the largest split
SHAPES = [
    (1, 5, 7),
    (2, 2 * MIN_BLOCK_ROWS + 3, MIN_COLUMNS),
    (1, 5 * MIN_BLOCK_ROWS + 1, MIN_COLUMNS + 1),
    (2, 3 * MIN_BLOCK_ROWS, 4),
]
SHAPE_IDS = [f"B={b}-I={i}-M={m}" for b, i, m in SHAPES]


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gram_matches_full_product(shape, transposed):
    """The Gram matrix equals the full product; in blocks, it is exactly symmetric."""
    torch.manual_seed(0)
    batch, rows, cols = shape
    if transposed:
        mat = torch.randn(batch, cols, rows, dtype=torch.float64).transpose(1, 2)
    else:
        mat = torch.randn(batch, rows, cols, dtype=torch.float64)
    result = gram(mat)
    assert_allclose_report(result, mat @ mat.transpose(1, 2))
    if num_blocks(rows, cols) > 1:
        assert torch.equal(result, result.transpose(1, 2))


@pytest.mark.parametrize(
    "rows, columns, expected",
    [
        (1, MIN_COLUMNS, 1),
        (2 * MIN_BLOCK_ROWS - 1, MIN_COLUMNS, 1),
        (2 * MIN_BLOCK_ROWS, MIN_COLUMNS, 2),
        (10**6, MIN_COLUMNS, MAX_BLOCKS),
        (10**6, MIN_COLUMNS - 1, 1),
    ],
)
def test_num_blocks(rows, columns, expected):
    """Small or short matrices get one block, large ones at most ``MAX_BLOCKS``."""
    assert num_blocks(rows, columns) == expected
