"""Cases for ``torch.nn.Conv{1,2,3}d`` and ``torch.nn.ConvTranspose{1,2,3}d``.

Sizes are small (a few channels, spatial sizes up to 9 in 2d and 5 in 3d) so that the
full matrix of products, strategies and cases runs quickly. See
:mod:`test_problems.cases` for the keys of a case.
"""

from torch import randn
from torch.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
)

from test_problems.cases import expand_cases

CONV1D_CASES = [
    {
        "seed": 100,
        "module_fn": lambda: Conv1d(3, 4, 3),
        "input_fn": lambda: randn(2, 3, 9),
    },
    {
        "seed": 101,
        "module_fn": lambda: Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
        "input_fn": lambda: randn(2, 3, 9),
    },
    # 'same' with an even kernel: total padding 3 is split as 1 + 2
    {
        "seed": 102,
        "module_fn": lambda: Conv1d(2, 3, 4, padding="same"),
        "input_fn": lambda: randn(2, 2, 7),
    },
    {
        "seed": 103,
        "module_fn": lambda: Conv1d(2, 3, 3, padding="valid"),
        "input_fn": lambda: randn(2, 2, 6),
    },
    {
        "seed": 104,
        "module_fn": lambda: Conv1d(
            4, 6, 3, padding=1, groups=2, padding_mode="reflect"
        ),
        "input_fn": lambda: randn(2, 4, 8),
    },
    {
        "seed": 105,
        "module_fn": lambda: Conv1d(2, 3, 3, padding=2, padding_mode="circular"),
        "input_fn": lambda: randn(3, 2, 7),
    },
    {
        "seed": 106,
        "module_fn": lambda: Conv1d(
            2, 3, 3, padding=1, padding_mode="replicate", bias=False
        ),
        "input_fn": lambda: randn(2, 2, 5),
    },
    # dense patch embedding (K = S)
    {
        "seed": 107,
        "module_fn": lambda: Conv1d(2, 3, 4, stride=4),
        "input_fn": lambda: randn(2, 2, 8),
    },
    # down-sampling (S > K): some inputs are never read
    {
        "seed": 108,
        "module_fn": lambda: Conv1d(2, 3, 1, stride=2),
        "input_fn": lambda: randn(2, 2, 9),
    },
    {
        "seed": 109,
        "module_fn": lambda: Conv1d(2, 3, 2, stride=3),
        "input_fn": lambda: randn(2, 2, 9),
    },
    # depthwise, batch size 1
    {
        "seed": 110,
        "module_fn": lambda: Conv1d(3, 3, 3, padding=1, groups=3),
        "input_fn": lambda: randn(1, 3, 7),
    },
]
"""Conv1d cases before expansion over devices and dtypes."""

