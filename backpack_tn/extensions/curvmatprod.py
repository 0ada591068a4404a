"""Curvature-matrix products (GGNMP, HMP, PCHMP) for every TN layer.

Stock BackPACK has them for Linear and Conv2d only. Their Conv2d module extensions
are written against the derivatives' products alone, so with TN derivatives the
same code serves Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d.
"""

from __future__ import annotations

from collections.abc import Callable

from backpack.extensions.curvmatprod.ggnmp.conv2d import GGNMPConv2d
from backpack.extensions.curvmatprod.hmp.conv2d import HMPConv2d
from backpack.extensions.curvmatprod.pchmp.conv2d import PCHMPConv2d
from backpack.extensions.module_extension import ModuleExtension

from backpack_tn.derivatives.base import TNDerivativesMixin


def on_tn_derivatives(
    stock_cls: type[ModuleExtension],
) -> Callable[[TNDerivativesMixin], ModuleExtension]:
    """Factory of a stock module extension that runs on TN derivatives.

    Args:
        stock_cls: Stock module extension whose methods only call its derivatives.

    Returns:
        A function mapping TN derivatives to the module extension.
    """

    def factory(derivatives: TNDerivativesMixin) -> ModuleExtension:
        module_extension = stock_cls()
        module_extension.derivatives = derivatives
        return module_extension

    return factory


ggnmp = on_tn_derivatives(GGNMPConv2d)
hmp = on_tn_derivatives(HMPConv2d)
pchmp = on_tn_derivatives(PCHMPConv2d)
