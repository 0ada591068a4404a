"""GGN diagonal of the weight from a matrix square root, as one network."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import squared_weight_vjp, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, x: Tensor, mat: Tensor, sum_batch: bool = True
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``diag(G) = Σ_v Σ_n (J_W^T mat)[v, n]²``.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Square root of the output GGN, shape ``[V, N, *output_shape[1:]]``.
        sum_batch: Sum over the batch. Otherwise keep the ``n`` leg.

    Returns:
        The network and the result's shape ``[(N,) *weight_shape]``.
    """
    batch = () if sum_batch else ("n",)
    net = squared_weight_vjp(spec, x, mat, (*batch, *spec.weight_legs()))
    sizes = () if sum_batch else (x.shape[0],)
    return net, (*sizes, *spec.weight_shape)


def einsum_expression(
    spec: LayerSpec,
    x: Tensor,
    mat: Tensor,
    sum_batch: bool = True,
    simplify: bool = True,
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of the weight GGN diagonal; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Square root of the output GGN, shape ``[V, N, *output_shape[1:]]``.
        sum_batch: Sum over the batch.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[(N,) *weight_shape]``.
    """
    return to_einsum_expression(*tensor_network(spec, x, mat, sum_batch), simplify)
