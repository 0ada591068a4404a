"""Map layer types to the tensor-network derivatives under test, and their limits."""

from collections.abc import Callable

from torch.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Linear,
    Module,
)

from backpack_tn.derivatives import (
    Conv1DDerivativesTN,
    Conv2DDerivativesTN,
    Conv3DDerivativesTN,
    ConvTranspose1DDerivativesTN,
    ConvTranspose2DDerivativesTN,
    ConvTranspose3DDerivativesTN,
    LinearDerivativesTN,
)
from test_problems.cases import CONV_TRANSPOSE_TYPES

TN_DERIVATIVES: dict[type[Module], type] = {
    Linear: LinearDerivativesTN,
    Conv1d: Conv1DDerivativesTN,
    Conv2d: Conv2DDerivativesTN,
    Conv3d: Conv3DDerivativesTN,
    ConvTranspose1d: ConvTranspose1DDerivativesTN,
    ConvTranspose2d: ConvTranspose2DDerivativesTN,
    ConvTranspose3d: ConvTranspose3DDerivativesTN,
}
"""Tensor-network derivatives class of each layer type."""

STOCK_STRATEGIES = ("same_conv", "higher_conv")
"""Strategies that run stock BackPACK's convolution weight VJP."""


def _uneven_same_padding(module: Module) -> bool:
    """Whether ``padding='same'`` pads one side more than the other.

    Args:
        module: Layer.

    Returns:
        ``True`` if some axis has an odd total padding ``dilation * (kernel - 1)``.
    """
    if getattr(module, "padding", None) != "same":
        return False
    return any(
        d * (k - 1) % 2 == 1
        for d, k in zip(module.dilation, module.kernel_size, strict=True)
    )


WEIGHT_VJP_LIMITS: list[tuple[tuple[str, ...], Callable[[Module], bool], str]] = [
    (
        STOCK_STRATEGIES,
        lambda module: isinstance(module, CONV_TRANSPOSE_TYPES),
        "stock BackPACK has no such weight VJP for transpose convolutions",
    ),
    (
        STOCK_STRATEGIES,
        lambda module: getattr(module, "padding_mode", "zeros") != "zeros",
        "stock BackPACK assumes zero padding",
    ),
    (
        STOCK_STRATEGIES,
        _uneven_same_padding,
        "stock BackPACK assumes the same padding on both sides",
    ),
    (
        ("higher_conv",),
        lambda module: isinstance(module, Conv3d),
        "PyTorch has no 4d convolution",
    ),
]
"""``(strategies, applies(module), reason)``: the weight VJP raises
``NotImplementedError`` naming the strategy when ``applies(module)`` holds."""


def tn_derivatives_class(layer_type: type[Module]) -> type:
    """Return the tensor-network derivatives class for a layer type.

    Args:
        layer_type: Layer class, e.g. ``torch.nn.Conv2d``.

    Returns:
        The class from ``backpack_tn.derivatives`` registered for the layer type.

    Raises:
        NotImplementedError: If no class is registered for the layer type.
    """
    cls = TN_DERIVATIVES.get(layer_type)
    if cls is None:
        raise NotImplementedError(
            f"No tensor-network derivatives registered for {layer_type.__name__}. "
            f"Registered: {sorted(t.__name__ for t in TN_DERIVATIVES)}."
        )
    return cls


def weight_vjp_unsupported(module: Module, strategy: str) -> str | None:
    """Return why the weight VJP of ``module`` is unsupported under ``strategy``.

    Args:
        module: Layer.
        strategy: Strategy name.

    Returns:
        The reason, or ``None`` if the weight VJP is supported.
    """
    for strategies, applies, reason in WEIGHT_VJP_LIMITS:
        if strategy in strategies and applies(module):
            return reason
    return None
