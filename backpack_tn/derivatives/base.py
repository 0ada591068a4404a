"""Tensor-network products shared by all TN derivative classes.

:class:`TNDerivativesMixin` overrides every product BackPACK calls for a layer
(``_jac_mat_prod``, ``_jac_t_mat_prod``, ``_weight_jac_mat_prod``,
``_weight_jac_t_mat_prod``, ``_bias_jac_mat_prod``, ``_bias_jac_t_mat_prod``,
``ea_jac_t_mat_jac_prod``, ``get_unfolded_input``) and adds the quantities that
BackPACK's module extensions compute from unfolded inputs (GGN diagonals,
per-sample gradient norms, Kronecker input factors). Each product is looked up in
:data:`~backpack_tn.derivatives.implementations.IMPLEMENTATIONS` and evaluated as
the derivative's ``strategy`` says (see :mod:`backpack_tn.derivatives.choice`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from backpack.utils.subsampling import subsample
from torch import Tensor
from torch.nn import Module

from backpack_tn._checks import check_hooked, check_like_weight, check_mat_shape
from backpack_tn.derivatives import plans
from backpack_tn.derivatives.choice import autotune_enabled, check_strategy, choose
from backpack_tn.derivatives.implementations import IMPLEMENTATIONS
from backpack_tn.expressions.layer_spec import LayerSpec, spec_of

#: Arguments of each product, in the order the public methods pass them to
#: ``_run`` (``explain`` takes the same).
PRODUCT_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "forward": ("x",),
    "jac_mat_prod": ("mat",),
    "jac_t_mat_prod": ("mat",),
    "weight_jac_mat_prod": ("x", "mat"),
    "weight_jac_t_mat_prod": ("x", "mat", "sum_batch"),
    "weight_diag_ggn": ("x", "mat", "sum_batch"),
    "weight_batch_l2": ("x", "mat"),
    "unfold_input": ("x",),
    "kfac_expand": ("x",),
    "kfac_reduce": ("x",),
}


def _flags(tensors: dict) -> tuple:
    """The non-tensor arguments of a product (part of its plan's key).

    Returns:
        Their values, in argument order.
    """
    return tuple(v for v in tensors.values() if not isinstance(v, Tensor))


#: Parameter name to the transposed Jacobian product that ``param_mjp`` calls.
_PARAM_MJPS = {"weight": "_weight_jac_t_mat_prod", "bias": "_bias_jac_t_mat_prod"}


def _matrix(
    module: Module,
    product: str,
    mat: Tensor,
    feature_shape: tuple[int, ...],
    batch_size: int | None,
) -> tuple[Tensor, bool]:
    """Check ``mat`` and give one vector a leading vector dimension.

    Args:
        module: The layer.
        product: Name of the product, for error messages.
        mat: ``[V, N, *feature_shape]`` or one vector ``[N, *feature_shape]``
            (without ``N`` where ``batch_size`` is ``None``).
        feature_shape: Expected trailing shape.
        batch_size: Expected ``N``, or ``None``.

    Returns:
        ``mat`` of shape ``[V, ...]``, and whether it was one vector.
    """
    one = check_mat_shape(module, product, mat, feature_shape, batch_size)
    return (mat.unsqueeze(0) if one else mat), one


def _check_has_bias(module: Module, product: str):
    """Raise if a bias product is asked of a layer without bias.

    Args:
        module: The layer.
        product: Name of the product, for the message.

    Raises:
        ValueError: If ``module.bias`` is ``None``.
    """
    if module.bias is None:
        raise ValueError(
            f"{type(module).__name__}.{product}: the layer has no bias"
            " (built with bias=False); only the weight has products."
        )


def _unmatrix(result: Tensor, one: bool) -> Tensor:
    """Drop the vector dimension that :func:`_matrix` added.

    Args:
        result: Product of shape ``[V, ...]``.
        one: Whether the product got one vector (then ``V = 1``).

    Returns:
        ``result`` of shape ``[...]`` for one vector, else unchanged.
    """
    return result.squeeze(0) if one else result


#: Flavours of the KFAC input factor.
KFAC_APPROXIMATIONS = ("expand", "reduce")


class TNDerivativesMixin:
    """Tensor-network Jacobian products; mixed into BackPACK's derivative classes.

    Args:
        strategy: How to evaluate the products, one of
            :data:`~backpack_tn.derivatives.choice.STRATEGIES`. ``'auto'``
            (default) picks per layer and product by a cost model, ``'autotune'``
            by timing the candidates once per configuration.
    """

    def __init__(self, strategy: str = "auto"):
        """Store the strategy (BackPACK's base class takes no arguments here).

        Args:
            strategy: Evaluation strategy.
        """
        check_strategy(strategy, type(self).__name__)
        super().__init__()
        self.strategy = strategy

    # dispatch

    def _run(self, op: str, module: Module, spec: LayerSpec, **tensors) -> Tensor:
        inputs = [v for v in tensors.values() if isinstance(v, Tensor)]
        inputs += [p for p in module._parameters.values() if p is not None]
        return plans.run(
            (op, self.strategy, spec, *tensors, *_flags(tensors)),
            lambda: self._prepare(op, module, spec, tensors),
            inputs,
        )

    def _prepare(
        self, op: str, module: Module, spec: LayerSpec, tensors: dict
    ) -> Callable[[], Tensor]:
        """Check the arguments and choose the evaluation of ``op``.

        Returns:
            The chosen evaluation, bound to its arguments.
        """
        for name, value in tensors.items():
            if isinstance(value, Tensor):
                check_like_weight(module, name, value)
        key, _ = choose(op, module, spec, self.strategy, tensors)
        return partial(IMPLEMENTATIONS[op][key], module, spec, key, **tensors)

    def explain(self, op: str, module: Module, **tensors) -> tuple[str, str]:
        """Which evaluation ``op`` gets for this layer, and why.

        Args:
            op: A product name, one of ``PRODUCT_ARGUMENTS`` (the keys of
                ``IMPLEMENTATIONS``), e.g. ``'weight_jac_t_mat_prod'``.
            module: A layer with ``input0`` and ``output`` set.
            **tensors: The product's arguments (``PRODUCT_ARGUMENTS[op]``). ``x``
                defaults to ``module.input0`` and ``sum_batch`` to ``True``;
                ``mat`` (``[V, N, *output_shape[1:]]``, or ``[V, N,
                *input_shape[1:]]`` for ``jac_mat_prod`` and
                ``weight_jac_mat_prod``'s ``[V, *weight_shape]``) is needed where
                the product takes one.

        Returns:
            The evaluation's name and a one-sentence reason.

        Raises:
            ValueError: If ``op`` is unknown, or an argument is missing or not
                one of the product's.
        """
        if op not in PRODUCT_ARGUMENTS:
            raise ValueError(
                f"{type(self).__name__}.explain got unknown product {op!r}."
                f" Supported: {sorted(PRODUCT_ARGUMENTS)}."
            )
        spec = self._spec(module)
        names = PRODUCT_ARGUMENTS[op]
        unknown = sorted(set(tensors) - set(names))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.explain({op!r}) got arguments {unknown},"
                f" which {op!r} does not take. It takes: {list(names)}."
            )
        defaults = {"x": module.input0, "sum_batch": True}
        missing = [n for n in names if n not in tensors and n not in defaults]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.explain({op!r}) needs {missing} for"
                f" {type(module).__name__}: the vectors the product would"
                " multiply, as BackPACK passes them (leading vector dimension V)."
            )
        arguments = {n: tensors[n] if n in tensors else defaults[n] for n in names}
        return choose(op, module, spec, self.strategy, arguments)

    @staticmethod
    def _spec(module: Module) -> LayerSpec:
        check_hooked(module)
        return spec_of(module)

    # public products: validate, accept one vector, dispatch
    #
    # These replace BackPACK's ``shape_check`` wrappers, which cost several
    # microseconds per call: the input checks below are the same (with clearer
    # messages), and the networks fix the output shapes.

    def jac_mat_prod(self, module, g_inp, g_out, mat):  # noqa: D102
        check_hooked(module)
        shape = module.input0.shape
        mat, one = _matrix(module, "jac_mat_prod", mat, shape[1:], shape[0])
        return _unmatrix(self._jac_mat_prod(module, g_inp, g_out, mat), one)

    def jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):  # noqa: D102
        check_hooked(module)
        shape = module.output.shape
        n = shape[0] if subsampling is None else len(subsampling)
        mat, one = _matrix(module, "jac_t_mat_prod", mat, shape[1:], n)
        result = self._jac_t_mat_prod(
            module, g_inp, g_out, mat, subsampling=subsampling
        )
        return _unmatrix(result, one)

    def param_mjp(  # noqa: D102
        self, param_str, module, g_inp, g_out, mat, sum_batch=True, subsampling=None
    ):
        mjp = _PARAM_MJPS.get(param_str)
        if mjp is None:
            raise ValueError(
                f"{type(module).__name__}.param_mjp: unknown parameter {param_str!r}."
                f" Supported: {tuple(_PARAM_MJPS)}."
            )
        check_hooked(module)
        if param_str == "bias":
            _check_has_bias(module, "param_mjp")
        shape = module.output.shape
        n = shape[0] if subsampling is None else len(subsampling)
        mat, one = _matrix(module, "param_mjp", mat, shape[1:], n)
        result = getattr(self, mjp)(
            module, g_inp, g_out, mat, sum_batch=sum_batch, subsampling=subsampling
        )
        return _unmatrix(result, one)

    def weight_jac_mat_prod(self, module, g_inp, g_out, mat):  # noqa: D102
        check_hooked(module)
        shape = tuple(module.weight.shape)
        mat, one = _matrix(module, "weight_jac_mat_prod", mat, shape, None)
        return _unmatrix(self._weight_jac_mat_prod(module, g_inp, g_out, mat), one)

    def bias_jac_mat_prod(self, module, g_inp, g_out, mat):  # noqa: D102
        check_hooked(module)
        _check_has_bias(module, "bias_jac_mat_prod")
        shape = tuple(module.bias.shape)
        mat, one = _matrix(module, "bias_jac_mat_prod", mat, shape, None)
        return _unmatrix(self._bias_jac_mat_prod(module, g_inp, g_out, mat), one)

    # products BackPACK calls

    def _jac_mat_prod(
        self, module: Module, g_inp: tuple[Tensor], g_out: tuple[Tensor], mat: Tensor
    ) -> Tensor:
        """Apply the input Jacobian.

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Input perturbations of shape ``[V, N, *input_shape[1:]]``.

        Returns:
            Result of shape ``[V, N, *output_shape[1:]]``.
        """
        return self._run("jac_mat_prod", module, self._spec(module), mat=mat)

    def _jac_t_mat_prod(
        self,
        module: Module,
        g_inp: tuple[Tensor],
        g_out: tuple[Tensor],
        mat: Tensor,
        subsampling: list[int] = None,
    ) -> Tensor:
        """Apply the transposed input Jacobian.

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Output vectors of shape ``[V, N, *output_shape[1:]]``; ``N`` is
                ``len(subsampling)`` when sub-sampling.
            subsampling: Indices of the active samples.

        Returns:
            Result of shape ``[V, N, *input_shape[1:]]``.
        """
        return self._run("jac_t_mat_prod", module, self._spec(module), mat=mat)

    def _weight_jac_mat_prod(
        self, module: Module, g_inp: tuple[Tensor], g_out: tuple[Tensor], mat: Tensor
    ) -> Tensor:
        """Apply the weight Jacobian.

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Weight perturbations of shape ``[V, *weight.shape]``.

        Returns:
            Result of shape ``[V, N, *output_shape[1:]]``.
        """
        return self._run(
            "weight_jac_mat_prod", module, self._spec(module), x=module.input0, mat=mat
        )

    def _weight_jac_t_mat_prod(
        self,
        module: Module,
        g_inp: tuple[Tensor],
        g_out: tuple[Tensor],
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: list[int] = None,
    ) -> Tensor:
        """Apply the transposed weight Jacobian.

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Output vectors of shape ``[V, N, *output_shape[1:]]``; ``N`` is
                ``len(subsampling)`` when sub-sampling.
            sum_batch: Sum over the batch.
            subsampling: Indices of the active samples.

        Returns:
            Result of shape ``[V, *weight.shape]`` or, without ``sum_batch``,
            ``[V, N, *weight.shape]``.
        """
        return self._run(
            "weight_jac_t_mat_prod",
            module,
            self._spec(module),
            x=subsample(module.input0, subsampling=subsampling),
            mat=mat,
            sum_batch=sum_batch,
        )

    def _bias_jac_mat_prod(
        self, module: Module, g_inp: tuple[Tensor], g_out: tuple[Tensor], mat: Tensor
    ) -> Tensor:
        """Apply the bias Jacobian (a broadcast over batch and positions).

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Bias perturbations of shape ``[V, C_out]``.

        Returns:
            Result of shape ``[V, N, *output_shape[1:]]``.
        """
        spec = self._spec(module)
        check_like_weight(module, "mat", mat)
        shape = (mat.shape[0], *spec.output_shape())
        if spec.kind == "linear":
            view = mat.reshape(mat.shape[0], *[1] * (len(shape) - 2), mat.shape[1])
        else:
            view = mat.reshape(*mat.shape, *[1] * (len(shape) - 3))
            view = view.unsqueeze(1)
        return view.expand(shape)

    def _bias_jac_t_mat_prod(
        self,
        module: Module,
        g_inp: tuple[Tensor],
        g_out: tuple[Tensor],
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: list[int] = None,
    ) -> Tensor:
        """Apply the transposed bias Jacobian (a sum over positions and batch).

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Output vectors of shape ``[V, N, *output_shape[1:]]``.
            sum_batch: Sum over the batch.
            subsampling: Indices of the active samples (``mat`` is already
                sub-sampled).

        Returns:
            Result of shape ``[V, C_out]`` or ``[V, N, C_out]``.
        """
        spec = self._spec(module)
        check_like_weight(module, "mat", mat)
        dims = list(range(3, mat.dim()))
        if spec.kind == "linear":
            dims = list(range(2, mat.dim() - 1))
        if sum_batch:
            dims.insert(0, 1)
        return mat.sum(dims) if dims else mat

    def ea_jac_t_mat_jac_prod(
        self, module: Module, g_inp: tuple[Tensor], g_out: tuple[Tensor], mat: Tensor
    ) -> Tensor:
        """Sandwich a matrix with the per-sample input-output Jacobian (KFRA).

        Args:
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            mat: Matrix of shape ``[F_out, F_out]`` with
                ``F_out = prod(output_shape[1:])``.

        Returns:
            ``J^T mat J`` of shape ``[F_in, F_in]``, with
            ``F_in = prod(input_shape[1:])``.
        """
        spec = self._spec(module)
        out_shape = spec.output_shape(1)[1:]
        jac_t = self._run(
            "jac_t_mat_prod", module, spec, mat=mat.reshape(mat.shape[0], 1, *out_shape)
        ).flatten(1)
        in_features = jac_t.shape[1]
        result = self._run(
            "jac_t_mat_prod",
            module,
            spec,
            mat=jac_t.t().reshape(in_features, 1, *out_shape),
        ).reshape(in_features, in_features)
        return result.t()

    def get_unfolded_input(self, module: Module) -> Tensor:
        """Unfold the layer input (im2col), as BackPACK's ``unfold_input`` does.

        Args:
            module: A convolution layer.

        Returns:
            Unfolded input of shape ``[N, C_in * prod(K), prod(O)]``.
        """
        return self._run("unfold_input", module, self._spec(module), x=module.input0)

    # quantities BackPACK's module extensions compute from unfolded inputs

    def weight_diag_ggn(
        self,
        module: Module,
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: list[int] = None,
    ) -> Tensor:
        """Weight GGN diagonal from a square root: ``Σ_v Σ_n (J_W^T mat)²``.

        Args:
            module: The layer.
            mat: Square root of the output GGN, shape ``[V, N, *output_shape[1:]]``.
            sum_batch: Sum over the batch.
            subsampling: Indices of the active samples.

        Returns:
            Result of shape ``[*weight.shape]`` or ``[N, *weight.shape]``.
        """
        return self._run(
            "weight_diag_ggn",
            module,
            self._spec(module),
            x=subsample(module.input0, subsampling=subsampling),
            mat=mat,
            sum_batch=sum_batch,
        )

    def weight_batch_l2(self, module: Module, grad_output: Tensor) -> Tensor:
        """Squared L2 norm of every sample's weight gradient.

        Args:
            module: The layer.
            grad_output: Gradient w.r.t. the layer output, shape
                ``[N, *output_shape[1:]]``.

        Returns:
            Norms of shape ``[N]``.
        """
        return self._run(
            "weight_batch_l2",
            module,
            self._spec(module),
            x=module.input0,
            mat=grad_output.unsqueeze(0),
        )

    def kfac_input_factor(self, module: Module, approx: str = "expand") -> Tensor:
        """Input-side Kronecker factor of KFAC.

        Args:
            module: The layer.
            approx: ``'expand'`` (every position counts as a sample, KFC) or
                ``'reduce'`` (positions are averaged first).

        Returns:
            Factor of shape ``[G, C_in // G * prod(K), C_in // G * prod(K)]``;
            block ``g`` belongs to the weight rows of group ``g``.

        Raises:
            ValueError: If ``approx`` is unknown.
        """
        if approx not in KFAC_APPROXIMATIONS:
            raise ValueError(
                f"Unknown KFAC approximation {approx!r}."
                f" Supported: {KFAC_APPROXIMATIONS}."
            )
        factor = self._run(
            f"kfac_{approx}", module, self._spec(module), x=module.input0
        )
        return factor.contiguous()

    def forward(self, module: Module, x: Tensor) -> Tensor:
        """Evaluate the layer (with bias) by the strategy's evaluation.

        Args:
            module: The layer.
            x: Input of shape ``[N, *input_shape[1:]]``.

        Returns:
            Output of shape ``[N, *output_shape[1:]]``.

        Raises:
            RuntimeError: If the layer's kernel rejects ``x`` (a wrong shape, say).
            TypeError: If ``x`` is not a tensor or has another dtype than the weight.
            ValueError: If ``x`` lives on another device than the weight.
        """
        if not isinstance(x, Tensor):
            check_like_weight(module, "x", x)
        spec = spec_of(module, x.shape)
        if self.strategy != "auto" or autotune_enabled():
            return self._run("forward", module, spec, x=x)
        # auto always picks the layer's own kernel, one torch call: a plan would
        # cost more than it saves. The kernel rejects a mismatched dtype or device
        # itself (checked here only then, for a clearer message), except a meta
        # input, which it would take.
        if x.is_meta:
            check_like_weight(module, "x", x)
        try:
            return IMPLEMENTATIONS["forward"]["kernel"](module, spec, "kernel", x)
        except (RuntimeError, TypeError):
            check_like_weight(module, "x", x)
            raise
