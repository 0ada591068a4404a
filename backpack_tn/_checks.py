"""Private validators that raise clear errors."""

from __future__ import annotations

from torch import Tensor
from torch.nn import Module


def check_like_weight(module: Module, name: str, tensor: Tensor):
    """Raise if ``tensor`` does not match the module weight's dtype and device.

    Args:
        module: The layer.
        name: Name of the argument, for the message.
        tensor: The tensor to check.

    Raises:
        TypeError: If ``tensor`` is not a tensor or its dtype differs.
        ValueError: If ``tensor`` lives on another device.
    """
    weight = module.weight
    layer = type(module).__name__
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{layer}: {name} must be a Tensor, got {type(tensor)}.")
    if tensor.dtype != weight.dtype:
        raise TypeError(
            f"{layer}: {name} has dtype {tensor.dtype}, but the weight has"
            f" {weight.dtype}; cast one of them."
        )
    if tensor.device != weight.device:
        raise ValueError(
            f"{layer}: {name} is on device {tensor.device}, but the weight is on"
            f" {weight.device}; move one of them."
        )


def check_hooked(module: Module):
    """Raise if BackPACK's hooks have not stored the layer's input and output.

    Args:
        module: The layer.

    Raises:
        ValueError: If ``module.input0`` or ``module.output`` is missing.
    """
    for attr in ("input0", "output"):
        if not isinstance(getattr(module, attr, None), Tensor):
            raise ValueError(
                f"{type(module).__name__} has no {attr!r}: run a forward pass of the"
                " model extended with backpack.extend(...), or set it by hand."
            )


def check_mat_shape(
    module: Module,
    product: str,
    mat: Tensor,
    feature_shape: tuple[int, ...],
    batch_size: int | None,
) -> bool:
    """Raise if ``mat`` is not ``[V, N, *feature_shape]`` (or ``[N, *feature_shape]``).

    Args:
        module: The layer.
        product: Name of the product, for the message.
        mat: The matrix to multiply.
        feature_shape: Expected trailing shape.
        batch_size: Expected ``N``; ``None`` if ``mat`` has no batch dimension.

    Returns:
        Whether ``mat`` is one vector (has no leading ``V`` dimension).

    Raises:
        ValueError: If the shape does not match.
    """
    shape, features = mat.shape, len(feature_shape)
    vectors = len(shape) - features - (batch_size is not None)
    valid = (
        vectors in (0, 1)
        and tuple(shape[len(shape) - features :]) == tuple(feature_shape)
        and (batch_size is None or shape[vectors] == batch_size)
    )
    if not valid:
        leading = () if batch_size is None else (batch_size,)
        expected = ", ".join(str(d) for d in (*leading, *feature_shape))
        raise ValueError(
            f"{type(module).__name__}.{product}: mat has shape {list(mat.shape)},"
            f" expected [V, {expected}] (or [{expected}] for one vector)."
        )
    return vectors == 0
