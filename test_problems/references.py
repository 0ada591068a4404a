"""Ground truth for Jacobian products, computed with autograd (``torch.func``).

Nothing here imports BackPACK: every quantity is obtained by differentiating the
module's own forward pass with :func:`torch.func.jvp`, :func:`torch.func.vjp`,
:func:`torch.func.grad` or :func:`torch.func.jacrev` through
:func:`torch.func.functional_call`. The references therefore hold for any
``torch.nn.Linear``, ``ConvNd`` and ``ConvTransposeNd`` configuration, including
``padding_mode != 'zeros'``, string padding and ``output_padding``.

The shapes follow BackPACK's conventions. Letters: ``V`` vectors, ``N`` batch size
(``len(subsampling)`` when sub-sampling), ``*in``/``*out`` the per-sample input/output
shape (``[C_in, *I]``/``[C_out, *O]`` for convolutions, ``[*, in_features]``/
``[*, out_features]`` for linear layers), ``K`` the kernel size, ``G`` the groups.

Sub-sampling selects samples of the batch. All layers here treat samples
independently, so a product restricted to the samples ``subsampling`` is computed from
the input rows ``x[subsampling]`` (repeated indices are allowed).
"""

from collections.abc import Callable
from math import prod

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn import (
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Module,
)

CONV_TRANSPOSE_TYPES = (ConvTranspose1d, ConvTranspose2d, ConvTranspose3d)


def _params(module: Module) -> dict[str, Tensor]:
    """Detached copies of the module's parameters, keyed by name.

    Args:
        module: Layer.

    Returns:
        Parameters of the module, detached from any graph.
    """
    return {name: p.detach() for name, p in module.named_parameters()}


def _check_param(module: Module, param: str) -> Tensor:
    """Return the parameter ``param`` of ``module``.

    Args:
        module: Layer.
        param: Name of the parameter, ``'weight'`` or ``'bias'``.

    Returns:
        The parameter.

    Raises:
        ValueError: If the module has no parameter called ``param``.
    """
    value = getattr(module, param, None)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{type(module).__name__} has no parameter {param!r}. Available: "
            f"{tuple(_params(module))}."
        )
    return value


def _subsample(x: Tensor, subsampling: list[int] | None) -> Tensor:
    """Select samples along the batch axis.

    Args:
        x: Tensor of shape ``[N, *]``.
        subsampling: Indices of the samples to keep. ``None`` keeps all.

    Returns:
        Tensor of shape ``[len(subsampling), *]``, or ``x`` when ``subsampling`` is
        ``None``.
    """
    return x if subsampling is None else x[subsampling]


def forward(module: Module, x: Tensor, **params: Tensor) -> Tensor:
    """Evaluate the module, optionally with some parameters replaced.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        **params: Replacement parameters, each of the parameter's shape.

    Returns:
        Output of shape ``[N, *out]``.
    """
    return functional_call(module, {**_params(module), **params}, (x,))


def jac_mat_prod(module: Module, x: Tensor, mat: Tensor) -> Tensor:
    """Apply the output-input Jacobian to ``V`` vectors.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *in]``.

    Returns:
        Jacobian-vector products of shape ``[V, N, *out]``.
    """

    def jvp_one(vec: Tensor) -> Tensor:
        return jvp(lambda inp: forward(module, inp), (x,), (vec,))[1]

    return vmap(jvp_one)(mat)


def jac_t_mat_prod(
    module: Module, x: Tensor, mat: Tensor, subsampling: list[int] | None = None
) -> Tensor:
    """Apply the transposed output-input Jacobian to ``V`` vectors.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *out]``; ``N`` becomes ``len(subsampling)``
            when sub-sampling.
        subsampling: Indices of the active samples. ``None`` uses all samples.

    Returns:
        Vector-Jacobian products of shape ``[V, N, *in]``; ``N`` becomes
        ``len(subsampling)`` when sub-sampling.
    """
    _, vjp_fn = vjp(lambda inp: forward(module, inp), _subsample(x, subsampling))
    return vmap(lambda vec: vjp_fn(vec)[0])(mat)


def param_jac_mat_prod(module: Module, x: Tensor, mat: Tensor, param: str) -> Tensor:
    """Apply the Jacobian of the output w.r.t. a parameter to ``V`` vectors.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, *param.shape]``.
        param: Name of the parameter, ``'weight'`` or ``'bias'``.

    Returns:
        Jacobian-vector products of shape ``[V, N, *out]``.
    """
    value = _check_param(module, param).detach()

    def jvp_one(vec: Tensor) -> Tensor:
        return jvp(lambda p: forward(module, x, **{param: p}), (value,), (vec,))[1]

    return vmap(jvp_one)(mat)


