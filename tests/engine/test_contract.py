"""Tests for ``backpack_tn.engine.contract``."""

import pytest
import torch

from backpack_tn.engine import contract, tape
from test_problems.compare import assert_allclose_report


def test_equation_from_legs():
    """Named legs become letters in order of appearance."""
    assert contract.equation_from_legs([("n", "c_in"), ("c_in",)], ("n",)) == "ab,b->a"


def test_contract_presums_lonely_legs_and_keeps_diagonals():
    """Legs of one operand are summed early, repeated legs stay diagonals.

    Scalars multiply the result.
    """
    torch.manual_seed(0)
    m, v, w = torch.randn(3, 3), torch.randn(4), torch.randn(4, 5)
    scale = torch.tensor(0.5)
    actual = contract.contract(
        [("a", "a"), ("b",), ("b", "c"), ()], ("c",), [m, v, w, scale]
    )
    expected = 0.5 * torch.trace(m) * (v @ w)
    assert_allclose_report(actual, expected, rtol=1e-6, atol=1e-7)
    actual = contract.contract([("a", "b"), ("b",)], ("b",), [w.T, v])
    assert_allclose_report(actual, w.sum(1) * v, rtol=1e-6, atol=1e-7)


def _strided_patches(x: torch.Tensor) -> torch.Tensor:
    """Non-overlapping 2x2 patches of ``x [N, C, H, W]`` as a zero-copy view.

    Returns:
        View of shape ``[N, C, H/2, W/2, 2, 2]`` (legs ``n c o0 o1 k0 k1``).
    """
    return x.unfold(2, 2, 2).unfold(3, 2, 2)


#: Gram-type steps: the operand (built from a tensor of shape ``[2, 3, 8, 8]``),
#: its legs, the second legs and the output.
#: The operand is contracted with itself; legs that differ are free.
SELF_PRODUCT_CASES = [
    {  # contiguous operand: a view serves as GEMM matrices
        "operand": lambda x: x,
        "legs": ("n", "c", "h", "w"),
        "second": ("n", "c", "h_", "w_"),
        "output": ("n", "h", "w", "h_", "w_"),
        "id": "contiguous",
    },
    {  # strided patches, kernel and channel legs summed: copied once, free legs last
        "operand": _strided_patches,
        "legs": ("n", "c", "o0", "o1", "k0", "k1"),
        "second": ("n", "c", "o0_", "o1_", "k0", "k1"),
        "output": ("n", "o1_", "o0", "o1", "o0_"),
        "id": "patches",
    },
    {  # strided patches, positions summed, kernel legs free: summed legs last
        "operand": _strided_patches,
        "legs": ("n", "c", "o0", "o1", "k0", "k1"),
        "second": ("n", "c", "o0", "o1", "k0_", "k1_"),
        "output": ("k1_", "k0", "k1", "k0_", "n"),
        "id": "patches-kernel-free",
    },
]
SELF_PRODUCT_IDS = [case["id"] for case in SELF_PRODUCT_CASES]


@pytest.mark.parametrize("case", SELF_PRODUCT_CASES, ids=SELF_PRODUCT_IDS)
def test_self_product_matches_einsum(case):
    """A tensor contracted with itself (Gram form) matches ``torch.einsum``."""
    torch.manual_seed(0)
    operand = case["operand"](torch.randn(2, 3, 8, 8, dtype=torch.float64))
    legs, second, output = case["legs"], case["second"], case["output"]
    equation = contract.equation_from_legs([legs, second], output)
    assert contract._pairwise(equation).gram
    for other in (operand, operand.clone()):  # one view twice, and two tensors
        actual = contract.contract([legs, second], output, [operand, other])
        expected = torch.einsum(equation, operand, other)
        assert_allclose_report(actual, expected)


