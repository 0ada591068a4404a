"""Tests of ``backpack_tn.engine.gram``."""

from collections.abc import Iterator

import pytest
import torch

from backpack_tn.engine import gemm
from backpack_tn.engine import gram as gram_module
from backpack_tn.engine.gram import (
    GPU_MIN_BLOCK_MACS,
    MAX_BLOCKS,
    MIN_BLOCK_ROWS,
    gram,
    num_blocks,
)
from test_problems.compare import assert_allclose_report

#: (batch, rows, columns): one block, uneven splits, the largest split
SHAPES = [
    (1, 5, 7),
    (2, 2 * MIN_BLOCK_ROWS + 3, 128),
    (1, 5 * MIN_BLOCK_ROWS + 1, 129),
    (2, 3 * MIN_BLOCK_ROWS, 4),
]
SHAPE_IDS = [f"B={b}-I={i}-M={m}" for b, i, m in SHAPES]


@pytest.fixture(params=["bmm", "onednn"])
def backend(request, monkeypatch) -> Iterator[str]:
    """GEMM library of the blocks; oneDNN serves float32 GEMMs of any size here.

    Yields:
        The backend's name.
    """
    if request.param == "onednn" and not gemm._onednn_available():
        pytest.skip("this PyTorch build has no oneDNN GEMM")
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend(request.param)
    yield request.param
    gemm.set_gemm_backend("auto")


@pytest.mark.parametrize("blocks", ["costed", "forced"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gram_matches_full_product(shape, transposed, blocks, backend, monkeypatch):
    """The Gram matrix equals the full product; in blocks, it is exactly symmetric.

    ``forced`` makes the blocks' copies and calls free, so that every matrix of at
    least ``2 * MIN_BLOCK_ROWS`` rows is split.
    """
    if blocks == "forced":
        monkeypatch.setattr(gram_module, "BLOCK_ASSEMBLY_MACS", 0)
        monkeypatch.setattr(gram_module, "BLOCK_CALL_MACS", 0)
    torch.manual_seed(0)
    batch, rows, cols = shape
    dtype = torch.float64 if backend == "bmm" else torch.float32
    if transposed:
        mat = torch.randn(batch, cols, rows, dtype=dtype).transpose(1, 2)
    else:
        mat = torch.randn(batch, rows, cols, dtype=dtype)
    result = gram(mat)
    expected = (mat.double() @ mat.double().transpose(1, 2)).to(dtype)
    tols = {} if backend == "bmm" else {"rtol": 1e-4, "atol": 1e-4}
    assert_allclose_report(result, expected, **tols)
    if blocks == "forced":
        assert (num_blocks(rows, cols) > 1) == (rows >= 2 * MIN_BLOCK_ROWS)
    if num_blocks(rows, cols) > 1:
        assert torch.equal(result, result.transpose(1, 2))


@pytest.mark.parametrize(
    "rows, columns, expected",
    [
        (1, 10**6, 1),
        (2 * MIN_BLOCK_ROWS - 1, 10**6, 1),
        (2 * MIN_BLOCK_ROWS, 10**6, 2),
        (10**6, 10**6, MAX_BLOCKS),
        # few columns: the copies cost more than the saved multiply-adds
        (2048, 196, 1),
        (2048, 1024, MAX_BLOCKS),
        (256, 1024, 1),
        (256, 4096, 2),
    ],
)
def test_num_blocks(rows, columns, expected):
    """Small or short matrices get one block, large ones at most ``MAX_BLOCKS``."""
    assert num_blocks(rows, columns) == expected


def test_num_blocks_on_gpu():
    """On a GPU only products of at least ``GPU_MIN_BLOCK_MACS`` are split."""
    rows, columns = 4 * MIN_BLOCK_ROWS, 128
    assert num_blocks(rows, columns, on_gpu=True) == 1
    batch = -(-GPU_MIN_BLOCK_MACS // (rows * rows * columns))
    assert num_blocks(rows, columns, batch, on_gpu=True) == MAX_BLOCKS
