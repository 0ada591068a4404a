"""Loss derivatives whose Hessian square roots have as few vectors as its rank.

The softmax cross-entropy Hessian of one sample, ``H = diag(p) - p pᵀ``, has rank
``C - 1``: ``√p`` spans its null space. BackPACK factorises it as ``H = S Sᵀ``
with ``C`` vectors, ``S = diag(√p) - p √pᵀ``, and every exact GGN extension
(``DiagGGNExact``, ``BatchDiagGGNExact``, ``KFLR``) backpropagates all ``C`` of
them through the network. ``C - 1`` vectors give the same ``H`` and every quantity
built from ``S Sᵀ``, at ``(C - 1) / C`` of the backpropagation's cost: 0.9x for
ten classes, 0.5x for two.
"""

from __future__ import annotations

from math import sqrt

from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from torch import Tensor, eye


def cross_entropy_sqrt_hessian(probs: Tensor) -> Tensor:
    """A ``C - 1``-vector square root of the softmax cross-entropy Hessian.

    With ``τ = √p`` and the Householder reflection ``Q`` that maps the last unit
    vector to ``-τ``, ``L = S Q`` without its last column (``S τ = 0``, so that
    column vanishes) is ``L[j, c] = τ_c δ_jc - τ_j b_c`` for ``j < C - 1``, with
    ``b_c = p_c / (1 + τ_{C-1})`` for ``c < C - 1`` and ``b_{C-1} = τ_{C-1}``. It
    is exact for any ``p``: ``1 + τ_{C-1} ≥ 1``.

    Args:
        probs: Softmax probabilities of shape ``[N, C]`` with ``C ≥ 2``.

    Returns:
        ``L`` of shape ``[C - 1, N, C]`` with ``Σ_j L[j, n] L[j, n]ᵀ = diag(p_n) -
        p_n p_nᵀ``.
    """
    tau = probs.sqrt()
    last = tau[:, -1:]
    b = probs / (1 + last)
    b[:, -1:] = last
    classes = probs.shape[1]
    identity = eye(classes - 1, classes, dtype=probs.dtype, device=probs.device)
    # [C - 1, N, C]
    return identity.unsqueeze(1) * tau - tau[:, :-1].T.unsqueeze(2) * b


class CrossEntropyLossDerivativesTN(CrossEntropyLossDerivatives):
    """Stock cross-entropy derivatives with a ``C - 1``-vector Hessian square root.

    Everything but ``sqrt_hessian`` is stock BackPACK's. With additional axes
    (inputs ``[N, C, *D]``), the square root has ``(C - 1) * prod(D)`` vectors,
    laid out as stock BackPACK lays out its ``C * prod(D)``. With one class the
    Hessian is zero and stock BackPACK's single vector is kept.
    """

    def _sqrt_hessian(self, module, g_inp, g_out, subsampling=None) -> Tensor:
        if module.input0.shape[1] < 2:
            return super()._sqrt_hessian(module, g_inp, g_out, subsampling)
        self._check_2nd_order_parameters(module)
        probs = self._get_probs(module, subsampling=subsampling)
        probs, *rearrange_info = self._merge_batch_and_additional(probs)
        root = cross_entropy_sqrt_hessian(probs)
        if module.reduction == "mean":
            root = root / sqrt(self._get_mean_normalization(module.input0))
        root = self._ungroup_batch_and_additional(root, *rearrange_info)
        return self._expand_sqrt_h(root)
