"""Ground truth for BackPACK's extensions on small networks, by brute force.

Every quantity is computed from its definition with autograd (``torch.func``) on a
``torch.nn.Sequential`` that was not extended, in the precision of the model. Nothing
here runs BackPACK's layer code. The exceptions are the square roots of the loss
Hessian, which are not unique: BackPACK's extensions keep the stock loss modules, so
:func:`sampled_loss_sqrt` and :func:`exact_loss_sqrt` call BackPACK's loss derivatives
to get the same factorization (and, from the same seed, the same Monte Carlo samples)
as an extension run. Every quantity that depends on them is also checked by a route
that does not (the GGN and ``J_nᵀ H_n J_n`` from ``torch.func.hessian``).

Notation: ``N`` batch size, ``C`` model outputs per sample, ``P`` the number of
entries of one parameter, ``V`` vectors (MC samples or classes), ``F`` the number of
features (entries) of one sample at some layer's output, ``R`` the number of output
positions of a layer (spatial output positions of a convolution, shared axes of a
Linear layer), ``G`` groups.

The loss is ``L(f) = Σ_n L_n(f_n)`` for CrossEntropyLoss and MSELoss (any reduction,
the scaling is part of ``L_n``). Per-sample quantities are those of ``L_n``:
:meth:`NetworkReference.sample_loss` evaluates ``L`` with only sample ``n`` depending
on the parameters.

Kronecker factors follow BackPACK's layout: weight factors ``[B, A]`` with ``B`` over
output channels (features), ``A`` over ``(C_in // G, *K)`` (in features), and
``kron(B, A)`` approximates the GGN w.r.t. ``weight`` flattened as ``[C_out, -1]``
(``weight.transpose(0, 1)`` for transpose convolutions). With ``G > 1`` groups, ``B``
is ``[G, C_out // G, C_out // G]`` and ``A`` is ``[G, D // G, D // G]``. With
``C_n`` the curvature w.r.t. the layer's output (channels ``c``, positions ``o``):

- ``B = Σ_n Σ_{o, o'} C_n[:, o, :, o']`` for both approximations (see
  ``OUTPUT_FACTOR_POSITIONS``); for ``G = 1`` this is the bias GGN,
- expand: ``A = 1/N Σ_n Σ_o u_{n,o} u_{n,o}ᵀ`` with ``u`` the unfolded input,
- reduce: ``A = 1/N Σ_n ū_n ū_nᵀ`` with ``ū_n = 1/R Σ_o u_{n,o}``,
- the bias gets ``[B]``.
"""

from collections.abc import Callable
from functools import cached_property

import torch
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from torch import Tensor
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.nn import CrossEntropyLoss, Linear, Module, MSELoss, Sequential

from test_problems.references import per_sample_jacobian, unfolded_input

KFAC_APPROXIMATIONS = ("expand", "reduce")
"""Kronecker factor approximations for weight sharing (Eschenhagen et al., 2023)."""

OUTPUT_FACTOR_POSITIONS = "all"
"""How ``B`` sums the output curvature over positions, for both approximations.

``'all'`` is ``Σ_{o, o'}`` (stock BackPACK's factor for convolutions and the exact
bias GGN, the convention of :mod:`backpack_tn.extensions.hbp`); ``'diagonal'``
(``Σ_o`` of the position-diagonal blocks) is Eschenhagen et al.'s KFAC-expand ``B``.
"""

CURVATURE_MODES = ("ggn", "hessian", "clip", "abs", "kfra")
"""Curvature backpropagated by :meth:`NetworkReference.output_curvatures`."""

PCH_MODIFICATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "clip": lambda residual: residual.clamp(min=0),
    "abs": torch.abs,
}
"""Concavity-eliminating modifications of the positive-curvature Hessian."""

LOSS_DERIVATIVES = {
    CrossEntropyLoss: CrossEntropyLossDerivatives,
    MSELoss: MSELossDerivatives,
}
"""Stock BackPACK loss derivatives, used only to draw the MC loss Hessian sqrt."""


