"""Weight Jacobian-matrix product (weight JVP)."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import input_operand, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, x: Tensor, mat: Tensor
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``J_W mat``.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Weight perturbations of shape ``[V, *weight_shape]``.

    Returns:
        The network and the result's shape ``[V, N, *output_shape[1:]]``.
    """
    operands, legs = input_operand(spec, x)
    net = TensorNetwork(
        [spec.split_weight(mat, 1), *operands],
        [("v", *spec.weight_legs()), *legs],
        ("v", "n", *spec.feature_legs("out", "a")),
    )
    return net, (mat.shape[0], *spec.output_shape(x.shape[0]))


def einsum_expression(
    spec: LayerSpec, x: Tensor, mat: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of ``J_W mat``; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Weight perturbations of shape ``[V, *weight_shape]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[V, N, *output_shape[1:]]``.
    """
    return to_einsum_expression(*tensor_network(spec, x, mat), simplify)
