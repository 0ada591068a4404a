"""Compare tensors and explain the mismatches when they differ."""

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_TOLS = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-4, "atol": 1e-6},
    torch.float16: {"rtol": 1e-2, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}
"""Default tolerances, keyed by the dtype of the expected value."""

NUM_WORST = 5
"""Number of worst mismatches listed in a report."""


def assert_allclose_report(
    actual: Tensor | Sequence[Tensor],
    expected: Tensor | Sequence[Tensor],
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` entry by entry.

    Checks the shapes first, then dtypes and devices, then the values. On a mismatch,
    the message states how many entries differ, lists the worst ones with their index,
    both values, the absolute error and the ratio ``actual / expected``, and gives the
    maximum absolute and relative error.

    Args:
        actual: Computed tensor, or a list/tuple of tensors. Any shape.
        expected: Reference tensor of the same shape as ``actual``, or a list/tuple of
            tensors of the same length as ``actual``.
        rtol: Relative tolerance. ``None`` takes it from ``DEFAULT_TOLS`` for the dtype
            of ``expected``.
        atol: Absolute tolerance. ``None`` takes it from ``DEFAULT_TOLS`` for the dtype
            of ``expected``.
        name: Name of the compared quantity, used in the message.

    Raises:
        AssertionError: If the containers, shapes, dtypes, devices or values differ.
    """
    label = f"{name}: " if name else ""

    if isinstance(actual, list | tuple) or isinstance(expected, list | tuple):
        if type(actual) not in (list, tuple) or type(expected) not in (list, tuple):
            raise AssertionError(
                f"{label}cannot compare a {type(actual).__name__} with a "
                f"{type(expected).__name__}."
            )
        if len(actual) != len(expected):
            raise AssertionError(
                f"{label}lengths differ: actual has {len(actual)} entries, expected "
                f"has {len(expected)}."
            )
        for idx, (act, exp) in enumerate(zip(actual, expected, strict=True)):
            assert_allclose_report(
                act, exp, rtol=rtol, atol=atol, name=f"{name}[{idx}]"
            )
        return

    if not isinstance(actual, Tensor) or not isinstance(expected, Tensor):
        raise AssertionError(
            f"{label}expected two tensors, got a {type(actual).__name__} (actual) and "
            f"a {type(expected).__name__} (expected)."
        )
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{label}shapes differ: actual {tuple(actual.shape)}, "
            f"expected {tuple(expected.shape)}."
        )
    if actual.dtype != expected.dtype:
        raise AssertionError(
            f"{label}dtypes differ: actual {actual.dtype}, expected {expected.dtype}."
        )
    if actual.device != expected.device:
        raise AssertionError(
            f"{label}devices differ: actual {actual.device}, "
            f"expected {expected.device}."
        )

    tols = DEFAULT_TOLS.get(expected.dtype, DEFAULT_TOLS[torch.float32])
    rtol = tols["rtol"] if rtol is None else rtol
    atol = tols["atol"] if atol is None else atol

    act = actual.detach().cpu().to(torch.float64)
    exp = expected.detach().cpu().to(torch.float64)
    abs_err = (act - exp).abs()
    # a NaN on either side counts as a mismatch, unless both sides are NaN
    both_nan = act.isnan() & exp.isnan()
    abs_err = torch.where(both_nan, torch.zeros_like(abs_err), abs_err)
    abs_err = torch.where(abs_err.isnan(), torch.full_like(abs_err, torch.inf), abs_err)
    mismatch = abs_err > atol + rtol * exp.abs()

    num_mismatch = int(mismatch.sum())
    if num_mismatch == 0:
        return

    flat_err = torch.where(mismatch, abs_err, torch.full_like(abs_err, -1.0)).flatten()
    worst = flat_err.argsort(descending=True)[: min(NUM_WORST, num_mismatch)]

    lines = [
        f"{label}{num_mismatch} of {exp.numel()} entries differ "
        f"(rtol={rtol:g}, atol={atol:g}, shape {tuple(exp.shape)}).",
        f"{'index':>20} {'actual':>14} {'expected':>14} {'abs err':>10} "
        f"{'act/exp':>10}",
    ]
    for flat_idx in worst.tolist():
        idx = tuple(_unravel_index(flat_idx, exp.shape))
        a, e = act.flatten()[flat_idx].item(), exp.flatten()[flat_idx].item()
        ratio = a / e if e != 0 else float("nan")
        lines.append(
            f"{idx!s:>20} {a:>14.6e} {e:>14.6e} {abs(a - e):>10.3e} {ratio:>10.4g}"
        )

    nonzero = exp != 0
    max_rel = (
        (abs_err[nonzero] / exp[nonzero].abs()).max() if nonzero.any() else torch.nan
    )
    lines.append(f"max abs err {abs_err.max():.3e}, max rel err {float(max_rel):.3e}.")
    raise AssertionError("\n".join(lines))


def _unravel_index(flat_idx: int, shape: torch.Size) -> list[int]:
    """Convert a flat index into a multi-index (row-major order).

    Args:
        flat_idx: Index into the flattened tensor.
        shape: Shape of the tensor.

    Returns:
        Multi-index with one entry per dimension of ``shape``.
    """
    idx = []
    for size in reversed(shape):
        flat_idx, i = divmod(flat_idx, size)
        idx.append(i)
    return idx[::-1]
