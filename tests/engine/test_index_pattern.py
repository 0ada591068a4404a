"""Tests of ``backpack_tn.engine.index_pattern``."""

import pytest
import torch
from torch.nn import functional

from backpack_tn.engine.index_pattern import IndexPattern, clear_caches
from test_problems.compare import assert_allclose_report

PATTERN_CASES = [
    IndexPattern(7, 3),
    IndexPattern(8, 3, stride=2, padding=(1, 1)),
    IndexPattern(9, 2, stride=2),
    IndexPattern(9, 1, stride=3),
    IndexPattern(9, 3, dilation=2, padding=(2, 1)),
    IndexPattern(6, 4, padding=(1, 2), padding_mode="reflect"),
    IndexPattern(6, 3, stride=2, padding=(2, 2), padding_mode="replicate"),
    IndexPattern(5, 3, padding=(3, 2), padding_mode="circular"),
]
PATTERN_IDS = [
    f"I={p.input_size}-K={p.kernel_size}-S={p.stride}-P={p.padding}-D={p.dilation}"
    f"-{p.padding_mode}"
    for p in PATTERN_CASES
]


@pytest.mark.parametrize("pattern", PATTERN_CASES, ids=PATTERN_IDS)
def test_pattern_is_conv1d(pattern: IndexPattern):
    """A 1d convolution through the dense pattern equals PyTorch's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, pattern.input_size, dtype=torch.float64)
    w = torch.randn(4, 3, pattern.kernel_size, dtype=torch.float64)
    mode = pattern.padding_mode
    padded = functional.pad(
        x, pattern.padding, mode="constant" if mode == "zeros" else mode
    )
    expected = functional.conv1d(
        padded, w, stride=pattern.stride, dilation=pattern.dilation
    )
    dense = pattern.dense(x.device, x.dtype)
    assert dense.shape == (pattern.kernel_size, pattern.output_size, pattern.input_size)
    actual = torch.einsum("nci,dck,koi->ndo", x, w, dense)
    assert_allclose_report(actual, expected, name="conv1d through pattern")


def test_dense_is_cached_and_cache_clears():
    """Dense patterns are built once per (pattern, device, dtype)."""
    pattern = IndexPattern(5, 2)
    first = pattern.dense("cpu", torch.float32)
    assert pattern.dense("cpu", torch.float32) is first
    assert pattern.dense("cpu", torch.float64) is not first
    clear_caches()
    assert pattern.dense("cpu", torch.float32) is not first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": 0, "kernel_size": 1}, "input_size must be a positive int"),
        ({"input_size": 3, "kernel_size": 2, "stride": 0}, "stride must be a positive"),
        ({"input_size": 3, "kernel_size": 5}, "has no output positions"),
        ({"input_size": 3, "kernel_size": 1, "padding": (1,)}, "padding must be two"),
        (
            {"input_size": 3, "kernel_size": 1, "padding_mode": "mirror"},
            "Unsupported padding_mode 'mirror'",
        ),
        (
            {
                "input_size": 3,
                "kernel_size": 1,
                "padding": (3, 0),
                "padding_mode": "reflect",
            },
            "needs padding <= 2",
        ),
    ],
)
def test_invalid_pattern_raises(kwargs, match):
    """Invalid hyper-parameters are rejected with a clear message."""
    with pytest.raises(ValueError, match=match):
        IndexPattern(**kwargs)


def test_num_outputs_truncates():
    """``num_outputs`` keeps the first output positions (transposed convolution)."""
    full = IndexPattern(6, 2, dilation=2)
    cut = IndexPattern(6, 2, dilation=2, num_outputs=3)
    assert (full.output_size, cut.output_size) == (4, 3)
    assert torch.equal(cut.index_map(), full.index_map()[:, :3])
    with pytest.raises(ValueError, match=r"num_outputs must be in \[1, 4\]"):
        IndexPattern(6, 2, dilation=2, num_outputs=5)
