"""Tensor-network derivatives for BackPACK: drop-in subclasses of its derivatives."""

from backpack_tn.derivatives.choice import STRATEGIES, set_autotune, set_host_probe
from backpack_tn.derivatives.layers import (
    DERIVATIVES,
    Conv1DDerivativesTN,
    Conv2DDerivativesTN,
    Conv3DDerivativesTN,
    ConvTranspose1DDerivativesTN,
    ConvTranspose2DDerivativesTN,
    ConvTranspose3DDerivativesTN,
    LinearDerivativesTN,
)

__all__ = [
    "DERIVATIVES",
    "STRATEGIES",
    "Conv1DDerivativesTN",
    "Conv2DDerivativesTN",
    "Conv3DDerivativesTN",
    "ConvTranspose1DDerivativesTN",
    "ConvTranspose2DDerivativesTN",
    "ConvTranspose3DDerivativesTN",
    "LinearDerivativesTN",
    "set_autotune",
    "set_host_probe",
]
