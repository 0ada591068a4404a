"""Per-sample squared L2 norm of the weight gradient, as one network."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions._build import squared_weight_vjp, to_einsum_expression
from backpack_tn.expressions.layer_spec import LayerSpec


def tensor_network(
    spec: LayerSpec, x: Tensor, mat: Tensor
) -> tuple[TensorNetwork, tuple[int, ...]]:
    """Network of ``‖g_n‖² = Σ_v Σ_{g, a, b, k} (J_W^T mat)[v, n]²``.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Output gradients of shape ``[V, N, *output_shape[1:]]`` (``V = 1``
            for the gradient).

    Returns:
        The network and the result's shape ``[N]``.
    """
    return squared_weight_vjp(spec, x, mat, ("n",)), (x.shape[0],)


def einsum_expression(
    spec: LayerSpec, x: Tensor, mat: Tensor, simplify: bool = True
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Einsum expression of per-sample squared norms; see :func:`tensor_network`.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Output gradients of shape ``[V, N, *output_shape[1:]]``.
        simplify: Rewire structured index patterns before returning.

    Returns:
        Equation, operands and result shape ``[N]``.
    """
    return to_einsum_expression(*tensor_network(spec, x, mat), simplify)
