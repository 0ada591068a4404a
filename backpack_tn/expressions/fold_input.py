"""Transpose of the input unfolding (col2im): scatter patches back onto the input."""

from __future__ import annotations

from math import prod

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, unfolded: Tensor
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``x[n, c, i] = Σ_{k, o} U[n, (c, k), o] Π[k, o, i]``.

    The adjoint of :mod:`~backpack_tn.expressions.unfold_input`: every patch entry
    is added to the input position it was read from (reads of zero padding drop).

    Args:
        spec: Layer description (a convolution or transposed convolution).
        unfolded: Patches of shape ``[N, C_in * prod(K), prod(O)]``.

    Returns:
        The network and the result's shape ``[N, *input_shape[1:]]``.
    """
    patterns, pattern_legs = spec.pattern_operands()
    kernel, out = spec.kernel_legs(), spec.spatial_legs("out")
    patches = unfolded.reshape(
        unfolded.shape[0],
        spec.groups,
        spec.in_channels // spec.groups,
        *spec.kernel_size,
        *spec.output_spatial,
    )
    net = TensorNetwork(
        [patches, *patterns],
        [("n", "g", "b", *kernel, *out), *pattern_legs],
        ("n", *spec.feature_legs("in", "b")),
    )
    return net, spec.input_shape(unfolded.shape[0])


def einsum_expression(
    spec: LayerSpec, unfolded: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of the folded patches; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        unfolded: Patches of shape ``[N, C_in * prod(K), prod(O)]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[N, *input_shape[1:]]``.
    """
    return to_einsum_expression(*tensor_network(spec, unfolded), simplify)


def unfolded_shape(spec: LayerSpec, batch_size: int) -> tuple[int, int, int]:
    """Shape of the patches that :func:`tensor_network` folds.

    Args:
        spec: Layer description.
        batch_size: ``N``.

    Returns:
        ``(N, C_in * prod(K), prod(O))``.
    """
    return (
        batch_size,
        spec.in_channels * prod(spec.kernel_size),
        prod(spec.output_spatial),
    )
