"""Module extensions of the diagonal and square-root curvature extensions.

Stock BackPACK unfolds the input of convolutions to extract GGN and Hessian
diagonals; here they come from the TN derivatives' ``weight_diag_ggn``. Backward
propagation and the square-root extensions already call the derivatives.
"""

from __future__ import annotations

from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor

from backpack_tn.derivatives.base import TNDerivativesMixin
from backpack_tn.extensions.first_order import PARAMS


def _bias_diagonal(derivatives, module, sqrt: Tensor, sum_batch: bool) -> Tensor:
    """``Σ_v (J_b^T sqrt)²``, summed over the batch if ``sum_batch``.

    Returns:
        Tensor of shape ``[(N,) C_out]``.
    """
    vjp = derivatives.param_mjp("bias", module, None, None, sqrt, sum_batch=False)
    squared = vjp.square().sum(0)
    return squared.sum(0) if sum_batch else squared


class DiagGGNTN(DiagGGNBaseModule):
    """GGN diagonal (exact or MC; summed or per sample) from TN derivatives."""

    def __init__(self, derivatives: TNDerivativesMixin, sum_batch: bool):
        """Store the derivatives.

        Args:
            derivatives: TN derivatives of the layer.
            sum_batch: Sum over the batch (``DiagGGN*``) or not (``BatchDiagGGN*``).
        """
        super().__init__(derivatives, PARAMS, sum_batch=sum_batch)
        self.sum_batch = sum_batch

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Weight GGN diagonal.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            backproped: Square root of the output GGN, ``[V, N, *out]``.

        Returns:
            Tensor of shape ``[(N,) *weight.shape]``.
        """
        return self.derivatives.weight_diag_ggn(module, backproped, self.sum_batch)

    def bias(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Bias GGN diagonal.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            backproped: Square root of the output GGN, ``[V, N, *out]``.

        Returns:
            Tensor of shape ``[(N,) C_out]``.
        """
        return _bias_diagonal(self.derivatives, module, backproped, self.sum_batch)


class DiagHessianTN(DiagHBaseModule):
    """Hessian diagonal (summed or per sample) from TN derivatives."""

    def __init__(self, derivatives: TNDerivativesMixin, sum_batch: bool):
        """Store the derivatives.

        Args:
            derivatives: TN derivatives of the layer.
            sum_batch: Sum over the batch (``DiagHessian``) or not.
        """
        super().__init__(derivatives, PARAMS)
        self.sum_batch = sum_batch

    def _signed_sum(self, backproped, diagonal) -> Tensor:
        result = None
        for sqrt, sign in zip(
            backproped["matrices"], backproped["signs"], strict=False
        ):
            term = diagonal(sqrt) * sign
            result = term if result is None else result + term
        return result

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Weight Hessian diagonal from signed square roots.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            backproped: ``{'matrices': [[V, N, *out], ...], 'signs': [±1, ...]}``.

        Returns:
            Tensor of shape ``[(N,) *weight.shape]``.
        """
        return self._signed_sum(
            backproped,
            lambda s: self.derivatives.weight_diag_ggn(module, s, self.sum_batch),
        )

    def bias(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Bias Hessian diagonal from signed square roots.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            backproped: ``{'matrices': [[V, N, *out], ...], 'signs': [±1, ...]}``.

        Returns:
            Tensor of shape ``[(N,) C_out]``.
        """
        return self._signed_sum(
            backproped,
            lambda s: _bias_diagonal(self.derivatives, module, s, self.sum_batch),
        )


def sqrt_ggn(derivatives: TNDerivativesMixin) -> SqrtGGNBaseModule:
    """Module extension of SqrtGGNExact / SqrtGGNMC.

    Args:
        derivatives: TN derivatives of the layer.

    Returns:
        The module extension.
    """
    return SqrtGGNBaseModule(derivatives, PARAMS)