#: Pairwise steps and how they run: ``"gram"`` (Gram product's leg pattern),
#: ``"gemm"`` (batched GEMM), ``"product"`` (no summed leg) or ``None``
#: (``torch.einsum``).
STEP_ROLE_CASES = [
    ("ab,ab->", "gram"),
    ("ab,ac->bc", "gram"),
    ("ab,ba->ab", "product"),
    ("ab,ab->ab", "product"),  # same letters, but nothing summed: no Gram product
    ("abcd,bce->abcde", "product"),
    ("ab,ac->b", None),  # c is summed in one operand only
    ("aab,ac->bc", None),  # diagonal
    ("abc,abd->ad", None),
    ("ab,abc->ac", "gemm"),
    ("abc,bde->acde", "gemm"),
]


def _step_kind(roles: contract._Pairwise | None) -> str | None:
    if roles is None:
        return None
    if not roles.contracted:
        return "product"
    return "gram" if roles.gram else "gemm"


@pytest.mark.parametrize("equation, kind", STEP_ROLE_CASES, ids=str)
def test_step_roles(equation, kind):
    """Steps are GEMMs, Gram products, products, or left to ``torch.einsum``."""
    assert _step_kind(contract._pairwise(equation)) == kind


#: Small steps of batched dot products: (equation, shapes of both operands).
DOT_STEP_CASES = [
    ("abcd,abcd->bcd", [(10, 3, 1, 4), (10, 3, 1, 4)]),
    ("ab,ba->", [(3, 4), (4, 3)]),
    ("nab,nba->bn", [(2, 3, 4), (2, 4, 3)]),
    ("abc,cab->b", [(2, 3, 4), (4, 2, 3)]),
]


@pytest.mark.parametrize(
    "equation, shapes", DOT_STEP_CASES, ids=[c[0] for c in DOT_STEP_CASES]
)
def test_dot_step_matches_einsum(equation, shapes, monkeypatch):
    """Operands with the same letters run as a product and a sum, not a GEMM."""
    torch.manual_seed(0)
    a, b = (torch.randn(shape, dtype=torch.float64) for shape in shapes)
    inputs, output = equation.split("->")
    legs = [tuple(letters) for letters in inputs.split(",")]
    assert contract._pairwise(equation).dot
    monkeypatch.setattr(contract, "SMALL_STEP", 1 << 16)
    for other in ("einsum", "_bmm_step", "_gram_step"):  # the step must not reach them
        monkeypatch.setattr(contract, other, None)
    actual = contract.contract(legs, tuple(output), [a, b])
    assert_allclose_report(actual, torch.einsum(equation, a, b), name=equation)
    assert not contract._pairwise("ab,ac->bc").dot
    assert not contract._pairwise("ab,ab->ab").dot


#: Steps without summed legs: (equation, shapes); the second operand is also
#: passed transposed in memory.
PRODUCT_STEP_CASES = [
    ("abcd,bce->abcde", [(2, 3, 1, 4), (3, 1, 5)]),
    ("ab,ba->ab", [(3, 4), (4, 3)]),
    ("nab,nb->bna", [(2, 3, 4), (2, 4)]),
    ("ab,cd->dacb", [(2, 3), (4, 5)]),
    ("nid,nod->noi", [(2, 3, 1), (2, 4, 1)]),  # the summed leg has size 1
    ("abcd,eabfd->eabfc", [(2, 1, 6, 1), (1, 2, 1, 5, 1)]),
]


@pytest.mark.parametrize(
    "equation, shapes", PRODUCT_STEP_CASES, ids=[c[0] for c in PRODUCT_STEP_CASES]
)
def test_product_step_matches_einsum(equation, shapes, monkeypatch):
    """Steps that sum nothing are products and match ``torch.einsum``."""
    for other in ("einsum", "_bmm_step", "_gram_step", "_dot_step"):
        monkeypatch.setattr(contract, other, None)  # the step must not reach them
    torch.manual_seed(0)
    a, b = (torch.randn(shape, dtype=torch.float64) for shape in shapes)
    inputs, output = equation.split("->")
    legs = [tuple(letters) for letters in inputs.split(",")]
    for second in (b, b.mT.contiguous().mT):
        actual = contract.contract(legs, tuple(output), [a, second])
        assert_allclose_report(actual, torch.einsum(equation, a, second))


