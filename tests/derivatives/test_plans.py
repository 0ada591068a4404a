"""Replayed evaluations agree with eager ones (``backpack_tn.derivatives.plans``).

The first call of a product on a configuration records it, later calls replay the
record. Every case runs every product three times: eagerly (replay off), recorded
and replayed, and once more replayed on new vectors of the same layout.
"""

from collections.abc import Callable, Iterator

import torch
from pytest import fixture, mark, skip
from torch import Tensor
from torch.func import vmap

from backpack_tn.derivatives import choice, implementations, plans, set_autotune
from backpack_tn.engine import contract
from backpack_tn.expressions.layer_spec import spec_of
from test_problems.cases import Problem
from test_problems.compare import assert_allclose_report
from test_problems.registry import tn_derivatives_class

#: Strategies whose records are checked (``kernel`` evaluations stay eager).
REPLAY_STRATEGIES = ["auto", "tn", "tn_lowered", "unfold", "higher_conv"]


def _output_vectors(module, num_vectors: int) -> Tensor:
    out = module.output
    return torch.randn(num_vectors, *out.shape, dtype=out.dtype).to(out.device)


def _input_vectors(module, num_vectors: int) -> Tensor:
    x = module.input0
    return torch.randn(num_vectors, *x.shape, dtype=x.dtype).to(x.device)


#: (name, product(derivatives, module, seed) -> Tensor); each draws its vectors
#: from ``seed``, so that two calls with one seed compute the same numbers.
PRODUCTS: list[tuple[str, Callable]] = [
    (
        "jac_t_mat_prod",
        lambda d, m: d.jac_t_mat_prod(m, None, None, _output_vectors(m, 2)),
    ),
    ("jac_mat_prod", lambda d, m: d.jac_mat_prod(m, None, None, _input_vectors(m, 2))),
    (
        "weight_vjp_per_sample",
        lambda d, m: d.param_mjp(
            "weight", m, None, None, _output_vectors(m, 2), sum_batch=False
        ),
    ),
    ("weight_diag_ggn", lambda d, m: d.weight_diag_ggn(m, _output_vectors(m, 3))),
    ("weight_batch_l2", lambda d, m: d.weight_batch_l2(m, _output_vectors(m, 1)[0])),
    ("kfac_expand", lambda d, m: d.kfac_input_factor(m, "expand")),
    ("kfac_reduce", lambda d, m: d.kfac_input_factor(m, "reduce")),
]
PRODUCT_IDS = [name for name, _ in PRODUCTS]


@fixture(autouse=True)
def fresh_plans() -> Iterator[None]:
    """Start every test without plans and with replay on; restore that afterwards.

    Yields:
        Nothing.
    """
    plans.set_replay(True)
    yield
    plans.set_replay(True)


def _call(product: Callable, derivatives, module, seed: int) -> Tensor:
    torch.manual_seed(seed)
    return product(derivatives, module)


def _derivatives(problem: Problem, strategy: str):
    return tn_derivatives_class(type(problem.module))(strategy=strategy)


@mark.parametrize("strategy", REPLAY_STRATEGIES)
@mark.parametrize("product", [p for _, p in PRODUCTS], ids=PRODUCT_IDS)
def test_replay_matches_eager(layer_problem: Problem, strategy: str, product):
    """Recorded and replayed products equal the eager product.

    Args:
        layer_problem: Layer problem.
        strategy: Strategy name.
        product: The product under test.
    """
    module = layer_problem.module
    derivatives = _derivatives(layer_problem, strategy)
    plans.set_replay(False)
    try:
        expected = [_call(product, derivatives, module, seed) for seed in (0, 1)]
    except NotImplementedError as error:
        skip(str(error))
    plans.set_replay(True)
    recorded = _call(product, derivatives, module, 0)
    replayed = _call(product, derivatives, module, 0)
    again = _call(product, derivatives, module, 1)
    for name, result, reference in [
        ("recorded", recorded, expected[0]),
        ("replayed", replayed, expected[0]),
        ("replayed on new vectors", again, expected[1]),
    ]:
        assert_allclose_report(result, reference, name=name, **layer_problem.tols)


def test_lag_factor_replay_matches_eager(conv_problem: Problem, monkeypatch):
    """The lagged-product KFAC-expand factor is recorded and replayed exactly.

    ``auto`` is made to pick it wherever it applies. Records of large kernels are
    refused (too many calls) and stay eager.

    Args:
        conv_problem: Convolution problem.
        monkeypatch: Pytest fixture.
    """
    module = conv_problem.module
    spec = spec_of(module)
    if not implementations.lag_applies(spec):
        skip("lagged products need unit strides")
    monkeypatch.setattr(choice, "_CHOSEN", {})
    monkeypatch.setitem(choice._RULES, "kfac_expand", lambda *_: ("lag", "forced"))
    derivatives = _derivatives(conv_problem, "auto")
    product = dict(PRODUCTS)["kfac_expand"]
    plans.set_replay(False)
    expected = _call(product, derivatives, module, 0)
    plans.set_replay(True)
    recorded = _call(product, derivatives, module, 0)
    replayed = _call(product, derivatives, module, 0)
    for name, result in [("recorded", recorded), ("replayed", replayed)]:
        assert_allclose_report(result, expected, name=name, **conv_problem.tols)


