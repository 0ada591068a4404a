"""BackPACK's extensions, with Linear/Conv/ConvTranspose computed by tensor networks.

Every class here subclasses the stock extension of the same name, takes the same
arguments plus ``strategy`` (see :data:`backpack_tn.derivatives.STRATEGIES`), and
writes the same attributes. KFAC, KFLR and KFRA also take ``kfac_approx``
(``'expand'`` or ``'reduce'``); their conventions are documented in
:mod:`backpack_tn.extensions.hbp`.
"""

from __future__ import annotations

from inspect import cleandoc

from backpack import extensions as _stock

from backpack_tn.derivatives.base import KFAC_APPROXIMATIONS

__all__ = [
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "BatchDiagHessian",
    "BatchGrad",
    "BatchL2Grad",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "GGNMP",
    "HMP",
    "KFAC",
    "KFLR",
    "KFRA",
    "PCHMP",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "SumGradSquared",
    "Variance",
]


def _tn_extension(stock_cls: type, kfac: bool = False) -> type:
    """Subclass a stock extension so that it installs TN module extensions.

    Returns:
        The subclass.
    """

    def __init__(self, *args, strategy: str = "auto", **kwargs):  # noqa: N807
        if kfac:
            approx = kwargs.pop("kfac_approx", "expand")
            if approx not in KFAC_APPROXIMATIONS:
                raise ValueError(
                    f"{stock_cls.__name__} got unknown kfac_approx {approx!r}."
                    f" Supported: {KFAC_APPROXIMATIONS}."
                )
            self.kfac_approx = approx
        stock_cls.__init__(self, *args, **kwargs)
        from backpack_tn.register import use_tn

        use_tn(self, strategy=strategy)

    extra = (
        " ``kfac_approx`` chooses KFAC-expand or KFAC-reduce for the input factor."
        if kfac
        else ""
    )
    return type(
        stock_cls.__name__,
        (stock_cls,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": (
                f"Stock BackPACK's ``{stock_cls.__name__}`` with tensor-network"
                f" derivatives for Linear, Conv and ConvTranspose layers.{extra}"
                " Takes the stock class's arguments plus ``strategy``. The stock"
                " class's documentation follows.\n\n"
                + cleandoc(stock_cls.__doc__ or "")
            ),
        },
    )


BatchGrad = _tn_extension(_stock.BatchGrad)
BatchL2Grad = _tn_extension(_stock.BatchL2Grad)
SumGradSquared = _tn_extension(_stock.SumGradSquared)
Variance = _tn_extension(_stock.Variance)
DiagGGNExact = _tn_extension(_stock.DiagGGNExact)
DiagGGNMC = _tn_extension(_stock.DiagGGNMC)
BatchDiagGGNExact = _tn_extension(_stock.BatchDiagGGNExact)
BatchDiagGGNMC = _tn_extension(_stock.BatchDiagGGNMC)
DiagHessian = _tn_extension(_stock.DiagHessian)
BatchDiagHessian = _tn_extension(_stock.BatchDiagHessian)
SqrtGGNExact = _tn_extension(_stock.SqrtGGNExact)
SqrtGGNMC = _tn_extension(_stock.SqrtGGNMC)
KFAC = _tn_extension(_stock.KFAC, kfac=True)
KFLR = _tn_extension(_stock.KFLR, kfac=True)
KFRA = _tn_extension(_stock.KFRA, kfac=True)
GGNMP = _tn_extension(_stock.GGNMP)
HMP = _tn_extension(_stock.HMP)
PCHMP = _tn_extension(_stock.PCHMP)
