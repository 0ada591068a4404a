"""Curvature-matrix products (GGNMP, HMP, PCHMP) for every TN layer.

Stock BackPACK has them for Linear and Conv2d only. Their parameter methods are
written against the derivatives' products alone, so with TN derivatives the same
methods serve Conv1d/3d and ConvTranspose1d/2d/3d.
"""

from __future__ import annotations

from backpack.extensions.curvmatprod.ggnmp.conv2d import GGNMPConv2d
from backpack.extensions.curvmatprod.hmp.conv2d import HMPConv2d
from backpack.extensions.curvmatprod.pchmp.conv2d import PCHMPConv2d
from backpack.extensions.module_extension import ModuleExtension

from backpack_tn.derivatives.base import TNDerivativesMixin


def _with_derivatives(
    module_extension: ModuleExtension, derivatives: TNDerivativesMixin
) -> ModuleExtension:
    module_extension.derivatives = derivatives
    return module_extension


def ggnmp(derivatives: TNDerivativesMixin) -> ModuleExtension:
    """Module extension of GGNMP.

    Args:
        derivatives: TN derivatives of the layer.

    Returns:
        The module extension.
    """
    return _with_derivatives(GGNMPConv2d(), derivatives)


def hmp(derivatives: TNDerivativesMixin) -> ModuleExtension:
    """Module extension of HMP.

    Args:
        derivatives: TN derivatives of the layer.

    Returns:
        The module extension.
    """
    return _with_derivatives(HMPConv2d(), derivatives)


def pchmp(derivatives: TNDerivativesMixin) -> ModuleExtension:
    """Module extension of PCHMP.

    Args:
        derivatives: TN derivatives of the layer.

    Returns:
        The module extension.
    """
    return _with_derivatives(PCHMPConv2d(), derivatives)
