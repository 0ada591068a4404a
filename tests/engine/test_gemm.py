"""Tests for ``backpack_tn.engine.gemm``: both libraries compute ``a @ bᵀ``."""

from collections.abc import Iterator

import pytest
import torch
from torch.func import vmap

from backpack_tn.engine import gemm
from test_problems.compare import assert_allclose_report

ONEDNN = pytest.mark.skipif(
    not gemm._onednn_available(), reason="this PyTorch build has no oneDNN GEMM"
)


def _batched(batch, rows, inner, columns, dtype):
    a = torch.randn(batch, rows, inner, dtype=dtype)
    b = torch.randn(batch, columns, inner, dtype=dtype)
    return a, b


#: (name, builder of (a [B, M, K], b [B, N, K])): one matrix, a batch with strided
#: operands, a broadcast right operand, and one with both sides broadcast.
GEMM_CASES = [
    ("single", lambda dtype: _batched(1, 33, 17, 9, dtype)),
    (
        "batch_strided",
        lambda dtype: (
            torch.randn(3, 17, 40, dtype=dtype).transpose(1, 2)[:, :33],
            torch.randn(3, 9, 34, dtype=dtype)[:, :, 1:18],
        ),
    ),
    (
        "broadcast_right",
        lambda dtype: (
            torch.randn(4, 33, 17, dtype=dtype),
            torch.randn(1, 9, 17, dtype=dtype).expand(4, -1, -1),
        ),
    ),
    (
        "broadcast_left_rows",
        lambda dtype: (
            torch.randn(33, 4, 17, dtype=dtype).transpose(0, 1),
            torch.randn(1, 9, 17, dtype=dtype).expand(4, -1, -1),
        ),
    ),
]
GEMM_IDS = [name for name, _ in GEMM_CASES]
TOLS = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {}}


@pytest.fixture
def backend() -> Iterator[None]:
    """Restore the default backend after a test.

    Yields:
        Nothing.
    """
    yield
    gemm.set_gemm_backend("auto")


@ONEDNN
@pytest.mark.parametrize("dtype", TOLS, ids=str)
@pytest.mark.parametrize("build", [b for _, b in GEMM_CASES], ids=GEMM_IDS)
def test_onednn_matches_bmm(build, dtype, backend, monkeypatch):
    """The oneDNN GEMM computes the batched products that ``bmm`` computes.

    A dtype this processor's oneDNN cannot multiply (bfloat16 without AVX-512)
    takes ``bmm`` and gives the same products.
    """
    torch.manual_seed(0)
    a, b = build(dtype)
    expected = torch.bmm(a.float(), b.float().transpose(1, 2)).to(dtype)
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend("onednn")
    assert gemm.gemm_backend() == "onednn"
    assert gemm.uses_onednn(a, b, 1) == gemm._onednn_available(dtype)
    assert_allclose_report(gemm.gemm_nt(a, b), expected, **TOLS[dtype])


@ONEDNN
def test_dtypes_onednn_cannot_multiply_take_bmm(backend, monkeypatch):
    """A dtype whose oneDNN primitive fails to build goes to ``bmm``, once tried."""
    tried = []

    def failing(a, b, bias, *args):
        tried.append(a.dtype)
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(gemm, "_AVAILABLE", {})
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend("onednn")
    assert gemm.gemm_backend() == "onednn"
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", failing)
    a, b = _batched(2, 5, 4, 3, torch.bfloat16)
    expected = torch.bmm(a, b.transpose(1, 2))
    for _ in range(2):
        assert_allclose_report(gemm.gemm_nt(a, b), expected)
    assert tried == [torch.bfloat16]


def test_bmm_where_onednn_cannot_serve(backend, monkeypatch):
    """float64, gradients and ``torch.func`` transforms take ``bmm``."""
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend("onednn")
    a, b = _batched(2, 5, 4, 3, torch.float64)
    assert_allclose_report(gemm.gemm_nt(a, b), torch.bmm(a, b.transpose(1, 2)))
    a, b = _batched(2, 5, 4, 3, torch.float32)
    a.requires_grad_(True)
    gemm.gemm_nt(a, b).sum().backward()
    assert_allclose_report(a.grad, b.sum(1, keepdim=True).expand(-1, 5, -1))
    products = vmap(lambda x, y: gemm.gemm_nt(x[None], y[None])[0])(a.detach(), b)
    assert_allclose_report(products, torch.bmm(a.detach(), b.transpose(1, 2)))


