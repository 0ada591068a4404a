"""Compare the tensor-network derivatives with ``torch.func`` references.

Every case of the linear and convolution families is run through every Jacobian
product of BackPACK's public derivatives API, for every strategy in
``backpack_tn.derivatives.STRATEGIES``. References do not depend on the strategy, so
the random vectors and their references are computed once per case and product.
"""

import math
import re
from collections.abc import Callable

import torch
from pytest import FixtureRequest, fixture, mark, raises, skip
from torch import Tensor, nn, randn

from backpack_tn.derivatives import STRATEGIES, implementations
from backpack_tn.engine.network import largest_intermediate
from backpack_tn.expressions import weight_batch_l2, weight_diag_ggn
from backpack_tn.expressions.layer_spec import spec_of
from test_problems import references
from test_problems.cases import Problem
from test_problems.compare import assert_allclose_report
from test_problems.registry import (
    TN_DERIVATIVES,
    tn_derivatives_class,
    weight_vjp_unsupported,
)

NUM_VECTORS = [1, 3]
SUBSAMPLINGS = [None, "first_last"]
SUM_BATCH = [True, False]
PARAMS = ["weight", "bias"]


class ReferenceCache:
    """Random vectors and their references for the current case.

    Tests run case by case, so only the entries of the latest case are kept.
    """

    def __init__(self):
        """Start empty."""
        self.case_id: str | None = None
        self.entries: dict[tuple, tuple[Tensor, Tensor]] = {}

    def get(
        self,
        problem: Problem,
        key: tuple,
        compute: Callable[[], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """Return the cached ``(mat, expected)`` of a product, computing it once.

        Args:
            problem: Layer problem.
            key: Product name and variant.
            compute: Draws the vectors and computes the reference.

        Returns:
            The vectors and the reference result.
        """
        if problem.case_id != self.case_id:
            self.case_id, self.entries = problem.case_id, {}
        if key not in self.entries:
            self.entries[key] = compute()
        return self.entries[key]


CACHE = ReferenceCache()


@fixture(params=STRATEGIES)
def strategy(request: FixtureRequest) -> str:
    """Strategy of the derivatives under test.

    Args:
        request: Pytest request; ``request.param`` is the strategy name.

    Returns:
        Strategy name.
    """
    return request.param


def _tn_derivatives(problem: Problem, strategy: str):
    """Build the tensor-network derivatives of the problem's layer.

    Args:
        problem: Layer problem.
        strategy: Strategy name.

    Returns:
        Derivatives object of the class registered for the layer.
    """
    return tn_derivatives_class(type(problem.module))(strategy=strategy)


def _randn(*shape: int, like: Tensor) -> Tensor:
    """Draw a standard normal tensor on the CPU, then move it next to ``like``.

    Args:
        *shape: Shape of the result.
        like: Tensor whose dtype and device the result gets.

    Returns:
        Random tensor of shape ``shape``.
    """
    return randn(*shape, dtype=like.dtype).to(like.device)


def _subsampling(problem: Problem, subsampling: str | None) -> list[int] | None:
    """Turn a sub-sampling variant into indices.

    Args:
        problem: Layer problem.
        subsampling: ``None`` (all samples) or ``'first_last'``.

    Returns:
        ``None``, or the indices ``[0, N - 1]`` (``[0]`` if ``N = 1``).
    """
    if subsampling is None:
        return None
    n = problem.x.shape[0]
    return [0, n - 1] if n > 1 else [0]


def _randn_like_output(
    problem: Problem, num_vectors: int, subsampling: list[int] | None
) -> Tensor:
    """Draw random vectors shaped like the (sub-sampled) layer output.

    Args:
        problem: Layer problem.
        num_vectors: Number of vectors ``V``.
        subsampling: Indices of active samples, or ``None`` for all.

    Returns:
        Tensor of shape ``[V, N, *out]``; ``N`` becomes ``len(subsampling)`` when
        sub-sampling.
    """
    output = problem.module.output
    output = output if subsampling is None else output[subsampling]
    return _randn(num_vectors, *output.shape, like=output)


def _skip_if_no_param(problem: Problem, param: str) -> None:
    """Skip the test if the layer lacks the parameter.

    Args:
        problem: Layer problem.
        param: Parameter name.
    """
    if getattr(problem.module, param) is None:
        skip(f"{type(problem.module).__name__} has no {param}.")


@mark.parametrize("num_vectors", NUM_VECTORS, ids=lambda v: f"V={v}")
def test_jac_mat_prod(layer_problem: Problem, strategy: str, num_vectors: int):
    """Input Jacobian applied to ``[V, N, *in]``.

    Args:
        layer_problem: Layer problem.
        strategy: Strategy name.
        num_vectors: Number of vectors ``V``.
    """
    module, x = layer_problem.module, layer_problem.x

    def compute() -> tuple[Tensor, Tensor]:
        mat = _randn(num_vectors, *x.shape, like=x)
        return mat, references.jac_mat_prod(module, x, mat)

    mat, expected = CACHE.get(layer_problem, ("jac_mat_prod", num_vectors), compute)
    derivatives = _tn_derivatives(layer_problem, strategy)

    result = derivatives.jac_mat_prod(module, None, None, mat.clone())
    assert_allclose_report(result, expected, name="jac_mat_prod", **layer_problem.tols)


@mark.parametrize("subsampling", SUBSAMPLINGS, ids=lambda s: f"sub={s}")
@mark.parametrize("num_vectors", NUM_VECTORS, ids=lambda v: f"V={v}")
def test_jac_t_mat_prod(
    layer_problem: Problem, strategy: str, num_vectors: int, subsampling: str | None
):
    """Transposed input Jacobian applied to ``[V, N, *out]``.

    Args:
        layer_problem: Layer problem.
        strategy: Strategy name.
        num_vectors: Number of vectors ``V``.
        subsampling: Sub-sampling variant.
    """
    module, x = layer_problem.module, layer_problem.x
    indices = _subsampling(layer_problem, subsampling)

    def compute() -> tuple[Tensor, Tensor]:
        mat = _randn_like_output(layer_problem, num_vectors, indices)
        return mat, references.jac_t_mat_prod(module, x, mat, subsampling=indices)

    key = ("jac_t_mat_prod", num_vectors, subsampling)
    mat, expected = CACHE.get(layer_problem, key, compute)
    derivatives = _tn_derivatives(layer_problem, strategy)

    result = derivatives.jac_t_mat_prod(
        module, None, None, mat.clone(), subsampling=indices
    )
    assert_allclose_report(
        result, expected, name="jac_t_mat_prod", **layer_problem.tols
    )


@mark.parametrize("param", PARAMS)
@mark.parametrize("num_vectors", NUM_VECTORS, ids=lambda v: f"V={v}")
def test_param_jac_mat_prod(
    layer_problem: Problem, strategy: str, num_vectors: int, param: str
):
    """Parameter Jacobian applied to ``[V, *param.shape]``.

    Args:
        layer_problem: Layer problem.
        strategy: Strategy name.
        num_vectors: Number of vectors ``V``.
        param: Parameter name.
    """
    _skip_if_no_param(layer_problem, param)
    module, x = layer_problem.module, layer_problem.x
    value = getattr(module, param)

    def compute() -> tuple[Tensor, Tensor]:
        mat = _randn(num_vectors, *value.shape, like=value)
        return mat, references.PARAM_JAC_MAT_PROD[param](module, x, mat)

    key = (f"{param}_jac_mat_prod", num_vectors)
    mat, expected = CACHE.get(layer_problem, key, compute)
    derivatives = _tn_derivatives(layer_problem, strategy)

    jac_mat_prod = getattr(derivatives, f"{param}_jac_mat_prod")
    result = jac_mat_prod(module, None, None, mat.clone())
    assert_allclose_report(
        result, expected, name=f"{param}_jac_mat_prod", **layer_problem.tols
    )


@mark.parametrize("subsampling", SUBSAMPLINGS, ids=lambda s: f"sub={s}")
@mark.parametrize("sum_batch", SUM_BATCH, ids=lambda s: f"sum_batch={s}")
@mark.parametrize("param", PARAMS)
@mark.parametrize("num_vectors", NUM_VECTORS, ids=lambda v: f"V={v}")
def test_param_mjp(
    layer_problem: Problem,
    strategy: str,
    num_vectors: int,
    param: str,
    sum_batch: bool,
    subsampling: str | None,
):
    """Transposed parameter Jacobian applied to ``[V, N, *out]`` via ``param_mjp``.

    Where the strategy does not support the layer's weight VJP, checks that it
    raises ``NotImplementedError`` naming the strategy.

    Args:
        layer_problem: Layer problem.
        strategy: Strategy name.
        num_vectors: Number of vectors ``V``.
        param: Parameter name.
        sum_batch: Whether to sum over the batch.
        subsampling: Sub-sampling variant.
    """
    _skip_if_no_param(layer_problem, param)
    module, x = layer_problem.module, layer_problem.x
    indices = _subsampling(layer_problem, subsampling)

    def compute() -> tuple[Tensor, Tensor]:
        mat = _randn_like_output(layer_problem, num_vectors, indices)
        return mat, references.PARAM_JAC_T_MAT_PROD[param](
            module, x, mat, sum_batch=sum_batch, subsampling=indices
        )

    key = ("param_mjp", param, num_vectors, sum_batch, subsampling)
    mat, expected = CACHE.get(layer_problem, key, compute)
    derivatives = _tn_derivatives(layer_problem, strategy)

    def param_mjp() -> Tensor:
        return derivatives.param_mjp(
            param,
            module,
            None,
            None,
            mat.clone(),
            sum_batch=sum_batch,
            subsampling=indices,
        )

    if param == "weight" and weight_vjp_unsupported(module, strategy):
        with raises(NotImplementedError, match=re.escape(repr(strategy))):
            param_mjp()
        return

    assert_allclose_report(
        param_mjp(), expected, name=f"param_mjp({param!r})", **layer_problem.tols
    )


def test_ea_jac_t_mat_jac_prod(layer_problem: Problem, strategy: str):
    """Expectation ``1/N sum_n J_nᵀ mat J_n`` with a ``[F_out, F_out]`` matrix.

    Args:
        layer_problem: Layer problem.
        strategy: Strategy name.
    """
    module, x = layer_problem.module, layer_problem.x

    def compute() -> tuple[Tensor, Tensor]:
        out_features = module.output[0].numel()
        mat = _randn(out_features, out_features, like=x)
        return mat, references.ea_jac_t_mat_jac_prod(module, x, mat)

    mat, expected = CACHE.get(layer_problem, ("ea_jac_t_mat_jac_prod",), compute)
    derivatives = _tn_derivatives(layer_problem, strategy)

    result = derivatives.ea_jac_t_mat_jac_prod(module, None, None, mat.clone())
    assert_allclose_report(
        result, expected, name="ea_jac_t_mat_jac_prod", **layer_problem.tols
    )


#: Public products that take one vector without the leading ``V`` dimension:
#: name -> (the parameter it needs, shape of one vector, the call).
ONE_VECTOR_PRODUCTS = {
    "jac_mat_prod": (
        None,
        lambda module: module.input0.shape,
        lambda d, module, mat: d.jac_mat_prod(module, None, None, mat),
    ),
    "jac_t_mat_prod": (
        None,
        lambda module: module.output.shape,
        lambda d, module, mat: d.jac_t_mat_prod(module, None, None, mat),
    ),
    "param_mjp-weight": (
        "weight",
        lambda module: module.output.shape,
        lambda d, module, mat: d.param_mjp(
            "weight", module, None, None, mat, sum_batch=False
        ),
    ),
    "param_mjp-bias": (
        "bias",
        lambda module: module.output.shape,
        lambda d, module, mat: d.param_mjp("bias", module, None, None, mat),
    ),
    "weight_jac_mat_prod": (
        "weight",
        lambda module: module.weight.shape,
        lambda d, module, mat: d.weight_jac_mat_prod(module, None, None, mat),
    ),
    "bias_jac_mat_prod": (
        "bias",
        lambda module: module.bias.shape,
        lambda d, module, mat: d.bias_jac_mat_prod(module, None, None, mat),
    ),
}


@mark.parametrize("product", ONE_VECTOR_PRODUCTS)
def test_one_vector(layer_problem: Problem, product: str):
    """One vector without ``V`` gives the ``V = 1`` result without ``V``.

    The ``V = 1`` results are compared with the references above.

    Args:
        layer_problem: Layer problem.
        product: Key of ``ONE_VECTOR_PRODUCTS``.
    """
    param, shape, call = ONE_VECTOR_PRODUCTS[product]
    if param is not None:
        _skip_if_no_param(layer_problem, param)
    module = layer_problem.module
    vector = _randn(*shape(module), like=module.weight)
    derivatives = _tn_derivatives(layer_problem, "auto")

    result = call(derivatives, module, vector)
    expected = call(derivatives, module, vector.unsqueeze(0)).squeeze(0)
    assert_allclose_report(result, expected, name=product, **layer_problem.tols)


#: Budgets for the blocks of squared per-sample VJPs, as a function of one VJP's
#: size: one vector of one sample per block, or all vectors of two samples.
VJP_BLOCKS = {"one-vector": lambda one: 1, "two-samples": lambda one: 3 * 2 * one}


@mark.parametrize("budget", VJP_BLOCKS.values(), ids=VJP_BLOCKS.keys())
@mark.parametrize("strategy", ["kernel", "unfold"])
def test_squared_vjps_in_blocks(
    layer_problem: Problem, strategy: str, budget: Callable, monkeypatch
):
    """GGN diagonals and per-sample norms add up the same over blocks of VJPs.

    Args:
        layer_problem: Layer problem.
        strategy: A strategy whose squared quantities square per-sample VJPs.
        budget: Block size in bytes, from the bytes of one VJP.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    mat = _randn(3, *module.output.shape, like=x)
    vjps = references.weight_jac_t_mat_prod(module, x, mat, sum_batch=False)
    one = module.weight.numel() * mat.element_size()
    for bound in ("VJP_BLOCK_BYTES", "VJP_BLOCK_BYTES_GPU"):
        monkeypatch.setattr(implementations, bound, budget(one))
    derivatives = _tn_derivatives(layer_problem, strategy)
    _check_ggn_diagonals(layer_problem, derivatives, mat, vjps)
    expected = vjps[:1].square().flatten(2).sum((0, 2))
    result = derivatives.weight_batch_l2(module, mat[0])
    assert_allclose_report(result, expected, name="batch_l2", **layer_problem.tols)


def test_depthwise_same_conv_in_vector_blocks(layer_problem: Problem, monkeypatch):
    """The same-order convolution of depthwise-like layers runs one vector a block.

    Args:
        layer_problem: Layer problem.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    reason = weight_vjp_unsupported(module, "same_conv")
    if reason is not None or getattr(module, "groups", 0) != x.shape[1]:
        skip(reason or "not depthwise-like")
    mat = _randn(3, *module.output.shape, like=x)
    calls = []
    block = implementations._depthwise_same_conv_block

    def counted(*args):
        calls.append(args[3].shape[0])
        return block(*args)

    monkeypatch.setattr(implementations, "DEPTHWISE_SAME_CONV_BLOCK_BYTES", 1)
    monkeypatch.setattr(implementations, "_depthwise_same_conv_block", counted)
    derivatives = _tn_derivatives(layer_problem, "same_conv")
    for sum_batch in SUM_BATCH:
        calls.clear()
        expected = references.weight_jac_t_mat_prod(module, x, mat, sum_batch)
        result = derivatives.param_mjp(
            "weight", module, None, None, mat, sum_batch=sum_batch
        )
        name = f"param_mjp('weight', sum_batch={sum_batch})"
        assert_allclose_report(result, expected, name=name, **layer_problem.tols)
        assert calls == ([3] if x.is_cuda else [1, 1, 1])


@mark.parametrize("strategy", ["tn_lowered", "unfold"])
def test_unfolding_vjps_one_sample_per_block(
    layer_problem: Problem, strategy: str, monkeypatch
):
    """Squared VJPs that unfold the input add up the same with one sample per block.

    Args:
        layer_problem: Layer problem.
        strategy: A strategy whose per-sample VJPs copy the unfolded input.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    mat = _randn(3, *module.output.shape, like=x)
    for bound in ("UNFOLDED_BLOCK_BYTES", "UNFOLDED_GROUPED_BLOCK_BYTES"):
        monkeypatch.setattr(implementations, bound, 1)
    spec = spec_of(module, x.shape, module.output.shape)
    key = f"{strategy}+square"
    blocks = list(implementations._vjp_blocks(spec, mat, key))
    if spec.kind != "linear" and not x.is_cuda:
        assert {b.stop - b.start for _, b in blocks} == {1}
    vjps = references.weight_jac_t_mat_prod(module, x, mat, sum_batch=False)
    derivatives = _tn_derivatives(layer_problem, strategy)
    _check_ggn_diagonals(layer_problem, derivatives, mat, vjps)


#: Groups per block of unfolded VJPs (their bound, in groups' unfolded inputs).
GROUP_BLOCKS = [1, 2]


@mark.parametrize("per_block", GROUP_BLOCKS, ids=lambda g: f"groups_per_block={g}")
@mark.parametrize("strategy", ["tn_lowered", "unfold"])
def test_unfolding_vjps_in_group_blocks(
    layer_problem: Problem, strategy: str, per_block: int, monkeypatch
):
    """Squared VJPs that unfold the input add up the same over blocks of groups.

    Args:
        layer_problem: Layer problem.
        strategy: A strategy whose per-sample VJPs copy the unfolded input.
        per_block: Groups per block (the last block may hold fewer).
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    if getattr(module, "groups", 1) == 1:
        skip("ungrouped")
    mat = _randn(3, *module.output.shape, like=x)
    spec = spec_of(module, x.shape, module.output.shape)
    one_group = implementations.unfolded_sample_bytes(spec, x.element_size())
    one_group //= module.groups
    bound = per_block * one_group
    monkeypatch.setattr(implementations, "UNFOLDED_GROUPED_BLOCK_BYTES", bound)
    key = f"{strategy}+square"
    blocks = implementations._group_blocks(spec, mat, key)
    sizes = [sub.groups for sub, _, _ in blocks]
    expected = [module.groups]
    if not x.is_cuda and per_block < module.groups:
        expected = [per_block] * (module.groups // per_block)
        expected += [module.groups % per_block] if module.groups % per_block else []
    assert sizes == expected, sizes
    vjps = references.weight_jac_t_mat_prod(module, x, mat, sum_batch=False)
    squares = vjps.square()
    evaluations = implementations.IMPLEMENTATIONS
    for sum_batch in SUM_BATCH:
        ggn = evaluations["weight_diag_ggn"][key]
        result = ggn(module, spec, key, x, mat, sum_batch)
        expected = squares.sum((0, 1) if sum_batch else 0)
        name = f"weight_diag_ggn(sum_batch={sum_batch})"
        assert_allclose_report(result, expected, name=name, **layer_problem.tols)
    result = evaluations["weight_batch_l2"][key](module, spec, key, x, mat)
    expected = squares.flatten(2).sum((0, 2))
    assert_allclose_report(result, expected, name="batch_l2", **layer_problem.tols)


#: (vectors, samples, copied-vector budget in samples, expected samples per block)
COPY_BOUND_CASES = [(3, 8, 2, 2), (3, 8, 8, 8), (3, 8, 0, 1), (1, 8, 1, 8)]


@mark.parametrize("vectors, samples, budget, expected", COPY_BOUND_CASES)
def test_unfolding_vjp_blocks_bound_copied_vectors(
    vectors: int, samples: int, budget: int, expected: int, monkeypatch
):
    """Blocks of several vectors hold at most the bound of sample-major copies.

    Args:
        vectors: Number of vectors.
        samples: Batch size.
        budget: ``UNFOLDED_BLOCK_BYTES`` in multiples of one sample's vectors.
        expected: Samples per block (one vector: no copy, all samples).
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module = nn.Conv2d(2, 4, 3, stride=2)
    x = randn(samples, 2, 9, 9)
    out_shape = module(x).shape
    mat = randn(vectors, *out_shape)
    one_sample = vectors * mat[0, 0].numel() * mat.element_size()
    monkeypatch.setattr(
        implementations, "UNFOLDED_BLOCK_BYTES", max(1, budget * one_sample)
    )
    monkeypatch.setattr(implementations, "unfolded_sample_bytes", lambda *_: 1)
    spec = spec_of(module, x.shape, out_shape)
    blocks = list(implementations._vjp_blocks(spec, mat, "tn_lowered+square"))
    sizes = {(v.stop - v.start, n.stop - n.start) for v, n in blocks}
    assert sizes == {(vectors, expected)}, sizes


@mark.parametrize("strategy", ["tn", "tn_unsimplified", "tn_lowered"])
def test_squared_networks_in_sample_blocks(
    layer_problem: Problem, strategy: str, monkeypatch
):
    """Single squared networks give the same sums evaluated one sample at a time.

    Args:
        layer_problem: Layer problem.
        strategy: A network strategy.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    mat = _randn(3, *module.output.shape, like=x)
    for bound in ("SQUARED_NETWORK_BLOCK_BYTES", "VJP_BLOCK_BYTES_GPU"):
        monkeypatch.setattr(implementations, bound, 1)
    calls = []
    evaluate = implementations.evaluate

    def counted(*args):
        calls.append(args)
        return evaluate(*args)

    monkeypatch.setattr(implementations, "evaluate", counted)
    spec = spec_of(module, x.shape, module.output.shape)
    vjps = references.weight_jac_t_mat_prod(module, x, mat, sum_batch=False)
    for sum_batch in SUM_BATCH:
        expected = vjps.square().sum((0, 1) if sum_batch else 0)
        result = implementations._tn_weight_diag_ggn(
            module, spec, strategy, x, mat, sum_batch
        )
        name = f"weight_diag_ggn(sum_batch={sum_batch})"
        assert_allclose_report(result, expected, name=name, **layer_problem.tols)
    expected = vjps.square().flatten(2).sum((0, 2))
    result = implementations._tn_weight_batch_l2(module, spec, strategy, x, mat)
    assert_allclose_report(result, expected, name="batch_l2", **layer_problem.tols)
    networks = [
        weight_diag_ggn.tensor_network(spec, x, mat, sum_batch)
        for sum_batch in SUM_BATCH
    ] + [weight_batch_l2.tensor_network(spec, x, mat)]
    blocked = sum(
        largest_intermediate(implementations.prepare(net, strategy)) > math.prod(shape)
        for net, shape in networks
    )
    samples = x.shape[0]
    assert len(calls) == (blocked * samples if samples > 1 else 0)


def _check_ggn_diagonals(problem: Problem, derivatives, mat: Tensor, vjps: Tensor):
    """Compare summed and per-sample GGN diagonals with squared reference VJPs.

    Args:
        problem: Layer problem.
        derivatives: TN derivatives of the layer.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
        vjps: Reference per-sample weight VJPs of shape ``[V, N, *weight_shape]``.
    """
    for sum_batch in SUM_BATCH:
        expected = vjps.square().sum((0, 1) if sum_batch else 0)
        result = derivatives.weight_diag_ggn(problem.module, mat, sum_batch=sum_batch)
        name = f"weight_diag_ggn(sum_batch={sum_batch})"
        assert_allclose_report(result, expected, name=name, **problem.tols)


#: Budgets for the blocks of the kernel route's per-sample VJPs of three vectors, as
#: a function of one sample's input bytes and one vector's bytes per sample.
def _check_weight_vjps(problem: Problem, strategy: str, mat: Tensor):
    """Compare summed and per-sample weight VJPs of a strategy with autograd.

    Args:
        problem: Convolution problem.
        strategy: Strategy of the derivatives.
        mat: Vectors of shape ``[V, N, *output_shape[1:]]``.
    """
    module, x = problem.module, problem.x
    derivatives = _tn_derivatives(problem, strategy)
    for sum_batch in SUM_BATCH:
        expected = references.weight_jac_t_mat_prod(module, x, mat, sum_batch)
        result = derivatives.param_mjp("weight", module, None, None, mat, sum_batch)
        name = f"weight_jac_t_mat_prod(sum_batch={sum_batch})"
        assert_allclose_report(result, expected, name=name, **problem.tols)


KERNEL_BLOCKS = {
    "one-vector": lambda sample, vector: 1,
    "two-vectors": lambda sample, vector: sample + 2 * vector,
    "two-samples": lambda sample, vector: 2 * (sample + 3 * vector),
}


@mark.parametrize("budget", KERNEL_BLOCKS.values(), ids=KERNEL_BLOCKS.keys())
def test_kernel_vjps_in_blocks(conv_problem: Problem, budget: Callable, monkeypatch):
    """Weight VJPs of the kernel route are the same in any blocks.

    Args:
        conv_problem: Convolution problem.
        budget: Block size in bytes, from one sample's and one vector's bytes.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = conv_problem.module, conv_problem.x
    mat = _randn(3, *module.output.shape, like=x)
    size = x.element_size()
    bytes_ = budget(x[0].numel() * size, mat[0, 0].numel() * size)
    monkeypatch.setattr(implementations, "KERNEL_BLOCK_BYTES", bytes_)
    _check_weight_vjps(conv_problem, "kernel", mat)


@mark.parametrize("groups_per_call", [1, 2, 3])
def test_higher_conv_in_blocks(
    conv_problem: Problem, groups_per_call: int, monkeypatch
):
    """Weight VJPs of the higher-order convolution are the same in any blocks.

    Args:
        conv_problem: Convolution problem.
        groups_per_call: Most (vector, sample, group) triples per call.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = conv_problem.module, conv_problem.x
    reason = weight_vjp_unsupported(module, "higher_conv")
    if reason is not None:
        skip(reason)
    monkeypatch.setattr(implementations, "HIGHER_CONV_GROUPS", groups_per_call)
    monkeypatch.setattr(implementations, "HIGHER_CONV_SLOW_GROUPS", 2)
    monkeypatch.setattr(implementations, "HIGHER_CONV_BLOCK_CHANNELS", 1)
    monkeypatch.setattr(implementations, "HIGHER_CONV_BLOCK_INPUT", 1)
    _check_weight_vjps(
        conv_problem, "higher_conv", _randn(3, *module.output.shape, like=x)
    )


@mark.parametrize("vjps_per_call", [1, 2])
def test_kernel_calls_bound_their_vjps(
    conv_problem: Problem, vjps_per_call: int, monkeypatch
):
    """Each weight-gradient kernel call forms at most ``KERNEL_VJP_BLOCK_BYTES``.

    Args:
        conv_problem: Convolution problem.
        vjps_per_call: The bound on CPU, in VJPs of the weight's size.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = conv_problem.module, conv_problem.x
    weight_bytes = module.weight.numel() * x.element_size()
    monkeypatch.setattr(
        implementations, "KERNEL_VJP_BLOCK_BYTES", vjps_per_call * weight_bytes
    )
    call, formed = implementations._grouped_weight_gradient, []

    def spy(module, spec, x, mat, sum_batch):
        formed.append(mat.shape[0] * (1 if sum_batch else mat.shape[1]))
        return call(module, spec, x, mat, sum_batch)

    monkeypatch.setattr(implementations, "_grouped_weight_gradient", spy)
    _check_weight_vjps(conv_problem, "kernel", _randn(3, *module.output.shape, like=x))
    assert formed
    if not x.is_cuda:
        assert max(formed) <= vjps_per_call, formed


#: Blocks of the kernel route's input VJPs, in bytes from one vector's input and
#: output bytes: one vector per call, or two and the rest.
INPUT_VJP_BLOCKS = {
    "one-vector": lambda sample: sample,
    "two-vectors": lambda sample: 2 * sample,
}


@mark.parametrize("budget", INPUT_VJP_BLOCKS.values(), ids=INPUT_VJP_BLOCKS.keys())
def test_kernel_input_vjps_in_blocks(
    layer_problem: Problem, budget: Callable, monkeypatch
):
    """Input VJPs of the kernel route are the same in any blocks of vectors.

    The rule's bounds are lifted, so every convolution takes blocks on CPU.

    Args:
        layer_problem: Layer problem.
        budget: Block size in bytes, from one vector's input and output bytes.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    mat = _randn(3, *module.output.shape, like=x)
    sample = (x[0].numel() + mat[0, 0].numel()) * x.element_size()
    monkeypatch.setattr(implementations, "INPUT_VJP_BLOCK_BYTES", budget(sample))
    monkeypatch.setattr(implementations, "INPUT_VJP_ONE_CALL_BYTES", 2 * budget(sample))
    monkeypatch.setattr(implementations, "INPUT_VJP_BLOCK_POSITIONS", 1)
    monkeypatch.setattr(implementations, "INPUT_VJP_BLOCK_WEIGHT_BYTES", math.inf)
    monkeypatch.setattr(implementations, "INPUT_VJP_BLOCK_SAMPLE_BYTES", 0)
    spec = spec_of(module, x.shape, module.output.shape)
    total = 3 * x.shape[0]
    blocked = spec.kind == "conv" and not x.is_cuda
    step = max(1, budget(sample) // sample)
    expected_step = min(total, step) if blocked and total > 2 * step else total
    assert implementations.input_vjp_step(spec, mat) == expected_step
    derivatives = _tn_derivatives(layer_problem, "kernel")
    expected = references.jac_t_mat_prod(module, x, mat)
    result = derivatives.jac_t_mat_prod(module, None, None, mat)
    assert_allclose_report(
        result, expected, name="jac_t_mat_prod", **layer_problem.tols
    )


#: Bounds in bytes on the intermediates of input JVP/VJP networks: one vector of one
#: sample per block, or a few.
INPUT_PRODUCT_BLOCKS = {"one-vector": 1, "16KiB": 2**14}


@mark.parametrize(
    "budget", INPUT_PRODUCT_BLOCKS.values(), ids=INPUT_PRODUCT_BLOCKS.keys()
)
@mark.parametrize("strategy", ["tn", "tn_unsimplified", "tn_lowered"])
def test_input_products_in_blocks(
    layer_problem: Problem, strategy: str, budget: int, monkeypatch
):
    """Input JVPs and VJPs are the same in any blocks of vectors.

    Args:
        layer_problem: Layer problem.
        strategy: A network strategy.
        budget: Bound on a block's largest intermediate, in bytes.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    module, x = layer_problem.module, layer_problem.x
    for bound in ("INPUT_PRODUCT_BLOCK_BYTES", "VJP_BLOCK_BYTES_GPU"):
        monkeypatch.setattr(implementations, bound, budget)
    derivatives = _tn_derivatives(layer_problem, strategy)
    mat = _randn(3, *x.shape, like=x)
    expected = references.jac_mat_prod(module, x, mat)
    result = derivatives.jac_mat_prod(module, None, None, mat)
    assert_allclose_report(result, expected, name="jac_mat_prod", **layer_problem.tols)
    mat = _randn(3, *module.output.shape, like=x)
    expected = references.jac_t_mat_prod(module, x, mat)
    result = derivatives.jac_t_mat_prod(module, None, None, mat)
    assert_allclose_report(
        result, expected, name="jac_t_mat_prod", **layer_problem.tols
    )


#: Same-order convolutions of stock BackPACK: (layer, input shape, vectors, whether
#: an operand passes the 32-bit index limit of CUDA convolutions).
SAME_CONV_SIZES = {
    "96x32x32-N32-V10": (
        lambda: nn.Conv2d(96, 96, 3, padding=1),
        (32, 96, 32, 32),
        10,
        True,
    ),
    "96x32x32-N2-V10": (
        lambda: nn.Conv2d(96, 96, 3, padding=1),
        (2, 96, 32, 32),
        10,
        False,
    ),
    "depthwise-N32-V10": (
        lambda: nn.Conv2d(96, 96, 3, padding=1, groups=96),
        (32, 96, 32, 32),
        10,
        False,
    ),
}


@mark.parametrize("case", SAME_CONV_SIZES.values(), ids=SAME_CONV_SIZES.keys())
def test_same_conv_size_check(case: tuple, monkeypatch):
    """``same_conv`` refuses operands past CUDA's 32-bit indices, naming the sizes.

    Meta tensors stand in for CUDA tensors of the real shapes (no memory).

    Args:
        case: Layer factory, input shape, vectors and whether the check raises.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    factory, shape, vectors, too_large = case
    module = factory()
    x = torch.empty(shape, device="meta")
    mat = torch.empty(vectors, *module.to("meta")(x).shape, device="meta")
    implementations.check_same_conv_size(module, x, mat)  # not an indexed device
    monkeypatch.setattr(implementations, "INT32_INDEXED_DEVICES", {"meta"})
    if not too_large:
        implementations.check_same_conv_size(module, x, mat)
        return
    with raises(NotImplementedError, match="same_conv") as error:
        implementations.check_same_conv_size(module, x, mat)
    message = str(error.value)
    for part in ("Conv2d(in_channels=96", "3019898880", "2147483647", "'auto'"):
        assert part in message, message


def test_get_unfolded_input(conv_problem: Problem, strategy: str):
    """Unfolded input ``[N, C_in * prod(K), prod(O)]`` of (transpose) convolutions.

    Args:
        conv_problem: Convolution problem.
        strategy: Strategy name.
    """
    module, x = conv_problem.module, conv_problem.x
    derivatives = _tn_derivatives(conv_problem, strategy)

    result = derivatives.get_unfolded_input(module)
    expected = references.unfolded_input(module, x)
    assert_allclose_report(
        result, expected, name="get_unfolded_input", **conv_problem.tols
    )


def test_lag_kfac_expand(conv_problem: Problem):
    """Lagged products give the KFAC-expand factor of unit-stride convolutions.

    Other layers are refused with an error that names the layer's strides.

    Args:
        conv_problem: Convolution problem.
    """
    module, x = conv_problem.module, conv_problem.x
    spec = spec_of(module)
    lag = implementations.IMPLEMENTATIONS["kfac_expand"]["lag"]
    if not implementations.lag_applies(spec):
        with raises(NotImplementedError, match=r"unit strides.* stride \("):
            lag(module, spec, "lag", x=x)
        return
    result = lag(module, spec, "lag", x=x)
    expected = references.kfac_input_factor(module, x, "expand")
    assert_allclose_report(result, expected, name="lag", **conv_problem.tols)
    assert torch.equal(result, result.transpose(1, 2))


@mark.parametrize("layer_type", TN_DERIVATIVES, ids=lambda t: t.__name__)
def test_unknown_strategy_raises(layer_type: type):
    """Building derivatives with an unknown strategy raises and names it.

    Args:
        layer_type: Layer class.
    """
    with raises(ValueError, match="'no_such_strategy'"):
        tn_derivatives_class(layer_type)(strategy="no_such_strategy")
