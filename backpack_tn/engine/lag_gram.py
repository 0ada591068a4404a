"""Gram matrices of unit-stride unfolded inputs from lagged products of the input.

With unit stride, the Gram matrix of an unfolded input (the KFAC-expand factor's
network ``x Π Π x`` contracted over samples and output positions) is

    A[(c, k), (c', k')] = Σ_n Σ_{o ∈ [0, O)} y[n, c, o + D k] y[n, c', o + D k'],

per spatial dimension, with ``y`` the padded input of size ``Q = O + D (K - 1)``.
Contracting the two index patterns over ``o`` leaves a band: the entry depends on
``(k, k')`` through the lag ``δ = D (k' - k)`` and on ``k`` alone through the window
``T(k) = [D k, D k + O)`` of positions it sums. Hence

    A[k, k'] = L(δ) - Σ_{q ∉ T(k)} y[q] y[q + δ]ᵀ,

where ``L(δ) = Σ_q y[q] y[q + δ]ᵀ`` sums over all positions (zero outside ``y``).
There are ``2 K - 1`` lags per dimension instead of ``K²`` pairs, and ``L(-δ) =
L(δ)ᵀ``: a 3x3 kernel needs 13 lagged products over the padded map, against 81 blocks
(45 by symmetry) over the output map. The corrections run over the thin border
strips outside each window (at most ``D (K - 1)`` positions per dimension).

Lagged products read a flat copy of the input, one row of positions per sample and
channel, with zeros after each sample: a lag in every dimension at once is one
shift of the flat index, so each ``L(δ)`` is one GEMM on two overlapping views of
the copy. Pairs that a flat shift wraps across a row end are positions outside the
windows, and the border corrections remove them with the rest.
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from backpack_tn.engine.gemm import gemm_nt


def unfolded_gram(
    padded: Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    zeros: tuple[tuple[int, int], ...] | None = None,
) -> Tensor:
    """Gram matrices per group of the unit-stride unfolding of a padded input.

    Args:
        padded: Padded input of shape ``[N, G, C, *Q]``; every spatial size must be
            larger than ``D (K - 1)`` (at least one output position).
        kernel_size: ``K`` per spatial dimension.
        dilation: ``D`` per spatial dimension.
        zeros: Per spatial dimension, how many leading and trailing positions of
            ``padded`` are zero (zero padding); the border corrections skip them.
            ``None``: none are known to be.

    Returns:
        ``Σ_{n, o} u u^T`` for the unfolded input ``u[n, g, (c, *k), *o]``, of shape
        ``[G, C * prod(K), C * prod(K)]``, exactly symmetric.

    Raises:
        ValueError: If the sizes do not match or leave no output position.
    """
    _, groups, channels, *sizes = padded.shape
    if not len(sizes) == len(kernel_size) == len(dilation):
        raise ValueError(
            f"unfolded_gram got an input with spatial sizes {tuple(sizes)}, kernel"
            f" size {kernel_size} and dilation {dilation}; they must have one entry"
            " per spatial dimension each."
        )
    spans = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
    if any(span >= size for span, size in zip(spans, sizes, strict=True)):
        raise ValueError(
            f"unfolded_gram got spatial sizes {tuple(sizes)}, kernel size"
            f" {kernel_size} and dilation {dilation}: no output position."
        )
    nonzero = _nonzero(zeros, sizes)
    flat = _FlatInput(padded, spans)
    lags = _lagged_products(flat, kernel_size, dilation)
    outputs = [size - span for size, span in zip(sizes, spans, strict=True)]
    # [G, C, *K, C', *K'], filled one block row (one k) at a time, only for
    # k'_h >= k_h along the dimension h of the largest kernel (half of the blocks
    # with k'_h = k_h): the result is this plus its transpose, which also makes it
    # exactly symmetric
    half = _halved(kernel_size)
    gram = padded.new_empty(groups, channels, *kernel_size, channels, *kernel_size)
    for k in itertools.product(*map(range, kernel_size)):
        # lags D (k' - k) for those k': a contiguous slice of the lag grid
        window = tuple(
            slice(size - 1 - ki + (ki if i == half else 0), 2 * size - 1 - ki)
            for i, (size, ki) in enumerate(zip(kernel_size, k, strict=True))
        )
        later = [
            slice(k[half], None) if i == half else slice(None) for i in range(len(k))
        ]
        row = gram[(slice(None), slice(None), *k, slice(None), *later)]
        row.copy_(lags[(..., *window)])  # [G, C, C', *K'], K'_h from k_h on
        for box in _outside(k, kernel_size, dilation, outputs, nonzero):
            row -= _box_products(flat, box, k, half, kernel_size, dilation)
        row.select(3 + half, 0).mul_(0.5)
    return _symmetrised(gram, half)


def _symmetrised(gram: Tensor, half: int) -> Tensor:
    """The filled half plus its transpose, in place, one block of offsets at a time.

    Blocks ``(k_h, k'_h)`` with ``k'_h > k_h`` hold their final values, the ones
    below are copied from their transposes, and the diagonal ones (halved) are
    added to their own transposes: no second result and no transposed pass over
    all of it.

    Args:
        gram: Tensor of shape ``[G, C, *K, C', *K']`` filled for ``k'_h >= k_h``.
        half: The dimension ``h``.

    Returns:
        The symmetric result, of shape ``[G, C * prod(K), C * prod(K)]``.
    """
    groups, channels = gram.shape[:2]
    dims = (gram.dim() - 3) // 2
    # [G, K_h, C, *K without h, K'_h, C', *K' without h]
    blocks = gram.movedim(2 + half, 1).movedim(3 + dims + half, 2 + dims)
    swap = [0, *range(1 + dims, 1 + 2 * dims), *range(1, 1 + dims)]
    size = gram.shape[2 + half]
    for a in range(size):
        row = blocks.select(1, a)
        diagonal = row.select(1 + dims, a)
        diagonal.add_(diagonal.permute(swap).clone())
        for b in range(a + 1, size):
            blocks.select(1, b).select(1 + dims, a).copy_(
                row.select(1 + dims, b).permute(swap)
            )
    rows = channels * math.prod(gram.shape[2 : 2 + dims])
    return gram.reshape(groups, rows, rows)


#: The border corrections' GEMMs are narrow and copy their lagged operand first:
#: their multiply-adds count this many times those of the lagged products (2 CPU
#: cores: 28 against 78 GMAC/s on a 96x34x34 input).
BORDER_PENALTY = 3
#: Cost of assembling and symmetrising the result, in multiply-adds per entry (2 CPU
#: cores: 2.4 ms for 0.8 M entries, 19 ms for 5.3 M) ...
ASSEMBLY_MACS = 300
#: ... and twice that from this many entries on, where each of the result's copies
#: is a fresh map whose pages fault on first touch (93 ms for 12 M entries).
LARGE_RESULT = 2**23
#: Cost of one GEMM call of either kind, in multiply-adds (about 30 µs).
CALL_MACS = 3 * 10**6


def cost(
    sizes: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    channels: int,
    groups: int,
    samples: int,
    zeros: tuple[tuple[int, int], ...] | None = None,
) -> float:
    """Multiply-adds of :func:`unfolded_gram`, its slower parts weighted up.

    Args:
        sizes: Padded spatial sizes ``Q``.
        kernel_size: ``K`` per spatial dimension.
        dilation: ``D`` per spatial dimension.
        channels: Input channels per group ``C``.
        groups: ``G``.
        samples: ``N``.
        zeros: Zero padding per dimension, as :func:`unfolded_gram` takes it.

    Returns:
        The cost, comparable with the multiply-adds of one GEMM.
    """
    spans = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
    _, margin = _flat_layout(list(sizes), spans)
    lags = (math.prod(2 * k - 1 for k in kernel_size) + 1) // 2
    lagged = lags * channels**2 * samples * (math.prod(sizes) + margin)
    outputs = [q - s for q, s in zip(sizes, spans, strict=True)]
    nonzero = _nonzero(zeros, list(sizes))
    half = _halved(kernel_size)
    others = math.prod(kernel_size) // kernel_size[half]
    boxes = [
        (box, kernel_size[half] - k[half])
        for k in itertools.product(*map(range, kernel_size))
        for box in _outside(k, kernel_size, dilation, outputs, nonzero)
    ]
    products = sum(math.prod(b - a for a, b in box) * offsets for box, offsets in boxes)
    borders = products * others * channels**2 * samples
    entries = (channels * math.prod(kernel_size)) ** 2
    assembly = ASSEMBLY_MACS * entries * (2 if groups * entries >= LARGE_RESULT else 1)
    calls = lags + len(boxes)
    return groups * (lagged + BORDER_PENALTY * borders + assembly) + CALL_MACS * calls


def _flat_layout(sizes: list[int], spans: list[int]) -> tuple[list[int], int]:
    """Flat strides of the spatial dimensions and the zeros kept around samples.

    Returns:
        The stride per dimension, and the margin: the largest flat shift of a lag.
    """
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    return strides, sum(s * t for s, t in zip(spans, strides, strict=True))


def _halved(kernel_size: tuple[int, ...]) -> int:
    """The dimension of the largest kernel, whose block rows start at the diagonal.

    Returns:
        Its index.
    """
    return max(range(len(kernel_size)), key=kernel_size.__getitem__)


def _nonzero(
    zeros: tuple[tuple[int, int], ...] | None, sizes: list[int]
) -> list[tuple[int, int]]:
    """Range of positions per dimension that are not zero padding.

    Returns:
        ``(start, stop)`` per spatial dimension.
    """
    zeros = zeros or [(0, 0)] * len(sizes)
    return [
        (lead, size - trail) for (lead, trail), size in zip(zeros, sizes, strict=True)
    ]


class _FlatInput:
    """The input as one row of positions per group and channel, zeros after samples.

    Attributes:
        data: Flat buffer of shape ``[G, C, margin + N * (T + margin) + margin]``,
            ``T = prod(Q)``; sample ``n`` starts at ``margin + n * (T + margin)``.
        strides: Flat stride of each spatial dimension.
        margin: Zeros before the first sample and after every sample; at least the
            largest flat shift of a lag.
        samples: ``N``.
        sizes: ``Q``.
    """

    def __init__(self, padded: Tensor, spans: list[int]):
        samples, groups, channels, *sizes = padded.shape
        self.samples, self.sizes = samples, sizes
        self.strides, self.margin = _flat_layout(sizes, spans)
        total = math.prod(sizes)
        self.period = total + self.margin
        self.data = padded.new_zeros(
            groups, channels, 2 * self.margin + samples * self.period
        )
        body = self.data[:, :, self.margin : self.margin + samples * self.period]
        body.view(groups, channels, samples, self.period)[..., :total].copy_(
            padded.flatten(3).permute(1, 2, 0, 3)
        )

    def view(self, offset: int, dims: list[tuple[int, int]]) -> Tensor:
        """A strided view of the buffer.

        Args:
            offset: Flat position of the first entry, relative to sample 0's start.
            dims: ``(size, stride)`` of each dimension after group and channel.

        Returns:
            View of shape ``[G, C, *sizes]``.
        """
        groups, channels, length = self.data.shape
        return self.data.as_strided(
            (groups, channels, *(size for size, _ in dims)),
            (channels * length, length, *(stride for _, stride in dims)),
            self.data.storage_offset() + self.margin + offset,
        )


def _lagged_products(
    flat: _FlatInput, kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """``L(δ)`` for every lag, summed over samples and all positions.

    Returns:
        Tensor of shape ``[G, C, C', *(2 K - 1)]``; entry ``j`` is the lag
        ``δ = D (j - K + 1)``.
    """
    groups, channels, _ = flat.data.shape
    grid = [2 * k - 1 for k in kernel_size]
    lags = flat.data.new_empty(groups, channels, channels, *grid)
    columns = flat.samples * flat.period
    left = flat.view(0, [(columns, 1)])
    for j in itertools.product(*map(range, grid)):
        shift = sum(
            d * (ji - k + 1) * stride
            for d, ji, k, stride in zip(
                dilation, j, kernel_size, flat.strides, strict=True
            )
        )
        if shift < 0:
            continue  # the transpose of the mirrored lag, filled below
        product = gemm_nt(left, flat.view(shift, [(columns, 1)]))
        lags[(..., *j)] = product
        mirrored = tuple(g - 1 - ji for g, ji in zip(grid, j, strict=True))
        lags[(..., *mirrored)] = product.transpose(1, 2)
    return lags


def _outside(
    k: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    outputs: list[int],
    nonzero: list[tuple[int, int]],
) -> list[list[tuple[int, int]]]:
    """Disjoint boxes of the possibly non-zero positions outside the window ``T(k)``.

    The complement of ``T_1 x ... x T_D`` is the union over ``i`` of ``T_1 x ... x
    T_(i-1) x (outside T_i) x all x ... x all``; each box is then cut to the
    positions that are not zero padding.

    Returns:
        Boxes as ``(start, stop)`` per spatial dimension, none empty.
    """
    windows = [
        (d * ki, d * ki + out) for d, ki, out in zip(dilation, k, outputs, strict=True)
    ]
    boxes = []
    for i, (start, stop) in enumerate(windows):
        for outside in ((-math.inf, start), (stop, math.inf)):
            box = [*windows[:i], outside, *nonzero[i + 1 :]]
            box = [
                (max(a, lo), min(b, hi))
                for (a, b), (lo, hi) in zip(box, nonzero, strict=True)
            ]
            if all(a < b for a, b in box):
                boxes.append(box)
    return boxes


def _box_products(
    flat: _FlatInput,
    box: list[tuple[int, int]],
    k: tuple[int, ...],
    half: int,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """``Σ_n Σ_{q ∈ box} y[q] y[q + D (k' - k)]ᵀ`` for all ``k'`` with ``k'_h >= k_h``.

    Args:
        flat: The input.
        box: ``(start, stop)`` per spatial dimension.
        k: Kernel offset of the block row.
        half: The dimension ``h`` whose offsets start at ``k_h``.
        kernel_size: ``K`` per spatial dimension.
        dilation: ``D`` per spatial dimension.

    Returns:
        Tensor of shape ``[G, C, C', *K']`` with ``K_h - k_h`` offsets along ``h``.
    """
    spatial = [
        (stop - start, stride)
        for (start, stop), stride in zip(box, flat.strides, strict=True)
    ]
    start = sum(s * t for (s, _), t in zip(box, flat.strides, strict=True))
    left = flat.view(start, [(flat.samples, flat.period), *spatial])
    offsets = [0 if i == half else ki for i, ki in enumerate(k)]
    first = -sum(
        d * ki * t for d, ki, t in zip(dilation, offsets, flat.strides, strict=True)
    )  # the lag of the first k'
    sizes = [size - (k[i] if i == half else 0) for i, size in enumerate(kernel_size)]
    lags = [
        (size, d * t) for size, d, t in zip(sizes, dilation, flat.strides, strict=True)
    ]
    partner = flat.view(start + first, [*lags, (flat.samples, flat.period), *spatial])
    groups, channels = left.shape[:2]
    dims = len(kernel_size)
    # [G, *K', C', N, *box]: the copy reads whole rows of the box
    partner = partner.movedim(1, 1 + dims).reshape(groups, -1, left[0, 0].numel())
    products = gemm_nt(left.reshape(groups, channels, -1), partner)
    products = products.view(groups, channels, *sizes, channels)
    return products.movedim(-1, 2)  # [G, C, C', *K']