def _stored_in_order(shapes, orders) -> list[torch.Tensor]:
    """Random float64 operands of the given shapes, each stored in a permuted order.

    Returns:
        Operand ``j`` of shape ``shapes[j]``, whose memory order is ``orders[j]``.
    """
    torch.manual_seed(0)
    operands = []
    for shape, order in zip(shapes, orders, strict=True):
        stored = torch.randn([shape[d] for d in order], dtype=torch.float64)
        operands.append(stored.permute([order.index(d) for d in range(len(shape))]))
    return operands


#: Pairwise steps on operands in different memory orders: (equation, shapes,
#: permutation applied to each operand's memory order, id).
GEMM_STEP_CASES = [
    ("nab,nbc->nac", [(2, 3, 4), (2, 4, 5)], [(0, 1, 2), (0, 1, 2)], "views"),
    ("nab,nbc->nca", [(2, 3, 4), (2, 4, 5)], [(2, 0, 1), (1, 2, 0)], "permuted"),
    ("vsa,sb->vab", [(3, 6, 5), (6, 4)], [(0, 1, 2), (1, 0)], "unmerged-free"),
    ("sb,vsa->bva", [(6, 4), (3, 6, 5)], [(0, 1), (0, 1, 2)], "unmerged-free-second"),
    (
        "nkxo,nxkp->opn",
        [(2, 2, 5, 3), (2, 5, 2, 4)],
        [(3, 0, 2, 1), (0, 2, 1, 3)],
        "mixed",
    ),
]


@pytest.mark.parametrize(
    "equation, shapes, orders",
    [c[:3] for c in GEMM_STEP_CASES],
    ids=[c[3] for c in GEMM_STEP_CASES],
)
def test_gemm_step_matches_einsum(equation, shapes, orders):
    """Batched-GEMM steps match ``torch.einsum`` whatever the operands' layouts."""
    operands = _stored_in_order(shapes, orders)
    inputs, output = equation.split("->")
    legs = [tuple(letters) for letters in inputs.split(",")]
    actual = contract.contract(legs, tuple(output), operands)
    assert_allclose_report(actual, torch.einsum(equation, *operands))


#: Batched steps in which one operand has no GEMM view and is larger than the
#: result: (equation, shapes, permutation of each operand's memory order, whether
#: the step runs slice by slice, id). Slicing needs GEMMs of at least
#: ``MIN_SLICE_ROWS`` rows.
SLICED_STEP_CASES = [
    (
        "vnso,nsi->vnoi",
        [(2, 2, 600, 256), (2, 600, 3)],
        [(0, 1, 2, 3), (0, 1, 2)],
        True,
        "one",
    ),
    (
        "vnmso,mnsi->nmvoi",
        [(2, 2, 3, 300, 256), (3, 2, 300, 2)],
        [(0, 1, 2, 3, 4), (2, 0, 1, 3)],
        True,
        "two-batch-legs",
    ),
    (
        "vnso,nsi->vnoi",
        [(4, 2, 2100, 8), (2, 2100, 3)],
        [(0, 1, 2, 3), (0, 1, 2)],
        False,
        "narrow-rows",
    ),
]


@pytest.mark.parametrize(
    "equation, shapes, orders, sliced",
    [c[:4] for c in SLICED_STEP_CASES],
    ids=[c[4] for c in SLICED_STEP_CASES],
)
def test_sliced_step_matches_einsum(equation, shapes, orders, sliced, monkeypatch):
    """Steps run slice by slice instead of copying a large operand match einsum."""
    operands = _stored_in_order(shapes, orders)
    calls = []
    monkeypatch.setattr(
        contract,
        "_sliced_step",
        lambda *args, run=contract._sliced_step: calls.append(1) or run(*args),
    )
    inputs, output = equation.split("->")
    legs = [tuple(letters) for letters in inputs.split(",")]
    actual = contract.contract(legs, tuple(output), operands)
    assert bool(calls) == sliced
    assert_allclose_report(actual, torch.einsum(equation, *operands))