def _loss_module_like(loss_func: Module, output: Tensor, target: Tensor) -> Module:
    """A fresh loss module holding input, target and loss as BackPACK stores them.

    Args:
        loss_func: ``CrossEntropyLoss`` or ``MSELoss``.
        output: Model output of shape ``[N, C]``.
        target: Target of shape ``[N]`` (class indices) or ``[N, C]``.

    Returns:
        A loss module of the same type and reduction with ``input0``, ``input1`` and
        ``output`` set.

    Raises:
        NotImplementedError: If the loss type is not supported.
    """
    loss_type = type(loss_func)
    if loss_type not in LOSS_DERIVATIVES:
        raise NotImplementedError(
            f"Unsupported loss {loss_type.__name__}. Supported: "
            f"{sorted(t.__name__ for t in LOSS_DERIVATIVES)}."
        )
    module = loss_type(reduction=loss_func.reduction)
    module.input0 = output.detach()
    module.input1 = target
    module.output = loss_func(output.detach(), target)
    return module


def sampled_loss_sqrt(
    loss_func: Module, output: Tensor, target: Tensor, mc_samples: int
) -> Tensor:
    """Draw BackPACK's MC square root of the loss Hessian w.r.t. the model output.

    Uses (and advances) the global random state exactly as BackPACK's loss module
    extensions do at the start of a backward pass. Seeding the same before this call
    and before ``loss.backward()`` gives the same samples.

    Args:
        loss_func: ``CrossEntropyLoss`` or ``MSELoss``.
        output: Model output of shape ``[N, C]``.
        target: Target of shape ``[N]`` or ``[N, C]``.
        mc_samples: Number of MC samples ``V``.

    Returns:
        ``S`` of shape ``[V, N, C]`` with ``E[Σ_v S[v, n] S[v, n]^T] = H_n``.
    """
    module = _loss_module_like(loss_func, output, target)
    derivatives = LOSS_DERIVATIVES[type(loss_func)]()
    g_out = (torch.ones_like(module.output),)
    return derivatives.sqrt_hessian_sampled(module, None, g_out, mc_samples=mc_samples)


def exact_loss_sqrt(loss_func: Module, output: Tensor, target: Tensor) -> Tensor:
    """BackPACK's exact symmetric factorization of the loss Hessian w.r.t. the output.

    The factorization is not unique; this one is the convention of
    ``SqrtGGNExact``, used to compare ``sqrt_ggn_exact`` entry by entry.

    Args:
        loss_func: ``CrossEntropyLoss`` or ``MSELoss``.
        output: Model output of shape ``[N, C]``.
        target: Target of shape ``[N]`` or ``[N, C]``.

    Returns:
        ``S`` of shape ``[C, N, C]`` with ``Σ_v S[v, n] S[v, n]^T = H_n``.
    """
    module = _loss_module_like(loss_func, output, target)
    derivatives = LOSS_DERIVATIVES[type(loss_func)]()
    g_out = (torch.ones_like(module.output),)
    return derivatives.sqrt_hessian(module, None, g_out)


def _diagonal(blocks: Tensor, shape: torch.Size) -> Tensor:
    """Diagonal of (a batch of) square blocks, shaped like the parameter.

    Args:
        blocks: ``[P, P]`` or ``[N, P, P]``.
        shape: Parameter shape, ``prod(shape) = P``.

    Returns:
        ``[*shape]`` or ``[N, *shape]``.
    """
    diag = blocks.diagonal(dim1=-2, dim2=-1)
    return diag.reshape(*blocks.shape[:-2], *shape)


