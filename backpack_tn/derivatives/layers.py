"""TN derivative classes, one per layer, subclassing BackPACK's derivatives."""

from __future__ import annotations

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.conv_transpose1d import ConvTranspose1DDerivatives
from backpack.core.derivatives.conv_transpose2d import ConvTranspose2DDerivatives
from backpack.core.derivatives.conv_transpose3d import ConvTranspose3DDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from torch.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Linear,
)

from backpack_tn.derivatives.base import TNDerivativesMixin


class LinearDerivativesTN(TNDerivativesMixin, LinearDerivatives):
    """Tensor-network derivatives of ``torch.nn.Linear`` (inputs ``[N, *, C_in]``)."""


class Conv1DDerivativesTN(TNDerivativesMixin, Conv1DDerivatives):
    """Tensor-network derivatives of ``torch.nn.Conv1d``."""


class Conv2DDerivativesTN(TNDerivativesMixin, Conv2DDerivatives):
    """Tensor-network derivatives of ``torch.nn.Conv2d``."""


class Conv3DDerivativesTN(TNDerivativesMixin, Conv3DDerivatives):
    """Tensor-network derivatives of ``torch.nn.Conv3d``."""


class ConvTranspose1DDerivativesTN(TNDerivativesMixin, ConvTranspose1DDerivatives):
    """Tensor-network derivatives of ``torch.nn.ConvTranspose1d``."""


class ConvTranspose2DDerivativesTN(TNDerivativesMixin, ConvTranspose2DDerivatives):
    """Tensor-network derivatives of ``torch.nn.ConvTranspose2d``."""


class ConvTranspose3DDerivativesTN(TNDerivativesMixin, ConvTranspose3DDerivatives):
    """Tensor-network derivatives of ``torch.nn.ConvTranspose3d``."""


#: Layer type -> its TN derivative class.
DERIVATIVES = {
    Linear: LinearDerivativesTN,
    Conv1d: Conv1DDerivativesTN,
    Conv2d: Conv2DDerivativesTN,
    Conv3d: Conv3DDerivativesTN,
    ConvTranspose1d: ConvTranspose1DDerivativesTN,
    ConvTranspose2d: ConvTranspose2DDerivativesTN,
    ConvTranspose3d: ConvTranspose3DDerivativesTN,
}
