"""Module extensions of the first-order BackPACK extensions, on TN derivatives.

BatchGrad and the gradient already call the derivatives' products; BatchL2Grad,
SumGradSquared and Variance in stock BackPACK unfold the input of convolutions
instead. Here they call the TN derivatives' squared quantities, which never form
an unfolded input and are correct for grouped convolutions.
"""

from __future__ import annotations

from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from backpack.extensions.firstorder.batch_l2_grad.batch_l2_base import BatchL2Base
from backpack.extensions.firstorder.gradient.base import GradBaseModule
from backpack.extensions.firstorder.sum_grad_squared.sgs_base import SGSBase
from backpack.extensions.firstorder.variance.variance_base import VarianceBaseModule
from torch import Tensor

from backpack_tn.derivatives.base import TNDerivativesMixin

PARAMS = ["bias", "weight"]


def _bias_per_sample(derivatives, module, g_out) -> Tensor:
    """Per-sample bias gradients.

    Returns:
        Tensor of shape ``[N, C_out]``.
    """
    return derivatives.param_mjp(
        "bias", module, None, g_out, g_out[0].unsqueeze(0), sum_batch=False
    )[0]


class BatchL2GradTN(BatchL2Base):
    """Per-sample squared gradient norms without forming per-sample gradients."""

    def __init__(self, derivatives: TNDerivativesMixin):
        """Store the derivatives.

        Args:
            derivatives: TN derivatives of the layer.
        """
        super().__init__(PARAMS, derivatives=derivatives)

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Squared norms of the per-sample weight gradients.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Gradient w.r.t. the output, ``g_out[0]`` of shape ``[N, *out]``.
            backproped: Unused.

        Returns:
            Tensor of shape ``[N]``.
        """
        return self.derivatives.weight_batch_l2(module, g_out[0])

    def bias(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Squared norms of the per-sample bias gradients.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Gradient w.r.t. the output.
            backproped: Unused.

        Returns:
            Tensor of shape ``[N]``.
        """
        return _bias_per_sample(self.derivatives, module, g_out).square().sum(1)


class SumGradSquaredTN(SGSBase):
    """Sum of squared per-sample gradients, as a GGN diagonal with ``V = 1``."""

    def __init__(self, derivatives: TNDerivativesMixin):
        """Store the derivatives.

        Args:
            derivatives: TN derivatives of the layer.
        """
        super().__init__(derivatives, PARAMS)

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Sum of squared per-sample weight gradients.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Gradient w.r.t. the output, ``g_out[0]`` of shape ``[N, *out]``.
            backproped: Unused.

        Returns:
            Tensor of the weight's shape.
        """
        return self.derivatives.weight_diag_ggn(module, g_out[0].unsqueeze(0))

    def bias(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        """Sum of squared per-sample bias gradients.

        Args:
            ext: The extension.
            module: The layer.
            g_inp: Unused.
            g_out: Gradient w.r.t. the output.
            backproped: Unused.

        Returns:
            Tensor of shape ``[C_out]``.
        """
        return _bias_per_sample(self.derivatives, module, g_out).square().sum(0)


def batch_grad(derivatives: TNDerivativesMixin) -> BatchGradBase:
    """Module extension of BatchGrad.

    Args:
        derivatives: TN derivatives of the layer.

    Returns:
        The module extension.
    """
    return BatchGradBase(derivatives, PARAMS)


def variance(derivatives: TNDerivativesMixin) -> VarianceBaseModule:
    """Module extension of Variance.

    Args:
        derivatives: TN derivatives of the layer.

    Returns:
        The module extension.
    """
    return VarianceBaseModule(
        PARAMS, GradBaseModule(derivatives, PARAMS), SumGradSquaredTN(derivatives)
    )
