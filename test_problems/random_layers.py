"""Hypothesis strategies for valid (transposed) convolutions of any configuration.

:func:`conv_layers` draws a layer's hyper-parameters (dimension 1 to 3, channels,
groups, kernel size, stride, padding including ``'same'``/``'valid'``, dilation,
padding mode, output padding, bias) together with a spatial input size for which the
layer is valid. The derivative tests draw single layers from it; the extension tests
put a drawn layer into a small network.
"""

from collections.abc import Callable
from math import ceil
from typing import NamedTuple

from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
MAX_EXTRA_SIZE = {1: 4, 2: 3, 3: 1}
"""How much larger than the smallest valid size an input may be, per dimension."""


class RandomLayer(NamedTuple):
    """A drawn layer.

    Attributes:
        module_fn: Lazy constructor of the layer (default dtype, CPU).
        in_channels: Input channels ``C_in``.
        sizes: Spatial input sizes ``I``, valid for the layer.
    """

    module_fn: Callable[[], nn.Module]
    in_channels: int
    sizes: tuple[int, ...]


def _conv_sizes(
    draw: st.DrawFn,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    pads: list[tuple[int, int]],
    padding_mode: str,
) -> tuple[int, ...]:
    """Draw spatial input sizes for which a convolution is valid.

    Args:
        draw: Hypothesis draw function.
        kernel: Kernel size per axis.
        dilation: Dilation per axis.
        pads: Padding ``(left, right)`` per axis.
        padding_mode: Padding mode; ``reflect`` needs inputs larger than the padding,
            ``circular`` inputs at least as large.

    Returns:
        Input sizes per axis.
    """
    dim = len(kernel)
    sizes = []
    for k, d, (left, right) in zip(kernel, dilation, pads, strict=True):
        smallest = max(1, d * (k - 1) + 1 - left - right)
        if padding_mode == "reflect":
            smallest = max(smallest, max(left, right) + 1)
        elif padding_mode == "circular":
            smallest = max(smallest, left, right)
        sizes.append(smallest + draw(st.integers(0, MAX_EXTRA_SIZE[dim])))
    return tuple(sizes)


@st.composite
def conv_layers(draw: st.DrawFn) -> RandomLayer:
    """Draw a valid ``ConvNd`` or ``ConvTransposeNd`` and a spatial input size.

    Args:
        draw: Hypothesis draw function.

    Returns:
        The layer's constructor, input channels and spatial input sizes.
    """
    dim = draw(st.integers(1, 3))
    transpose = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    bias = draw(st.booleans())

    def per_axis(low: int, high: int) -> tuple[int, ...]:
        return tuple(draw(st.integers(low, high)) for _ in range(dim))

    kernel, stride, dilation = per_axis(1, 3), per_axis(1, 3), per_axis(1, 2)
    hyperparameters = {
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
        "bias": bias,
    }

    if transpose:
        padding = per_axis(0, 2)
        output_padding = tuple(
            draw(st.integers(0, max(s, d) - 1))
            for s, d in zip(stride, dilation, strict=True)
        )
        # output size (L - 1) * s - 2 * p + d * (k - 1) + op + 1 must be positive
        sizes = tuple(
            max(1, 1 + ceil((2 * p - d * (k - 1) - op) / s))
            + draw(st.integers(0, MAX_EXTRA_SIZE[dim]))
            for k, s, d, p, op in zip(
                kernel, stride, dilation, padding, output_padding, strict=True
            )
        )
        layer = CONV_TRANSPOSE[dim]
        hyperparameters.update(padding=padding, output_padding=output_padding)
    else:
        choices = ["int", "valid"] + (["same"] if set(stride) == {1} else [])
        padding_kind = draw(st.sampled_from(choices))
        if padding_kind == "int":
            padding = per_axis(0, 2)
            pads = [(p, p) for p in padding]
        elif padding_kind == "valid":
            padding, pads = "valid", [(0, 0)] * dim
        else:
            totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            padding, pads = "same", [(t // 2, t - t // 2) for t in totals]
        padding_mode = draw(st.sampled_from(PADDING_MODES))
        sizes = _conv_sizes(draw, kernel, dilation, pads, padding_mode)
        layer = CONV[dim]
        hyperparameters.update(padding=padding, padding_mode=padding_mode)

    def module_fn() -> nn.Module:
        return layer(c_in, c_out, kernel, **hyperparameters)

    return RandomLayer(module_fn, c_in, sizes)