def param_jac_t_mat_prod(
    module: Module,
    x: Tensor,
    mat: Tensor,
    param: str,
    sum_batch: bool = True,
    subsampling: list[int] | None = None,
) -> Tensor:
    """Apply the transposed Jacobian of the output w.r.t. a parameter to ``V`` vectors.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *out]``; ``N`` becomes ``len(subsampling)``
            when sub-sampling.
        param: Name of the parameter, ``'weight'`` or ``'bias'``.
        sum_batch: Sum the per-sample results over the batch.
        subsampling: Indices of the active samples. ``None`` uses all samples.

    Returns:
        Vector-Jacobian products of shape ``[V, *param.shape]`` with ``sum_batch``,
        else ``[V, N, *param.shape]`` (``N`` becomes ``len(subsampling)`` when
        sub-sampling).
    """
    _check_param(module, param)
    x_sub = _subsample(x, subsampling)
    # fold the vectors into the batch: [V * N, *in] and [V * N, *out]
    num_vectors, n = mat.shape[:2]
    x_rep = x_sub.repeat(num_vectors, *[1] * (x.dim() - 1))
    result = per_sample_grads(module, x_rep, mat.flatten(end_dim=1))[param]
    result = result.unflatten(0, (num_vectors, n))
    return result.sum(1) if sum_batch else result


def weight_jac_mat_prod(module: Module, x: Tensor, mat: Tensor) -> Tensor:
    """Apply the Jacobian of the output w.r.t. the weight to ``V`` vectors.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, *weight.shape]``.

    Returns:
        Jacobian-vector products of shape ``[V, N, *out]``.
    """
    return param_jac_mat_prod(module, x, mat, "weight")


def bias_jac_mat_prod(module: Module, x: Tensor, mat: Tensor) -> Tensor:
    """Apply the Jacobian of the output w.r.t. the bias to ``V`` vectors.

    Args:
        module: Layer with bias.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, *bias.shape]``.

    Returns:
        Jacobian-vector products of shape ``[V, N, *out]``.
    """
    return param_jac_mat_prod(module, x, mat, "bias")


def weight_jac_t_mat_prod(
    module: Module,
    x: Tensor,
    mat: Tensor,
    sum_batch: bool = True,
    subsampling: list[int] | None = None,
) -> Tensor:
    """Apply the transposed Jacobian of the output w.r.t. the weight to ``V`` vectors.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *out]``; ``N`` becomes ``len(subsampling)``
            when sub-sampling.
        sum_batch: Sum the per-sample results over the batch.
        subsampling: Indices of the active samples. ``None`` uses all samples.

    Returns:
        Vector-Jacobian products of shape ``[V, *weight.shape]`` with ``sum_batch``,
        else ``[V, N, *weight.shape]``.
    """
    return param_jac_t_mat_prod(module, x, mat, "weight", sum_batch, subsampling)


def bias_jac_t_mat_prod(
    module: Module,
    x: Tensor,
    mat: Tensor,
    sum_batch: bool = True,
    subsampling: list[int] | None = None,
) -> Tensor:
    """Apply the transposed Jacobian of the output w.r.t. the bias to ``V`` vectors.

    Args:
        module: Layer with bias.
        x: Input of shape ``[N, *in]``.
        mat: Vectors of shape ``[V, N, *out]``; ``N`` becomes ``len(subsampling)``
            when sub-sampling.
        sum_batch: Sum the per-sample results over the batch.
        subsampling: Indices of the active samples. ``None`` uses all samples.

    Returns:
        Vector-Jacobian products of shape ``[V, *bias.shape]`` with ``sum_batch``,
        else ``[V, N, *bias.shape]``.
    """
    return param_jac_t_mat_prod(module, x, mat, "bias", sum_batch, subsampling)


PARAM_JAC_MAT_PROD: dict[str, Callable[..., Tensor]] = {
    "weight": weight_jac_mat_prod,
    "bias": bias_jac_mat_prod,
}
"""Parameter Jacobian-vector products, keyed by parameter name."""

PARAM_JAC_T_MAT_PROD: dict[str, Callable[..., Tensor]] = {
    "weight": weight_jac_t_mat_prod,
    "bias": bias_jac_t_mat_prod,
}
"""Parameter vector-Jacobian products, keyed by parameter name."""


def per_sample_jacobian(module: Module, x: Tensor) -> Tensor:
    """Output-input Jacobian of each sample, flattened to a matrix.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.

    Returns:
        Jacobians of shape ``[N, F_out, F_in]`` with ``F_out = prod(*out)`` and
        ``F_in = prod(*in)``, both flattened in row-major order.
    """

    def flat_forward(x_n: Tensor) -> Tensor:
        return forward(module, x_n.unsqueeze(0)).flatten()

    jac = vmap(jacrev(flat_forward))(x)
    return jac.flatten(start_dim=2)


def ea_jac_t_mat_jac_prod(module: Module, x: Tensor, mat: Tensor) -> Tensor:
    """Average of ``J_nᵀ mat J_n`` over samples, with ``J_n`` the input Jacobian.

    ``J_n`` is the Jacobian of the flattened output of sample ``n`` w.r.t. its
    flattened input. For a linear layer with input ``[N, *, in_features]`` the
    additional axes ``*`` are part of the sample (BackPACK's ``LinearDerivatives``
    convention), so ``J_n`` is block diagonal.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        mat: Matrix of shape ``[F_out, F_out]`` with ``F_out = prod(*out)``.

    Returns:
        Matrix of shape ``[F_in, F_in]`` with ``F_in = prod(*in)``.
    """
    jac = per_sample_jacobian(module, x)
    return torch.einsum("nai,ab,nbj->ij", jac, mat, jac) / x.shape[0]


