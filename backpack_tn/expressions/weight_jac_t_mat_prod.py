"""Transposed weight Jacobian-matrix product (weight VJP, per-sample or summed)."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import input_operand, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, x: Tensor, mat: Tensor, sum_batch: bool = True
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``J_W^T mat``; batching over samples is an extra output leg.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
        sum_batch: Sum over the batch. Otherwise keep the ``n`` leg (per-sample).

    Returns:
        The network and the result's shape ``[V, *weight_shape]`` (``sum_batch``)
        or ``[V, N, *weight_shape]``.
    """
    operands, legs = input_operand(spec, x)
    batch = () if sum_batch else ("n",)
    net = TensorNetwork(
        [spec.split_features(mat, 1), *operands],
        [("v", "n", *spec.feature_legs("out", "a")), *legs],
        ("v", *batch, *spec.weight_legs()),
    )
    sizes = () if sum_batch else (x.shape[0],)
    return net, (mat.shape[0], *sizes, *spec.weight_shape)


def einsum_expression(
    spec: LayerSpec,
    x: Tensor,
    mat: Tensor,
    sum_batch: bool = True,
    simplify: bool = True,
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of ``J_W^T mat``; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
        sum_batch: Sum over the batch.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[V, (N,) *weight_shape]``.
    """
    return to_einsum_expression(*tensor_network(spec, x, mat, sum_batch), simplify)
