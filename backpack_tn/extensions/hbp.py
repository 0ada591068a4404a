"""Kronecker-factored curvature (KFAC, KFLR, KFRA) for every TN layer.

Beyond stock BackPACK: grouped and depthwise convolutions, transposed
convolutions, Linear layers with weight sharing (inputs ``[N, *, C_in]``) and the
KFAC-reduce approximation (Eschenhagen et al., NeurIPS 2023).

Conventions (``R`` = number of output positions sharing the weight, ``u_{n,o}``
the unfolded input at position ``o``, ``s_{v,n,o}`` the backpropagated GGN square
root at position ``o``, ``s̄_{v,n} = Σ_o s_{v,n,o}``):

- output factor (both flavours): ``B = Σ_v Σ_n s̄_{v,n} s̄_{v,n}^T``, the exact GGN
  of the bias. This is stock BackPACK's factor for convolutions; it equals ``R``
  times KFC's ``Γ`` under KFC's assumption of spatially uncorrelated derivatives.
- expand (default): ``A = 1/N Σ_n Σ_o u_{n,o} u_{n,o}^T``, stock BackPACK's factor
  (KFC's ``Ω``). For ``R = 1`` both factors are stock BackPACK's Linear factors.
- reduce: ``A = 1/N Σ_n ū_n ū_n^T`` with ``ū_n = 1/R Σ_o u_{n,o}`` (Eschenhagen et
  al., 2023). Positions are averaged inside the tensor network, so no unfolded
  input is formed.
- KFRA: ``B = Σ_{o,o'} H[(c, o), (c', o')]`` from the backpropagated
  batch-averaged output GGN ``H`` (stock BackPACK's convention), both flavours.

Layout: ``weight`` gets ``[B, A]``, ``bias`` gets ``[B]``. With ``G > 1`` groups,
``B`` has shape ``[G, C_out // G, C_out // G]`` and ``A`` has shape
``[G, C_in // G * prod(K), C_in // G * prod(K)]``: block ``g`` approximates the
GGN of the weight rows of group ``g`` (``weight.reshape(G, C_out // G, -1)[g]``
for convolutions, ``weight.reshape(G, C_in // G, C_out // G, -1)[g].transpose(0, 1)
.flatten(1)`` for transposed convolutions, whose weight is ``[C_in, C_out // G, *K]``)
as ``kron(B[g], A[g])``. With ``G = 1`` the leading group axis is dropped, as in
stock BackPACK.
"""

from __future__ import annotations

from backpack.extensions.secondorder.hbp.hbp_options import (
    BackpropStrategy,
    ExpectationApproximation,
)
from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
from torch import Tensor, einsum

from backpack_tn.derivatives.base import KFAC_APPROXIMATIONS, TNDerivativesMixin
from backpack_tn.expressions.layer_spec import LayerSpec
from backpack_tn.extensions.first_order import PARAMS


def kfac_approximation(ext) -> str:
    """The extension's KFAC flavour (``'expand'`` unless it says otherwise).

    Args:
        ext: A KFAC, KFLR or KFRA extension.

    Returns:
        ``'expand'`` or ``'reduce'``.

    Raises:
        ValueError: If the extension carries an unknown flavour.
    """
    approx = getattr(ext, "kfac_approx", "expand")
    if approx not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"{type(ext).__name__} has unknown kfac_approx {approx!r}."
            f" Supported: {KFAC_APPROXIMATIONS}."
        )
    return approx


def _positions_last(spec: LayerSpec, sqrt: Tensor) -> Tensor:
    """View a square root with positions last.

    Returns:
        ``[V, N, *out]`` as ``[V, N, G, C_out // G, R]``.
    """
    if spec.kind == "linear":
        sqrt = sqrt.reshape(*sqrt.shape[:2], -1, sqrt.shape[-1]).transpose(-1, -2)
    else:
        sqrt = sqrt.flatten(3)
    return sqrt.unflatten(2, (spec.groups, -1))


def _drop_unit_group(factor: Tensor) -> Tensor:
    return factor.squeeze(0) if factor.shape[0] == 1 else factor


class HBPTN(HBPBaseModule):
    """Kronecker factors of KFAC, KFLR and KFRA from TN derivatives."""

    def __init__(self, derivatives: TNDerivativesMixin):
        """Store the derivatives.

        Args:
            derivatives: TN derivatives of the layer.
        """
        super().__init__(derivatives, PARAMS)

    def _output_factor(self, ext, module, backproped: Tensor) -> Tensor:
        spec = self.derivatives._spec(module)
        if BackpropStrategy.is_batch_average(ext.get_backprop_strategy()):
            out = spec.output_shape(1)[1:]
            channel_dim = len(out) - 1 if spec.kind == "linear" else 0
            h = backproped.reshape(*out, *out)
            dims = [d for d in range(len(out)) if d != channel_dim]
            if dims:
                h = h.sum([*dims, *(len(out) + d for d in dims)])
            h = h.unflatten(0, (spec.groups, -1)).unflatten(2, (spec.groups, -1))
            factor = h.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        else:
            summed = _positions_last(spec, backproped).sum(-1)
            factor = einsum("vnga,vngb->gab", summed, summed)
        return _drop_unit_group(factor.contiguous())

    def _input_factors(self, ext, module) -> list[Tensor]:
        if ExpectationApproximation.should_average_param_jac(ext.get_ea_strategy()):
            spec = self.derivatives._spec(module)
            if spec.kind != "linear" or spec.shared:
                raise NotImplementedError(
                    f"{type(ext).__name__} with averaged parameter Jacobians supports"
                    f" only Linear layers with inputs [N, C_in], not"
                    f" {type(module).__name__} with input {list(module.input0.shape)}."
                )
            mean = module.input0.mean(0).unsqueeze(-1)
            return [mean, mean.t()]
        factor = self.derivatives.kfac_input_factor(module, kfac_approximation(ext))
        return [_drop_unit_group(factor)]

    def weight(self, ext, module, g_inp, g_out, backproped) -> list[Tensor]:
        """Kronecker factors of the weight curvature.

        Args:
            ext: KFAC, KFLR or KFRA.
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            backproped: GGN square root ``[V, N, *out]`` (KFAC/KFLR) or
                batch-averaged output GGN ``[F_out, F_out]`` (KFRA).

        Returns:
            ``[B, A]`` (see the module docstring for shapes).
        """
        return [self._output_factor(ext, module, backproped)] + self._input_factors(
            ext, module
        )

    def bias(self, ext, module, g_inp, g_out, backproped) -> list[Tensor]:
        """Kronecker factor of the bias curvature.

        Args:
            ext: KFAC, KFLR or KFRA.
            module: The layer.
            g_inp: Unused.
            g_out: Unused.
            backproped: As for ``weight``.

        Returns:
            ``[B]``.
        """
        return [self._output_factor(ext, module, backproped)]
