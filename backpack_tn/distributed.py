"""Reduce BackPACK quantities across data-parallel processes.

In data-parallel training every process ``r`` of ``W`` runs BackPACK on its local
batch of ``N_r`` samples. :func:`reduce_quantities` combines the quantities stored on
the parameters so that, on every process, they equal what BackPACK computes in a single
process on the union of all local batches (``N = N_0 + ... + N_{W-1}`` samples).
DistributedDataParallel (DDP) only reduces ``param.grad``; this module does the same
for ``diag_ggn_exact``, ``grad_batch``, ``kflr`` and the other BackPACK quantities.

Index letters used in the shapes below:

=========  ==========================================================================
Letter     Meaning
=========  ==========================================================================
``N``      local batch size ``N_r`` of the calling process (before reduction)
``N_tot``  global batch size ``N = sum_r N_r`` (after reduction)
``C``      columns of a GGN matrix square root (classes, or Monte Carlo samples)
``*P``     shape of the parameter, e.g. ``[O, I]`` for a ``Linear`` weight
``O``      output-side dimension of a Kronecker factor (output features/channels)
``I``      input-side dimension of a Kronecker factor (unfolded input features)
=========  ==========================================================================

Loss scaling convention. Let ``l_n`` be the loss of sample ``n``. With
``reduction="sum"`` each process minimises ``sum_{n in r} l_n`` and the full-batch loss
is their sum. With ``reduction="mean"`` each process minimises
``1/N_r sum_{n in r} l_n`` while the full-batch loss is ``1/N sum_n l_n``, so every
quantity that is linear in the loss must be rescaled by ``c_r = N_r / N`` before it is
combined (``c_r = 1`` for ``reduction="sum"``). A quantity that is a ``p``-th power of
the loss scale (``p = 2`` for squared gradients, ``p = 1/2`` for GGN square roots) is
rescaled by ``c_r ** p``. The local batch sizes are exchanged with an all-gather, so
processes may hold batches of different sizes.

Example:
    >>> ddp = DistributedDataParallel(extend(model))  # doctest: +SKIP
    >>> with backpack(DiagGGNExact(), BatchGrad()):  # doctest: +SKIP
    ...     lossfunc(ddp(X), y).backward()
    >>> reduce_quantities(ddp, reduction="mean")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "KRONECKER_QUANTITIES",
    "PER_SAMPLE_QUANTITIES",
    "SUMMED_QUANTITIES",
    "SUPPORTED_QUANTITIES",
    "reduce_quantities",
]

REDUCTIONS = ("sum", "mean")


class _Spec(NamedTuple):
    """How one BackPACK quantity is reduced.

    Attributes:
        kind: ``"sum"`` (all-reduce), ``"gather"`` (all-gather along the batch axis),
            ``"kronecker"`` (list of Kronecker factors) or ``"variance"``.
        power: Power ``p`` of the loss scale ``1 / N_r`` that the quantity carries
            under ``reduction="mean"``; it is rescaled by ``(N_r / N) ** p``.
        batch_axis: Axis that indexes the samples, only for ``kind="gather"``.
    """

    kind: str
    power: float = 1.0
    batch_axis: int = 0


# Processing order matters: ``variance`` reads the local ``grad_batch``/``grad`` and
# therefore comes first, ``grad`` (opt-in) comes last.
_SPECS: dict[str, _Spec] = {
    "variance": _Spec("variance"),
    # sums over the local batch
    "diag_ggn_exact": _Spec("sum", 1.0),
    "diag_ggn_mc": _Spec("sum", 1.0),
    "diag_h": _Spec("sum", 1.0),
    "sum_grad_squared": _Spec("sum", 2.0),
    # one slice per sample
    "grad_batch": _Spec("gather", 1.0, 0),
    "batch_l2": _Spec("gather", 2.0, 0),
    "diag_ggn_exact_batch": _Spec("gather", 1.0, 0),
    "diag_ggn_mc_batch": _Spec("gather", 1.0, 0),
    "diag_h_batch": _Spec("gather", 1.0, 0),
    "sqrt_ggn_exact": _Spec("gather", 0.5, 1),
    "sqrt_ggn_mc": _Spec("gather", 0.5, 1),
    # Kronecker factors: index 0 is output-side, the rest input-side
    "kfac": _Spec("kronecker"),
    "kflr": _Spec("kronecker"),
    "kfra": _Spec("kronecker"),
    # the gradient itself, only when named explicitly (normally DDP's job)
    "grad": _Spec("sum", 1.0),
}

SUPPORTED_QUANTITIES: tuple[str, ...] = tuple(_SPECS)
"""All quantity names accepted by :func:`reduce_quantities`."""

SUMMED_QUANTITIES: tuple[str, ...] = tuple(
    name for name, spec in _SPECS.items() if spec.kind == "sum"
)
"""Quantities that are sums over the batch; they are all-reduced."""

PER_SAMPLE_QUANTITIES: dict[str, int] = {
    name: spec.batch_axis for name, spec in _SPECS.items() if spec.kind == "gather"
}
"""Per-sample quantities and their batch axis; they are all-gathered."""

KRONECKER_QUANTITIES: tuple[str, ...] = tuple(
    name for name, spec in _SPECS.items() if spec.kind == "kronecker"
)
"""Quantities stored as lists of Kronecker factors."""

_DEFAULT_QUANTITIES = tuple(name for name in SUPPORTED_QUANTITIES if name != "grad")

# Positions in the handshake vector each process contributes.
_SIZE, _SIZE_CONFLICT, _NO_VARIANCE_MEAN, _MASK = 0, 1, 2, 3


def reduce_quantities(
    model: Module,
    quantities: Iterable[str] | None = None,
    *,
    reduction: str,
    batch_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Reduce the BackPACK quantities on a model's parameters across processes.

    Call this on every process of ``group`` after the backward pass inside
    ``with backpack(...)``. Afterwards each parameter attribute equals the quantity
    that BackPACK computes in one process on the union of all local batches; the
    attributes are replaced in place on every process. All processes must call it
    with the same arguments and hold the same quantities on the same parameters.

    How each quantity is reduced (``c_r = N_r / N`` for ``reduction="mean"``,
    ``c_r = 1`` for ``reduction="sum"``):

    - Batch sums ``diag_ggn_exact``, ``diag_ggn_mc``, ``diag_h`` (shape ``[*P]``):
      ``sum_r c_r q_r``. ``sum_grad_squared`` (``[*P]``) carries the squared scale:
      ``sum_r c_r**2 q_r``.
    - Per-sample quantities are gathered along their batch axis in rank order after
      rescaling: ``grad_batch``, ``diag_ggn_exact_batch``, ``diag_ggn_mc_batch``,
      ``diag_h_batch`` (``[N, *P]`` -> ``[N_tot, *P]``, factor ``c_r``), ``batch_l2``
      (``[N]`` -> ``[N_tot]``, factor ``c_r**2``), ``sqrt_ggn_exact`` and
      ``sqrt_ggn_mc`` (``[C, N, *P]`` -> ``[C, N_tot, *P]``, factor ``sqrt(c_r)``).
    - ``variance`` (``[*P]``) is BackPACK's biased per-sample variance. Locally it
      is ``var_r = 1/N_r sum_{n in r} h_n**2 - (1/N_r sum_{n in r} h_n)**2`` with
      ``h_n = g_n`` (sum) or ``h_n = g_n / N_r`` (mean), ``g_n`` the gradient of
      ``l_n``; the full-batch variance is that of the vectors ``c_r h_n``. With the
      local gradient ``G_r = sum_{n in r} h_n``, the rescaled local mean
      ``m_r = c_r G_r / N_r`` and the global mean ``mu = sum_r c_r G_r / N``, the
      law of total variance gives

      ``var = 1/N sum_r N_r (c_r**2 var_r + (m_r - mu)**2)``.

      ``G_r`` is taken from ``param.grad_batch.sum(0)`` when ``BatchGrad`` ran in
      the same backward pass, otherwise from ``param.grad``, which must then still
      hold the local gradient: run that backward pass under ``ddp.no_sync()`` (DDP
      overwrites ``param.grad`` with the average over processes otherwise).
    - Kronecker factors ``kfac``, ``kflr``, ``kfra`` (lists ``[G, A]`` for weights,
      ``[G]`` for biases). The output-side factor ``G`` (``[O, O]``) is a sum over
      the local batch of GGN square-root outer products and carries the loss scale:
      ``sum_r c_r G_r``. The input-side factors ``A`` (``[I, I]``) are BackPACK's
      batch averages ``1/N_r sum_n x_n x_n^T`` whatever the loss reduction: they are
      averaged with weights ``N_r / N``. Both are exact for ``kfac`` (up to its
      Monte Carlo sampling) and ``kflr``. For ``kfra`` only the input-side factors
      and the output-side factors of layers that feed the loss directly are exact:
      KFRA multiplies batch averages in the backward pass, so its other output-side
      factors are approximated by the reduced local factors.
    - ``grad`` (``[*P]``) is reduced only when named in ``quantities``, for a
      backward pass run under ``ddp.no_sync()`` or without DDP:
      ``sum_r c_r G_r``. For ``reduction="mean"`` with unequal local batches this
      is the exact full-batch gradient, which DDP's plain average is not.

    Args:
        model: The BackPACK-extended module, or the ``DistributedDataParallel``
            wrapper around it.
        quantities: Names of the quantities to reduce, from ``SUPPORTED_QUANTITIES``.
            Each must be present on at least one parameter. ``None`` reduces every
            quantity present except ``grad``.
        reduction: ``"sum"`` or ``"mean"``, the ``reduction`` of the loss function
            used in the backward pass.
        batch_size: Local batch size ``N_r`` of this process. Needed only when no
            per-sample quantity is present to infer it from and the reduction
            depends on it (``reduction="mean"``, ``variance``, Kronecker factors).
        group: Process group to reduce over; ``None`` means the default group.

    Raises:
        RuntimeError: If ``torch.distributed`` is unavailable or its default process
            group is not initialised, or if the processes hold different quantities
            on their parameters.
        ValueError: If a quantity name is unknown, ``reduction`` is neither
            ``"sum"`` nor ``"mean"``, ``batch_size`` is not a positive integer, the
            model holds none of the requested quantities, a named quantity is
            missing, the local batch size is inconsistent or unknown where needed,
            or ``variance`` lacks the local gradient.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "reduce_quantities needs an initialized default process group, but "
            "torch.distributed.is_initialized() is False; call "
            "torch.distributed.init_process_group(...) on every process first."
        )
    names = _check_quantities(quantities)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Unsupported reduction {reduction!r}. Supported: {REDUCTIONS}."
        )
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be a positive int or None, got {batch_size!r}."
        )

    module = model.module if isinstance(model, DistributedDataParallel) else model
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    comm_device = _comm_device(group, params)

    # One all-gather tells every process the state of all others, so that every
    # error below is raised on all processes instead of leaving some waiting.
    local_sizes = _local_batch_sizes(params, names, batch_size)
    no_variance_mean = "variance" in names and any(
        _get(p, "variance") is not None
        and _get(p, "grad_batch") is None
        and p.grad is None
        for _, p in params
    )
    header = [
        local_sizes[0] if len(local_sizes) == 1 else -1,
        int(len(local_sizes) > 1),
        int(no_variance_mean),
    ]
    mask = [_get(p, name) is not None for _, p in params for name in names]
    table = _all_gather_rows(
        torch.tensor(header + mask, dtype=torch.int64, device=comm_device), group
    )
    present = _check_handshake(
        table, module, params, names, quantities is not None, local_sizes
    )

    sizes = table[:, _SIZE].tolist()
    present_names = [name for j, name in enumerate(names) if present[:, j].any()]
    needs_size = [
        name
        for name in present_names
        if reduction == "mean" or _SPECS[name].kind in ("variance", "kronecker")
    ]
    if needs_size and min(sizes) < 1:
        unknown = [r for r, n in enumerate(sizes) if n < 1]
        raise ValueError(
            f"reduce_quantities needs the local batch size for {needs_size} but "
            f"rank(s) {unknown} hold no per-sample quantity to infer it from; pass "
            "batch_size=<local batch size>."
        )

    local = sizes[dist.get_rank(group)]
    total = sum(sizes)
    # Unused (and possibly undefined) when no local batch size is needed.
    weight = local / total if needs_size else 1.0
    scale = weight if reduction == "mean" else 1.0

    for name in present_names:
        spec = _SPECS[name]
        for _, param in params:
            value = _get(param, name)
            if value is None:
                continue
            if spec.kind == "sum":
                reduced = _all_reduce(value * scale**spec.power, group, comm_device)
            elif spec.kind == "gather":
                reduced = _all_gather_batch(
                    value * scale**spec.power,
                    spec.batch_axis,
                    sizes,
                    group,
                    comm_device,
                )
            elif spec.kind == "kronecker":
                reduced = _reduce_kronecker(value, scale, weight, group, comm_device)
            else:
                reduced = _reduce_variance(
                    param, value, local, total, scale, group, comm_device
                )
            if name == "grad":
                param.grad.copy_(reduced)
            else:
                setattr(param, name, reduced)


def _check_quantities(quantities: Iterable[str] | None) -> tuple[str, ...]:
    """Validate quantity names and return them in processing order.

    Args:
        quantities: Requested names, or ``None`` for all but ``grad``.

    Returns:
        The names, ordered as in ``SUPPORTED_QUANTITIES``.

    Raises:
        ValueError: If ``quantities`` is a single string or contains unknown names.
    """
    if quantities is None:
        return _DEFAULT_QUANTITIES
    if isinstance(quantities, str):
        raise ValueError(
            f"quantities must be an iterable of names, got the string {quantities!r}; "
            f"wrap it in a list: [{quantities!r}]."
        )
    requested = set(quantities)
    unknown = sorted(requested.difference(SUPPORTED_QUANTITIES))
    if unknown:
        raise ValueError(
            f"Unknown BackPACK quantities {unknown}. Supported: {SUPPORTED_QUANTITIES}."
        )
    return tuple(name for name in SUPPORTED_QUANTITIES if name in requested)


def _get(param: Parameter, name: str) -> Tensor | list[Tensor] | None:
    """Return a parameter's BackPACK quantity, or ``None`` if it is absent.

    Args:
        param: Parameter to read from.
        name: Quantity name, e.g. ``"diag_ggn_exact"``.

    Returns:
        The stored tensor (list of tensors for Kronecker factors) or ``None``.
    """
    return param.grad if name == "grad" else getattr(param, name, None)


def _comm_device(
    group: dist.ProcessGroup | None, params: list[tuple[str, Parameter]]
) -> torch.device:
    """Choose the device that collectives run on.

    Args:
        group: Process group, ``None`` for the default one.
        params: Named parameters of the model.

    Returns:
        The CPU for the gloo backend, else the device of the first parameter.
    """
    if dist.get_backend(group) == "gloo" or not params:
        return torch.device("cpu")
    return params[0][1].device


def _local_batch_sizes(
    params: list[tuple[str, Parameter]], names: tuple[str, ...], batch_size: int | None
) -> list[int]:
    """Collect the local batch sizes stated by ``batch_size`` and per-sample tensors.

    Args:
        params: Named parameters of the model.
        names: Quantities to reduce; only their per-sample tensors are inspected.
        batch_size: Local batch size passed by the caller, or ``None``.

    Returns:
        The distinct sizes found, sorted; more than one means they disagree.
    """
    sizes = set() if batch_size is None else {batch_size}
    for _, param in params:
        for name in names:
            value = getattr(param, name, None)
            if name in PER_SAMPLE_QUANTITIES and value is not None:
                sizes.add(value.shape[PER_SAMPLE_QUANTITIES[name]])
    return sorted(sizes)


def _check_handshake(
    table: Tensor,
    module: Module,
    params: list[tuple[str, Parameter]],
    names: tuple[str, ...],
    explicit: bool,
    local_sizes: list[int],
) -> Tensor:
    """Raise the same error on every process if any process is in a bad state.

    Args:
        table: Gathered handshake rows of shape ``[W, 3 + len(params) * len(names)]``.
        module: The extended module (for messages).
        params: Named parameters of the model.
        names: Requested quantity names.
        explicit: Whether the caller named the quantities.
        local_sizes: Local batch sizes seen on this process (for messages).

    Returns:
        Which quantities are present, as a bool tensor of shape
        ``[len(params), len(names)]``, identical on all processes.

    Raises:
        ValueError: If a process's batch sizes disagree, no quantity is present, a
            named quantity is missing, or ``variance`` lacks the local gradient.
        RuntimeError: If processes hold different quantities.
    """
    ranks = torch.arange(table.shape[0])
    conflict = ranks[table[:, _SIZE_CONFLICT] > 0].tolist()
    if conflict:
        raise ValueError(
            f"Local batch sizes disagree on rank(s) {conflict} (this rank saw "
            f"{local_sizes}): batch_size and the batch axes of "
            f"{tuple(PER_SAMPLE_QUANTITIES)} must all match."
        )
    mask = table[:, _MASK:].reshape(table.shape[0], len(params), len(names)) > 0
    if not mask.any():
        raise ValueError(
            f"Model {type(module).__name__} holds none of the BackPACK quantities "
            f"{names} on its parameters; extend it with backpack.extend and run the "
            "backward pass inside `with backpack(...)`."
        )
    if explicit:
        missing = [name for j, name in enumerate(names) if not mask[:, :, j].any()]
        if missing:
            raise ValueError(
                f"Requested quantities {missing} are on no parameter of "
                f"{type(module).__name__}; compute them with the matching BackPACK "
                "extension or leave them out."
            )
    differ = (mask.any(0) != mask.all(0)).nonzero().tolist()
    if differ:
        pairs = [(params[i][0], names[j]) for i, j in differ]
        raise RuntimeError(
            f"Processes hold different BackPACK quantities for (parameter, quantity) "
            f"pairs {pairs[:5]}{' ...' if len(pairs) > 5 else ''}; run the same "
            "extensions on the same model on every process."
        )
    no_mean = ranks[table[:, _NO_VARIANCE_MEAN] > 0].tolist()
    if no_mean:
        raise ValueError(
            f"Reducing 'variance' needs the local gradient, but rank(s) {no_mean} "
            "hold neither param.grad_batch nor param.grad; add BatchGrad() or keep "
            "param.grad from the same backward pass."
        )
    return mask[0]


def _all_gather_rows(row: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-gather one equally sized vector per process.

    Args:
        row: Local vector of shape ``[L]``.
        group: Process group, ``None`` for the default one.

    Returns:
        Stacked vectors of shape ``[W, L]`` on the CPU, in rank order.
    """
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows).cpu()


