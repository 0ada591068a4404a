"""Gram matrices ``A A^T`` that compute only the upper block triangle.

BLAS has ``syrk`` for this, PyTorch does not expose it. Splitting the rows of
``A`` into blocks and multiplying each block row with the blocks from the diagonal
on saves up to half the FLOPs of one full GEMM (``(b + 1) / 2b`` of them for
``b`` blocks); the lower triangle is mirrored from the upper one (also inside the
diagonal blocks), so the result is exactly symmetric. The copies cost about as much
as 150 multiply-adds per result entry on CPU, so small matrices, and products with
few columns, take one full GEMM (:func:`num_blocks`); so do products on a GPU below
:data:`GPU_MIN_BLOCK_MACS`, where the blocks' extra kernel launches cost more than
the saved FLOPs.
"""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.gemm import gemm_nt, uses_onednn

#: Rows per block below which one full GEMM is cheaper than several smaller ones.
MIN_BLOCK_ROWS = 128
#: Largest number of block rows (more, smaller GEMMs lose efficiency).
MAX_BLOCKS = 4
#: Cost of the blocks' copies (each block row into the result, its transpose into
#: the lower triangle, the diagonal blocks mirrored), in multiply-adds per entry of
#: the result ...
BLOCK_ASSEMBLY_MACS = 150
#: ... and of each block's calls, in multiply-adds. Fitted on a 2-core AMD EPYC VM
#: (GEMMs at 200 GFLOP/s, float32): blocks took 1.4-2.3x of one GEMM's time with
#: 128-256 columns and 0.8-0.9x from 1024 columns on 1024-4608 rows; with 256-448
#: rows (two or three blocks) they broke even only at 2048 columns.
BLOCK_CALL_MACS = 10**7


#: On a GPU, products with fewer multiply-adds (all batches) take one GEMM.
GPU_MIN_BLOCK_MACS = 1 << 34


def num_blocks(rows: int, columns: int, batch: int = 1, on_gpu: bool = False) -> int:
    """Number of block rows for a Gram matrix of ``A`` with shape ``[rows, columns]``.

    On CPU the number with the fewest multiply-adds, counting ``b`` blocks'
    GEMMs as ``(b + 1) / 2b`` of one full product plus ``BLOCK_ASSEMBLY_MACS``
    per result entry and ``BLOCK_CALL_MACS`` per block.

    Args:
        rows: Number of rows ``I`` of ``A``.
        columns: Number of columns ``M`` of ``A``.
        batch: Number of matrices ``A``.
        on_gpu: Whether ``A`` is on a GPU.

    Returns:
        Between 1 and ``MAX_BLOCKS``.
    """
    most = max(1, min(MAX_BLOCKS, rows // MIN_BLOCK_ROWS))
    if on_gpu:
        return 1 if batch * rows * rows * columns < GPU_MIN_BLOCK_MACS else most
    full = rows * rows * columns
    assembly = BLOCK_ASSEMBLY_MACS * rows * rows
    costs = {
        blocks: full * (blocks + 1) / (2 * blocks) + assembly + BLOCK_CALL_MACS * blocks
        for blocks in range(2, most + 1)
    }
    costs[1] = full
    return min(costs, key=costs.get)


def gram(mat: Tensor) -> Tensor:
    """Batched Gram matrix ``mat @ mat^T`` from its upper block triangle.

    Args:
        mat: Matrices of shape ``[B, I, M]`` (any strides).

    Returns:
        The Gram matrices, of shape ``[B, I, I]``; exactly symmetric when computed
        in blocks (one full product otherwise, as symmetric as BLAS makes it).
    """
    rows = mat.shape[1]
    blocks = num_blocks(rows, mat.shape[2], mat.shape[0], mat.device.type != "cpu")
    if blocks == 1:
        return gemm_nt(mat, mat)
    if mat.stride(2) != 1 and uses_onednn(mat, mat, 2 * rows * rows * mat.shape[2]):
        # oneDNN copies a right operand that is not contiguous, once per block
        mat = mat.contiguous()
    result = mat.new_empty(mat.shape[0], rows, rows)
    edges = [rows * b // blocks for b in range(blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        block_row = gemm_nt(mat[:, start:stop], mat[:, start:])
        width = stop - start
        diagonal = block_row[:, :, :width]
        upper = diagonal.triu(1)
        result[:, start:stop, start:stop] = diagonal.triu() + upper.transpose(1, 2)
        result[:, start:stop, stop:] = block_row[:, :, width:]
        result[:, stop:, start:stop] = block_row[:, :, width:].transpose(1, 2)
    return result