def test_backend_setting(backend):
    """``'bmm'`` is kept, ``'auto'`` resolves by the probe, others are refused.

    The probe leaves the global random state as it found it.
    """
    gemm.set_gemm_backend("bmm")
    assert gemm.gemm_backend() == "bmm"
    gemm.set_gemm_backend("auto")
    state = torch.get_rng_state()
    assert gemm.gemm_backend() in ("bmm", "onednn")
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="Unsupported GEMM backend 'mkl'"):
        gemm.set_gemm_backend("mkl")


@ONEDNN
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_onednn_linear_matches_functional(with_bias, backend, monkeypatch):
    """``linear`` equals ``F.linear`` on inputs with extra dimensions."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    weight = torch.randn(7, 4).T  # a transposed view, as input VJPs pass it
    bias = torch.randn(4) if with_bias else None
    expected = torch.nn.functional.linear(x, weight, bias)
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend("onednn")
    assert_allclose_report(gemm.linear(x, weight, bias), expected, **TOLS[x.dtype])


@ONEDNN
def test_onednn_copies_right_operands_it_cannot_read(backend, monkeypatch):
    """Right operands with a leading dimension above ``K`` are copied first.

    oneDNN's element-wise reorder of such an operand takes seconds; a copy takes
    microseconds. The product is right either way, and fast only with the copy.
    """
    torch.manual_seed(0)
    a = torch.randn(1, 64, 48)
    b = torch.randn(1, 40, 56)[:, :, :48]
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend("onednn")
    expected = torch.bmm(a, b.transpose(1, 2))
    assert_allclose_report(gemm.gemm_nt(a, b), expected, **TOLS[a.dtype])


@ONEDNN
def test_onednn_only_without_copies_below_the_penalty(backend, monkeypatch):
    """Mid-sized GEMMs go to oneDNN only if it needs no copy of an operand."""
    calls = []
    onednn_bmm = gemm._onednn_bmm
    monkeypatch.setattr(
        gemm, "_onednn_bmm", lambda a, b: calls.append(1) or onednn_bmm(a, b)
    )
    gemm.set_gemm_backend("onednn")
    x = torch.randn(1, 64, 48)
    flops = 2 * 48 * 48 * 64
    monkeypatch.setattr(gemm, "MIN_FLOPS", flops)
    transposed = x.transpose(1, 2)  # a Gram operand oneDNN would copy
    for a, b, uses_onednn in [(x, x, True), (transposed, transposed, False)]:
        calls.clear()
        result = gemm.gemm_nt(a, b)
        assert bool(calls) == uses_onednn
        assert_allclose_report(result, torch.bmm(a, b.transpose(1, 2)), **TOLS[x.dtype])


#: (name, builder of (a, b), whether the product runs transposed): narrow products
#: of a transposed left operand run as ``b @ aᵀ``; of a row-major one, or wide
#: ones, as they are.
ORIENTATION_CASES = [
    ("narrow_transposed", lambda: (torch.randn(2, 7, 40).transpose(1, 2), 3), True),
    ("narrow_row_major", lambda: (torch.randn(2, 40, 7), 3), False),
    ("wide_transposed", lambda: (torch.randn(2, 7, 40).transpose(1, 2), 20), False),
    ("narrow_both", lambda: (torch.randn(2, 7, 2).transpose(1, 2), 3), False),
]


@pytest.mark.parametrize(
    "build, swapped",
    [(b, s) for _, b, s in ORIENTATION_CASES],
    ids=[name for name, _, _ in ORIENTATION_CASES],
)
@pytest.mark.parametrize("name", ["bmm", pytest.param("onednn", marks=ONEDNN)])
def test_narrow_products_run_transposed(build, swapped, name, backend, monkeypatch):
    """Few result columns and a transposed left operand: ``(b @ aᵀ)ᵀ``, exactly."""
    torch.manual_seed(0)
    a, columns = build()
    b = torch.randn(a.shape[0], columns, a.shape[2])
    monkeypatch.setattr(gemm, "MIN_FLOPS", 0)
    gemm.set_gemm_backend(name)
    result = gemm.gemm_nt(a, b)
    assert_allclose_report(result, torch.bmm(a, b.transpose(1, 2)), **TOLS[a.dtype])
    assert (result.stride(1) == 1 != result.stride(2)) == swapped
