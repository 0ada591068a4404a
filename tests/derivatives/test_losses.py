"""The ``C - 1``-vector cross-entropy Hessian square root gives the exact Hessian."""

import math
from typing import Any

import torch
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from pytest import mark
from torch import nn

import backpack_tn.extensions as tn
from backpack_tn.derivatives.losses import (
    CrossEntropyLossDerivativesTN,
    cross_entropy_sqrt_hessian,
)
from test_problems.compare import assert_allclose_report

#: Logits ``[N, C]``: random, and with one class near probability one (first and
#: last, the column the factor drops), in float64.
LOGIT_CASES = {
    "two-classes": lambda: torch.randn(6, 2, dtype=torch.float64),
    "ten-classes": lambda: 3 * torch.randn(6, 10, dtype=torch.float64),
    "last-certain": lambda: torch.tensor([[-30.0, 0.0, 40.0]], dtype=torch.float64),
    "first-certain": lambda: torch.tensor([[40.0, 0.0, -30.0]], dtype=torch.float64),
}


@mark.parametrize("logits", LOGIT_CASES.values(), ids=LOGIT_CASES.keys())
def test_sqrt_hessian_is_exact(logits):
    """``Σ_j L_j L_jᵀ = diag(p) - p pᵀ`` with ``C - 1`` vectors.

    Args:
        logits: Function returning logits of shape ``[N, C]``.
    """
    torch.manual_seed(0)
    probs = logits().softmax(1)
    root = cross_entropy_sqrt_hessian(probs)
    samples, classes = probs.shape
    assert root.shape == (classes - 1, samples, classes)
    hessian = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    assert_allclose_report(torch.einsum("jnc,jnd->ncd", root, root), hessian)


#: Cross-entropy inputs ``[N, C, *D]``, reduction and sub-sampling.
LOSS_CASES = [
    {"shape": (4, 10), "reduction": "mean", "subsampling": None},
    {"shape": (4, 10), "reduction": "sum", "subsampling": [0, 2]},
    {"shape": (3, 5, 3, 2), "reduction": "mean", "subsampling": None},
    {"shape": (3, 4, 2), "reduction": "sum", "subsampling": [1]},
    {"shape": (5, 1), "reduction": "mean", "subsampling": None},
]
LOSS_IDS = [
    f"in={'x'.join(map(str, c['shape']))}-{c['reduction']}-sub={c['subsampling']}"
    for c in LOSS_CASES
]


@mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_sqrt_hessian_matches_stock(case: dict[str, Any]):
    """Both square roots give the same Hessian; ours has ``(C - 1) prod(D)`` vectors.

    Args:
        case: Input shape, reduction and sub-sampling.
    """
    torch.manual_seed(0)
    shape = case["shape"]
    module = nn.CrossEntropyLoss(reduction=case["reduction"])
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    module.input0, module.input1, module.output = x, y, module(x, y)
    args = (module, None, None, case["subsampling"])
    expected = CrossEntropyLossDerivatives().sqrt_hessian(*args)
    result = CrossEntropyLossDerivativesTN().sqrt_hessian(*args)
    vectors = max(shape[1] - 1, 1) * math.prod(shape[2:])
    assert result.shape == (vectors, *expected.shape[1:])

    def hessian(root):
        flat = root.flatten(2)
        return torch.einsum("vna,vnb->nab", flat, flat)

    assert_allclose_report(hessian(result), hessian(expected))


#: Extensions that get the ``C - 1``-vector square root, and one that keeps stock's.
LOSS_EXTENSIONS = {
    tn.DiagGGNExact: True,
    tn.BatchDiagGGNExact: True,
    tn.KFLR: True,
    tn.SqrtGGNExact: False,
    tn.DiagGGNMC: False,
}


@mark.parametrize("extension", LOSS_EXTENSIONS, ids=lambda e: e.__name__)
def test_exact_ggn_extensions_use_reduced_root(extension: type):
    """Exact GGN extensions install the reduced root; ``SqrtGGNExact`` does not.

    Args:
        extension: A backpack_tn extension class.
    """
    module_extensions = extension()._BackpropExtension__module_extensions
    derivatives = module_extensions[nn.CrossEntropyLoss].derivatives
    reduced = isinstance(derivatives, CrossEntropyLossDerivativesTN)
    assert reduced == LOSS_EXTENSIONS[extension]
