"""Memory-layout helpers: work in the order a tensor's elements lie in memory.

PyTorch allocates the results of copies and reductions in the logical order of
their dimensions. When an operand's memory order differs (a permuted GEMM result,
a strided view of a pattern), the kernel walks one side with large strides or
with a short inner loop, which can cost ten times a well-ordered pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def by_stride(x: Tensor, dims: Sequence[int]) -> list[int]:
    """Dimensions ordered from the largest stride to the smallest.

    Args:
        x: The tensor.
        dims: Some of its dimensions.

    Returns:
        ``dims`` in memory order, outermost first (larger sizes first on ties).
    """
    return sorted(dims, key=lambda d: (-x.stride(d), -x.shape[d]))


def flat_view(x: Tensor, groups: Sequence[Sequence[int]]) -> Tensor | None:
    """View ``x`` with each group of dimensions merged into one, without a copy.

    Args:
        x: The tensor.
        groups: Dimensions of ``x`` per merged dimension, each outer to inner.

    Returns:
        The view, or ``None`` if some group's dimensions are not evenly strided.
    """
    sizes, strides = [], []
    for group in groups:
        dims = [d for d in group if x.shape[d] != 1]
        for outer, inner in zip(dims[:-1], dims[1:], strict=True):
            if x.stride(outer) != x.stride(inner) * x.shape[inner]:
                return None
        sizes.append(math.prod(x.shape[d] for d in group))
        strides.append(x.stride(dims[-1]) if dims else 1)
    return x.as_strided(sizes, strides, x.storage_offset())


def sum_in_memory_order(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``x.sum(dims)``, with the result laid out in ``x``'s memory order.

    Args:
        x: The tensor.
        dims: Dimensions to sum out; none leaves ``x`` as it is (unlike
            ``Tensor.sum``, which then sums all of them).

    Returns:
        The sum, with the remaining dimensions in their order in ``x`` (a view of
        a result that is contiguous in ``x``'s memory order).
    """
    if not dims:
        return x
    order = by_stride(x, range(x.dim()))
    summed = x.permute(order).sum([order.index(d) for d in dims])
    kept = [d for d in order if d not in dims]
    return summed.permute(sorted(range(len(kept)), key=kept.__getitem__))


def view_key(x: Tensor) -> tuple:
    """What makes two tensors the same view of memory, as a hashable key.

    Returns:
        The data pointer, device, shape, strides, dtype and whether ``x`` records
        gradients (a tensor and its detached copy are different operands).
    """
    return (x.data_ptr(), x.device, x.shape, x.stride(), x.dtype, x.requires_grad)