def per_sample_grads(
    module: Module, x: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients of ``<module(x_n), grad_output_n>`` w.r.t. the parameters.

    Args:
        module: Layer.
        x: Input of shape ``[N, *in]``.
        grad_output: Gradient w.r.t. the output, of shape ``[N, *out]``.

    Returns:
        Per-sample gradients, keyed by parameter name, each of shape
        ``[N, *param.shape]``.
    """

    def sample_loss(params: dict[str, Tensor], x_n: Tensor, g_n: Tensor) -> Tensor:
        out = functional_call(module, params, (x_n.unsqueeze(0),))
        return (out * g_n.unsqueeze(0)).sum()

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(
        _params(module), x, grad_output
    )


def unfolded_input(module: Module, x: Tensor) -> Tensor:
    """Unfolded input of a (transpose) convolution, in BackPACK's layout.

    The output of a convolution is linear in its weight. The unfolded input ``U``
    holds the coefficients: for input channel ``c`` of group ``g`` and output channel
    ``o`` of the same group, ``out[n, o, *O] = bias[o] + sum_{c, *K} W[o, c, *K]
    U[n, c, *K, *O]`` (for ``ConvTransposeNd`` the weight is indexed ``W[c, o, *K]``).
    ``U`` is read off by evaluating the layer on one-hot weights, without bias. A
    one-hot weight that selects the input channel ``c`` of every group and feeds the
    first output channel of that group gives the unfolded rows of all groups at once.

    This matches ``backpack.utils.conv.unfold_input`` (convolution) and
    ``backpack.utils.conv_transpose.unfold_by_conv_transpose`` (transpose
    convolution) where those are correct, and extends them to padding modes other than
    zeros, string padding and ``output_padding``.

    Args:
        module: ``ConvNd`` or ``ConvTransposeNd`` layer.
        x: Input of shape ``[N, C_in, *I]``.

    Returns:
        Unfolded input of shape ``[N, C_in * prod(K), prod(O)]``; the second axis is
        ordered as ``(C_in, *K)`` in row-major order.
    """
    weight = _check_param(module, "weight")
    kernel_size = weight.shape[2:]
    groups = module.groups
    n, c_in = x.shape[:2]
    c_in_g = c_in // groups
    num_k = prod(kernel_size)
    transposed = isinstance(module, CONV_TRANSPOSE_TYPES)

    # one-hot weights, one per (input channel within a group, kernel position):
    # [c_in_g * num_k, c_in_g, *K]
    eye = torch.eye(c_in_g * num_k, dtype=x.dtype, device=x.device)
    eye = eye.reshape(-1, c_in_g, *kernel_size)
    basis = torch.zeros(len(eye), *weight.shape, dtype=x.dtype, device=x.device)
    c_out_g = weight.shape[1] if transposed else weight.shape[0] // groups
    first_out = torch.arange(groups, device=x.device) * c_out_g
    if transposed:  # W[g * c_in_g + c, 0, *K] = 1 for every group g
        basis[:, :, 0] = eye.repeat(1, groups, *[1] * len(kernel_size))
    else:  # W[g * c_out_g, c, *K] = 1 for every group g
        basis[:, first_out] = eye.unsqueeze(1)

    no_bias = {} if module.bias is None else {"bias": torch.zeros_like(module.bias)}
    # [c_in_g * num_k, N, C_out, *O] -> [c_in_g * num_k, N, G, prod(O)]
    out = vmap(lambda w: forward(module, x, weight=w, **no_bias))(basis)
    out = out[:, :, first_out].flatten(start_dim=3)
    # [(c, k), N, G, O] -> [N, (G, c, k), O]
    out = out.reshape(c_in_g, num_k, n, groups, -1).permute(2, 3, 0, 1, 4)
    return out.reshape(n, c_in * num_k, -1)


def kfac_input_factor(module: Module, x: Tensor, approx: str) -> Tensor:
    """Kronecker input factor of a (transpose) convolution from its unfolded input.

    Args:
        module: ``ConvNd`` or ``ConvTransposeNd`` layer.
        x: Input of shape ``[N, C_in, *I]``.
        approx: ``'expand'`` (sum over output positions) or ``'reduce'`` (mean over
            them first).

    Returns:
        The factor of shape ``[G, C_in // G * prod(K)] * 2``, divided by ``N``.
    """
    unfolded = unfolded_input(module, x).unflatten(1, (module.groups, -1))
    n = x.shape[0]
    if approx == "reduce":
        mean = unfolded.mean(-1)  # [N, G, B * K]
        return torch.einsum("ngi,ngj->gij", mean, mean) / n
    return torch.einsum("ngir,ngjr->gij", unfolded, unfolded) / n