CONV2D_CASES = [
    {
        "seed": 200,
        "module_fn": lambda: Conv2d(3, 4, 3),
        "input_fn": lambda: randn(2, 3, 8, 8),
    },
    {
        "seed": 201,
        "module_fn": lambda: Conv2d(3, 4, 3, stride=2, padding=1),
        "input_fn": lambda: randn(2, 3, 8, 8),
    },
    # non-square kernel, tuple stride and padding, odd sizes
    {
        "seed": 202,
        "module_fn": lambda: Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2)),
        "input_fn": lambda: randn(2, 2, 7, 5),
    },
    {
        "seed": 203,
        "module_fn": lambda: Conv2d(2, 3, 3, padding=2, dilation=(2, 1)),
        "input_fn": lambda: randn(2, 2, 7, 6),
    },
    # uneven 'same': total padding 3 from dilation 3 (height) and kernel 4 (width)
    {
        "seed": 204,
        "module_fn": lambda: Conv2d(2, 3, (2, 4), padding="same", dilation=(3, 1)),
        "input_fn": lambda: randn(2, 2, 7, 6),
    },
    {
        "seed": 205,
        "module_fn": lambda: Conv2d(2, 3, 3, padding="same", dilation=2),
        "input_fn": lambda: randn(2, 2, 6, 6),
    },
    {
        "seed": 206,
        "module_fn": lambda: Conv2d(2, 3, (2, 3), padding="valid"),
        "input_fn": lambda: randn(2, 2, 5, 6),
    },
    {
        "seed": 207,
        "module_fn": lambda: Conv2d(4, 6, 3, padding=1, groups=2),
        "input_fn": lambda: randn(2, 4, 6, 6),
    },
    # depthwise with channel multiplier 2
    {
        "seed": 208,
        "module_fn": lambda: Conv2d(3, 6, 3, padding=1, groups=3),
        "input_fn": lambda: randn(2, 3, 6, 6),
    },
    {
        "seed": 209,
        "module_fn": lambda: Conv2d(4, 4, 3, stride=2, groups=4, bias=False),
        "input_fn": lambda: randn(2, 4, 7, 7),
    },
    {
        "seed": 210,
        "module_fn": lambda: Conv2d(3, 4, 3, padding=1, bias=False),
        "input_fn": lambda: randn(2, 3, 5, 5),
    },
    {
        "seed": 211,
        "module_fn": lambda: Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        "input_fn": lambda: randn(2, 2, 6, 6),
    },
    {
        "seed": 212,
        "module_fn": lambda: Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate"),
        "input_fn": lambda: randn(2, 2, 5, 6),
    },
    {
        "seed": 213,
        "module_fn": lambda: Conv2d(
            2, 3, 3, stride=2, padding=2, padding_mode="circular"
        ),
        "input_fn": lambda: randn(2, 2, 7, 7),
    },
    # uneven 'same' with a non-zero padding mode
    {
        "seed": 214,
        "module_fn": lambda: Conv2d(2, 3, 4, padding="same", padding_mode="reflect"),
        "input_fn": lambda: randn(2, 2, 6, 7),
    },
    {
        "seed": 215,
        "module_fn": lambda: Conv2d(
            2, 4, 3, stride=2, padding=1, groups=2, padding_mode="circular"
        ),
        "input_fn": lambda: randn(2, 2, 6, 6),
    },
    # batch size 1
    {
        "seed": 216,
        "module_fn": lambda: Conv2d(3, 4, 3, padding=1),
        "input_fn": lambda: randn(1, 3, 5, 5),
    },
    # odd sizes
    {
        "seed": 217,
        "module_fn": lambda: Conv2d(2, 3, 3),
        "input_fn": lambda: randn(3, 2, 7, 5),
    },
    # 1x1 convolutions
    {
        "seed": 218,
        "module_fn": lambda: Conv2d(3, 5, 1),
        "input_fn": lambda: randn(2, 3, 5, 5),
    },
    {
        "seed": 219,
        "module_fn": lambda: Conv2d(3, 5, 1, stride=2),
        "input_fn": lambda: randn(2, 3, 7, 7),
    },
    # dense patch embeddings (K = S)
    {
        "seed": 220,
        "module_fn": lambda: Conv2d(3, 4, 2, stride=2),
        "input_fn": lambda: randn(2, 3, 8, 8),
    },
    {
        "seed": 221,
        "module_fn": lambda: Conv2d(3, 4, 4, stride=4, padding=0),
        "input_fn": lambda: randn(2, 3, 8, 8),
    },
    # down-sampling (S > K): some inputs are never read
    {
        "seed": 222,
        "module_fn": lambda: Conv2d(2, 3, 2, stride=3),
        "input_fn": lambda: randn(2, 2, 9, 9),
    },
    {
        "seed": 223,
        "module_fn": lambda: Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        "input_fn": lambda: randn(2, 4, 9, 9),
    },
    {
        "seed": 224,
        "module_fn": lambda: Conv2d(2, 3, (1, 3), stride=(1, 2)),
        "input_fn": lambda: randn(2, 2, 5, 9),
    },
]
"""Conv2d cases before expansion over devices and dtypes."""