def test_gemm_steps_under_vmap_and_autograd():
    """GEMM and Gram steps work on batched (``vmap``) and differentiated inputs."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 6, dtype=torch.float64)
    product = torch.vmap(
        lambda t: contract.contract([("a", "b"), ("b", "c")], ("a", "c"), [t, y])
    )
    assert_allclose_report(product(x), torch.einsum("nab,bc->nac", x, y))
    gram = torch.vmap(
        lambda t: contract.contract([("a", "b"), ("a", "c")], ("b", "c"), [t, t])
    )
    expected = torch.einsum("nab,nac->nbc", x, x)
    assert_allclose_report(gram(x), expected)
    (grad,) = torch.autograd.grad(gram(x).sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert_allclose_report(grad, expected_grad)


#: (name, operand builder, batch, free, contracted dims, expected innermost dims of
#: the copy): copies keep contiguous dimensions innermost; without a contiguous run
#: of ``MIN_RUN`` elements, the largest dimension goes innermost.
COPY_ORDER_CASES = [
    (
        "streaming",
        lambda: torch.randn(10, 8, 128, 28, 28),
        [1],
        [0, 2],
        [3, 4],
        "contracted",
    ),
    (
        "short_inner_run",
        lambda: torch.randn(6, 40, 3).permute(0, 2, 1)[:, :2, :],
        [],
        [1],
        [0, 2],
        "contracted",
    ),
]


@pytest.mark.parametrize(
    "build, batch, free, contracted, inner",
    [case[1:] for case in COPY_ORDER_CASES],
    ids=[case[0] for case in COPY_ORDER_CASES],
)
def test_copied_matrices_order(build, batch, free, contracted, inner):
    """Copies stream along the operand's memory, and hold the right entries."""
    x = build()
    mat, free_order = contract._copied_matrices(x, batch, free, contracted)
    expected = x.permute(batch + free_order + contracted).reshape(mat.shape)
    assert_allclose_report(mat, expected)
    contracted_inner = mat.stride(2) == 1
    assert contracted_inner == (inner == "contracted")


