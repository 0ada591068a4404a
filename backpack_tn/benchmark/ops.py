"""The measured operations and the methods that compute each of them.

An *op* is one quantity BackPACK needs from a layer; a *method* is one way to
compute it. Every method has the signature ``method(module, x, extra) -> Tensor``
where ``module`` carries ``input0``/``output`` (set by :func:`prepare`), ``x`` is
the input batch and ``extra`` holds the op's other operands (``g``: output
gradient ``[N, *out]``; ``mat``: ``V`` output-shaped vectors ``[V, N, *out]``).
A method raises ``NotImplementedError`` for a layer it does not support; the
benchmark reports such cells as ``n/a``.

Reference methods:

* ``torch``: the layer's own forward pass.
* ``autograd``: ``torch.autograd.grad`` through a graph built before timing.
* ``bp_default``: stock BackPACK derivatives (``param_mjp``/``jac_t_mat_prod``)
  under ``weight_jac_t_save_memory(False)``.
* ``bp_save_memory``: the same under ``weight_jac_t_save_memory(True)``
  (higher-order convolution; ``Conv1d``/``Conv2d`` only).
* ``torch_func``: ``torch.func.vmap(torch.func.grad(...))`` per-sample gradients;
  for ``input_vjp``, ``vmap`` over ``torch.func.vjp`` (which includes a forward pass).
* ``unfold``: ``backpack.utils.conv.unfold_input`` (``unfoldNd`` for transposed
  convolutions) followed by ``einsum``; this is the code of BackPACK's
  ``BatchL2Grad``, ``DiagGGN`` and ``KFAC`` extensions, generalized to groups.

Methods of ``backpack_tn`` are named ``ours:<strategy>`` for each strategy in
``backpack_tn.derivatives.STRATEGIES`` (and ``ours:auto``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, einsum, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.conv import _ConvTransposeNd

from backpack_tn.benchmark.layers import LayerSpec
from backpack_tn.derivatives.implementations import check_same_conv_size

Method = Callable[[nn.Module, Tensor, dict], Tensor]

#: Prefix of the methods implemented by ``backpack_tn.derivatives``.
OURS_PREFIX = "ours:"


@dataclass(frozen=True)
class OpInfo:
    """Description of one benchmark op.

    Attributes:
        name: Op name.
        description: One line: what is computed, with the result's shape.
        batch_divisor: The op runs at batch size ``max(1, N // batch_divisor)``;
            it is 4 for ``ggn_diag`` because BackPACK's default route
            materializes ``V * N * C_out * C_in/G * prod(O)`` numbers.
    """

    name: str
    description: str
    batch_divisor: int = 1


#: The ops in report order.
OPS: dict[str, OpInfo] = {
    info.name: info
    for info in (
        OpInfo("forward", "layer output `[N, C_out, *O]`"),
        OpInfo("input_vjp", "input VJP of one vector: `[1, N, *in]`"),
        OpInfo(
            "per_sample_weight_grad",
            "per-sample weight gradients `[N, *weight]` (BatchGrad)",
        ),
        OpInfo("batch_l2", "per-sample squared weight gradient norms `[N]`"),
        OpInfo(
            "ggn_diag",
            "weight VJPs of V output vectors, squared, summed over v and n "
            "`[*weight]` (DiagGGN)",
            batch_divisor=4,
        ),
        OpInfo("kfac_expand", "KFAC-expand (KFC) input factor `[C_in K, C_in K]`"),
        OpInfo("kfac_reduce", "KFAC-reduce input factor `[C_in K, C_in K]`"),
    )
}
OP_NAMES: tuple[str, ...] = tuple(OPS)

#: Reference methods in report order.
REFERENCE_METHODS: tuple[str, ...] = (
    "torch",
    "autograd",
    "bp_default",
    "bp_save_memory",
    "torch_func",
    "unfold",
)


def is_reference(method: str) -> bool:
    """Whether a method is a reference (not one of ``backpack_tn``'s).

    Args:
        method: Method name.

    Returns:
        ``True`` for reference methods.
    """
    return not method.startswith(OURS_PREFIX)


# ----------------------------------------------------------------- setup
def prepare(
    spec: LayerSpec,
    op: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ggn_vectors: int = 10,
) -> tuple[nn.Module, Tensor, dict]:
    """Build a layer, its input and the operands of an op.

    The layer's ``input0`` and ``output`` attributes are set as BackPACK's hooks
    would set them. All random numbers come from ``seed``, so every process
    that prepares the same ``(spec, op, seed)`` gets the same operands.

    Args:
        spec: Layer configuration, including the batch size ``N``.
        op: Op name, one of :data:`OP_NAMES`.
        device: Device of layer and tensors.
        dtype: Floating point type.
        seed: Random seed.
        ggn_vectors: Number ``V`` of vectors for ``ggn_diag``.

    Returns:
        ``(module, x, extra)``; ``x`` has shape ``[N, *in]``; ``extra`` has
        ``g`` of shape ``[N, *out]`` (``per_sample_weight_grad``, ``batch_l2``),
        ``mat`` of shape ``[V, N, *out]`` (``input_vjp``: ``V = 1``;
        ``ggn_diag``: ``V = ggn_vectors``) and, for ``input_vjp``, ``x_graph``
        and ``out_graph``, an input and output connected by an autograd graph.

    Raises:
        ValueError: If ``op`` is unknown.
    """
    if op not in OPS:
        raise ValueError(f"Unknown op {op!r}. Supported: {OP_NAMES}.")
    module, x = spec.build(device=device, dtype=dtype, seed=seed)
    with torch.no_grad():
        out = module(x)
    module.input0 = x
    module.output = out
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    extra: dict = {}
    if op in ("per_sample_weight_grad", "batch_l2"):
        extra["g"] = randn(*out.shape)
    elif op == "ggn_diag":
        extra["mat"] = randn(ggn_vectors, *out.shape)
    elif op == "input_vjp":
        extra["mat"] = randn(1, *out.shape)
        x_graph = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            extra["out_graph"] = module(x_graph)
        extra["x_graph"] = x_graph
    return module, x, extra


# ------------------------------------------------------------- helpers
def _kind(module: nn.Module) -> str:
    """Layer kind of a module, e.g. ``"conv2d"``.

    Args:
        module: A supported layer.

    Returns:
        The kind.
    """
    return type(module).__name__.lower()


def _require_plain_conv(
    module: nn.Module, method: str, allow_output_padding: bool = False
):
    """Reject layer settings that BackPACK and ``unfold`` ignore or mishandle.

    Args:
        module: The layer.
        method: Method name, for the message.
        allow_output_padding: Whether non-zero ``output_padding`` is fine.

    Raises:
        NotImplementedError: For ``padding_mode != 'zeros'``, string padding or
            (unless allowed) non-zero ``output_padding``.
    """
    if isinstance(module, nn.Linear):
        return
    if module.padding_mode != "zeros":
        raise NotImplementedError(
            f"{method} ignores padding_mode {module.padding_mode!r}."
        )
    if isinstance(module.padding, str):
        raise NotImplementedError(f"{method} needs integer padding.")
    if not allow_output_padding and any(getattr(module, "output_padding", ())):
        raise NotImplementedError(f"{method} ignores output_padding.")


@functools.cache
def _bp_derivatives(kind: str):
    """Stock BackPACK derivatives object for a layer kind.

    Args:
        kind: Layer kind.

    Returns:
        An instance of BackPACK's derivatives class (kept for reuse).
    """
    from backpack.core.derivatives import (
        conv1d,
        conv2d,
        conv3d,
        conv_transpose1d,
        conv_transpose2d,
        conv_transpose3d,
        linear,
    )

    return {
        "linear": linear.LinearDerivatives,
        "conv1d": conv1d.Conv1DDerivatives,
        "conv2d": conv2d.Conv2DDerivatives,
        "conv3d": conv3d.Conv3DDerivatives,
        "convtranspose1d": conv_transpose1d.ConvTranspose1DDerivatives,
        "convtranspose2d": conv_transpose2d.ConvTranspose2DDerivatives,
        "convtranspose3d": conv_transpose3d.ConvTranspose3DDerivatives,
    }[kind]()


def _bp_weight_vjp(module: nn.Module, mat: Tensor, save_memory: bool) -> Tensor:
    """Per-sample weight VJPs with stock BackPACK's ``param_mjp``.

    Args:
        module: The layer, with ``input0``/``output``.
        mat: Vectors of shape ``[V, N, *out]``.
        save_memory: Value of ``weight_jac_t_save_memory``.

    Returns:
        Per-sample VJPs of shape ``[V, N, *weight]``.

    Raises:
        NotImplementedError: If BackPACK has no such route for the layer, or its
            same-order convolution would overrun CUDA's 32-bit indices.
    """
    from backpack.core.derivatives.convnd import (
        weight_jac_t_save_memory,
    )

    method = "bp_save_memory" if save_memory else "bp_default"
    kind = _kind(module)
    if save_memory and kind not in ("conv1d", "conv2d"):
        raise NotImplementedError(
            f"{method} exists only for conv1d/conv2d, not for {kind}."
        )
    _require_plain_conv(module, method)
    if not save_memory and kind in ("conv1d", "conv2d", "conv3d"):
        # a failing CUDA kernel would end every later measurement of the run
        check_same_conv_size(module, module.input0, mat, method)
    with weight_jac_t_save_memory(save_memory):
        return _bp_derivatives(kind).param_mjp(
            "weight", module, None, None, mat, sum_batch=False
        )


def _unfolded(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded input, split into channel groups.

    Args:
        module: The layer.
        x: Input of shape ``[N, *in]``.

    Returns:
        Tensor of shape ``[N, G, C_in // G, K, L]`` with ``K`` the number of
        kernel elements and ``L`` the number of output positions (``K = 1`` and
        ``L = prod(extra dims)`` for ``Linear``).
    """
    n = x.shape[0]
    if isinstance(module, nn.Linear):
        return x.reshape(n, 1, -1, x.shape[-1]).transpose(-1, -2).unsqueeze(-2)
    _require_plain_conv(module, "unfold", allow_output_padding=True)
    if isinstance(module, _ConvTransposeNd):
        from unfoldNd import unfold_transposeNd

        unfolded = unfold_transposeNd(
            x,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            output_padding=module.output_padding,
            dilation=module.dilation,
        )
    else:
        from backpack.utils.conv import unfold_input

        unfolded = unfold_input(module, x)
    groups = module.groups
    return unfolded.reshape(
        n, groups, module.in_channels // groups, prod(module.kernel_size), -1
    )


def _unfold_weight_vjp(module: nn.Module, x: Tensor, mat: Tensor) -> Tensor:
    """Per-sample weight VJPs from the unfolded input.

    Args:
        module: The layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *out]``.

    Returns:
        Per-sample VJPs of shape ``[V, N, *weight]``.
    """
    unfolded = _unfolded(module, x)
    v, n, groups = mat.shape[0], mat.shape[1], unfolded.shape[1]
    if isinstance(module, nn.Linear):
        mat = mat.reshape(v, n, -1, mat.shape[-1]).transpose(-1, -2)
    mat = mat.reshape(v, n, groups, -1, unfolded.shape[-1])
    # weight is [(g o), c, *k] for convolutions, [(g c), o, *k] when transposed
    out = "vngcok" if isinstance(module, _ConvTransposeNd) else "vngock"
    vjp = einsum(f"ngckl,vngol->{out}", unfolded, mat)
    return vjp.reshape(v, n, *module.weight.shape)


def _torch_func_weight_vjp(module: nn.Module, x: Tensor, mat: Tensor) -> Tensor:
    """Per-sample weight VJPs with ``torch.func``.

    Args:
        module: The layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *out]``.

    Returns:
        Per-sample VJPs of shape ``[V, N, *weight]``.
    """

    def inner(weight: Tensor, x_n: Tensor, mat_n: Tensor) -> Tensor:
        out = functional_call(module, {"weight": weight}, (x_n.unsqueeze(0),))
        return (out.squeeze(0) * mat_n).sum()

    per_sample = vmap(grad(inner), in_dims=(None, 0, 0))
    weight = module.weight.detach()
    if mat.shape[0] == 1:
        return per_sample(weight, x, mat[0]).unsqueeze(0)
    return vmap(per_sample, in_dims=(None, None, 0))(weight, x, mat)


# ----------------------------------------------------------- references
def _forward_torch(module, x, extra):
    return module(x)


def _input_vjp_bp(module, x, extra):
    if not isinstance(module, _ConvTransposeNd):
        _require_plain_conv(module, "bp_default")
    return _bp_derivatives(_kind(module)).jac_t_mat_prod(
        module, None, None, extra["mat"]
    )


def _input_vjp_autograd(module, x, extra):
    out, x_graph = extra["out_graph"], extra["x_graph"]
    return torch.stack(
        [
            torch.autograd.grad(out, x_graph, m, retain_graph=True)[0]
            for m in extra["mat"]
        ]
    )


def _input_vjp_torch_func(module, x, extra):
    _, vjp_fn = torch.func.vjp(module, x)
    return vmap(vjp_fn)(extra["mat"])[0]


def _psg(vjp: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Method:
    def method(module, x, extra):
        return vjp(module, x, extra["g"].unsqueeze(0))[0]

    return method


def _batch_l2_from(vjp: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Method:
    def method(module, x, extra):
        return vjp(module, x, extra["g"].unsqueeze(0))[0].pow_(2).flatten(1).sum(1)

    return method


def _ggn_diag_from(vjp: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Method:
    def method(module, x, extra):
        return vjp(module, x, extra["mat"]).pow_(2).sum((0, 1))

    return method


def _batch_l2_unfold(module, x, extra):
    unfolded = _unfolded(module, x).flatten(2, 3)  # [N, G, C_in/G * K, L]
    g = extra["g"]
    n, groups = g.shape[0], unfolded.shape[1]
    if isinstance(module, nn.Linear):
        g = g.reshape(n, -1, g.shape[-1]).transpose(-1, -2)
    g = g.reshape(n, groups, -1, unfolded.shape[-1])
    if groups == 1:  # BackPACK's BatchL2Grad for convolutions
        return einsum(
            "nmi,nki,nmj,nkj->n", g[:, 0], unfolded[:, 0], g[:, 0], unfolded[:, 0]
        )
    return einsum("ngmi,ngki,ngmj,ngkj->n", g, unfolded, g, unfolded)


def _ggn_diag_unfold(module, x, extra):
    mat = extra["mat"]
    if isinstance(module, nn.Linear):
        return _unfold_weight_vjp(module, x, mat).pow_(2).sum((0, 1))
    unfolded = _unfolded(module, x).flatten(2, 3).flatten(1, 2)
    if isinstance(module, _ConvTransposeNd):
        from backpack.utils.conv_transpose import (
            extract_weight_diagonal,
        )
    else:
        from backpack.utils.conv import extract_weight_diagonal
    return extract_weight_diagonal(module, unfolded, mat, sum_batch=True)


def _kfac_unfold(reduce: bool) -> Method:
    def method(module, x, extra):
        unfolded = _unfolded(module, x).flatten(2, 3)  # [N, G, C_in/G * K, L]
        n, groups = unfolded.shape[:2]
        if reduce:
            mean = unfolded.mean(-1)
            if groups == 1:
                return einsum("ni,nj->ij", mean[:, 0], mean[:, 0]) / n
            return einsum("ngi,ngj->gij", mean, mean) / n
        if groups == 1:  # BackPACK's KFAC for convolutions
            return einsum("bik,bjk->ij", unfolded[:, 0], unfolded[:, 0]) / n
        return einsum("ngil,ngjl->gij", unfolded, unfolded) / n

    return method


def _bp_default(module, x, mat):
    return _bp_weight_vjp(module, mat, save_memory=False)


def _bp_save_memory(module, x, mat):
    return _bp_weight_vjp(module, mat, save_memory=True)


#: Reference methods per op: ``{op: {method: callable(module, x, extra)}}``.
REFERENCES: dict[str, dict[str, Method]] = {
    "forward": {"torch": _forward_torch},
    "input_vjp": {
        "bp_default": _input_vjp_bp,
        "autograd": _input_vjp_autograd,
        "torch_func": _input_vjp_torch_func,
    },
    "per_sample_weight_grad": {
        "bp_default": _psg(_bp_default),
        "bp_save_memory": _psg(_bp_save_memory),
        "torch_func": _psg(_torch_func_weight_vjp),
        "unfold": _psg(_unfold_weight_vjp),
    },
    "batch_l2": {
        "bp_default": _batch_l2_from(_bp_default),
        "bp_save_memory": _batch_l2_from(_bp_save_memory),
        "torch_func": _batch_l2_from(_torch_func_weight_vjp),
        "unfold": _batch_l2_unfold,
    },
    "ggn_diag": {
        "bp_default": _ggn_diag_from(_bp_default),
        "bp_save_memory": _ggn_diag_from(_bp_save_memory),
        "torch_func": _ggn_diag_from(_torch_func_weight_vjp),
        "unfold": _ggn_diag_unfold,
    },
    "kfac_expand": {"unfold": _kfac_unfold(reduce=False)},
    "kfac_reduce": {"unfold": _kfac_unfold(reduce=True)},
}


# ------------------------------------------------------------------ ours
#: Class in ``backpack_tn.derivatives`` per layer kind.
OUR_CLASSES: dict[str, str] = {
    "linear": "LinearDerivativesTN",
    "conv1d": "Conv1DDerivativesTN",
    "conv2d": "Conv2DDerivativesTN",
    "conv3d": "Conv3DDerivativesTN",
    "convtranspose1d": "ConvTranspose1DDerivativesTN",
    "convtranspose2d": "ConvTranspose2DDerivativesTN",
    "convtranspose3d": "ConvTranspose3DDerivativesTN",
}


def _our_module():
    """Import ``backpack_tn.derivatives`` if it exists.

    Returns:
        The module, or ``None`` if the package has no ``derivatives`` yet.

    Raises:
        ModuleNotFoundError: If a dependency of ``backpack_tn.derivatives`` is
            missing.
    """
    try:
        return importlib.import_module("backpack_tn.derivatives")
    except ModuleNotFoundError as error:
        if error.name in ("backpack_tn", "backpack_tn.derivatives"):
            return None
        raise


def our_strategies() -> tuple[str, ...]:
    """Strategies of ``backpack_tn.derivatives``, plus ``"auto"``.

    Returns:
        Strategy names; empty if ``backpack_tn.derivatives`` does not exist or
        does not define ``STRATEGIES`` yet.
    """
    module = _our_module()
    if module is None or not hasattr(module, "STRATEGIES"):
        return ()
    strategies = tuple(module.STRATEGIES)
    return strategies if "auto" in strategies else ("auto", *strategies)


@functools.cache
def _our_derivatives(kind: str, strategy: str):
    """``backpack_tn`` derivatives object for a layer kind and strategy.

    Args:
        kind: Layer kind.
        strategy: Strategy name.

    Returns:
        An instance (kept for reuse, like an extension's derivatives object).

    Raises:
        NotImplementedError: If ``backpack_tn.derivatives`` lacks the class.
    """
    module = _our_module()
    cls = getattr(module, OUR_CLASSES[kind], None) if module else None
    if cls is None:
        raise NotImplementedError(
            f"backpack_tn.derivatives has no {OUR_CLASSES[kind]}."
        )
    return cls(strategy=strategy)


#: op -> its ``backpack_tn`` call, ``f(derivatives, module, x, extra)``
_OUR_CALLS: dict[str, Callable] = {
    "forward": lambda d, module, x, extra: d.forward(module, x),
    "input_vjp": lambda d, module, x, extra: d.jac_t_mat_prod(
        module, None, None, extra["mat"]
    ),
    "per_sample_weight_grad": lambda d, module, x, extra: d.param_mjp(
        "weight", module, None, None, extra["g"].unsqueeze(0), sum_batch=False
    )[0],
    "batch_l2": lambda d, module, x, extra: d.weight_batch_l2(module, extra["g"]),
    "ggn_diag": lambda d, module, x, extra: d.weight_diag_ggn(
        module, extra["mat"], sum_batch=True
    ),
    "kfac_expand": lambda d, module, x, extra: d.kfac_input_factor(
        module, approx="expand"
    ),
    "kfac_reduce": lambda d, module, x, extra: d.kfac_input_factor(
        module, approx="reduce"
    ),
}


def _ours(op: str, strategy: str) -> Method:
    """The ``backpack_tn`` method of an op for one strategy.

    The derivatives object is looked up once per layer type, so the method adds
    no more Python per call than the references' own dispatch.

    Args:
        op: Op name.
        strategy: Strategy name.

    Returns:
        The method.
    """
    call = _OUR_CALLS[op]
    by_type: dict[type, object] = {}

    def method(module, x, extra):
        derivatives = by_type.get(type(module))
        if derivatives is None:
            derivatives = _our_derivatives(_kind(module), strategy)
            by_type[type(module)] = derivatives
        return call(derivatives, module, x, extra)

    method.__name__ = f"{OURS_PREFIX}{strategy}_{op}"
    return method


def op_registry(include_ours: bool = True) -> dict[str, dict[str, Method]]:
    """All methods per op: references first, then ``ours:<strategy>``.

    Args:
        include_ours: Whether to import ``backpack_tn.derivatives`` and add its
            strategies.

    Returns:
        ``{op: {method: callable(module, x, extra) -> Tensor}}``.
    """
    registry = {op: dict(methods) for op, methods in REFERENCES.items()}
    if include_ours:
        for strategy in our_strategies():
            for op, methods in registry.items():
                methods[f"{OURS_PREFIX}{strategy}"] = _ours(op, strategy)
    return registry


def get_method(op: str, method: str) -> Method:
    """Look up one method.

    Args:
        op: Op name.
        method: Method name.

    Returns:
        The callable.

    Raises:
        NotImplementedError: If the op has no such method.
    """
    if method.startswith(OURS_PREFIX):
        return _ours(op, method[len(OURS_PREFIX) :])
    try:
        return REFERENCES[op][method]
    except KeyError:
        raise NotImplementedError(f"Op {op!r} has no method {method!r}.") from None
