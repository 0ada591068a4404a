"""The one place that installs TN module extensions into BackPACK extensions.

:data:`REGISTRY` maps each stock BackPACK extension class to the factory of its
module extension for the TN layers. :func:`use_tn` installs them into an
extension instance; for extensions it does not know (user-written ones), it
swaps the derivatives of the module extensions they already have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from backpack import extensions as stock
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.losses import DiagGGNLoss
from backpack.extensions.secondorder.hbp.losses import HBPLoss
from torch.nn import CrossEntropyLoss

from backpack_tn.derivatives import DERIVATIVES
from backpack_tn.derivatives.base import TNDerivativesMixin
from backpack_tn.derivatives.choice import check_strategy
from backpack_tn.derivatives.losses import CrossEntropyLossDerivativesTN
from backpack_tn.extensions import curvmatprod, first_order, hbp, second_order

Factory = Callable[[TNDerivativesMixin], object]

#: Stock extension class -> factory of its TN module extension.
REGISTRY: dict[type, Factory] = {
    stock.BatchGrad: first_order.batch_grad,
    stock.BatchL2Grad: first_order.BatchL2GradTN,
    stock.SumGradSquared: first_order.SumGradSquaredTN,
    stock.Variance: first_order.variance,
    stock.DiagGGNExact: lambda d: second_order.DiagGGNTN(d, sum_batch=True),
    stock.DiagGGNMC: lambda d: second_order.DiagGGNTN(d, sum_batch=True),
    stock.BatchDiagGGNExact: lambda d: second_order.DiagGGNTN(d, sum_batch=False),
    stock.BatchDiagGGNMC: lambda d: second_order.DiagGGNTN(d, sum_batch=False),
    stock.DiagHessian: lambda d: second_order.DiagHessianTN(d, sum_batch=True),
    stock.BatchDiagHessian: lambda d: second_order.DiagHessianTN(d, sum_batch=False),
    stock.SqrtGGNExact: second_order.sqrt_ggn,
    stock.SqrtGGNMC: second_order.sqrt_ggn,
    stock.KFAC: hbp.HBPTN,
    stock.KFLR: hbp.HBPTN,
    stock.KFRA: hbp.HBPTN,
    stock.GGNMP: curvmatprod.ggnmp,
    stock.HMP: curvmatprod.hmp,
    stock.PCHMP: curvmatprod.pchmp,
}

#: Stock extension class -> loss module -> factory of its module extension, for the
#: extensions that backpropagate the exact square root of the loss Hessian: the
#: cross-entropy's has ``C - 1`` vectors instead of ``C`` (see
#: :mod:`backpack_tn.derivatives.losses`). ``SqrtGGNExact`` keeps stock BackPACK's,
#: as the square root is its result.
_DIAG_GGN_LOSSES = {
    CrossEntropyLoss: lambda: DiagGGNLoss(CrossEntropyLossDerivativesTN())
}
LOSS_REGISTRY: dict[type, dict[type, Callable[[], object]]] = {
    stock.DiagGGNExact: _DIAG_GGN_LOSSES,
    stock.BatchDiagGGNExact: _DIAG_GGN_LOSSES,
    stock.KFLR: {CrossEntropyLoss: lambda: HBPLoss(CrossEntropyLossDerivativesTN())},
}

Extension = TypeVar("Extension", bound=BackpropExtension)


def use_tn(extension: Extension, strategy: str = "auto") -> Extension:
    """Compute an extension's Linear/Conv/ConvTranspose quantities by tensor networks.

    Stock module extensions of these layers are replaced by TN ones; user-written
    module extensions keep their code but get TN derivatives. The exact GGN
    extensions (``LOSS_REGISTRY``) backpropagate a cross-entropy Hessian square
    root of ``C - 1`` vectors instead of ``C``. All other layers keep BackPACK's
    module extensions.

    Args:
        extension: A BackPACK extension instance, stock or user-written.
        strategy: Evaluation strategy of the TN derivatives, one of
            :data:`backpack_tn.derivatives.STRATEGIES`.

    Returns:
        The same extension instance, so it can be used inline:
        ``with backpack(use_tn(DiagGGNExact())): ...``.

    Raises:
        TypeError: If ``extension`` is not a BackPACK extension instance.
    """
    if not isinstance(extension, BackpropExtension):
        raise TypeError(
            "use_tn expects a BackPACK extension instance (e.g. DiagGGNExact()),"
            f" got {extension!r} of type {type(extension).__name__}."
        )
    check_strategy(strategy, "use_tn")
    factory = _registered(REGISTRY, extension)
    module_extensions = extension._BackpropExtension__module_extensions
    for layer, derivatives_cls in DERIVATIVES.items():
        derivatives = derivatives_cls(strategy=strategy)
        current = module_extensions.get(layer)
        if factory is not None and (current is None or _is_stock(current)):
            extension.set_module_extension(layer, factory(derivatives), overwrite=True)
        elif current is not None:
            # BatchGrad's base keeps them as ``_derivatives``, all others not
            for attribute in ("derivatives", "_derivatives"):
                if hasattr(current, attribute):
                    setattr(current, attribute, derivatives)
    for loss, make in _registered(LOSS_REGISTRY, extension, {}).items():
        current = module_extensions.get(loss)
        if current is not None and _is_stock(current):
            extension.set_module_extension(loss, make(), overwrite=True)
    extension.tn_strategy = strategy
    return extension


def _registered(registry: dict, extension: BackpropExtension, default=None):
    for cls in type(extension).__mro__:
        if cls in registry:
            return registry[cls]
    return default


def _is_stock(module_extension) -> bool:
    """Whether a module extension is stock BackPACK's or ours (not user-written).

    Returns:
        ``True`` for module extensions defined in backpack or backpack_tn.
    """
    package = type(module_extension).__module__.split(".")[0]
    return package in ("backpack", "backpack_tn")