def _group_blocks(matrix: Tensor, groups: int) -> Tensor:
    """Diagonal blocks of a matrix split into ``groups`` equal groups.

    Args:
        matrix: ``[D, D]`` with ``D`` divisible by ``groups``.
        groups: Number of groups ``G``.

    Returns:
        ``[D, D]`` if ``G = 1``, else ``[G, D // G, D // G]``.
    """
    if groups == 1:
        return matrix
    d = matrix.shape[0] // groups
    return (
        matrix.reshape(groups, d, groups, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    )


def channels_by_positions(module: Module, curvature: Tensor) -> Tensor:
    """Reshape a curvature w.r.t. a layer's output to channel and position axes.

    Args:
        module: ``Linear``, ``ConvNd`` or ``ConvTransposeNd`` layer with output
            ``[N, *, out]`` (Linear) or ``[N, C_out, *O]`` (convolutions).
        curvature: ``[..., F, F]`` with ``F`` the entries of one sample's output.

    Returns:
        ``[..., C_out, R, C_out, R]``, channels (out features) before positions.
    """
    lead, f = curvature.shape[:-2], curvature.shape[-1]
    if isinstance(module, Linear):
        out = module.out_features
        result = curvature.reshape(*lead, f // out, out, f // out, out)
        return result.transpose(-4, -3).transpose(-2, -1)
    c_out = module.out_channels
    return curvature.reshape(*lead, c_out, f // c_out, c_out, f // c_out)


def layer_unfolded_input(module: Module, x: Tensor) -> Tensor:
    """Columns ``u[n, :, o]`` that the weight multiplies at output position ``o``.

    Args:
        module: ``Linear``, ``ConvNd`` or ``ConvTransposeNd`` layer.
        x: Layer input of shape ``[N, *, in]`` (Linear) or ``[N, C_in, *I]``.

    Returns:
        ``[N, D, R]`` with ``D = in_features`` or ``C_in * prod(K)`` (ordered as
        ``(C_in, *K)``, groups first) and ``R`` output positions.
    """
    if isinstance(module, Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    return unfolded_input(module, x)


def kronecker_output_factor(
    module: Module, curvature: Tensor, positions: str = OUTPUT_FACTOR_POSITIONS
) -> Tensor:
    """Output-side Kronecker factor ``B`` from the curvature w.r.t. a layer's output.

    Args:
        module: Layer.
        curvature: Per-sample curvature ``[N, F, F]`` or batch-averaged ``[F, F]``
            w.r.t. the layer's output.
        positions: ``'all'``: ``Σ_n Σ_{o, o'} C_n[:, o, :, o']``; ``'diagonal'``:
            ``Σ_n Σ_o C_n[:, o, :, o]``.

    Returns:
        ``[C_out, C_out]``, or ``[G, C_out // G, C_out // G]`` for ``G > 1`` groups.

    Raises:
        ValueError: If ``positions`` is unknown.
    """
    blocks = channels_by_positions(module, curvature)
    if curvature.dim() == 2:
        blocks = blocks.unsqueeze(0)
    if positions == "all":
        full = torch.einsum("ncodp->cd", blocks)
    elif positions == "diagonal":
        full = torch.einsum("ncodo->cd", blocks)
    else:
        raise ValueError(
            f"Unknown positions {positions!r}. Supported: ('all', 'diagonal')."
        )
    return _group_blocks(full, getattr(module, "groups", 1))


def kronecker_input_factor(module: Module, x: Tensor, approx: str) -> Tensor:
    """Input-side Kronecker factor ``A`` of a weight from the layer input.

    Args:
        module: Layer.
        x: Layer input of shape ``[N, *in]``.
        approx: ``'expand'``: ``1/N Σ_n Σ_o u_{n,o} u_{n,o}^T``; ``'reduce'``:
            ``1/N Σ_n ū_n ū_n^T`` with ``ū_n = 1/R Σ_o u_{n,o}``.

    Returns:
        ``[D, D]``, or ``[G, D // G, D // G]`` for ``G > 1`` groups.

    Raises:
        ValueError: If ``approx`` is unknown.
    """
    u = layer_unfolded_input(module, x)
    if approx == "expand":
        full = torch.einsum("nio,njo->ij", u, u) / u.shape[0]
    elif approx == "reduce":
        mean = u.mean(-1)
        full = torch.einsum("ni,nj->ij", mean, mean) / u.shape[0]
    else:
        raise ValueError(
            f"Unknown approximation {approx!r}. Supported: {KFAC_APPROXIMATIONS}."
        )
    return _group_blocks(full, getattr(module, "groups", 1))


def curvature_matrix_product(block: Tensor, mat: Tensor) -> Tensor:
    """Multiply a parameter's curvature block onto ``V`` vectors.

    Args:
        block: ``[P, P]``.
        mat: ``[V, *param.shape]``.

    Returns:
        ``[V, *param.shape]``.
    """
    return (mat.flatten(start_dim=1) @ block.T).reshape(mat.shape)


class NetworkReference:
    """Brute-force extension quantities of a sequential model with a loss.

    Results are dicts keyed by parameter name (as in ``model.named_parameters()``)
    and computed on first access.

    Args:
        model: ``torch.nn.Sequential`` whose children are treated one after another.
            It must not be extended by BackPACK (``torch.func`` rejects its hooks).
        loss_func: ``CrossEntropyLoss`` or ``MSELoss`` with reduction sum or mean.
        x: Input of shape ``[N, *in]``.
        y: Target of shape ``[N]`` or ``[N, C]``.

    Attributes:
        output: Model output of shape ``[N, C]``, computed on construction.
    """

    def __init__(self, model: Sequential, loss_func: Module, x: Tensor, y: Tensor):
        """Store the problem.

        Args:
            model: Sequential model, not extended.
            loss_func: Loss module.
            x: Input of shape ``[N, *in]``.
            y: Target of shape ``[N]`` or ``[N, C]``.
        """
        self.model, self.loss_func, self.x, self.y = model, loss_func, x, y
        self.batch_size = x.shape[0]
        self.params = {name: p.detach() for name, p in model.named_parameters()}
        # (child index, child, parameter name in child) for every parameter
        self.param_layers = {
            f"{index}.{param}": (index, child, param)
            for index, child in enumerate(model)
            for param, _ in child.named_parameters()
        }
        # computed here, outside any transform: a first access inside one (such
        # as ``sample_loss`` under ``hessian``) would keep a tensor of that
        # transform's level, which later transforms reject
        with torch.no_grad():
            self.output = functional_call(self.model, self.params, (self.x,))

    def sample_loss(self, params: dict[str, Tensor], n: int) -> Tensor:
        """Loss with only sample ``n`` evaluated with ``params``.

        Its derivatives w.r.t. ``params`` are those of the per-sample term ``L_n``.

        Args:
            params: Parameters, keyed by name, each of the parameter's shape.
            n: Sample index.

        Returns:
            Scalar loss.
        """
        f_n = functional_call(self.model, params, (self.x[n : n + 1],))
        others = self.output
        f = torch.cat([others[:n], f_n, others[n + 1 :]])
        return self.loss_func(f, self.y)

    @cached_property
    def loss_hessians(self) -> Tensor:
        """Per-sample Hessians of the loss w.r.t. the model output, ``[N, C, C]``."""
        full = hessian(lambda f: self.loss_func(f, self.y))(self.output)
        idx = torch.arange(self.batch_size, device=self.x.device)
        return full[idx, :, idx, :]

    @cached_property
    def output_jacobians(self) -> dict[str, Tensor]:
        """Per-sample Jacobians of the model output w.r.t. each parameter.

        Returns a dict of tensors of shape ``[N, C, P]``.
        """

        def output_n(params: dict[str, Tensor], x_n: Tensor) -> Tensor:
            return functional_call(self.model, params, (x_n.unsqueeze(0),)).squeeze(0)

        jac = vmap(jacrev(output_n), in_dims=(None, 0))(self.params, self.x)
        return {name: j.flatten(start_dim=2) for name, j in jac.items()}

    # ------------------------------------------------------------- first order
    @cached_property
    def grad_batch(self) -> dict[str, Tensor]:
        """Per-sample gradients ``∇ L_n``, each ``[N, *param.shape]``."""
        grads = [grad(self.sample_loss)(self.params, n) for n in range(self.batch_size)]
        return {name: torch.stack([g[name] for g in grads]) for name in self.params}

    @cached_property
    def grad(self) -> dict[str, Tensor]:
        """Gradient of the loss, each ``[*param.shape]``."""

        def loss(params: dict[str, Tensor]) -> Tensor:
            output = functional_call(self.model, params, (self.x,))
            return self.loss_func(output, self.y)

        return grad(loss)(self.params)

    @cached_property
    def batch_l2(self) -> dict[str, Tensor]:
        """Squared norms of the per-sample gradients, each ``[N]``."""
        return {
            name: (g**2).flatten(start_dim=1).sum(1)
            for name, g in self.grad_batch.items()
        }

    @cached_property
    def sum_grad_squared(self) -> dict[str, Tensor]:
        """``Σ_n (∇ L_n)²``, each ``[*param.shape]``."""
        return {name: (g**2).sum(0) for name, g in self.grad_batch.items()}

    @cached_property
    def variance(self) -> dict[str, Tensor]:
        """``1/N Σ_n (∇ L_n)² - (1/N Σ_n ∇ L_n)²``, each ``[*param.shape]``.

        This is BackPACK's definition: the variance of the per-sample gradients of the
        loss as it is scaled (``1/N`` included for mean reduction).
        """
        n = self.batch_size
        return {
            name: (g**2).sum(0) / n - (g.sum(0) / n) ** 2
            for name, g in self.grad_batch.items()
        }

    # ------------------------------------------------------------ second order
    @cached_property
    def ggn_blocks_batch(self) -> dict[str, Tensor]:
        """Per-sample GGN blocks ``J_nᵀ H_n J_n``, each ``[N, P, P]``."""
        return {
            name: torch.einsum("nap,nab,nbq->npq", jac, self.loss_hessians, jac)
            for name, jac in self.output_jacobians.items()
        }

    @cached_property
    def ggn_blocks(self) -> dict[str, Tensor]:
        """GGN blocks ``Σ_n J_nᵀ H_n J_n``, each ``[P, P]``."""
        return {name: block.sum(0) for name, block in self.ggn_blocks_batch.items()}

    @cached_property
    def hessian_blocks_batch(self) -> dict[str, Tensor]:
        """Per-sample Hessian blocks of ``L_n``, each ``[N, P, P]``."""
        blocks = {}
        for name, value in self.params.items():
            per_sample = []
            for n in range(self.batch_size):

                def loss_n(p: Tensor, n: int = n, name: str = name) -> Tensor:
                    return self.sample_loss({**self.params, name: p}, n)

                per_sample.append(hessian(loss_n)(value).reshape(value.numel(), -1))
            blocks[name] = torch.stack(per_sample)
        return blocks

    @cached_property
    def hessian_blocks(self) -> dict[str, Tensor]:
        """Hessian blocks of the loss, each ``[P, P]``."""
        return {name: block.sum(0) for name, block in self.hessian_blocks_batch.items()}

    @cached_property
    def diag_ggn_exact(self) -> dict[str, Tensor]:
        """GGN diagonal, each ``[*param.shape]``."""
        return {
            name: _diagonal(block, self.params[name].shape)
            for name, block in self.ggn_blocks.items()
        }

    @cached_property
    def diag_ggn_exact_batch(self) -> dict[str, Tensor]:
        """Per-sample GGN diagonals, each ``[N, *param.shape]``."""
        return {
            name: _diagonal(block, self.params[name].shape)
            for name, block in self.ggn_blocks_batch.items()
        }

    @cached_property
    def diag_h(self) -> dict[str, Tensor]:
        """Hessian diagonal, each ``[*param.shape]``."""
        return {
            name: _diagonal(block, self.params[name].shape)
            for name, block in self.hessian_blocks.items()
        }

    @cached_property
    def diag_h_batch(self) -> dict[str, Tensor]:
        """Per-sample Hessian diagonals, each ``[N, *param.shape]``."""
        return {
            name: _diagonal(block, self.params[name].shape)
            for name, block in self.hessian_blocks_batch.items()
        }

    def sqrt_ggn(self, loss_sqrt: Tensor) -> dict[str, Tensor]:
        """Backpropagate a loss Hessian square root to the parameters.

        Args:
            loss_sqrt: ``S`` of shape ``[V, N, C]``.

        Returns:
            ``J_nᵀ S[v, n]``, each of shape ``[V, N, *param.shape]``.
        """
        return {
            name: torch.einsum("nap,vna->vnp", jac, loss_sqrt).reshape(
                *loss_sqrt.shape[:2], *self.params[name].shape
            )
            for name, jac in self.output_jacobians.items()
        }

    def diag_ggn_from_sqrt(
        self, loss_sqrt: Tensor, sum_batch: bool = True
    ) -> dict[str, Tensor]:
        """Diagonal of the GGN with the loss Hessian replaced by ``S Sᵀ``.

        Args:
            loss_sqrt: ``S`` of shape ``[V, N, C]``.
            sum_batch: Sum over samples.

        Returns:
            Each ``[*param.shape]`` with ``sum_batch``, else ``[N, *param.shape]``.
        """
        sqrt = self.sqrt_ggn(loss_sqrt)
        return {
            name: (s**2).sum((0, 1) if sum_batch else 0) for name, s in sqrt.items()
        }

    # ---------------------------------------------- curvature backpropagation
    @cached_property
    def layer_inputs(self) -> list[Tensor]:
        """Input of every child of the model, ``[N, *in_l]`` each."""
        inputs, h = [], self.x
        with torch.no_grad():
            for child in self.model:
                inputs.append(h)
                h = child(h)
        return inputs

    @cached_property
    def layer_output_grads(self) -> list[Tensor]:
        """Gradient of the loss w.r.t. the output of every child, ``[N, *out_l]``."""
        h = self.x.clone().requires_grad_(True)
        outputs = []
        for index in range(len(self.model)):
            h = self._child_forward(index)(h)
            outputs.append(h)
        loss = self.loss_func(h, self.y)
        return list(torch.autograd.grad(loss, outputs))

    def _child_forward(self, index: int) -> Callable[..., Tensor]:
        """The forward pass of one child, with its parameters as keywords.

        Args:
            index: Child index.

        Returns:
            ``f(x, **params)`` mapping ``[N, *in]`` to ``[N, *out]``.
        """
        child = self.model[index]
        own = {
            name.removeprefix(f"{index}."): p
            for name, p in self.params.items()
            if name.startswith(f"{index}.")
        }
        return lambda x, **params: functional_call(child, {**own, **params}, (x,))

    def _residual(self, index: int, mode: str) -> Tensor:
        """Second-order effect of a child on the curvature w.r.t. its input.

        ``Σ_k g_{n,k} ∇²_x out_k(x_n)`` with ``g`` the gradient w.r.t. the child's
        output; for ``'clip'``/``'abs'`` its (necessarily diagonal) entries are
        modified as in the positive-curvature Hessian.

        Args:
            index: Child index.
            mode: ``'hessian'``, ``'clip'`` or ``'abs'``.

        Returns:
            ``[N, F_in, F_in]``.

        Raises:
            ValueError: If ``mode`` modifies a residual that is not diagonal.
        """
        forward = self._child_forward(index)
        x, g_out = self.layer_inputs[index], self.layer_output_grads[index]

        def weighted_output(x_n: Tensor, g_n: Tensor) -> Tensor:
            return (forward(x_n.unsqueeze(0)).squeeze(0) * g_n).sum()

        residual = vmap(hessian(weighted_output))(x, g_out)
        residual = residual.reshape(x.shape[0], x[0].numel(), x[0].numel())
        if mode in PCH_MODIFICATIONS:
            diag = residual.diagonal(dim1=1, dim2=2)
            if not torch.equal(residual, torch.diag_embed(diag)):
                raise ValueError(
                    f"Mode {mode!r} needs element-wise layers. Child {index} "
                    f"({type(self.model[index]).__name__}) has a non-diagonal "
                    "residual."
                )
            residual = torch.diag_embed(PCH_MODIFICATIONS[mode](diag))
        return residual

    def output_curvatures(self, loss_curvature: Tensor, mode: str) -> list[Tensor]:
        """Backpropagate a curvature from the model output through every child.

        Starts from ``loss_curvature`` w.r.t. the model output and applies
        ``C_in,n = J_nᵀ C_out,n J_n + residual`` with the per-sample input Jacobian
        ``J_n`` of each child, where the residual is

        - ``'ggn'``: zero (generalized Gauss-Newton),
        - ``'hessian'``: the exact second-order term (Hessian) of children without
          parameters (those with parameters are affine in their input),
        - ``'clip'``/``'abs'``: that term, which must be diagonal (element-wise
          layers), with its entries clipped at zero or made absolute
          (positive-curvature Hessian, Chen et al. 2018),
        - ``'kfra'``: zero, and the result is averaged over samples after every
          step, ``C_in = 1/N Σ_n J_nᵀ C_out J_n``, starting from ``Σ_n H_n``
          (Botev et al. 2017).

        Args:
            loss_curvature: ``[N, C, C]``.
            mode: One of ``CURVATURE_MODES``.

        Returns:
            For every child, the curvature w.r.t. its output: ``[N, F_l, F_l]``
            (``[F_l, F_l]`` for ``'kfra'``).

        Raises:
            ValueError: If ``mode`` is unknown.
        """
        if mode not in CURVATURE_MODES:
            raise ValueError(f"Unknown mode {mode!r}. Supported: {CURVATURE_MODES}.")
        curvature = loss_curvature.sum(0) if mode == "kfra" else loss_curvature
        result = [None] * len(self.model)
        for index in reversed(range(len(self.model))):
            result[index] = curvature
            if index == 0:
                break
            jac = per_sample_jacobian(self.model[index], self.layer_inputs[index])
            if mode == "kfra":
                curvature = torch.einsum("nai,ab,nbj->ij", jac, curvature, jac)
                curvature = curvature / self.batch_size
            else:
                curvature = torch.einsum("nai,nab,nbj->nij", jac, curvature, jac)
                if mode != "ggn" and not list(self.model[index].parameters()):
                    curvature = curvature + self._residual(index, mode)
        return result

    def _param_jacobian(self, name: str) -> Tensor:
        """Per-sample Jacobian of a child's output w.r.t. one of its parameters.

        Args:
            name: Parameter name, e.g. ``'0.weight'``.

        Returns:
            ``[N, F_out, P]``.
        """
        index, _, param = self.param_layers[name]
        forward = self._child_forward(index)

        def out_n(p: Tensor, x_n: Tensor) -> Tensor:
            return forward(x_n.unsqueeze(0), **{param: p}).flatten()

        jac = vmap(jacrev(out_n), in_dims=(None, 0))(
            self.params[name], self.layer_inputs[index]
        )
        return jac.flatten(start_dim=2)

    def curvature_blocks(self, mode: str) -> dict[str, Tensor]:
        """Parameter blocks of a backpropagated curvature.

        Args:
            mode: ``'ggn'`` (GGN), ``'hessian'`` (Hessian), ``'clip'`` or ``'abs'``
                (positive-curvature Hessian); see :meth:`output_curvatures`.

        Returns:
            ``Σ_n J_θ,nᵀ C_n J_θ,n`` with ``C`` the curvature w.r.t. the layer's
            output, each ``[P, P]``.
        """
        curvatures = self.output_curvatures(self.loss_hessians, mode)
        blocks = {}
        for name, (index, _, _) in self.param_layers.items():
            jac = self._param_jacobian(name)
            blocks[name] = torch.einsum("nap,nab,nbq->pq", jac, curvatures[index], jac)
        return blocks

    def kronecker_factors(
        self, kind: str, approx: str = "expand", loss_sqrt: Tensor | None = None
    ) -> dict[str, list[Tensor]]:
        """Kronecker factors of KFAC, KFLR or KFRA from their definitions.

        Args:
            kind: ``'KFAC'`` (needs ``loss_sqrt``), ``'KFLR'`` or ``'KFRA'``.
            approx: ``'expand'`` or ``'reduce'``.
            loss_sqrt: MC square root ``[V, N, C]`` of the loss Hessian, for KFAC.

        Returns:
            ``[B, A]`` for weights and ``[B]`` for biases; see the module docstring
            for shapes.

        Raises:
            ValueError: If ``kind`` is unknown or KFAC lacks ``loss_sqrt``.
        """
        if kind == "KFLR":
            curvatures = self.output_curvatures(self.loss_hessians, "ggn")
        elif kind == "KFAC":
            if loss_sqrt is None:
                raise ValueError("KFAC needs the sampled loss_sqrt, got None.")
            sampled = torch.einsum("vni,vnj->nij", loss_sqrt, loss_sqrt)
            curvatures = self.output_curvatures(sampled, "ggn")
        elif kind == "KFRA":
            curvatures = self.output_curvatures(self.loss_hessians, "kfra")
        else:
            raise ValueError(
                f"Unknown kind {kind!r}. Supported: ('KFAC', 'KFLR', 'KFRA')."
            )
        factors = {}
        for name, (index, child, param) in self.param_layers.items():
            factors[name] = [kronecker_output_factor(child, curvatures[index])]
            if param == "weight":
                factors[name].append(
                    kronecker_input_factor(child, self.layer_inputs[index], approx)
                )
        return factors

    # ---------------------------------------------------------------- helpers
    def kron_dense(self, name: str, factors: list[Tensor]) -> Tensor:
        """Dense matrix of Kronecker factors in the parameter's own layout.

        Args:
            name: Parameter name.
            factors: ``[B, A]`` or ``[B]``, possibly grouped.

        Returns:
            ``[P, P]`` in the row-major order of ``weight.reshape(C_out, -1)``
            (``weight.transpose(0, 1)`` for transpose convolutions).
        """
        if len(factors) == 1:
            (b,) = factors
            return b if b.dim() == 2 else torch.block_diag(*b)
        b, a = factors
        if b.dim() == 2:
            return torch.kron(b, a)
        return torch.block_diag(
            *[torch.kron(b_g, a_g) for b_g, a_g in zip(b, a, strict=True)]
        )
