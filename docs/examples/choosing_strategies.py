"""Choosing and comparing the evaluation strategies of the TN derivatives.

Every derivative class takes a ``strategy`` (one of ``backpack_tn.STRATEGIES``):

- ``tn``: the simplified tensor network (non-overlapping patterns become views),
- ``tn_unsimplified``: the raw network with dense index patterns,
- ``tn_lowered``: every pattern lowered into a strided view (im2col-like),
- ``kernel``: PyTorch's convolution kernels batched with ``torch.func.vmap``,
- ``same_conv`` / ``higher_conv``: stock BackPACK's two convolution-based weight
  VJPs (Conv1d/2d/3d with zero padding only),
- ``auto`` (default): a cost model picks one of them per layer and product.

This script computes per-sample weight gradients (the transposed weight Jacobian
applied to one vector per sample, as ``BatchGrad`` does) of two small convolutions
with every strategy, checks that all of them agree with ``torch.func``, times them
with ``time.perf_counter`` and prints what ``auto`` picks and why. The same
``strategy`` argument is accepted by every extension, e.g. ``BatchGrad(strategy="tn")``.
"""

import time

import torch
from backpack import extend
from torch import nn
from torch.func import functional_call, grad, vmap

from backpack_tn import STRATEGIES, set_autotune
from backpack_tn.derivatives import Conv2DDerivativesTN

torch.manual_seed(0)

N, REPEATS = 8, 5

LAYERS = {
    "3x3, stride 1 (overlapping)": nn.Conv2d(8, 16, kernel_size=3, padding=1),
    "2x2, stride 2 (non-overlapping)": nn.Conv2d(8, 16, kernel_size=2, stride=2),
}


def best_time(fn) -> float:
    """Best wall-clock time of ``fn()`` over ``REPEATS`` runs, after one warm-up.

    The warm-up run also fills the caches of contraction paths.

    Args:
        fn: Function without arguments.

    Returns:
        The best time in milliseconds.
    """
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def reference_grads(layer: nn.Module, x: torch.Tensor, mat: torch.Tensor):
    """Per-sample weight gradients of ``<layer(x_n), mat_n>`` by ``torch.func``.

    Call it before ``extend(layer)``: torch.func does not trace BackPACK's hooks.

    Args:
        layer: The layer.
        x: Input of shape ``[N, C_in, *I]``.
        mat: One vector per sample, shape ``[1, N, C_out, *O]``.

    Returns:
        Gradients of shape ``[1, N, *weight.shape]``.
    """
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def inner_product(params: dict, x_n: torch.Tensor, m_n: torch.Tensor):
        out = functional_call(layer, params, (x_n.unsqueeze(0),))
        return (out[0] * m_n).sum()

    grads = vmap(grad(inner_product), in_dims=(None, 0, 0))(params, x, mat[0])
    return grads["weight"].unsqueeze(0)


def compare_strategies(layer: nn.Module):
    """Time every strategy on one layer, check it, and explain ``auto``'s choices.

    Args:
        layer: A ``Conv2d`` layer that is not extended yet.
    """
    x = torch.randn(N, layer.in_channels, 16, 16)
    mat = torch.randn(1, *layer(x).shape)  # [V=1, N, C_out, *O]
    reference = reference_grads(layer, x, mat)
    layer = extend(layer)
    layer(x)  # stores layer.input0 and layer.output, as BackPACK's hooks do

    header = (
        f"{'strategy':16s} {'evaluation':16s} {'time [ms]':>9s}  {'rel. error':>10s}"
    )
    print(f"  {header}")
    for strategy in STRATEGIES:
        derivatives = Conv2DDerivativesTN(strategy=strategy)
        tensors = {"x": x, "mat": mat, "sum_batch": False}
        evaluation, _ = derivatives.explain("weight_jac_t_mat_prod", layer, **tensors)

        def per_sample_grads(derivatives=derivatives):
            """The product BatchGrad calls: per-sample weight VJPs.

            Args:
                derivatives: The TN derivatives to evaluate it with.

            Returns:
                Per-sample weight VJPs of shape ``[1, N, *weight.shape]``.
            """
            return derivatives.param_mjp(
                "weight", layer, None, None, mat, sum_batch=False
            )

        milliseconds = best_time(per_sample_grads)
        error = (per_sample_grads() - reference).abs().max() / reference.abs().max()
        assert error < 1e-5, f"strategy {strategy!r} disagrees: {error:.1e}"
        print(f"  {strategy:16s} {evaluation:16s} {milliseconds:9.2f}  {error:10.1e}")

    # why auto picks what it picks, for several products of this layer
    auto = Conv2DDerivativesTN()
    for op, tensors in (
        ("weight_jac_t_mat_prod", {"x": x, "mat": mat, "sum_batch": False}),
        ("weight_diag_ggn", {"x": x, "mat": mat, "sum_batch": True}),
        ("kfac_reduce", {"x": x}),
    ):
        evaluation, reason = auto.explain(op, layer, **tensors)
        print(f"  auto, {op}: {evaluation}\n    because {reason}")

    # autotuning: time every candidate once per configuration, keep the fastest
    set_autotune(True)
    tensors = {"x": x, "mat": mat, "sum_batch": False}
    evaluation, reason = auto.explain("weight_jac_t_mat_prod", layer, **tensors)
    set_autotune(False)
    print(f"  auto with set_autotune(True): {evaluation}\n    because {reason}\n")


for description, layer in LAYERS.items():
    print(f"Conv2d {description}: per-sample weight gradients")
    compare_strategies(layer)
