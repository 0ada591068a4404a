"""Tests of ``backpack_tn.engine.lag_gram``."""

import pytest
import torch

from backpack_tn.engine import lag_gram
from test_problems.compare import assert_allclose_report

#: (N, G, C, padded sizes Q, kernel size K, dilation D, zero padding or None)
LAG_CASES = [
    (2, 1, 3, (9,), (3,), (1,), None),
    (2, 2, 2, (11,), (4,), (3,), ((3, 2),)),
    (1, 1, 1, (2,), (2,), (1,), None),
    (2, 1, 3, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 2, 2, (9, 6), (3, 2), (2, 1), ((2, 0), (0, 3))),
    (1, 1, 4, (5, 5), (5, 5), (1, 1), ((2, 2), (2, 2))),
    (3, 3, 1, (4, 9), (2, 3), (1, 3), None),
    (2, 1, 2, (3, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 1, 2, (10, 10), (3, 3), (2, 2), ((3, 3), (3, 3))),
    (2, 1, 2, (6, 5), (1, 3), (1, 1), ((0, 0), (1, 1))),
    (2, 2, 2, (5, 6, 4), (3, 2, 2), (1, 2, 1), ((1, 1), (0, 0), (1, 0))),
]
LAG_IDS = [
    f"N={n}-G={g}-C={c}-Q={'x'.join(map(str, q))}-K={'x'.join(map(str, k))}"
    f"-D={'x'.join(map(str, d))}-zeros={z is not None}"
    for n, g, c, q, k, d, z in LAG_CASES
]


def _padded(samples, groups, channels, sizes, zeros):
    """A random padded input whose zero frame is zero.

    Returns:
        Tensor of shape ``[N, G, C, *Q]``.
    """
    padded = torch.randn(samples, groups, channels, *sizes, dtype=torch.float64)
    for dim, (lead, trail) in enumerate(zeros or ()):
        padded.narrow(3 + dim, 0, lead).zero_()
        padded.narrow(3 + dim, sizes[dim] - trail, trail).zero_()
    return padded


def _reference(padded, kernel_size, dilation):
    """Gram matrices of the unfolding built with ``Tensor.unfold``.

    Returns:
        Tensor of shape ``[G, C * prod(K), C * prod(K)]``.
    """
    samples, groups, channels = padded.shape[:3]
    dims = len(kernel_size)
    unfolded = padded
    for i, (k, d) in enumerate(zip(kernel_size, dilation, strict=True)):
        unfolded = unfolded.unfold(3 + i, d * (k - 1) + 1, 1)[..., ::d]
    # [N, G, C, *O, *K] -> [G, C, *K, N, *O]
    kernel_dims = range(3 + dims, 3 + 2 * dims)
    unfolded = unfolded.permute(1, 2, *kernel_dims, 0, *range(3, 3 + dims))
    rows = channels * torch.Size(kernel_size).numel()
    unfolded = unfolded.reshape(groups, rows, -1)
    return unfolded @ unfolded.transpose(1, 2)


@pytest.mark.parametrize("case", LAG_CASES, ids=LAG_IDS)
def test_unfolded_gram(case):
    """Lagged products with border corrections give the unfolded Gram matrix."""
    samples, groups, channels, sizes, kernel_size, dilation, zeros = case
    torch.manual_seed(0)
    padded = _padded(samples, groups, channels, sizes, zeros)
    result = lag_gram.unfolded_gram(padded, kernel_size, dilation, zeros)
    assert_allclose_report(result, _reference(padded, kernel_size, dilation))
    assert torch.equal(result, result.transpose(1, 2))


@pytest.mark.parametrize("case", LAG_CASES, ids=LAG_IDS)
def test_zero_frames_lower_the_cost(case):
    """Skipping zero padding never costs more, and saves where there is some."""
    samples, groups, channels, sizes, kernel_size, dilation, zeros = case
    arguments = (sizes, kernel_size, dilation, channels, groups, samples)
    without = lag_gram.cost(*arguments)
    with_zeros = lag_gram.cost(*arguments, zeros)
    assert 0 < with_zeros <= without
    if zeros is not None and any(sum(z) > 0 for z in zeros):
        assert with_zeros < without


#: (padded shape, kernel size, dilation, message)
ERROR_CASES = [
    ((2, 1, 3, 5, 5), (3,), (1,), "one entry per spatial dimension"),
    ((2, 1, 3, 5), (3,), (1, 1), "one entry per spatial dimension"),
    ((2, 1, 3, 4, 5), (3, 3), (2, 1), "no output position"),
]


@pytest.mark.parametrize("shape, kernel_size, dilation, match", ERROR_CASES)
def test_unfolded_gram_rejects_bad_sizes(shape, kernel_size, dilation, match):
    """Mismatched dimensions and kernels larger than the input raise."""
    with pytest.raises(ValueError, match=match):
        lag_gram.unfolded_gram(torch.zeros(shape), kernel_size, dilation)