def test_small_steps_take_einsum_outside_records_only(monkeypatch):
    """Eager small steps use ``torch.einsum``; records keep plain GEMM calls."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 5, 2).double()
    legs, output = [("n", "i", "j"), ("n", "j", "k")], ("n", "k", "i")
    monkeypatch.setattr(contract, "SMALL_STEP", 1 << 16)
    calls = []
    real = contract.einsum
    monkeypatch.setattr(
        contract, "einsum", lambda *args: calls.append(args[0]) or real(*args)
    )
    expected = torch.einsum("nij,njk->nki", a, b)
    assert_allclose_report(contract.contract(legs, output, [a, b]), expected)
    assert calls, "an eager small step should run through torch.einsum"
    calls.clear()
    _, replay, refusal = tape.capture(
        lambda: contract.contract(legs, output, [a, b]), [a, b]
    )
    assert refusal is None and not calls
    c, d = torch.randn_like(a), torch.randn_like(b)
    assert_allclose_report(replay(c, d), torch.einsum("nij,njk->nki", c, d))


#: (free sizes ``a`` of ``x[v, s, a]``, whether its ``v`` may batch the GEMMs)
OUTER_FREE_CASES = [(32, True), (7, False)]


@pytest.mark.parametrize("inner, batched", OUTER_FREE_CASES)
def test_outer_free_batches_only_wide_gemms(inner: int, batched: bool):
    """``x[v, s, a] y[s, b]`` batches over ``v`` only if ``a`` is not narrow.

    Args:
        inner: Size of ``a``.
        batched: Whether ``v`` should become the GEMMs' batch.
    """
    torch.manual_seed(0)
    x = torch.randn(inner, 8, 40).permute(1, 2, 0)  # [v, s, a], no GEMM view
    y = torch.randn(40, 24)
    step = contract._pairwise("vsa,sb->vab")
    sides = [
        contract._Side(x, "vsa", [], [0, 2], [1]),
        contract._Side(y, "sb", [], [1], [0]),
    ]
    for side in sides:
        side.mat = contract._matrices(side.x, side.batch, side.free, side.summed)
    assert sides[0].mat is None
    contract._batch_outer_free(sides, 1)
    assert (sides[0].mat is not None) == batched
    assert sides[0].outer == ([0] if batched else [])
    result = contract._bmm_step(x, y, step)
    expected = torch.einsum("vsa,sb->vab", x, y)
    assert_allclose_report(result, expected, rtol=1e-5, atol=1e-5)


#: (columns ``b`` of ``y[n, s, b]`` against ``x[v, n, a, s]``, whether ``y`` is
#: repeated over ``v`` instead of copying ``x`` sample-major)
REPEAT_CASES = [(9, True), (64, False)]


@pytest.mark.parametrize("columns, repeated", REPEAT_CASES)
def test_outer_free_joins_the_batch_where_repeating_copies_less(
    columns: int, repeated: bool
):
    """``x[v, n, a, s] y[n, s, b]`` batches over ``(v, n)`` if ``V * |y| < |x|``.

    Args:
        columns: Size of ``b``.
        repeated: Whether ``v`` should join the GEMMs' batch.
    """
    torch.manual_seed(0)
    vectors, samples, rows, summed = 10, 3, 32, 50
    x = torch.randn(vectors, samples, rows, summed)
    y = torch.randn(samples, summed, columns)
    step = contract._pairwise("vnas,nsb->vnab")
    sides = [
        contract._Side(x, "vnas", [1], [0, 2], [3]),
        contract._Side(y, "nsb", [0], [2], [1]),
    ]
    for side in sides:
        side.mat = contract._matrices(side.x, side.batch, side.free, side.summed)
    assert sides[0].mat is None and sides[1].mat is not None
    contract._batch_outer_free(sides, samples)
    assert sides[0].outer == ([0] if repeated else [])
    result = contract._bmm_step(x, y, step)
    expected = torch.einsum("vnas,nsb->vnab", x, y)
    assert_allclose_report(result, expected, rtol=1e-5, atol=1e-5)
    # ``y`` stored column-major, as the second operand
    y_columns = y.transpose(1, 2).contiguous().transpose(1, 2)
    swapped = contract._bmm_step(y_columns, x, contract._pairwise("nsb,vnas->vnab"))
    assert_allclose_report(swapped, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [contract.SMALL_COPY_RATIO, 0], ids=["on", "off"])
def test_small_copies_follow_the_result_order(ratio: int, monkeypatch):
    """A small operand without a GEMM view is copied in the result's leg order.

    ``b[p, i, k]`` is stored ``k``-major, so its free legs ``(i, k)`` do not merge;
    copied in the result's order, the product ``[v, o, i, k]`` needs no permutation.

    Args:
        ratio: ``SMALL_COPY_RATIO`` (0: the copy follows ``b``'s memory order).
        monkeypatch: Pytest's monkeypatch fixture.
    """
    monkeypatch.setattr(contract, "SMALL_COPY_RATIO", ratio)
    torch.manual_seed(0)
    a = torch.randn(4, 64, 6, dtype=torch.float64)
    b = torch.randn(3, 6, 5, dtype=torch.float64).permute(1, 2, 0)
    assert contract._matrices(b, [], [1, 2], [0]) is None
    result = contract._bmm_step(a, b, contract._pairwise("vop,pik->voik"))
    assert_allclose_report(result, torch.einsum("vop,pik->voik", a, b))
    assert result.is_contiguous() == bool(ratio)
