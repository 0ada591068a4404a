"""Evaluations of every layer product, one registry entry per (op, strategy).

Strategies:

- ``tn``: the simplified tensor network (structured patterns become views).
- ``tn_unsimplified``: the raw network with dense index patterns.
- ``tn_lowered``: every pattern lowered into a strided view (im2col-like) or a
  scatter-add; no dense pattern is materialised.
- ``kernel``: PyTorch's convolution kernels through the layer's own forward
  function, batched with ``torch.func.vmap`` (per-sample gradients as in
  ``vmap(grad)``); correct for every padding mode since the layer's forward is used.
- ``unfold``: weight VJPs of Conv2d as PyTorch's im2col kernel (``F.unfold``) and
  one batched GEMM (the lowered network elsewhere); other products as ``auto``.
- ``same_conv`` / ``higher_conv``: stock BackPACK's two convolution-based weight
  VJPs (Conv1d/2d/3d and Conv1d/2d only, zero padding); on depthwise-like layers
  ``same_conv`` runs the same convolution without stock's copies.

Every evaluation takes ``(module, spec, **tensors)`` and returns a tensor in
BackPACK's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import torch
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.convnd import weight_jac_t_save_memory
from torch import Tensor
from torch.func import vjp, vmap
from torch.nn import Module, functional

from backpack_tn.engine import lag_gram
from backpack_tn.engine.contract import contract
from backpack_tn.engine.gemm import linear
from backpack_tn.engine.gram import gram
from backpack_tn.engine.index_pattern import IndexPattern
from backpack_tn.engine.layout import sum_in_memory_order
from backpack_tn.engine.network import TensorNetwork, largest_intermediate, pad
from backpack_tn.expressions import (
    jac_mat_prod,
    jac_t_mat_prod,
    kfac_expand,
    kfac_reduce,
    unfold_input,
    weight_batch_l2,
    weight_diag_ggn,
    weight_jac_mat_prod,
    weight_jac_t_mat_prod,
)
from backpack_tn.expressions._build import input_operand
from backpack_tn.expressions.layer_spec import LayerSpec

#: Strategies that evaluate the tensor network itself.
TN_STRATEGIES = ("tn", "tn_unsimplified", "tn_lowered")

#: Suffix of evaluations that square another strategy's per-sample weight VJPs.
SQUARE = "+square"


def evaluate(net: TensorNetwork, shape: tuple[int, ...], strategy: str) -> Tensor:
    """Evaluate a network as the TN strategy says.

    Args:
        net: The tensor network.
        shape: Shape of the result.
        strategy: One of ``TN_STRATEGIES``.

    Returns:
        The result, reshaped to ``shape``.
    """
    return prepare(net, strategy).contract().reshape(shape)


def prepare(net: TensorNetwork, strategy: str) -> TensorNetwork:
    """The network as the TN strategy evaluates it (also for cost estimates).

    Args:
        net: The tensor network.
        strategy: One of ``TN_STRATEGIES``.

    Returns:
        The simplified, lowered or unchanged network.
    """
    if strategy == "tn":
        return net.simplify()
    if strategy == "tn_lowered":
        return net.simplify(lower_all=True)
    return net


# tensor-network evaluations


#: Input JVPs and VJPs are linear in every vector of every sample; their networks
#: are evaluated in blocks of vectors whose largest intermediate (where it exceeds the
#: result) stays within this many bytes. The dense-pattern input VJP of a 3-channel
#: 5x5 layer forms ``[V * N, C_in, K, K, O, O]`` first, 19 times its result: 1.9 MB
#: for one vector of 8 samples, 30 MB for 10 vectors of 32 samples (DiagGGNExact),
#: where the transposed convolution holds 2 MiB and 8 MiB. Blocks were also faster
#: there (10 vectors of 32 samples, one thread: 140 → 92 ms; the transposed
#: convolution: 162 ms). On CUDA the bound is ``VJP_BLOCK_BYTES_GPU``: each block
#: costs its own kernel launches.
INPUT_PRODUCT_BLOCK_BYTES = 1 << 20


def _tn_input_product(build: Callable, module, spec, strategy, mat):
    """An input JVP or VJP network, in blocks of vectors where it saves memory.

    Args:
        build: The product's ``tensor_network(spec, weight, mat)``.
        module: The layer.
        spec: Its description.
        strategy: One of ``TN_STRATEGIES``.
        mat: Vectors of shape ``[V, N, ...]``.

    Returns:
        The product of shape ``[V, N, ...]``.
    """
    net, shape = build(spec, module.weight, mat)
    prepared = prepare(net, strategy)
    vectors = mat.shape[0] * mat.shape[1]
    largest = largest_intermediate(prepared)
    size = mat.element_size()
    bound = VJP_BLOCK_BYTES_GPU if mat.is_cuda else INPUT_PRODUCT_BLOCK_BYTES
    if largest <= math.prod(shape) or largest * size <= bound:
        return prepared.contract().reshape(shape)
    step = _even(vectors, max(1, bound * vectors // (largest * size)))

    def product(block: Tensor) -> Tensor:
        return evaluate(*build(spec, module.weight, block.unsqueeze(0)), strategy)[0]

    return _in_flat_blocks(product, mat, step, shape[2:])


def _in_flat_blocks(
    product: Callable[[Tensor], Tensor], mat: Tensor, step: int, sizes: tuple
) -> Tensor:
    """A product of vectors and samples, in blocks of ``step`` of them.

    Args:
        product: Maps a block of shape ``[B, *mat.shape[2:]]`` to ``[B, *sizes]``.
        mat: Vectors of shape ``[V, N, ...]``.
        step: Vectors times samples per block.
        sizes: Shape of one vector's result.

    Returns:
        The product of shape ``[V, N, *sizes]``.
    """
    flat = mat.flatten(0, 1)
    result = flat.new_empty(len(flat), *sizes)
    for start in range(0, len(flat), step):
        result[start : start + step].copy_(product(flat[start : start + step]))
    return result.unflatten(0, mat.shape[:2])


def _tn_jac_mat_prod(module, spec, strategy, mat):
    return _tn_input_product(jac_mat_prod.tensor_network, module, spec, strategy, mat)


def _tn_jac_t_mat_prod(module, spec, strategy, mat):
    return _tn_input_product(jac_t_mat_prod.tensor_network, module, spec, strategy, mat)


def _tn_weight_jac_mat_prod(module, spec, strategy, x, mat):
    return evaluate(*weight_jac_mat_prod.tensor_network(spec, x, mat), strategy)


def _tn_weight_jac_t_mat_prod(module, spec, strategy, x, mat, sum_batch):
    net, shape = weight_jac_t_mat_prod.tensor_network(spec, x, mat, sum_batch)
    return evaluate(net, shape, strategy)


#: Single squared networks (GGN diagonals, per-sample norms) are evaluated in blocks
#: of samples whose largest intermediate stays within this many bytes and half the
#: batch's unfolded input (what the unfold reference holds), where one evaluation's
#: would exceed both and its result; on CUDA the bound is ``VJP_BLOCK_BYTES_GPU``.
#: Samples are independent: each block fills its samples' entries or, summed over
#: the batch, adds up. Per-sample norms of All-CNN-C's stride-2 192x16x16 layer at
#: N = 32 held 19.9 MiB in one evaluation (two 9 MiB intermediates; unfold reference:
#: 14.4 MiB) and 6.7 MiB in blocks, at the same time; those of ResNet18's 256x14x14 and
#: ResNeXt's 1024x14x14 layers (two 4.7 MiB position Gram matrices) half as much.
#: Blocks of at most 1 MiB ran up to 1.7x slower, those of 2-8 MiB alike.
SQUARED_NETWORK_BLOCK_BYTES = 4 * 2**20


def _tn_squared(
    build: Callable,
    spec: LayerSpec,
    strategy: str,
    x: Tensor,
    mat: Tensor,
    summed: bool,
):
    """A squared network, in blocks of samples where it saves memory.

    Args:
        build: Maps ``(x, mat)`` of some samples to their network and its shape.
        spec: Layer description.
        strategy: One of ``TN_STRATEGIES``.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
        summed: Whether the result sums over the samples (else they lead it).

    Returns:
        The network's result.
    """
    net, shape = build(x, mat)
    prepared = prepare(net, strategy)
    size = mat.element_size()
    largest = largest_intermediate(prepared) * size
    samples = x.shape[0]
    if mat.is_cuda:
        bound = VJP_BLOCK_BYTES_GPU
    else:
        unfolded = samples * unfolded_sample_bytes(spec, size)
        bound = min(SQUARED_NETWORK_BLOCK_BYTES, unfolded // 2)
    if samples == 1 or largest <= max(bound, math.prod(shape) * size):
        return prepared.contract().reshape(shape)
    step = _even(samples, max(1, bound * samples // largest))
    result = None
    for start in range(0, samples, step):
        block = slice(start, start + step)
        part = evaluate(*build(x[block], mat[:, block]), strategy)
        if summed:
            result = part if result is None else result.add_(part)
            continue
        if result is None:
            result = part.new_empty(shape)
        result[block].copy_(part)
    return result


def unfolded_sample_bytes(spec: LayerSpec, size: int) -> int:
    """Bytes of one sample's unfolded input ``[C_in, *K, *O]`` (Linear: its input).

    Returns:
        ``C_in * prod(K) * prod(O) * size``.
    """
    return spec.in_channels * math.prod(spec.kernel_size) * spec.num_positions * size


def _tn_weight_diag_ggn(module, spec, strategy, x, mat, sum_batch):
    def build(x_block: Tensor, mat_block: Tensor):
        return weight_diag_ggn.tensor_network(spec, x_block, mat_block, sum_batch)

    return _tn_squared(build, spec, strategy, x, mat, sum_batch)


def _tn_weight_batch_l2(module, spec, strategy, x, mat):
    def build(x_block: Tensor, mat_block: Tensor):
        return weight_batch_l2.tensor_network(spec, x_block, mat_block)

    return _tn_squared(build, spec, strategy, x, mat, False)


def _tn_unfold_input(module, spec, strategy, x):
    return evaluate(*unfold_input.tensor_network(spec, x), strategy)


def _input_gram(spec, strategy, x, positions):
    """Gram matrix per group of the unfolded input, one column per ``(n, *positions)``.

    Position legs left out of ``positions`` are summed before the channels are
    touched (KFAC-reduce); the network is evaluated once, not twice as in the
    factor's own network.

    Returns:
        The Gram matrices of shape ``[G, C_in // G * prod(K)] * 2``.
    """
    operands, legs = input_operand(spec, x)
    output = ("g", "b", *spec.kernel_legs(), "n", *positions)
    columns = prepare(TensorNetwork(operands, legs, output), strategy).contract()
    groups, rows, _ = kfac_expand.result_shape(spec)
    return gram(columns.reshape(groups, rows, -1))


def _tn_kfac_expand(module, spec, strategy, x):
    if strategy != "tn_lowered":
        return evaluate(*kfac_expand.tensor_network(spec, x), strategy)
    positions = spec.spatial_legs("out")
    return _input_gram(spec, strategy, x, positions).div_(x.shape[0])


def lag_applies(spec: LayerSpec) -> bool:
    """Whether the KFAC-expand factor can come from lagged products (``"lag"``).

    Returns:
        ``True`` for convolutions (not transposed) with unit strides in every
        dimension and a kernel larger than ``1`` in some.
    """
    return (
        spec.kind == "conv"
        and all(p.stride == 1 for p in spec.patterns)
        and any(p.kernel_size > 1 for p in spec.patterns)
    )


def lag_zeros(spec: LayerSpec) -> tuple[tuple[int, int], ...]:
    """Zero padding per spatial dimension (none where another mode pads).

    Returns:
        ``(P_left, P_right)`` per dimension, ``(0, 0)`` for non-zero modes.
    """
    return tuple(
        p.padding if p.padding_mode == "zeros" else (0, 0) for p in spec.patterns
    )


def _lag_kfac_expand(module, spec, strategy, x):
    """KFAC-expand factor of a unit-stride convolution from lagged products.

    See :mod:`backpack_tn.engine.lag_gram`: the two index patterns of the factor's
    network, contracted over output positions, leave ``2 K - 1`` lags per dimension
    and border corrections instead of ``K²`` pairs.

    Returns:
        The factor of shape ``[G, C_in // G * prod(K)] * 2``.

    Raises:
        NotImplementedError: If the layer is no unit-stride convolution.
    """
    if not lag_applies(spec):
        raise NotImplementedError(
            f"The lagged-product KFAC-expand factor needs a convolution with unit"
            f" strides and a kernel larger than 1; {type(module).__name__} has"
            f" kind {spec.kind!r}, stride {tuple(p.stride for p in spec.patterns)}"
            f" and kernel_size {spec.kernel_size}."
        )
    dims = {2 + i: pattern for i, pattern in enumerate(spec.patterns)}
    padded = pad(x, dims).unflatten(1, (spec.groups, -1))  # [N, G, C_in // G, *Q]
    dilation = tuple(p.dilation for p in spec.patterns)
    return lag_gram.unfolded_gram(
        padded, spec.kernel_size, dilation, lag_zeros(spec)
    ).div_(x.shape[0])


def _tn_kfac_reduce(module, spec, strategy, x):
    if strategy == "tn_unsimplified":
        return evaluate(*kfac_reduce.tensor_network(spec, x), strategy)
    scale = 1.0 / (x.shape[0] * spec.num_positions**2)
    return _input_gram(spec, strategy, x, ()).mul_(scale)


# kernel evaluations


_CONV_TRANSPOSE = {
    1: functional.conv_transpose1d,
    2: functional.conv_transpose2d,
    3: functional.conv_transpose3d,
}


def _unused_inputs(pattern: IndexPattern) -> int:
    """Trailing input positions that no output reads (the VJP's output padding).

    Returns:
        ``I + P_left + P_right - (S * (O - 1) + D * (K - 1) + 1)``.
    """
    span = pattern.stride * (pattern.output_size - 1)
    span += pattern.dilation * (pattern.kernel_size - 1) + 1
    return pattern.padded_size - span


_CONV = {1: functional.conv1d, 2: functional.conv2d, 3: functional.conv3d}


def layer_function(module: Module, spec: LayerSpec) -> Callable[..., Tensor]:
    """The layer as a function of input, weight and (optional) bias.

    Args:
        module: The layer.
        spec: Its description (gives the transposed convolution's output size).

    Returns:
        ``f(x, weight, bias=None)`` with ``x`` of shape ``[N, *input_shape[1:]]``.
    """
    if spec.kind == "linear":
        return linear
    if spec.kind == "conv":
        return partial(_conv, module)
    return partial(
        _conv_transpose,
        _CONV_TRANSPOSE[len(spec.patterns)],
        {
            "stride": module.stride,
            "padding": module.padding,
            "output_padding": tuple(_unused_inputs(p) for p in spec.patterns),
            "groups": module.groups,
            "dilation": module.dilation,
        },
    )


def _conv(module, x, weight, bias=None):
    return module._conv_forward(x, weight, bias)


def _conv_transpose(transpose, kwargs, x, weight, bias=None):
    return transpose(x, weight, bias, **kwargs)


def _kernel_forward(module, spec, strategy, x):
    return layer_function(module, spec)(x, module.weight, module.bias)


def _tn_forward(module, spec, strategy, x):
    out = _tn_jac_mat_prod(module, spec, strategy, x.unsqueeze(0))[0]
    if module.bias is None:
        return out
    shape = [1] * out.dim()
    shape[-1 if spec.kind == "linear" else 1] = -1
    return out + module.bias.reshape(shape)


def _kernel_jac_mat_prod(module, spec, strategy, mat):
    out = layer_function(module, spec)(mat.flatten(0, 1), module.weight)
    return out.unflatten(0, mat.shape[:2])


def has_even_zero_padding(module: Module, spec: LayerSpec) -> bool:
    """Whether a layer pads with zeros, equally on both sides of every dimension.

    PyTorch's convolution kernels (and stock BackPACK) take such padding directly.

    Args:
        module: The layer.
        spec: Its description.

    Returns:
        ``True`` for zero padding with ``P_left = P_right`` everywhere.
    """
    even = all(p.padding[0] == p.padding[1] for p in spec.patterns)
    return getattr(module, "padding_mode", "zeros") == "zeros" and even


def _conv_input_grad(size: tuple[int, ...], weight: Tensor, flat: Tensor, **kwargs):
    """Input gradients of a convolution through ``convolution_backward``.

    This is autograd's route, as ``torch.nn.grad.conv2d_input`` takes it, except
    for the input that only carries the shape: on CPU, oneDNN makes it contiguous,
    so the zero-stride view that ``conv2d_input`` passes becomes a copy of the
    whole input (24 MiB more peak memory than autograd on ResNeXt's 512x56x56
    layer with 32 groups at 4 samples). An uninitialised input is never written,
    so its pages cost no memory.

    Args:
        size: Input shape ``[B, *input_shape[1:]]``.
        weight: The layer's weight.
        flat: Output gradients of shape ``[B, *output_shape[1:]]``.
        **kwargs: ``stride``, ``padding``, ``dilation`` and ``groups``.

    Returns:
        The input gradients, of shape ``size``.
    """
    if flat.is_cuda:
        shape_carrier = flat.new_empty(1).expand(size)
    else:
        shape_carrier = flat.new_empty(size)
    zeros = (0,) * (len(size) - 2)
    return torch.ops.aten.convolution_backward(
        flat,
        shape_carrier,
        weight,
        None,
        kwargs["stride"],
        kwargs["padding"],
        kwargs["dilation"],
        False,
        zeros,
        kwargs["groups"],
        (True, False, False),
    )[0]


def is_grouped_strided(module: Module) -> bool:
    """Whether a convolution has groups of several channels and a stride.

    For such layers, the input VJP through ``convolution_backward`` (autograd's
    route) was up to 4.5x faster than the transposed convolution on CPU (a ResNeXt
    layer with 32 groups and stride 2); elsewhere the transposed convolution was
    as fast or up to 17% faster.

    Args:
        module: The layer.

    Returns:
        ``True`` for ``1 < groups < in_channels`` and a stride above 1.
    """
    groups = module.groups
    return 1 < groups < module.in_channels and any(s > 1 for s in module.stride)


#: On CPU, input VJPs of a convolution through its kernels run in blocks of vectors
#: and samples whose inputs and output gradients take at most this many bytes, on
#: layers that ``input_vjp_step`` names, once one call would take more than
#: ``INPUT_VJP_ONE_CALL_BYTES``. oneDNN's transposed convolution slowed down per
#: sample once one call's operands outgrew about 56 MiB: in blocks of 16 MiB,
#: Inception's 32x149x149 layer ran at 0.59x of one call's time (16 samples, 86 MiB),
#: its 32x147x147 layer at 0.78x (63 MiB), its 3x299x299 stem at 0.63x (60 MiB) and
#: ResNet18's 3x224x224 stem at 0.81x (58 MiB); for 80 vectors (10 of 8 samples,
#: as DiagGGNExact sends them) 0.5-0.8x on ResNet18's and MobileNetV2's 56x56 and
#: 112x112 layers (2-core AMD EPYC; the first four with glibc's heap kept, as the
#: benchmark runs, the 80-vector ones without).
#: Blocks of 8 MiB were up to 1.5x slower than blocks of 16 MiB.
INPUT_VJP_BLOCK_BYTES = 16 * 2**20
#: Up to this many bytes one call was as fast as blocks or up to 1.5x faster:
#: Inception's 80x73x73 layer at 4 and 8 samples (21 and 43 MiB; blocks of 8 MiB,
#: the rule before, took 1.2x), MobileNetV2's depthwise 32x112x112 and 144x56x56
#: layers at 8 and 16 samples (24-55 MiB; up to 1.4x), ResNeXt's 256x56x56 g = 32
#: stride-2 layer at 8 samples (31 MiB; 1.2x), ResNet18's 64x56x56 layer at 32
#: samples (49 MiB; 1.06x).
INPUT_VJP_ONE_CALL_BYTES = 56 * 2**20
#: Blocks pay off only on large maps with small kernels. Each block reorders the
#: weight again, and on maps below 32x32 positions the blocks were 2-30% slower
#: (Inception's 17x17 and 8x8, ResNeXt's 14x14 layers with up to 8 MiB weights).
INPUT_VJP_BLOCK_POSITIONS = 1024
INPUT_VJP_BLOCK_WEIGHT_BYTES = 2**20
#: ... and on samples of at least this many bytes (inputs plus output gradients).
INPUT_VJP_BLOCK_SAMPLE_BYTES = 2**19


def input_vjp_step(
    spec: LayerSpec, mat: Tensor, one_call_bytes: int | None = None
) -> int:
    """Vectors and samples per call of a convolution's input-VJP kernel.

    Args:
        spec: Layer description.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
        one_call_bytes: Bytes (inputs plus output gradients) up to which one
            call runs; default ``INPUT_VJP_ONE_CALL_BYTES``.

    Returns:
        ``V * N`` (one call) on CUDA, for Linear and transposed convolutions, on
        maps below ``INPUT_VJP_BLOCK_POSITIONS``, for weights above
        ``INPUT_VJP_BLOCK_WEIGHT_BYTES``, for samples below
        ``INPUT_VJP_BLOCK_SAMPLE_BYTES`` and up to ``one_call_bytes``; else the
        even step whose blocks take at most ``INPUT_VJP_BLOCK_BYTES``.
    """
    if one_call_bytes is None:
        one_call_bytes = INPUT_VJP_ONE_CALL_BYTES
    total = mat.shape[0] * mat.shape[1]
    size = mat.element_size()
    sample = (math.prod(spec.input_shape()[1:]) + mat[0, 0].numel()) * size
    if (
        mat.is_cuda
        or spec.kind != "conv"
        or math.prod(spec.input_spatial) < INPUT_VJP_BLOCK_POSITIONS
        or math.prod(spec.weight_shape) * size > INPUT_VJP_BLOCK_WEIGHT_BYTES
        or sample < INPUT_VJP_BLOCK_SAMPLE_BYTES
        or total * sample <= one_call_bytes
    ):
        return total
    return _even(total, max(1, INPUT_VJP_BLOCK_BYTES // sample))


def _kernel_jac_t_mat_prod(module, spec, strategy, mat):
    step = input_vjp_step(spec, mat)
    product = partial(_kernel_input_vjp, module, spec)
    if step == mat.shape[0] * mat.shape[1]:
        return product(mat.flatten(0, 1)).unflatten(0, mat.shape[:2])
    return _in_flat_blocks(product, mat, step, spec.input_shape()[1:])


def _kernel_input_vjp(module, spec, flat):
    """Input VJPs through the layer's kernels, in one call.

    Args:
        module: The layer.
        spec: Its description.
        flat: Vectors of shape ``[B, *output_shape[1:]]``.

    Returns:
        The VJPs, of shape ``[B, *input_shape[1:]]``.
    """
    weight = module.weight.detach()
    dims = len(spec.patterns)
    if spec.kind == "linear":
        return linear(flat, weight.T)
    if spec.kind == "conv" and has_even_zero_padding(module, spec):
        hyperparameters = {
            "stride": module.stride,
            "padding": tuple(p.padding[0] for p in spec.patterns),
            "dilation": module.dilation,
            "groups": module.groups,
        }
        if is_grouped_strided(module):
            # oneDNN's transposed convolution can be several times slower here
            size = (flat.shape[0], *spec.input_shape()[1:])
            return _conv_input_grad(size, weight, flat, **hyperparameters)
        # the transposed convolution, with the output padding that restores I
        return _CONV_TRANSPOSE[dims](
            flat,
            weight,
            None,
            output_padding=tuple(_unused_inputs(p) for p in spec.patterns),
            **hyperparameters,
        )
    if spec.kind == "conv_transpose":
        result = _CONV[dims](
            flat,
            weight,
            None,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
        )
        for d, size in enumerate(spec.input_spatial):
            result = result.narrow(2 + d, 0, size)
        return result
    # padding modes, uneven 'same': differentiate the layer's own forward
    f = layer_function(module, spec)
    zeros = flat.new_zeros(flat.shape[0], *spec.input_shape()[1:])
    _, vjp_fn = vjp(lambda x: f(x, weight), zeros)
    return vjp_fn(flat)[0]


def _kernel_weight_jac_mat_prod(module, spec, strategy, x, mat):
    f = layer_function(module, spec)
    return vmap(lambda w: f(x, w))(mat)


def _kernel_weight_jac_t_mat_prod(module, spec, strategy, x, mat, sum_batch):
    if spec.kind != "linear":
        result = _kernel_weight_gradients(module, spec, x, mat, sum_batch)
        sizes = () if sum_batch else (x.shape[0],)
        return result.reshape(mat.shape[0], *sizes, *spec.weight_shape)
    f = layer_function(module, spec)
    weight = module.weight.detach()
    if sum_batch:
        _, vjp_fn = vjp(lambda w: f(x, w), weight)
        return vmap(lambda m: vjp_fn(m)[0])(mat)

    def per_sample(x_n: Tensor, mat_n: Tensor) -> Tensor:
        _, vjp_fn = vjp(lambda w: f(x_n.unsqueeze(0), w).squeeze(0), weight)
        return vmap(lambda m: vjp_fn(m)[0])(mat_n)

    return vmap(per_sample, in_dims=(0, 1), out_dims=1)(x, mat)


#: Weight VJPs from convolution kernels run on blocks of samples and vectors whose
#: inputs and output gradients take at most this many bytes (at least one vector
#: of one sample; all samples when they are summed). The kernels copy both into
#: their own memory layout; for per-sample VJPs on a 64-channel 56x56 layer at
#: batch size 8, one block of all samples needed 20 MiB on top of the inputs,
#: blocks of one sample 2.5 MiB, at the same speed.
KERNEL_BLOCK_BYTES = 2**21
#: On CPU, one call of the weight-gradient kernel also forms at most this many bytes
#: of VJPs (at least one vector of one sample). oneDNN writes them in its own blocked
#: layout and reorders them, so a call held about twice its VJPs on top of the
#: result: per-sample gradients of AlexNet's 192x13x13 -> 384 3x3 layer at N = 4 (10
#: MiB of VJPs) peaked at 30 MiB, against 15 MiB for unfolding and one GEMM; with
#: a bound of 4 MiB it peaked at 15 MiB, at the same speed (ResNet18's 512x7x7
#: layer: 0.54x the time).
#: The higher-order convolution holds twice its VJPs as well (21 MiB on that layer),
#: but blocks of one sample cost it 1.15-1.2x the time, so it runs unbounded.
#: Blocks of 2 MiB instead of 4 MiB took Inception's 7x1 and 1x7 layers from
#: 1.35-1.37x the leanest reference's peak to 0.89-0.9x (per-sample gradients,
#: N = 4), at 0.97x the time over the 40 kernel-route cells of ResNet18 and AlexNet
#: (per-sample gradients and GGN diagonals; single cells 0.42-1.33x, within the
#: noise of one run; 2-core AMD EPYC).
KERNEL_VJP_BLOCK_BYTES = 2**21


def _bound_kernel_vjps(
    spec: LayerSpec, mat: Tensor, step_v: int, step_n: int, sum_batch: bool
) -> tuple[int, int]:
    """Shrink a block of vectors and samples until its VJPs fit the CPU bound.

    Args:
        spec: Layer description.
        mat: Vectors of shape ``[V, N, C_out, *O]``.
        step_v: Vectors per block.
        step_n: Samples per block.
        sum_batch: Whether the kernel sums the block's samples (then a block forms
            one VJP per vector).

    Returns:
        ``(step_v, step_n)``, samples shrunk first; unchanged on CUDA.
    """
    if mat.is_cuda:
        return step_v, step_n
    most = max(
        1, KERNEL_VJP_BLOCK_BYTES // (math.prod(spec.weight_shape) * mat.element_size())
    )
    if not sum_batch:
        step_n = max(1, min(step_n, most // step_v))
    return max(1, min(step_v, most // (1 if sum_batch else step_n))), step_n


def _kernel_weight_gradients(module, spec, x, mat, sum_batch):
    """Weight VJPs of a convolution from its weight-gradient kernel, in blocks.

    A block of ``n`` samples and ``v`` vectors becomes one weight gradient of a
    convolution with the vectors stacked as output channels of each group (where
    ``vmap`` over the vectors repeats the input instead). Per sample, the samples
    are stacked as channels too, in ``n * G`` groups (as ``vmap(grad)`` does).
    Padding that the kernel cannot apply (non-zero modes, uneven ``'same'``) is
    applied to each block of samples first.

    Args:
        module: The (transposed) convolution.
        spec: Its description.
        x: Layer input of shape ``[N, C_in, *I]``.
        mat: Vectors of shape ``[V, N, C_out, *O]``.
        sum_batch: Whether to sum over the samples.

    Returns:
        The VJPs of shape ``[V, (N,) G, weight_shape[0] // G, *weight_shape[1:]]``;
        for a single block, a view of the kernel's result, else a tensor that the
        blocks are copied into.
    """
    vectors, samples = mat.shape[:2]
    sample, vector = x[0].numel(), mat[0, 0].numel()
    budget = KERNEL_BLOCK_BYTES // x.element_size()
    if sum_batch:
        step_v, step_n = max(1, budget // (samples * vector)), samples
    elif sample + vectors * vector <= budget:
        step_v, step_n = vectors, max(1, budget // (sample + vectors * vector))
    else:
        step_v, step_n = max(1, (budget - sample) // vector), 1
    step_v, step_n = _bound_kernel_vjps(spec, mat, step_v, step_n, sum_batch)
    step_v, step_n = _even(vectors, step_v), _even(samples, step_n)
    if step_v == vectors and step_n == samples:
        x = _kernel_padded(module, spec, x)
        return _grouped_weight_gradient(module, spec, x, mat, sum_batch)
    result = None  # blocks are written into it: no second copy of all VJPs
    for n in range(0, samples, step_n):
        x_block = _kernel_padded(module, spec, x[n : n + step_n])
        for v in range(0, vectors, step_v):
            block = _grouped_weight_gradient(
                module, spec, x_block, mat[v : v + step_v, n : n + step_n], sum_batch
            )
            if result is None:
                sizes = (vectors,) if sum_batch else (vectors, samples)
                result = block.new_empty(*sizes, *block.shape[len(sizes) :])
            target = result[v : v + step_v]
            (target if sum_batch else target[:, n : n + step_n]).copy_(block)
            del block
    return result


def _kernel_padded(module, spec, x):
    """The input with the padding a convolution kernel cannot apply by itself.

    Returns:
        ``x`` itself for transposed convolutions and even zero padding, else ``x``
        padded explicitly as the index patterns say.
    """
    if spec.kind != "conv" or has_even_zero_padding(module, spec):
        return x
    return pad(x, {2 + d: pattern for d, pattern in enumerate(spec.patterns)})


def _grouped_weight_gradient(module, spec, x, mat, sum_batch):
    """Weight gradients of each vector (and sample), as one grouped convolution's.

    Args:
        module: The (transposed) convolution.
        spec: Its description.
        x: Samples of shape ``[n, C_in, *I]``, padded by ``_kernel_padded``.
        mat: Vectors of shape ``[v, n, C_out, *O]``.
        sum_batch: Whether to sum over the samples.

    Returns:
        The gradients of shape ``[v, (n,) G, weight_shape[0] // G,
        *weight_shape[1:]]``, a view of the kernel's result.
    """
    vectors, samples = mat.shape[:2]
    groups, dims = module.groups, len(spec.patterns)
    first, second, *kernel = spec.weight_shape
    copies = 1 if sum_batch else samples  # sets of groups
    transposed = spec.kind == "conv_transpose"
    if transposed:  # weight [C_in, C_out // G, *K]: vectors join its second axis
        padding = module.padding
        output_padding = tuple(_unused_inputs(p) for p in spec.patterns)
        proxy = (copies * first, vectors * second)
        blocks, vector_axis = (copies, groups, first // groups, vectors, second), 3
    else:  # weight [C_out, C_in // G, *K]: vectors join its first axis
        padding = (0,) * dims
        if has_even_zero_padding(module, spec):
            padding = tuple(p.padding[0] for p in spec.patterns)
        output_padding = (0,) * dims
        proxy = (copies * vectors * first, second)
        blocks, vector_axis = (copies, groups, vectors, first // groups, second), 2
    # output channels of group (n, g) or g: (v, C_out // G)
    grouped = mat.unflatten(2, (groups, -1)).movedim(0, 2)  # [n, G, v, C_out // G, *O]
    if sum_batch:
        grouped = grouped.reshape(samples, -1, *mat.shape[3:])
    else:  # the samples become channels of one sample
        grouped = grouped.reshape(1, -1, *mat.shape[3:])
        x = x.flatten(0, 1).unsqueeze(0)
    # the kernel reads only the weight's shape
    weight = mat.new_zeros(()).expand(*proxy, *kernel)
    _, gradient, _ = torch.ops.aten.convolution_backward(
        grouped,
        x,
        weight,
        None,
        module.stride,
        padding,
        module.dilation,
        transposed,
        output_padding,
        copies * groups,
        (False, True, False),
    )
    gradient = gradient.view(*blocks, *kernel).movedim(vector_axis, 0)
    return gradient.squeeze(1) if sum_batch else gradient


#: Per-sample VJPs are formed in blocks of at most this many bytes, then squared and
#: summed. glibc serves blocks of its largest mmap threshold (32 MiB) and more with
#: fresh maps whose pages fault on first touch on every call; on a 3x3 layer with
#: 106 MB of VJPs that cost a third of the time. Blocks of exactly 32 MiB (two
#: vectors of a 2048 -> 2048 1x1 layer's 16 MiB weight, four of a 512 -> 1024 2x2
#: layer's 8 MiB) took 1.3-1.45x of the time of 24 MiB blocks (GGN diagonals, V = 10,
#: N = 1 and 4); on other large-weight layers 24 and 32 MiB ran alike. Blocks also
#: bound the memory.
VJP_BLOCK_BYTES = 24 * 2**20

#: The same bound for CUDA tensors. The caching allocator reuses blocks without page
#: faults, and every block costs its own kernel launches. H100, N = 32, V = 10,
#: DiagGGNExact of a whole network: All-CNN-C 26-28 ms with 32 MiB blocks, 18.5 ms
#: with 128 MiB, 18 ms with 256 MiB (stock BackPACK: 21 ms); ResNet18 without
#: batch norm 31-33, 28.1 and 28-29 ms (stock: 40 ms). Peak memory stays at most
#: that of 32 MiB blocks plus 100 MiB, far below stock BackPACK's.
VJP_BLOCK_BYTES_GPU = 128 * 2**20


#: Evaluations of per-sample VJPs that copy the unfolded input of their samples
#: (``[n, C_in, *K, *O]``) first; their blocks also hold at most
#: ``UNFOLDED_BLOCK_BYTES`` of it. On MobileNetV2's depthwise 192x28x28 layer (GGN
#: diagonal, N = 8, V = 10), whose VJPs are small, one block of all samples held
#: 46 MiB against 42 MiB for the unfold reference.
UNFOLDING_VJPS = (f"tn_lowered{SQUARE}", f"unfold{SQUARE}")
UNFOLDED_BLOCK_BYTES = 8 * 2**20
#: The same bound for grouped layers, whose blocks also split the groups where one
#: sample's unfolded input exceeds it (each group is a GEMM of its own either way).
#: On MobileNetV2's strided depthwise 144x56x56 layer (GGN diagonal, N = 1, V = 10)
#: the lowered network held 5.6 MiB in one block, against 3.8 MiB for the leanest
#: reference.
UNFOLDED_GROUPED_BLOCK_BYTES = 2**20


def unfolded_block_bytes(spec: LayerSpec) -> int:
    """The bound on a block's unfolded input (``UNFOLDING_VJPS`` on CPU).

    Returns:
        ``UNFOLDED_GROUPED_BLOCK_BYTES`` for grouped layers, else
        ``UNFOLDED_BLOCK_BYTES``.
    """
    return UNFOLDED_GROUPED_BLOCK_BYTES if spec.groups > 1 else UNFOLDED_BLOCK_BYTES


def _group_blocks(
    spec: LayerSpec, mat: Tensor, strategy: str
) -> list[tuple[LayerSpec, slice, slice]]:
    """Blocks of groups whose one sample's unfolded input fits the grouped bound.

    Args:
        spec: Layer description.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
        strategy: The evaluation of the VJPs.

    Returns:
        ``(spec of the block, input channels, output channels)`` per block; one
        block of all groups unless ``strategy`` is one of ``UNFOLDING_VJPS`` on CPU
        and the grouped bound splits them.
    """
    whole = [(spec, slice(None), slice(None))]
    if strategy not in UNFOLDING_VJPS or spec.groups == 1 or mat.is_cuda:
        return whole
    one_group = unfolded_sample_bytes(spec, mat.element_size()) // spec.groups
    step = _even(spec.groups, max(1, UNFOLDED_GROUPED_BLOCK_BYTES // max(1, one_group)))
    if step == spec.groups:
        return whole
    ins, outs = spec.in_channels // spec.groups, spec.out_channels // spec.groups
    blocks = []
    for first in range(0, spec.groups, step):
        size = min(step, spec.groups - first)
        sub = replace(
            spec, in_channels=ins * size, out_channels=outs * size, groups=size
        )
        channels_in = slice(first * ins, (first + size) * ins)
        blocks.append((sub, channels_in, slice(first * outs, (first + size) * outs)))
    return blocks


def _vjp_blocks(
    spec: LayerSpec, mat: Tensor, strategy: str = "", unfolded_bound: int | None = None
) -> Iterator[tuple[slice, slice]]:
    """Blocks of vectors and samples whose per-sample VJPs fit the block bound.

    The bound is ``VJP_BLOCK_BYTES``, or ``VJP_BLOCK_BYTES_GPU`` for CUDA tensors.
    For the evaluations in ``UNFOLDING_VJPS`` on CPU, a block's samples' unfolded
    inputs also stay within ``unfolded_bound`` (at least one sample), and so
    do the vectors that a block of several of them copies sample-major (a
    4x112x112 5x5 stride-2 layer, GGN diagonal at N = 4, V = 10: 36 MiB in one
    block of all samples against 10 MiB for the leanest reference); on CUDA, where
    every block costs its own kernel launches, they do not.

    Args:
        spec: Layer description.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
        strategy: The evaluation of the VJPs.
        unfolded_bound: The bound on unfolded inputs; default
            ``unfolded_block_bytes(spec)``. Blocks of groups pass their layer's, as
            a block of one group is an ungrouped spec.

    Yields:
        ``(vectors, samples)`` slices, samples in the outer loop.
    """
    if unfolded_bound is None:
        unfolded_bound = unfolded_block_bytes(spec)
    vectors, samples = mat.shape[:2]
    size = mat.element_size()
    one = math.prod(spec.weight_shape) * size
    unfolded = 0
    if strategy in UNFOLDING_VJPS and spec.kind != "linear" and not mat.is_cuda:
        unfolded = unfolded_sample_bytes(spec, size)
    limit = VJP_BLOCK_BYTES_GPU if mat.is_cuda else VJP_BLOCK_BYTES
    if vectors * one <= limit:
        step_v, step_n = vectors, max(1, limit // (vectors * one))
    else:
        step_v, step_n = max(1, limit // one), 1
    if unfolded:
        step_n = min(step_n, max(1, unfolded_bound // unfolded))
        if step_v > 1:
            copied = sample_vector_bytes(mat, step_v)
            step_n = min(step_n, max(1, unfolded_bound // copied))
    yield from _blocks(vectors, samples, step_v, step_n)


def sample_vector_bytes(mat: Tensor, vectors: int | None = None) -> int:
    """Bytes of some vectors of one sample.

    A block of several vectors of some of several samples has no GEMM view of them
    (vectors and output channels do not merge), so the lowered network copies them
    sample-major, these bytes per sample.

    Args:
        mat: Vectors of shape ``[V, N, C_out, *O]``.
        vectors: How many of the ``V`` vectors (default: all).

    Returns:
        ``vectors * C_out * prod(O)`` times the element size.
    """
    count = mat.shape[0] if vectors is None else vectors
    return count * mat[0, 0].numel() * mat.element_size()


def _blocks(
    vectors: int, samples: int, step_v: int, step_n: int
) -> Iterator[tuple[slice, slice]]:
    """Blocks of at most ``step_v`` vectors and ``step_n`` samples, split evenly.

    Yields:
        ``(vectors, samples)`` slices, samples in the outer loop.
    """
    step_v, step_n = _even(vectors, step_v), _even(samples, step_n)
    for n in range(0, samples, step_n):
        for v in range(0, vectors, step_v):
            yield slice(v, v + step_v), slice(n, n + step_n)


def _even(total: int, most: int) -> int:
    """The step that cuts ``range(total)`` into as few near-equal blocks as ``most``.

    A short last block runs its GEMMs below the others' efficiency: 8 samples in
    blocks of at most 7 become 4 + 4, not 7 + 1.

    Returns:
        The block size, at most ``most``.
    """
    return -(-total // -(-total // most))


def _squares_in_blocks(module, spec, strategy, x, mat, dims, per_sample):
    """Sums of squared per-sample VJPs, formed block by block.

    Blocks split the groups (``_group_blocks``), then the vectors and samples
    (``_vjp_blocks``).

    Args:
        module: The layer.
        spec: Its description.
        strategy: The evaluation with ``SQUARE`` appended.
        x: Layer input of shape ``[N, *input_shape[1:]]``.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
        dims: Dimensions of the raw VJPs (``[V, N, ...]``) to sum, as a function
            of their number of dimensions.
        per_sample: Whether the samples' dimension stays (then first).

    Returns:
        The sums, with the dimensions that ``dims`` leaves, in order; over several
        blocks of groups, those that keep the weight's dimensions have them as
        ``[(N,) C_out, -1]``.
    """
    groups = _group_blocks(spec, mat, strategy)
    bound = unfolded_block_bytes(spec)
    if len(groups) == 1:
        return _squares_of_groups(
            module, spec, strategy, x, mat, dims, per_sample, bound
        )
    entries_summed = 2 in dims(3)  # [V, N, entries]: then the blocks add up
    total = None
    for sub, ins, outs in groups:
        part = _squares_of_groups(
            module, sub, strategy, x[:, ins], mat[:, :, outs], dims, per_sample, bound
        )
        if entries_summed:
            total = part if total is None else total.add_(part)
            continue
        leading = (x.shape[0],) if per_sample else ()
        part = part.reshape(*leading, sub.out_channels, -1)
        if total is None:
            total = part.new_empty(*leading, spec.out_channels, part.shape[-1])
        total[..., outs, :] = part
    return total


def _squares_of_groups(module, spec, strategy, x, mat, dims, per_sample, bound):
    """``_squares_in_blocks`` of one block of groups, over ``_vjp_blocks``.

    Returns:
        The sums, with the dimensions that ``dims`` leaves, in order.
    """
    blocks = list(_vjp_blocks(spec, mat, strategy, bound))
    total = None
    for vectors, samples in blocks:
        raw = _raw_per_sample_vjps(
            module, spec, strategy, x[samples], mat[vectors, samples]
        )
        part = sum_in_memory_order(raw.square_(), dims(raw.dim()))
        if len(blocks) == 1:
            return part
        if total is None:
            shape = (x.shape[0], *part.shape[1:]) if per_sample else part.shape
            total = part.new_zeros(shape)
        (total[samples] if per_sample else total).add_(part)
    return total


def _vjp_squared(module, spec, strategy, x, mat, sum_batch):
    """GGN diagonal as the squared per-sample VJP of another strategy.

    Returns:
        The GGN diagonal of shape ``[(N,) *weight_shape]``.
    """
    dims = (0, 1) if sum_batch else (0,)
    sums = _squares_in_blocks(
        module, spec, strategy, x, mat, lambda _: dims, not sum_batch
    )
    shape = () if sum_batch else (x.shape[0],)
    return sums.reshape(*shape, *spec.weight_shape)


def _vjp_batch_l2(module, spec, strategy, x, mat):
    def dims(order: int) -> tuple[int, ...]:
        return (0, *range(2, order))

    return _squares_in_blocks(module, spec, strategy, x, mat, dims, True)


def _unfold_weight_jac_t_mat_prod(module, spec, strategy, x, mat, sum_batch):
    """Weight VJP as PyTorch's im2col kernel (``F.unfold``) and one batched GEMM.

    Only for Conv2d; other layers use the lowered network, which is the same
    computation with a strided view in place of the im2col kernel. Even zero
    padding is left to the im2col kernel; other padding (uneven, non-zero modes)
    is applied explicitly first.

    Returns:
        The weight VJP of shape ``[V, (N,) *weight_shape]``.
    """
    if not _is_conv2d(spec):
        return _tn_weight_jac_t_mat_prod(module, spec, "tn_lowered", x, mat, sum_batch)
    result = _unfolded_vjps(spec, x, mat, sum_batch)
    sizes = () if sum_batch else (x.shape[0],)
    return result.reshape(mat.shape[0], *sizes, *spec.weight_shape)


def _is_conv2d(spec: LayerSpec) -> bool:
    return spec.kind == "conv" and len(spec.patterns) == 2


def _unfolded_vjps(spec, x, mat, sum_batch):
    """Weight VJPs of a Conv2d from PyTorch's im2col kernel and one batched GEMM.

    Returns:
        The VJPs of shape ``[V, (N,) G, C_out // G, C_in // G * K0 * K1]``, a view
        of the GEMM's result.
    """
    first, second = spec.patterns
    if all(
        p.padding_mode == "zeros" and len(set(p.padding)) == 1 for p in spec.patterns
    ):
        padding = (first.padding[0], second.padding[0])  # im2col pads as it copies
    else:
        x, padding = pad(x, {2: first, 3: second}), (0, 0)
    unfolded = functional.unfold(
        x,
        kernel_size=(first.kernel_size, second.kernel_size),
        dilation=(first.dilation, second.dilation),
        padding=padding,
        stride=(first.stride, second.stride),
    ).unflatten(1, (spec.groups, -1))  # [N, G, B * K0 * K1, O0 * O1]
    mat = mat.flatten(3).unflatten(2, (spec.groups, -1))  # [V, N, G, A, O0 * O1]
    output = ("v", "g", "a", "k") if sum_batch else ("v", "n", "g", "a", "k")
    return contract(
        [("n", "g", "k", "o"), ("v", "n", "g", "a", "o")], output, [unfolded, mat]
    )


def _raw_per_sample_vjps(module, spec, strategy, x, mat):
    """Per-sample weight VJPs in the layout their evaluation produced them.

    Reshaping them to ``[V, N, *weight_shape]`` can copy them (the layout of a
    GEMM's result rarely matches it); squared quantities reshape their far smaller
    sums instead.

    Returns:
        Tensor of shape ``[V, N, ...]`` whose trailing dimensions flatten, in
        order, to the weight's.
    """
    base = strategy.removesuffix(SQUARE)
    if base in TN_STRATEGIES:
        net, _ = weight_jac_t_mat_prod.tensor_network(spec, x, mat, False)
        return prepare(net, base).contract()
    if base == "unfold" and _is_conv2d(spec):
        return _unfolded_vjps(spec, x, mat, False)
    if base == "kernel" and spec.kind != "linear":
        return _kernel_weight_gradients(module, spec, x, mat, False)
    return WEIGHT_VJP[base](module, spec, base, x, mat, False)


#: Stock BackPACK's weight-VJP methods, kept for comparison.
STOCK_WEIGHT_VJP = ("same_conv", "higher_conv")


#: Most (vector, sample, group) triples per call of the higher-order convolution on
#: CPU. It is one convolution with a group per triple, and from 8 groups on oneDNN's
#: kernel took 2.5x as long per group (2 cores, AVX-512; 64x32x32 -> 64 and
#: 192x16x16 -> 192, 3x3: 0.39-0.44 ms and 0.92-0.95 ms per sample for up to 7
#: triples, 1.13-1.16 ms and 2.35-2.39 ms from 8 on, for any split into vectors and
#: samples). Blocks of 4 ran at the fast rate: at N = 16, 0.73-0.88x the time of the
#: kernel route on five such layers, against 2.0-2.4x unblocked.
HIGHER_CONV_GROUPS = 4
#: Number of groups from which one call of the higher-order convolution is slow.
HIGHER_CONV_SLOW_GROUPS = 8
#: The slow kernel showed with at least this many input channels per group and input
#: elements per channel group and sample (8x32x32 -> 32 at N = 8: 0.84 against 1.58
#: ms blocked); below, the blocks' calls cost more than they save (3-channel and
#: 1-channel layers 1.2-4x slower blocked, 32x8x8 -> 64 with 10 vectors 1.4x).
HIGHER_CONV_BLOCK_CHANNELS = 8
HIGHER_CONV_BLOCK_INPUT = 2**13


def _stock_weight_jac_t_mat_prod(module, spec, strategy, x, mat, sum_batch):
    """Stock BackPACK's weight VJP (``same_conv`` or ``higher_conv``).

    On CPU, the higher-order convolution of layers with enough input channels runs
    in blocks of at most ``HIGHER_CONV_GROUPS`` (vector, sample, group) triples.

    Returns:
        The weight VJP of shape ``[V, (N,) *weight_shape]``.
    """
    check_stock_strategy(module, spec, strategy)
    if strategy == "same_conv":
        check_same_conv_size(module, x, mat)
        if spec.in_channels == spec.groups:
            return _depthwise_same_conv(module, spec, x, mat, sum_batch)
        return _stock_call(module, spec, strategy, x, mat, sum_batch)
    vectors, samples = mat.shape[:2]
    channels = spec.in_channels // spec.groups
    if (
        mat.is_cuda
        or vectors * samples * spec.groups < HIGHER_CONV_SLOW_GROUPS
        or spec.groups >= HIGHER_CONV_SLOW_GROUPS
        or channels < HIGHER_CONV_BLOCK_CHANNELS
        or channels * math.prod(spec.input_spatial) < HIGHER_CONV_BLOCK_INPUT
    ):
        return _stock_call(module, spec, strategy, x, mat, sum_batch)
    pairs = max(1, HIGHER_CONV_GROUPS // spec.groups)
    step_v = _even(vectors, pairs)
    shape = (vectors, *(() if sum_batch else (samples,)), *spec.weight_shape)
    result = mat.new_zeros(shape) if sum_batch else mat.new_empty(shape)
    for vs, ns in _blocks(vectors, samples, step_v, max(1, pairs // step_v)):
        part = _stock_call(module, spec, strategy, x[ns], mat[vs, ns], sum_batch)
        if sum_batch:
            result[vs].add_(part)
        else:
            result[vs, ns] = part
    return result


#: On CPU, the same-order convolution of depthwise-like layers runs in blocks of
#: vectors whose copies of the input take at most this many bytes (see
#: ``_depthwise_same_conv``).
DEPTHWISE_SAME_CONV_BLOCK_BYTES = 2**22


def _depthwise_same_conv(module, spec, x, mat, sum_batch):
    """Stock BackPACK's same-order convolution on depthwise-like layers, leaner.

    With one input channel per group, each (sample, group, vector) triple is a group
    of one convolution whose input channel is the layer's and whose kernel is the
    vector. Stock BackPACK copies the input once per vector and the vectors once
    more. Here one vector's input is a view, and several vectors run in blocks
    whose copies of the input take at most ``DEPTHWISE_SAME_CONV_BLOCK_BYTES`` on
    CPU. Grouping the vectors of a (sample, group) pair as output channels of one
    group instead avoids the copies, but oneDNN's kernel for it took 2-2.6x the time
    (ConvNeXt's depthwise 7x7 layers, V = 10).

    Args:
        module: The convolution (``in_channels == groups``, even zero padding).
        spec: Its description.
        x: Layer input of shape ``[N, C_in, *I]``.
        mat: Vectors of shape ``[V, N, C_out, *O]``.
        sum_batch: Whether to sum over the samples.

    Returns:
        The weight VJPs of shape ``[V, (N,) C_out, 1, *K]``.
    """
    vectors, samples = mat.shape[:2]
    step = vectors
    if not mat.is_cuda:
        padded = math.prod(p.padded_size for p in spec.patterns)
        one = samples * spec.in_channels * padded * mat.element_size()
        step = _even(vectors, max(1, DEPTHWISE_SAME_CONV_BLOCK_BYTES // one))
    if step == vectors:
        return _depthwise_same_conv_block(module, spec, x, mat, sum_batch)
    blocks = [
        _depthwise_same_conv_block(module, spec, x, mat[v : v + step], sum_batch)
        for v in range(0, vectors, step)
    ]
    return torch.cat(blocks)


def _depthwise_same_conv_block(module, spec, x, mat, sum_batch):
    """One call of ``_depthwise_same_conv``'s convolution, for all of ``mat``.

    Returns:
        The weight VJPs of shape ``[V, (N,) C_out, 1, *K]``.
    """
    vectors, samples, out_channels, *positions = mat.shape
    groups, dims = spec.groups, len(positions)
    multiplier = out_channels // groups
    # kernel [(n, g, v, m), 1, *O]; a view for one vector
    kernel = mat.unflatten(2, (groups, multiplier))
    kernel = kernel.permute(1, 2, 0, 3, *range(4, 4 + dims))
    kernel = kernel.reshape(samples * groups * vectors * multiplier, 1, *positions)
    inputs = x.unsqueeze(2).expand(samples, groups, vectors, *x.shape[2:])
    result = _CONV[dims](
        inputs.reshape(1, samples * groups * vectors, *x.shape[2:]),
        kernel,
        stride=module.dilation,
        padding=tuple(p.padding[0] for p in spec.patterns),
        dilation=module.stride,
        groups=samples * groups * vectors,
    )
    for d, size in enumerate(spec.kernel_size):
        result = result.narrow(2 + d, 0, size)
    result = result.view(samples, groups, vectors, multiplier, *spec.kernel_size)
    result = result.movedim(2, 0).reshape(
        vectors, samples, out_channels, 1, *spec.kernel_size
    )
    return result.sum(1) if sum_batch else result


def _stock_call(module, spec, strategy, x, mat, sum_batch):
    """One call of stock BackPACK's weight VJP on the given samples.

    Returns:
        The weight VJP of shape ``[V, (N,) *weight_shape]``.
    """
    proxy = SimpleNamespace(
        input0=x,
        output=x.new_empty(()).expand(spec.output_shape(x.shape[0])),
        weight=module.weight,
        groups=module.groups,
        stride=module.stride,
        padding=tuple(p.padding[0] for p in spec.patterns),
        dilation=module.dilation,
    )
    stock = {1: Conv1DDerivatives, 2: Conv2DDerivatives, 3: Conv3DDerivatives}
    derivatives = stock[len(spec.patterns)]()
    with weight_jac_t_save_memory(strategy == "higher_conv"):
        return derivatives._weight_jac_t_mat_prod(proxy, None, None, mat, sum_batch)


def check_stock_strategy(module: Module, spec: LayerSpec, strategy: str):
    """Raise if stock BackPACK's weight VJP would be wrong or unavailable.

    Args:
        module: The layer.
        spec: Its description.
        strategy: ``'same_conv'`` or ``'higher_conv'``.

    Raises:
        NotImplementedError: For layers other than Conv1d/2d/3d, non-zero padding
            modes, uneven ``padding='same'``, or ``higher_conv`` on Conv3d.
    """
    name = type(module).__name__
    alternatives = f"Use one of {('auto', *TN_STRATEGIES, 'kernel', 'unfold')}."
    if spec.kind != "conv":
        raise NotImplementedError(
            f"Strategy {strategy!r} exists only for Conv1d/2d/3d, not {name}."
            f" {alternatives}"
        )
    if not has_even_zero_padding(module, spec):
        raise NotImplementedError(
            f"Strategy {strategy!r} is stock BackPACK's and assumes even zero"
            f" padding; {name} has padding={module.padding!r},"
            f" padding_mode={module.padding_mode!r}. {alternatives}"
        )
    if strategy == "higher_conv" and len(spec.patterns) == 3:
        raise NotImplementedError(
            f"Strategy 'higher_conv' needs a 4d convolution, which PyTorch lacks, so"
            f" it does not support {name}. {alternatives}"
        )


#: Most elements a tensor of a CUDA convolution may have. Past it, cuDNN's kernels
#: overrun their 32-bit indices and fail with an illegal memory access that leaves
#: the CUDA context unusable (PyTorch's own kernels refuse such tensors). Stock
#: BackPACK's same-order convolution reaches it on ordinary layers: a 96x32x32 -> 96
#: 3x3 layer with N = 32 samples and V = 10 vectors (H100, torch 2.11).
MAX_CUDA_CONV_ELEMENTS = 2**31 - 1

#: Device types whose convolutions index with 32 bits.
INT32_INDEXED_DEVICES = frozenset({"cuda"})


def check_same_conv_size(
    module: Module, x: Tensor, mat: Tensor, method: str = "Strategy 'same_conv'"
):
    """Raise before stock BackPACK's same-order convolution overruns CUDA's indices.

    That convolution treats every (vector, sample, input channel) as a group: its
    kernel has ``V * N * C_out * C_in // G * prod(O)`` and its input
    ``V * N * C_in * prod(I)`` elements.

    Args:
        module: The convolution.
        x: Layer input of shape ``[N, C_in, *I]``.
        mat: Vectors of shape ``[V, N, C_out, *O]``.
        method: Who asked, for the message.

    Raises:
        NotImplementedError: On ``INT32_INDEXED_DEVICES``, if either tensor would
            have more than ``MAX_CUDA_CONV_ELEMENTS`` elements.
    """
    if mat.device.type not in INT32_INDEXED_DEVICES:
        return
    vectors = mat.shape[0]
    kernel = mat.numel() * (module.in_channels // module.groups)
    largest = max(kernel, vectors * x.numel())
    if largest > MAX_CUDA_CONV_ELEMENTS:
        raise NotImplementedError(
            f"{method} on {type(module).__name__}(in_channels="
            f"{module.in_channels}, out_channels={module.out_channels}) would build a"
            f" convolution operand of {largest} elements for {vectors} vectors of"
            f" {mat.shape[1]} samples; CUDA convolutions support at most"
            f" {MAX_CUDA_CONV_ELEMENTS}. Use strategy 'auto' (or 'tn', 'kernel',"
            " 'unfold', 'higher_conv'), or fewer samples per call."
        )


WEIGHT_VJP: dict[str, Callable] = {
    **dict.fromkeys(TN_STRATEGIES, _tn_weight_jac_t_mat_prod),
    "kernel": _kernel_weight_jac_t_mat_prod,
    "unfold": _unfold_weight_jac_t_mat_prod,
    **dict.fromkeys(STOCK_WEIGHT_VJP, _stock_weight_jac_t_mat_prod),
}

#: Evaluations that only some layers admit, with the test of a layer (``auto`` and
#: autotuning offer them only there).
APPLIES: dict[str, Callable[[LayerSpec], bool]] = {"lag": lag_applies}

#: op -> strategy -> evaluation(module, spec, strategy, **tensors)
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "forward": {
        **dict.fromkeys(TN_STRATEGIES, _tn_forward),
        "kernel": _kernel_forward,
    },
    "jac_mat_prod": {
        **dict.fromkeys(TN_STRATEGIES, _tn_jac_mat_prod),
        "kernel": _kernel_jac_mat_prod,
    },
    "jac_t_mat_prod": {
        **dict.fromkeys(TN_STRATEGIES, _tn_jac_t_mat_prod),
        "kernel": _kernel_jac_t_mat_prod,
    },
    "weight_jac_mat_prod": {
        **dict.fromkeys(TN_STRATEGIES, _tn_weight_jac_mat_prod),
        "kernel": _kernel_weight_jac_mat_prod,
    },
    "weight_jac_t_mat_prod": WEIGHT_VJP,
    "weight_diag_ggn": {
        **dict.fromkeys(TN_STRATEGIES, _tn_weight_diag_ggn),
        **{f"{s}{SQUARE}": _vjp_squared for s in WEIGHT_VJP},
    },
    "weight_batch_l2": {
        **dict.fromkeys(TN_STRATEGIES, _tn_weight_batch_l2),
        **{f"{s}{SQUARE}": _vjp_batch_l2 for s in WEIGHT_VJP},
    },
    "unfold_input": dict.fromkeys(TN_STRATEGIES, _tn_unfold_input),
    "kfac_expand": {
        **dict.fromkeys(TN_STRATEGIES, _tn_kfac_expand),
        "lag": _lag_kfac_expand,
    },
    "kfac_reduce": dict.fromkeys(TN_STRATEGIES, _tn_kfac_reduce),
}