CONV3D_CASES = [
    {
        "seed": 300,
        "module_fn": lambda: Conv3d(2, 3, 2),
        "input_fn": lambda: randn(2, 2, 4, 4, 4),
    },
    {
        "seed": 301,
        "module_fn": lambda: Conv3d(2, 3, 3, stride=2, padding=1),
        "input_fn": lambda: randn(2, 2, 5, 5, 5),
    },
    {
        "seed": 302,
        "module_fn": lambda: Conv3d(
            2, 3, (1, 2, 3), padding=(0, 1, 1), dilation=(1, 2, 1)
        ),
        "input_fn": lambda: randn(2, 2, 3, 4, 5),
    },
    {
        "seed": 303,
        "module_fn": lambda: Conv3d(4, 2, 2, groups=2),
        "input_fn": lambda: randn(2, 4, 3, 4, 3),
    },
    # depthwise with channel multiplier 2, batch size 1
    {
        "seed": 304,
        "module_fn": lambda: Conv3d(2, 4, 3, padding=1, groups=2),
        "input_fn": lambda: randn(1, 2, 4, 4, 4),
    },
    # uneven 'same'
    {
        "seed": 305,
        "module_fn": lambda: Conv3d(2, 3, 2, padding="same"),
        "input_fn": lambda: randn(2, 2, 4, 4, 4),
    },
    {
        "seed": 306,
        "module_fn": lambda: Conv3d(2, 3, 3, padding=1, padding_mode="reflect"),
        "input_fn": lambda: randn(2, 2, 4, 4, 4),
    },
    {
        "seed": 307,
        "module_fn": lambda: Conv3d(
            2, 3, 2, padding=(1, 0, 1), padding_mode="replicate", bias=False
        ),
        "input_fn": lambda: randn(2, 2, 3, 4, 4),
    },
    {
        "seed": 308,
        "module_fn": lambda: Conv3d(
            2, 3, 3, stride=2, padding=2, padding_mode="circular"
        ),
        "input_fn": lambda: randn(2, 2, 5, 4, 5),
    },
    # dense patch embedding (K = S)
    {
        "seed": 309,
        "module_fn": lambda: Conv3d(2, 3, 2, stride=2),
        "input_fn": lambda: randn(2, 2, 4, 4, 4),
    },
    # down-sampling (S > K)
    {
        "seed": 310,
        "module_fn": lambda: Conv3d(2, 3, 1, stride=2),
        "input_fn": lambda: randn(2, 2, 5, 5, 5),
    },
    {
        "seed": 311,
        "module_fn": lambda: Conv3d(2, 3, 2, stride=3, padding="valid"),
        "input_fn": lambda: randn(2, 2, 5, 5, 5),
    },
]
"""Conv3d cases before expansion over devices and dtypes."""

CONV_TRANSPOSE1D_CASES = [
    {
        "seed": 400,
        "module_fn": lambda: ConvTranspose1d(3, 4, 3),
        "input_fn": lambda: randn(2, 3, 5),
    },
    {
        "seed": 401,
        "module_fn": lambda: ConvTranspose1d(
            3, 4, 3, stride=2, padding=1, output_padding=1
        ),
        "input_fn": lambda: randn(2, 3, 5),
    },
    {
        "seed": 402,
        "module_fn": lambda: ConvTranspose1d(
            2, 3, 3, stride=3, dilation=2, output_padding=2
        ),
        "input_fn": lambda: randn(2, 2, 4),
    },
    {
        "seed": 403,
        "module_fn": lambda: ConvTranspose1d(4, 6, 3, stride=2, groups=2),
        "input_fn": lambda: randn(2, 4, 5),
    },
    {
        "seed": 404,
        "module_fn": lambda: ConvTranspose1d(2, 3, 2, stride=2, bias=False),
        "input_fn": lambda: randn(1, 2, 5),
    },
]
"""ConvTranspose1d cases before expansion over devices and dtypes."""

