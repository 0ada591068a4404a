"""Input-side Kronecker factor of KFAC-reduce (Eschenhagen et al., NeurIPS 2023)."""

from __future__ import annotations

from math import prod

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import input_operand, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(spec: LayerSpec, x: Tensor) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``A = 1/N Σ_n ū_n ū_n^T`` per group, ``ū_n = 1/R Σ_o u[n, :, o]``.

    ``u`` is the unfolded input and ``R`` the number of output positions (shared
    positions for Linear). The sum over positions happens inside the network,
    before the channels are touched, so the unfolded input never exists.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.

    Returns:
        The network and the result's shape ``[G, C_in // G * prod(K)] * 2``.
    """
    first, first_legs = input_operand(spec, x)
    second, second_legs = input_operand(
        spec, x, "_", rename=("channel", "kernel", "in", "out")
    )
    scale = x.new_tensor(1.0 / (x.shape[0] * spec.num_positions**2))
    net = TensorNetwork(
        [scale, *first, *second],
        [(), *first_legs, *second_legs],
        ("g", "b", *spec.kernel_legs(), "b_", *spec.kernel_legs("_")),
    )
    size = spec.in_channels // spec.groups * prod(spec.kernel_size)
    return net, (spec.groups, size, size)


def einsum_expression(
    spec: LayerSpec, x: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of the KFAC-reduce input factor; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[G, C_in // G * prod(K)] * 2``.
    """
    return to_einsum_expression(*tensor_network(spec, x), simplify)
