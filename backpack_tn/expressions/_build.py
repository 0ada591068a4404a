"""Shared helpers for the expression builders."""

from __future__ import annotations

from torch import Tensor

from backpack_tn.engine.network import TensorNetwork
from backpack_tn.expressions.layer_spec import LayerSpec


def to_einsum_expression(
    net: TensorNetwork, shape: tuple[int, ...], simplify: bool
) -> tuple[str, list[Tensor], tuple[int, ...]]:
    """Turn a network into ``(equation, operands, shape)``.

    Args:
        net: The tensor network.
        shape: Shape to reshape the einsum result to.
        simplify: Rewire structured index patterns into views of the operands
            (input side only, so the result stays a single einsum).

    Returns:
        Einsum equation, operands, and the shape of the result.
    """
    if simplify:
        net = net.simplify(output_side=False)
    equation, operands = net.einsum_expression()
    return equation, operands, shape


def input_operand(
    spec: LayerSpec,
    x: Tensor,
    suffix: str = "",
    rename: tuple[str, ...] = ("channel", "kernel", "in"),
) -> tuple[list, list]:
    """The layer input and the index patterns acting on it, as network operands.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, C_in, *I]`` (conv) or ``[N, *, C_in]``.
        suffix: Appended to the names of the leg categories in ``rename``, to
            build a second copy of the input.
        rename: Leg categories to rename: ``'channel'`` (``b``), ``'kernel'``
            (``k*``), ``'in'`` (input-side spatial legs that are not also output
            positions) and ``'out'`` (output-side spatial legs).

    Returns:
        Operands ``[x, *patterns]`` and their legs. ``x`` has legs
        ``(n, g, b, *spatial_in)`` (conv) or ``(n, *s, g, b)`` (Linear).
    """
    out_legs = spec.spatial_legs("out")
    categories = {
        "channel": ["b"],
        "kernel": list(spec.kernel_legs()),
        "in": [leg for leg in spec.spatial_legs("in") if leg not in out_legs],
        "out": list(out_legs),
    }
    mapping = {leg: f"{leg}{suffix}" for c in rename for leg in categories[c]}
    x_legs = ("n", *spec.feature_legs("in", "b"))
    patterns, pattern_legs = spec.pattern_operands()
    legs = [
        tuple(mapping.get(leg, leg) for leg in op) for op in [x_legs, *pattern_legs]
    ]
    return [spec.split_features(x, 0), *patterns], legs


def squared_weight_vjp(
    spec: LayerSpec, x: Tensor, mat: Tensor, output: tuple[str, ...]
) -> TensorNetwork:
    """Network of ``Σ (J_W^T mat)²`` over all legs not in ``output``.

    The weight VJP appears twice, sharing the weight legs ``(g, a, b, *k)``, the
    vector leg ``v`` and the batch leg ``n``; spatial legs are independent. The
    per-sample VJPs are never formed, which pays off when there are few output
    positions compared to weight entries.

    Args:
        spec: Layer description.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
        output: Result legs, a subset of ``('v', 'n', *weight_legs)``.

    Returns:
        The network.
    """
    first, first_legs = input_operand(spec, x)
    second, second_legs = input_operand(spec, x, "_", rename=("in", "out"))
    mat = spec.split_features(mat, 1)
    return TensorNetwork(
        [mat, *first, mat, *second],
        [
            ("v", "n", *spec.feature_legs("out", "a")),
            *first_legs,
            ("v", "n", *spec.feature_legs("out", "a", "_")),
            *second_legs,
        ],
        output,
    )
