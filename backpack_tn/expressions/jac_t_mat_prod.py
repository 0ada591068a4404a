"""Transposed input Jacobian-matrix product (input VJP, transposed convolution)."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, weight: Tensor, mat: Tensor
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``J_x^T mat``.

    Args:
        spec: Layer description.
        weight: Layer weight of shape ``spec.weight_shape``.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.

    Returns:
        The network and the result's shape ``[V, N, *input_shape[1:]]``.
    """
    patterns, pattern_legs = spec.pattern_operands()
    net = TensorNetwork(
        [spec.split_features(mat, 1), spec.split_weight(weight), *patterns],
        [("v", "n", *spec.feature_legs("out", "a")), spec.weight_legs(), *pattern_legs],
        ("v", "n", *spec.feature_legs("in", "b")),
    )
    return net, (mat.shape[0], *spec.input_shape(mat.shape[1]))


def einsum_expression(
    spec: LayerSpec, weight: Tensor, mat: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of ``J_x^T mat``; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        weight: Layer weight of shape ``spec.weight_shape``.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[V, N, *input_shape[1:]]``.
    """
    return to_einsum_expression(*tensor_network(spec, weight, mat), simplify)
