"""Unfolded input (im2col) of a layer."""

from __future__ import annotations

from math import prod

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import input_operand, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(spec: LayerSpec, x: Tensor) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of the unfolded input ``U[n, (c, k), o] = Σ_i x[n, c, i] Π[k, o, i]``.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.

    Returns:
        The network and the result's shape ``[N, C_in * prod(K), prod(O)]`` (the
        layout of BackPACK's ``unfold_input`` / ``unfold_by_conv_transpose``).
    """
    operands, legs = input_operand(spec, x)
    net = TensorNetwork(
        operands,
        legs,
        ("n", "g", "b", *spec.kernel_legs(), *spec.spatial_legs("out")),
    )
    shape = (
        x.shape[0],
        spec.in_channels * prod(spec.kernel_size),
        prod(spec.output_spatial),
    )
    return net, shape


def einsum_expression(
    spec: LayerSpec, x: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of the unfolded input; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[N, C_in * prod(K), prod(O)]``.
    """
    return to_einsum_expression(*tensor_network(spec, x), simplify)
