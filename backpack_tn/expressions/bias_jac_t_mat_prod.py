"""Transposed bias Jacobian-matrix product (bias VJP, per-sample or summed)."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, mat: Tensor, sum_batch: bool = True
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``J_b^T mat``: a sum over output positions (and the batch).

    Args:
        spec: Layer description.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
        sum_batch: Sum over the batch.

    Returns:
        The network and the result's shape ``[V, (N,) C_out]``.
    """
    batch = () if sum_batch else ("n",)
    net = TensorNetwork(
        [spec.split_features(mat, 1)],
        [("v", "n", *spec.feature_legs("out", "a"))],
        ("v", *batch, "g", "a"),
    )
    sizes = () if sum_batch else (mat.shape[1],)
    return net, (mat.shape[0], *sizes, spec.out_channels)


def einsum_expression(
    spec: LayerSpec, mat: Tensor, sum_batch: bool = True, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of ``J_b^T mat``; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
        sum_batch: Sum over the batch.
        simplify: Has no effect (there are no index patterns).

    Returns:
        Equation, operands and result shape ``[V, (N,) C_out]``.
    """
    return to_einsum_expression(*tensor_network(spec, mat, sum_batch), simplify)