def _all_reduce(
    tensor: Tensor, group: dist.ProcessGroup | None, device: torch.device
) -> Tensor:
    """Sum a tensor over processes without modifying the input.

    Args:
        tensor: Local summand of any shape.
        group: Process group, ``None`` for the default one.
        device: Device on which the collective runs.

    Returns:
        The sum over processes, same shape and device as ``tensor``.
    """
    buffer = tensor.to(device, copy=True).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.to(tensor.device)


def _all_gather_batch(
    tensor: Tensor,
    axis: int,
    sizes: list[int],
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> Tensor:
    """Concatenate per-sample tensors of unequal batch sizes across processes.

    Args:
        tensor: Local tensor with ``N_r`` samples along ``axis``, e.g. of shape
            ``[N, *P]`` or ``[C, N, *P]``.
        axis: The batch axis.
        sizes: Local batch sizes ``[N_0, ..., N_{W-1}]`` of all processes.
        group: Process group, ``None`` for the default one.
        device: Device on which the collective runs.

    Returns:
        The tensors of all processes, concatenated along ``axis`` in rank order,
        with ``N_tot`` samples along ``axis``, on the device of ``tensor``.
    """
    padded_shape = list(tensor.shape)
    padded_shape[axis] = max(sizes)
    padded = tensor.new_zeros(padded_shape, device=device)
    padded.narrow(axis, 0, tensor.shape[axis]).copy_(tensor)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    trimmed = [part.narrow(axis, 0, n) for part, n in zip(parts, sizes, strict=True)]
    return torch.cat(trimmed, dim=axis).to(tensor.device)


def _reduce_kronecker(
    factors: list[Tensor],
    scale: float,
    weight: float,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> list[Tensor]:
    """Reduce a list of BackPACK Kronecker factors.

    Args:
        factors: ``[G]`` or ``[G, A, ...]`` with the output-side factor ``G`` of
            shape ``[O, O]`` and input-side factors ``A`` of shape ``[I, I]``.
        scale: Loss rescaling ``c_r`` of this process for ``G``.
        weight: Batch weight ``N_r / N`` of this process for the averages ``A``.
        group: Process group, ``None`` for the default one.
        device: Device on which the collective runs.

    Returns:
        Reduced factors with the same shapes.
    """
    output_side, *input_side = factors
    reduced = [_all_reduce(output_side * scale, group, device)]
    reduced += [_all_reduce(factor * weight, group, device) for factor in input_side]
    return reduced


def _reduce_variance(
    param: Parameter,
    variance: Tensor,
    local: int,
    total: int,
    scale: float,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> Tensor:
    """Combine local per-sample gradient variances into the global one.

    Args:
        param: Parameter holding ``grad_batch`` (``[N, *P]``) or the local ``grad``
            (``[*P]``), from which the local gradient ``G_r`` is read.
        variance: Local variance of shape ``[*P]``.
        local: Local batch size ``N_r``.
        total: Global batch size ``N``.
        scale: Loss rescaling ``c_r`` of this process.
        group: Process group, ``None`` for the default one.
        device: Device on which the collective runs.

    Returns:
        Global variance of shape ``[*P]``.
    """
    grad_batch = getattr(param, "grad_batch", None)
    local_grad = param.grad if grad_batch is None else grad_batch.sum(0)
    scaled_grad = scale * local_grad
    global_mean = _all_reduce(scaled_grad, group, device) / total
    local_mean = scaled_grad / local
    spread = local * (scale**2 * variance + (local_mean - global_mean) ** 2)
    return _all_reduce(spread, group, device) / total
