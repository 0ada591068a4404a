"""Input-side Kronecker factor of KFAC-expand (KFC, Grosse & Martens 2016)."""

from __future__ import annotations

from math import prod

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import input_operand, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(spec: LayerSpec, x: Tensor) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``A = 1/N Σ_n Σ_o u[n, :, o] u[n, :, o]^T`` per group.

    ``u`` is the unfolded input; every output position ``o`` (every shared position
    of a Linear layer) counts as an extra sample (expand). Scaling follows
    BackPACK's KFAC for convolutions: divided by ``N``, not by ``N * R``.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.

    Returns:
        The network and the result's shape ``[G, C_in // G * prod(K)] * 2``.
    """
    first, first_legs = input_operand(spec, x)
    second, second_legs = input_operand(spec, x, "_")
    scale = x.new_tensor(1.0 / x.shape[0])
    net = TensorNetwork(
        [scale, *first, *second],
        [(), *first_legs, *second_legs],
        ("g", "b", *spec.kernel_legs(), "b_", *spec.kernel_legs("_")),
    )
    return net, result_shape(spec)


def result_shape(spec: LayerSpec) -> tuple[int, int, int]:
    """Shape of the KFAC-expand input factor.

    Args:
        spec: Layer description.

    Returns:
        ``(G, C_in // G * prod(K), C_in // G * prod(K))``.
    """
    size = spec.in_channels // spec.groups * prod(spec.kernel_size)
    return spec.groups, size, size


def einsum_expression(
    spec: LayerSpec, x: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of the KFAC-expand input factor; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[G, C_in // G * prod(K)] * 2``.
    """
    return to_einsum_expression(*tensor_network(spec, x), simplify)
