"""Pure builders of the layers' tensor networks (no BackPACK import).

One module per quantity; each exposes ``tensor_network(spec, ...)`` and
``einsum_expression(spec, ..., simplify=True) -> (equation, operands, shape)``.
A :class:`~backpack_tn.expressions.layer_spec.LayerSpec` describes Linear,
ConvNd and ConvTransposeNd layers uniformly, so each builder serves all of them.
"""