CONV_TRANSPOSE2D_CASES = [
    {
        "seed": 500,
        "module_fn": lambda: ConvTranspose2d(3, 4, 3),
        "input_fn": lambda: randn(2, 3, 4, 4),
    },
    {
        "seed": 501,
        "module_fn": lambda: ConvTranspose2d(
            3, 4, 3, stride=2, padding=1, output_padding=1
        ),
        "input_fn": lambda: randn(2, 3, 4, 4),
    },
    {
        "seed": 502,
        "module_fn": lambda: ConvTranspose2d(
            2,
            3,
            (3, 2),
            stride=(2, 3),
            padding=(1, 0),
            output_padding=(1, 2),
            dilation=(1, 2),
        ),
        "input_fn": lambda: randn(2, 2, 3, 4),
    },
    {
        "seed": 503,
        "module_fn": lambda: ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2),
        "input_fn": lambda: randn(2, 4, 4, 4),
    },
    # depthwise
    {
        "seed": 504,
        "module_fn": lambda: ConvTranspose2d(3, 3, 3, padding=1, groups=3),
        "input_fn": lambda: randn(2, 3, 5, 5),
    },
    # up-sampling with K = S
    {
        "seed": 505,
        "module_fn": lambda: ConvTranspose2d(3, 4, 2, stride=2),
        "input_fn": lambda: randn(2, 3, 4, 4),
    },
    {
        "seed": 506,
        "module_fn": lambda: ConvTranspose2d(
            2, 3, 3, padding=2, dilation=2, bias=False
        ),
        "input_fn": lambda: randn(1, 2, 5, 5),
    },
    # odd sizes, output padding along one axis only
    {
        "seed": 507,
        "module_fn": lambda: ConvTranspose2d(
            2, 3, 3, stride=2, padding=1, output_padding=(0, 1)
        ),
        "input_fn": lambda: randn(3, 2, 3, 5),
    },
    # output padding not below the stride (allowed since it is below the dilation)
    {
        "seed": 508,
        "module_fn": lambda: ConvTranspose2d(
            2, 3, 2, stride=(1, 2), dilation=(2, 1), output_padding=(1, 0)
        ),
        "input_fn": lambda: randn(2, 2, 3, 3),
    },
]
"""ConvTranspose2d cases before expansion over devices and dtypes."""

CONV_TRANSPOSE3D_CASES = [
    {
        "seed": 600,
        "module_fn": lambda: ConvTranspose3d(2, 3, 2),
        "input_fn": lambda: randn(2, 2, 3, 3, 3),
    },
    {
        "seed": 601,
        "module_fn": lambda: ConvTranspose3d(
            2, 3, 3, stride=2, padding=1, output_padding=1
        ),
        "input_fn": lambda: randn(2, 2, 2, 3, 2),
    },
    {
        "seed": 602,
        "module_fn": lambda: ConvTranspose3d(
            4, 2, (1, 2, 3), stride=(1, 2, 1), groups=2
        ),
        "input_fn": lambda: randn(2, 4, 3, 2, 3),
    },
    {
        "seed": 603,
        "module_fn": lambda: ConvTranspose3d(
            2, 3, 2, stride=2, dilation=(1, 2, 1), bias=False
        ),
        "input_fn": lambda: randn(1, 2, 2, 3, 2),
    },
]
"""ConvTranspose3d cases before expansion over devices and dtypes."""

CONV_BASE_CASES = (
    CONV1D_CASES
    + CONV2D_CASES
    + CONV3D_CASES
    + CONV_TRANSPOSE1D_CASES
    + CONV_TRANSPOSE2D_CASES
    + CONV_TRANSPOSE3D_CASES
)
"""All (transpose) convolution cases before expansion over devices and dtypes."""

CONV_CASES, CONV_IDS = expand_cases(CONV_BASE_CASES)