def test_tn_products_are_replayed(conv_problem: Problem):
    """The simplified network of a weight VJP is recorded, not refused.

    Args:
        conv_problem: Convolution problem.
    """
    module = conv_problem.module
    derivatives = _derivatives(conv_problem, "tn")
    _call(PRODUCTS[2][1], derivatives, module, 0)
    assert plans.refusals() == {}
    assert any(plan is not None for plan in plans._PLANS.values())


def test_replay_reads_the_current_parameters(linear_problem: Problem):
    """Weights changed in place or replaced are read anew by the replay.

    Args:
        linear_problem: Linear problem.
    """
    module = linear_problem.module
    derivatives = _derivatives(linear_problem, "auto")
    product = PRODUCTS[0][1]

    def replayed_and_eager() -> tuple[Tensor, Tensor]:
        replayed = _call(product, derivatives, module, 0)
        plans.set_replay(False)
        eager = _call(product, derivatives, module, 0)
        plans.set_replay(True)
        _call(product, derivatives, module, 0)  # record again
        return replayed, eager

    _call(product, derivatives, module, 0)
    with torch.no_grad():
        module.weight.mul_(-2.0)
    assert_allclose_report(*replayed_and_eager(), **linear_problem.tols)
    module.weight = torch.nn.Parameter(torch.randn_like(module.weight))
    assert_allclose_report(*replayed_and_eager(), **linear_problem.tols)


def test_layouts_and_settings_get_their_own_plans(conv_problem: Problem):
    """Strides and the engine's settings are part of a plan's key.

    Args:
        conv_problem: Convolution problem.
    """
    module = conv_problem.module
    derivatives = _derivatives(conv_problem, "tn")
    mat = _output_vectors(module, 2)
    permuted = mat.transpose(0, 1).contiguous().transpose(0, 1)
    expected = derivatives.jac_t_mat_prod(module, None, None, mat)
    for vectors in (mat, permuted):
        result = derivatives.jac_t_mat_prod(module, None, None, vectors)
        assert_allclose_report(result, expected, **conv_problem.tols)
    plans_before = len(plans._PLANS)
    with contract.optimizer("greedy"):
        result = derivatives.jac_t_mat_prod(module, None, None, mat)
    assert len(plans._PLANS) == plans_before + 1
    assert_allclose_report(result, expected, **conv_problem.tols)


@mark.parametrize(
    "budget",
    [
        "VJP_BLOCK_BYTES",
        "VJP_BLOCK_BYTES_GPU",
        "KERNEL_BLOCK_BYTES",
        "KERNEL_VJP_BLOCK_BYTES",
        "INPUT_PRODUCT_BLOCK_BYTES",
        "INPUT_VJP_BLOCK_BYTES",
        "INPUT_VJP_ONE_CALL_BYTES",
        "UNFOLDED_BLOCK_BYTES",
        "SQUARED_NETWORK_BLOCK_BYTES",
        "INPUT_VJP_BLOCK_POSITIONS",
        "INPUT_VJP_BLOCK_WEIGHT_BYTES",
        "INPUT_VJP_BLOCK_SAMPLE_BYTES",
    ],
)
def test_block_budgets_are_settings(budget: str, monkeypatch):
    """A plan recorded under one block budget is not replayed under another.

    Args:
        budget: Name of the budget in ``implementations``.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    before = plans._settings()
    monkeypatch.setattr(implementations, budget, 1)
    assert plans._settings() != before


def test_switches():
    """Without replay nothing is stored; autotuning empties the store."""
    x = torch.randn(3, 4)

    def prepare():
        return lambda: x * 2

    plans.set_replay(False)
    plans.run(("double",), prepare, [x])
    assert not plans._PLANS
    plans.set_replay(True)
    plans.run(("double",), prepare, [x])
    assert len(plans._PLANS) == 1
    set_autotune(True)
    assert not plans._PLANS
    set_autotune(False)


def test_wrapped_inputs_bypass_the_store():
    """Inside ``torch.func`` transforms, products run eagerly and store nothing."""
    x = torch.randn(3, 4)

    def double(row: Tensor) -> Tensor:
        return plans.run(("double",), lambda: lambda: row * 2, [row])

    assert_allclose_report(vmap(double)(x), 2 * x)
    assert not plans._PLANS


def test_the_same_tensor_twice():
    """One tensor as two inputs is not recorded, but replays a record of two."""

    def product(a: Tensor, b: Tensor) -> Tensor:
        return plans.run(("product",), lambda: lambda: a * b.flip(0), [a, b])

    x, y = torch.randn(3), torch.randn(3)
    assert_allclose_report(product(x, x), x * x.flip(0))
    assert not plans._PLANS
    assert_allclose_report(product(x, y), x * y.flip(0))
    assert len(plans._PLANS) == 1
    assert_allclose_report(product(y, y), y * y.flip(0))
