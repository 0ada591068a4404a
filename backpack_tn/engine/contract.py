"""Evaluation of einsum networks with opt_einsum and cached contraction paths.

The contraction path of a network is computed once per ``(equation, shapes,
optimiser)`` and cached. The optimiser is a setting: :func:`set_optimizer` changes
the default, :func:`optimizer` changes it inside a ``with`` block. Large pairwise
steps run as batched GEMMs on views of their operands (``_bmm_step``), small
ones through ``torch.einsum``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import opt_einsum
from opt_einsum.parser import convert_to_valid_einsum_chars
from torch import Tensor, einsum, stack

from backpack_tn.engine.gemm import NARROW_COLUMNS, gemm_nt
from backpack_tn.engine.gram import gram
from backpack_tn.engine.layout import by_stride, flat_view, view_key
from backpack_tn.engine.tape import recording

#: Path optimisers accepted by :func:`set_optimizer`: ``'dp-combo'`` and opt_einsum's.
OPTIMIZERS = ("dp-combo", "dp", "auto", "auto-hq", "greedy", "optimal", "branch-2")

_DEFAULT = {"optimize": "dp-combo"}


def _optimizer_object(name: str):
    """The opt_einsum optimiser for a name of ``OPTIMIZERS``.

    Returns:
        ``'dp-combo'``: dynamic programming minimising FLOPs plus 64 times the
        elements written by each step; other names are passed on unchanged.
    """
    if name == "dp-combo":
        return opt_einsum.DynamicProgramming(minimize="combo")
    return name


def get_optimizer() -> str:
    """Return the default path optimiser.

    Returns:
        The name of the default opt_einsum path optimiser.
    """
    return _DEFAULT["optimize"]


def set_optimizer(name: str):
    """Set the default opt_einsum path optimiser.

    ``'dp-combo'`` (dynamic programming, minimising FLOPs plus 64 times the
    elements each step writes) is the default. Pure FLOPs (``'dp'``) can prefer
    chains of cheap but memory-bound steps on huge intermediates, e.g. the
    KFAC-reduce factor of a 3x3 convolution on 1x1 maps (1.6x slower than
    ``'dp-combo'``); opt_einsum's ``'auto'`` can pick paths with twice the FLOPs
    on strided convolutions.

    Args:
        name: One of ``OPTIMIZERS``.

    Raises:
        ValueError: If ``name`` is not a supported optimiser.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unsupported optimize {name!r}. Supported: {OPTIMIZERS}.")
    _DEFAULT["optimize"] = name


@contextmanager
def optimizer(name: str) -> Iterator[None]:
    """Use another default path optimiser inside a ``with`` block.

    Args:
        name: One of ``OPTIMIZERS``.

    Yields:
        Nothing.
    """
    old = get_optimizer()
    set_optimizer(name)
    try:
        yield
    finally:
        set_optimizer(old)


def equation_from_legs(legs: Sequence[Sequence[str]], output: Sequence[str]) -> str:
    """Translate named legs into an einsum equation.

    Leg names are mapped to ``a-z``, ``A-Z`` and then further symbols in order of
    first appearance, e.g. ``[("n", "c_in"), ("c_in",)] -> ("n",)`` gives
    ``"ab,b->a"``.

    Args:
        legs: Leg names of each operand.
        output: Leg names of the result.

    Returns:
        The einsum equation.
    """
    letters: dict[str, str] = {}
    for name in [leg for op in legs for leg in op] + list(output):
        if name not in letters:
            letters[name] = opt_einsum.get_symbol(len(letters))
    inputs = ",".join("".join(letters[leg] for leg in op) for op in legs)
    return f"{inputs}->{''.join(letters[leg] for leg in output)}"


@lru_cache(maxsize=1024)
def _plan(
    equation: str, shapes: tuple[tuple[int, ...], ...], optimize: str
) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Pairwise steps of a contraction: operand positions and step equation.

    The path comes from opt_einsum; the steps run through ``torch.einsum`` directly,
    which saves opt_einsum's per-call parsing and dispatch (tens of microseconds,
    as much as a small layer's whole product).

    Returns:
        One ``(positions, equation)`` per step; the positions are popped from the
        operand list (in the given, descending order) and the step's result is
        appended to it.
    """
    info = _path_info(equation, shapes, optimize)
    return tuple(
        (tuple(positions), convert_to_valid_einsum_chars(step_equation))
        for positions, _, step_equation, *_ in info.contraction_list
    )


@lru_cache(maxsize=1024)
def _path_info(equation: str, shapes: tuple[tuple[int, ...], ...], optimize: str):
    return opt_einsum.contract_path(
        equation, *shapes, shapes=True, optimize=_optimizer_object(optimize)
    )[1]


def path_info(
    legs: Sequence[Sequence[str]],
    output: Sequence[str],
    shapes: Sequence[Sequence[int]],
    optimize: str | None = None,
) -> opt_einsum.contract.PathInfo:
    """Contraction path information of a network without evaluating it.

    Args:
        legs: Leg names of each operand.
        output: Leg names of the result.
        shapes: Shape of each operand.
        optimize: Path optimiser; ``None`` uses the default.

    Returns:
        opt_einsum's path information (FLOPs, largest intermediate, path).
    """
    equation = equation_from_legs(legs, output)
    key = tuple(tuple(int(s) for s in shape) for shape in shapes)
    return _path_info(equation, key, optimize or get_optimizer())


def contract(
    legs: Sequence[Sequence[str]],
    output: Sequence[str],
    operands: Sequence[Tensor],
    optimize: str | None = None,
) -> Tensor:
    """Contract tensors with named legs.

    Before the pairwise contractions, every leg that only one operand carries, and
    the result does not, is summed out of that operand. Otherwise a pairwise step
    would carry it along, e.g. sum over a pattern's output positions only after
    multiplying with the input. Scalar operands multiply the smallest remaining
    operand (not the result, which can be far larger).

    Args:
        legs: Leg names of each operand.
        output: Leg names of the result.
        operands: Tensors; operand ``j`` has one dimension per name in ``legs[j]``.
        optimize: Path optimiser; ``None`` uses the default.

    Returns:
        The contraction, with one dimension per name in ``output``.
    """
    recipe = _recipe(
        tuple(map(tuple, legs)),
        tuple(output),
        tuple(tuple(op.shape) for op in operands),
        optimize or get_optimizer(),
    )
    scale = None
    for j in recipe.scalars:
        scale = operands[j] if scale is None else scale * operands[j]
    kept = [operands[j] for j in recipe.kept]
    for j, dims in recipe.sums:
        kept[j] = kept[j].sum(dims)
    if scale is not None and kept:  # scale the smallest operand, not the result
        kept[recipe.smallest] = kept[recipe.smallest] * scale
        scale = None
    if len(kept) <= 2:
        result = _run_step(recipe.steps[0], kept)
    else:
        for step in recipe.steps:
            kept.append(_run_step(step, [kept.pop(p) for p in step[0]]))
        (result,) = kept
    return result if scale is None else result * scale


#: Below this many elements in a step's two operands, ``torch.einsum`` runs it
#: outside records: copies are cheap there and its dispatch is faster than
#: ``_bmm_step``'s Python. A record keeps only ``_bmm_step``'s torch calls, whose
#: replay is faster than ``torch.einsum`` (KFAC-reduce factor of a 3x32x32 5x5
#: layer at N = 8: 50.7 -> 33.1 µs; per-sample gradients of a 192x6x6 1x1 layer:
#: 41.6 -> 29.9 µs; two CPU threads).
SMALL_STEP = 1 << 16


class _Pairwise(NamedTuple):
    """The legs of a pairwise step ``first, second -> output`` by their role.

    Attributes:
        first: The first operand's letters.
        second: The second operand's letters.
        output: The result's letters.
        batch: Letters of both operands and the result.
        contracted: Letters of both operands only (summed over); empty for an
            elementwise product.
        gram: Whether some letters are summed and the operands carry the same
            letters at the same positions, except for free letters: a Gram
            product when both are one tensor.
        dot: Whether some letters are summed and both operands carry the same
            letters (none is free): batched dot products.
    """

    first: str
    second: str
    output: str
    batch: str
    contracted: str
    gram: bool
    dot: bool


def _pairwise(equation: str) -> _Pairwise | None:
    """The roles of a pairwise step's legs, if it is a plain batched GEMM.

    Args:
        equation: Einsum equation of a step.

    Returns:
        The roles, or ``None`` for steps with one or three operands, repeated
        letters (diagonals), or letters of one operand that the result lacks;
        ``torch.einsum`` runs those. A step without a summed letter is an
        elementwise product of broadcast views (:func:`_product_step`).
    """
    inputs, output = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    first, second = operands
    if len(set(first)) != len(first) or len(set(second)) != len(second):
        return None
    if any(leg not in second and leg not in output for leg in first) or any(
        leg not in first and leg not in output for leg in second
    ):
        return None
    batch = "".join(leg for leg in first if leg in second and leg in output)
    contracted = "".join(leg for leg in first if leg in second and leg not in output)
    gram = (
        bool(contracted)
        and len(first) == len(second)
        and all(
            a == b or (a not in second and b not in first)
            for a, b in zip(first, second, strict=True)
        )
    )
    dot = bool(contracted) and set(first) == set(second)
    return _Pairwise(first, second, output, batch, contracted, gram, dot)


def _matrices(
    x: Tensor, batch: list[int], free: list[int], contracted: list[int]
) -> Tensor | None:
    """A view of ``x`` as matrices ``[B, F, C]`` that a GEMM reads without a copy.

    Args:
        x: An operand.
        batch: Its batch dimensions, outer to inner.
        free: Its free dimensions, outer to inner.
        contracted: Its summed dimensions, outer to inner.

    Returns:
        The view, or ``None`` if the groups do not merge or neither matrix
        dimension is contiguous.
    """
    for rows, columns in ((free, contracted), (contracted, free)):
        mat = flat_view(x, (batch, rows, columns))
        if mat is not None and 1 in (mat.stride(1), mat.stride(2)):
            return mat if rows is free else mat.transpose(1, 2)
    return None


#: A copy whose innermost dimension reads fewer contiguous elements than this
#: counts as scattered (16 float32 numbers fill a cache line).
MIN_RUN = 16


def _contiguous_run(x: Tensor, order: list[int]) -> int:
    """How many elements a copy into ``order`` reads contiguously at a time.

    Returns:
        The product of the innermost sizes of ``order`` that are contiguous in
        ``x`` (1 if the innermost one is strided).
    """
    run = 1
    for d in reversed(order):
        if x.shape[d] == 1:
            continue
        if x.stride(d) != run:
            break
        run *= x.shape[d]
    return run


def _copied_matrices(
    x: Tensor,
    batch: list[int],
    free: list[int],
    contracted: list[int],
    result_order: list[int] | None = None,
) -> tuple[Tensor, list[int]]:
    """``x`` copied into matrices ``[B, F, C]`` in the cheapest order to copy.

    A copy streams when its innermost dimensions are contiguous in ``x``; a
    transposing one ran 9x slower on 32 MB. When no order reads at least
    ``MIN_RUN`` contiguous elements (a strided view of patches with a size-2
    innermost kernel leg), the largest dimension goes innermost, since copies with
    a short innermost dimension run up to ten times slower. The free dimensions
    may be reordered, the batch and summed ones not (the other operand shares
    them). A given ``result_order`` fixes the free dimensions' order (see
    ``SMALL_COPY_RATIO``); only which group goes innermost is then chosen.

    Args:
        x: An operand.
        batch: Its batch dimensions, outer to inner.
        free: Its free dimensions in memory order (as :func:`by_stride` sorts them).
        contracted: Its summed dimensions, outer to inner.
        result_order: Its free dimensions in the order the step's result lists
            them, or ``None``.

    Returns:
        The matrices and the order of the free dimensions in them.
    """
    orders = [free] if result_order is None else [result_order]
    if free and result_order is None:
        biggest = max(free, key=x.shape.__getitem__)
        orders.append([d for d in free if d != biggest] + [biggest])
    candidates = []
    for free_order in orders:
        for free_inner in (False, True) if free else (False,):
            outer, inner = (
                (contracted, free_order) if free_inner else (free_order, contracted)
            )
            order = batch + outer + inner
            run = _contiguous_run(x, order)
            score = (run >= MIN_RUN, run if run >= MIN_RUN else x.shape[order[-1]])
            candidates.append((score, free_inner, free_order, outer, inner))
    _, free_inner, free, outer, inner = max(candidates, key=lambda c: c[0])
    sizes = [math.prod(x.shape[d] for d in group) for group in (batch, outer, inner)]
    mat = x.permute(batch + outer + inner).contiguous().view(sizes)
    return (mat.transpose(1, 2) if free_inner else mat), free


#: An operand to copy with at most this fraction of the step result's elements is
#: copied with its free dimensions in the order of the result, which then needs no
#: permutation: its consumers (squares and sums of per-sample VJPs, additions into
#: accumulated blocks) read it in memory order (0 turns this off).
SMALL_COPY_RATIO = 8


def _result_size(sides: list[_Side], slices: int) -> int:
    """Elements of a GEMM step's result.

    Returns:
        The step's batch size times both sides' free (and outer free) sizes.
    """
    return slices * math.prod(
        side.x.shape[d] for side in sides for d in side.outer + side.free
    )


def _bmm_step(a: Tensor, b: Tensor, step: _Pairwise) -> Tensor:
    """A pairwise step as one batched GEMM on views, copying only where needed.

    ``torch.einsum`` copies an operand whenever its dimensions are not in the
    order it picks, and in an order that ignores the operand's strides. Here the
    batch and summed dimensions follow the larger operand's memory order, the free
    ones each operand's own, so that views serve as GEMM matrices wherever the
    layouts allow it. An operand without such a view has its outer free
    dimensions turned into GEMM batches (when the step has no other batch), or
    else is copied once, in a well-ordered pass (:func:`_copied_matrices`). The
    result's rows are the free legs of the side that holds the result's first free
    leg: consumers sum leading legs (vectors, samples), and a sum over outer
    dimensions runs 3x faster than one over a middle dimension.

    Args:
        a: First operand.
        b: Second operand.
        step: The step's leg roles.

    Returns:
        The step's result.
    """
    dims_a = {leg: d for d, leg in enumerate(step.first)}
    dims_b = {leg: d for d, leg in enumerate(step.second)}
    big, dims_big = (a, dims_a) if a.numel() >= b.numel() else (b, dims_b)
    batch = sorted(step.batch, key=lambda leg: -big.stride(dims_big[leg]))
    contracted = sorted(step.contracted, key=lambda leg: -big.stride(dims_big[leg]))
    shared = step.batch + step.contracted
    sides = []
    for x, dims, letters in ((a, dims_a, step.first), (b, dims_b, step.second)):
        free = by_stride(x, [d for d, leg in enumerate(letters) if leg not in shared])
        side = _Side(x, letters, [dims[leg] for leg in batch], free)
        side.summed = [dims[leg] for leg in contracted]
        side.mat = _matrices(x, side.batch, free, side.summed)
        sides.append(side)
    slices = math.prod(big.shape[dims_big[leg]] for leg in batch)
    if slices > 1 and _slicing_pays(sides, slices, step, big):
        return _sliced_step(a, b, step)
    _batch_outer_free(sides, slices)
    for side in sides:
        if side.mat is None:
            result_order = None
            if SMALL_COPY_RATIO and side.x.numel() * SMALL_COPY_RATIO <= _result_size(
                sides, slices
            ):
                result_order = sorted(
                    side.free, key=lambda d, s=side: step.output.index(s.letters[d])
                )
            side.mat, side.free = _copied_matrices(
                side.x, side.batch, side.free, side.summed, result_order
            )
    first_free = next((leg for leg in step.output if leg not in step.batch), None)
    if first_free is not None and first_free in step.second:
        sides.reverse()  # rows: the side whose legs the result lists first
    rows, cols = (side.mat for side in sides)
    count = max(rows.shape[0], cols.shape[0])  # with one side's outer free dims
    rows, cols = _repeated(rows, count), _repeated(cols, count)
    legs = [side.letters[d] for side in sides for d in side.outer] + list(batch)
    legs += [side.letters[d] for side in sides for d in side.free]
    size = dict(zip(step.first, a.shape, strict=True))
    size.update(zip(step.second, b.shape, strict=True))
    result = gemm_nt(rows, cols).view([size[leg] for leg in legs])
    return result.permute([legs.index(leg) for leg in step.output])


@dataclass
class _Side:
    """One operand of a GEMM step and how it becomes matrices.

    Attributes:
        x: The operand.
        letters: Its letters in the step's equation.
        batch: Its batch dimensions, in the step's order.
        free: Its free dimensions (matrix rows), outer to inner.
        summed: Its summed dimensions, in the step's order.
        mat: Matrices ``[B, F, C]`` over these dimensions, once found.
        outer: Free dimensions that became GEMM batches (``_batch_outer_free``).
    """

    x: Tensor
    letters: str
    batch: list[int]
    free: list[int]
    summed: list[int] = field(default_factory=list)
    mat: Tensor | None = None
    outer: list[int] = field(default_factory=list)


def _batch_outer_free(sides: list[_Side], slices: int):
    """Let the outer free dimensions of the one side without a view be GEMM batches.

    ``x[v, s, a] y[s, b]`` has no GEMM view of ``x`` (``v`` and ``a`` do not
    merge), but ``x[v]ᵀ y`` for each ``v`` is one: a batched GEMM with ``y``
    broadcast, which saves copying ``x``. Only where ``a`` keeps at least
    ``NARROW_COLUMNS`` entries: the lowered weight VJP of a single sample of a
    128x17x17 7x1 layer (10 vectors) batched its 128 input channels into GEMMs of
    7 columns, 89 ms at 11 GFLOP/s, where a copy of its 1 MB unfolded input and
    one GEMM take about 5 ms.

    With batch legs (``x[v, n, a, s] y[n, s, b]``), the outer free legs join the
    batch ahead of them, and ``y`` is copied once for each of their indices
    (:func:`_repeated`) where that copies fewer elements than ``x`` holds: the
    lowered weight VJPs of 10 vectors of 8 samples took 25.8 ms with a
    sample-major copy of the vectors and 11.8 ms so on a 1x64x64 3x3 layer
    (``y`` 3.6x smaller than ``x`` once repeated), 39 against 16 ms for
    ``[V, N, 256, 784]`` vectors and ``[N, 784, 64]`` columns (4x smaller); with
    ``[N, 784, 512]`` columns (4x larger), 46 against 82 ms.

    Args:
        sides: Both operands; updated in place where a split works.
        slices: Number of batch slices of the step.
    """
    missing = [side for side in sides if side.mat is None]
    if len(missing) != 1:
        return
    (side,) = missing
    (other,) = (s for s in sides if s is not side)
    for split in range(1, len(side.free)):
        outer, rest = side.free[:split], side.free[split:]
        if math.prod(side.x.shape[d] for d in rest) < NARROW_COLUMNS:
            return
        count = math.prod(side.x.shape[d] for d in outer)
        if slices > 1 and other.x.numel() * count >= side.x.numel():
            return
        mat = _matrices(side.x, outer + side.batch, rest, side.summed)
        if mat is not None:
            side.mat, side.free, side.outer = mat, rest, outer
            return


def _repeated(mat: Tensor, count: int) -> Tensor:
    """Matrices repeated along their batch up to ``count`` matrices.

    Args:
        mat: Matrices of shape ``[B, F, C]``, ``B`` dividing ``count``.
        count: The batch size to reach.

    Returns:
        ``mat`` itself, a broadcast view of its one matrix, or a copy of shape
        ``[count, F, C]`` whose consecutive blocks of ``B`` are ``mat``, with
        ``mat``'s contiguous matrix dimension.
    """
    if mat.shape[0] == count:
        return mat
    if mat.shape[0] == 1:
        return mat.expand(count, -1, -1)
    flipped = mat.stride(2) != 1
    if flipped:
        mat = mat.transpose(1, 2)
    copies = mat.unsqueeze(0).expand(count // mat.shape[0], -1, -1, -1)
    copies = copies.reshape(count, *mat.shape[1:])
    return copies.transpose(1, 2) if flipped else copies


#: Most batch slices that a step runs one by one instead of copying an operand.
MAX_SLICES = 64
#: Fewest bytes of copying that each slice must save: a slice costs about
#: five calls (views, GEMM), a copy streams about 10 GB/s.
MIN_SLICE_BYTES = 1 << 18
#: Fewest matrix rows of the sliced GEMMs: narrower GEMMs ran up to 1.8x slower
#: than one GEMM on the copy (1x1 layers with 24–64 output channels; 1.2x with
#: 128, for a Linear layer of 512 → 128 features on 56 x 56 positions).
MIN_SLICE_ROWS = 256


def _slicing_pays(
    sides: list[_Side], slices: int, step: _Pairwise, big: Tensor
) -> bool:
    """Whether a batched step should run slice by slice instead of copying an operand.

    Per batch slice, the outer free dimensions of a side without a GEMM view can
    be GEMM batches (:func:`_batch_outer_free`), so no operand is copied; the
    slices' results are stacked instead. That pays when the operand that would
    be copied is larger than the result, large enough for each slice to save
    :data:`MIN_SLICE_BYTES` of copying, and the sliced GEMMs keep at least
    :data:`MIN_SLICE_ROWS` rows. GGN diagonals, 10 vectors of 8 samples: a Linear
    layer with shared dimensions (56 x 56 positions, 128 → 512 features) took
    528 ms with a sample-major copy of its 514 MB of vectors and 184 ms slice by
    slice; ResNeXt's 64x56x56 → 256 1x1 layer 115 against 30 ms.

    Args:
        sides: Both operands, with ``mat`` set where a view serves.
        slices: Number of batch slices.
        step: The step's leg roles.
        big: The larger operand.

    Returns:
        ``True`` to run :func:`_sliced_step`.
    """
    if slices > MAX_SLICES:
        return False
    # sides whose outermost free leg can batch the GEMMs of a slice
    saved = [side for side in sides if side.mat is None and len(side.free) > 1]
    for side in saved:
        if math.prod(side.x.shape[d] for d in side.free[1:]) < MIN_SLICE_ROWS:
            return False
    copied = sum(side.x.numel() for side in saved)
    if copied * big.element_size() < slices * MIN_SLICE_BYTES:
        return False
    sizes = {
        leg: side.x.shape[d] for side in sides for d, leg in enumerate(side.letters)
    }
    return copied > math.prod(sizes[leg] for leg in step.output)


def _sliced_step(a: Tensor, b: Tensor, step: _Pairwise) -> Tensor:
    """A batched step as one unbatched step per batch index, results stacked.

    Args:
        a: First operand.
        b: Second operand.
        step: The step's leg roles (with batch legs).

    Returns:
        The step's result.
    """

    def without_batch(letters: str) -> str:
        return "".join(leg for leg in letters if leg not in step.batch)

    inner = step._replace(
        first=without_batch(step.first),
        second=without_batch(step.second),
        output=without_batch(step.output),
        batch="",
        gram=False,
    )
    sizes = [a.shape[step.first.index(leg)] for leg in step.batch]
    results = []
    for index in itertools.product(*map(range, sizes)):
        a_slice = _batch_slice(a, step.first, step.batch, index)
        b_slice = _batch_slice(b, step.second, step.batch, index)
        results.append(_bmm_step(a_slice, b_slice, inner))
    result = stack(results).view(*sizes, *results[0].shape)
    legs = step.batch + inner.output
    return result.permute([legs.index(leg) for leg in step.output])


def _batch_slice(x: Tensor, letters: str, batch: str, index: tuple[int, ...]) -> Tensor:
    """The slice of ``x`` at one index of the batch legs.

    Returns:
        A view without the batch legs' dimensions.
    """
    # select from the last dimension on, so that earlier positions stay valid
    for d, i in sorted(zip(map(letters.index, batch), index, strict=True))[::-1]:
        x = x.select(d, i)
    return x


def _gram_step(x: Tensor, step: _Pairwise) -> Tensor:
    """A Gram step ``x[b, f, c] x[b, f', c]``: one copy at most, and :func:`gram`.

    Args:
        x: The operand of both sides.
        step: The step's leg roles (``step.gram`` holds).

    Returns:
        The step's result.
    """
    batch = by_stride(x, [step.first.index(leg) for leg in step.batch])
    contracted = by_stride(x, [step.first.index(leg) for leg in step.contracted])
    free = by_stride(
        x, [d for d, leg in enumerate(step.first) if leg != step.second[d]]
    )
    mat = _matrices(x, batch, free, contracted)
    if mat is None:
        mat, free = _copied_matrices(x, batch, free, contracted)
    shape = [x.shape[d] for d in batch + free + free]
    legs = [step.first[d] for d in batch + free] + [step.second[d] for d in free]
    result = gram(mat).view(shape)
    return result.permute([legs.index(leg) for leg in step.output])


def _run_step(
    step: tuple[tuple[int, ...], str, _Pairwise | None], operands: list[Tensor]
) -> Tensor:
    """Evaluate one step of a contraction.

    Args:
        step: Positions, equation and leg roles of the step.
        operands: The step's operands, in the equation's order.

    Returns:
        The step's result.
    """
    _, equation, pair = step
    if pair is None:
        return einsum(equation, *operands)
    a, b = operands
    if _sums_nothing(a, pair):
        return _product_step(a, b, pair)
    if a.numel() + b.numel() < SMALL_STEP:
        if pair.dot:
            return _dot_step(a, b, pair)
        if not recording():
            return einsum(equation, a, b)
    if pair.gram and _same_view(a, b):
        return _gram_step(a, pair)
    return _bmm_step(a, b, pair)


def _product_step(a: Tensor, b: Tensor, step: _Pairwise) -> Tensor:
    """A step that sums nothing as one broadcast elementwise product.

    Its summed legs, if any, have size 1. ``torch.einsum`` runs a step without
    summed legs (e.g. the per-sample outer products ``x[n, i] g[n, o]``) as a
    batched GEMM with one summed element, 1.4x slower than the product on
    1152 x 512 outer products and twice as slow to dispatch; a GEMM with a summed
    leg of size 1 is as slow (per-sample gradients of a 512x1x1 3x3 layer at
    N = 8: 27 ms against 21 ms).

    Args:
        a: First operand.
        b: Second operand.
        step: The step's leg roles (summed legs of size 1 only).

    Returns:
        The step's result (in the memory order that ``torch.mul`` picks from the
        operands' strides).
    """
    product = _full_product(a, b, step)
    return product.squeeze(_summed_dims(step)) if step.contracted else product


def _sums_nothing(a: Tensor, step: _Pairwise) -> bool:
    """Whether all summed legs of a step have size 1 (or there are none).

    Returns:
        ``True`` if the step is an elementwise product.
    """
    return all(a.shape[step.first.index(leg)] == 1 for leg in step.contracted)


def _dot_step(a: Tensor, b: Tensor, step: _Pairwise) -> Tensor:
    """A small step of batched dot products as one product and one sum.

    ``torch.einsum`` runs such a step (e.g. the squared vectors of a GGN diagonal
    summed over the vectors, ``g[v, n, o] g[v, n, o] -> [n, o]``) as a batched
    GEMM of ``1 x 1`` results after copying both operands: 22.6 µs against 4.0
    for the product and the sum on ``[10, 8, 1, 256]`` (CPU, one thread). Large
    steps keep the GEMM, which needs no temporary of the operands' size.

    Args:
        a: First operand.
        b: Second operand, with the same letters.
        step: The step's leg roles (``step.dot`` holds).

    Returns:
        The step's result.
    """
    return _full_product(a, b, step).sum(_summed_dims(step))


def _full_product(a: Tensor, b: Tensor, step: _Pairwise) -> Tensor:
    """The broadcast product of a step's operands, before anything is summed.

    Returns:
        A tensor with the output's legs, then the summed legs (see
        :func:`_summed_dims`).
    """
    letters = step.output + step.contracted
    return _aligned(a, step.first, letters) * _aligned(b, step.second, letters)


def _summed_dims(step: _Pairwise) -> tuple[int, ...]:
    """Positions of the summed legs in :func:`_full_product`'s result.

    Returns:
        The trailing dimensions, one per summed leg.
    """
    return tuple(range(len(step.output), len(step.output) + len(step.contracted)))


def _aligned(x: Tensor, letters: str, output: str) -> Tensor:
    """A view of ``x`` with one dimension per output letter (size 1 where missing).

    Args:
        x: An operand.
        letters: Its letters.
        output: The result's letters; they include all of ``letters``.

    Returns:
        The view, broadcastable to the result.
    """
    order = [letters.index(leg) for leg in output if leg in letters]
    if order != sorted(order):
        x = x.permute(order)
    if len(letters) == len(output):
        return x
    sizes = iter(x.shape)
    return x.view([next(sizes) if leg in letters else 1 for leg in output])


def _same_view(first: Tensor, second: Tensor) -> bool:
    """Whether two tensors view the same memory the same way.

    Returns:
        ``True`` for the same tensor or equal :func:`view_key`.
    """
    return first is second or view_key(first) == view_key(second)


class _Recipe(NamedTuple):
    """What :func:`contract` does for one signature of legs and shapes.

    Attributes:
        scalars: Positions of the scalar operands.
        kept: Positions of the other operands.
        sums: ``(j, dims)``: sum dimensions ``dims`` of kept operand ``j`` first.
        smallest: Kept operand that scalars multiply.
        steps: ``(positions, equation, roles)`` per pairwise step, as in
            :func:`_plan`, plus the step's :class:`_Pairwise` (or ``None``);
            with at most two kept operands, one step that takes them in order.
    """

    scalars: tuple[int, ...]
    kept: tuple[int, ...]
    sums: tuple[tuple[int, tuple[int, ...]], ...]
    smallest: int
    steps: tuple[tuple[tuple[int, ...], str, _Pairwise | None], ...]


@lru_cache(maxsize=4096)
def _recipe(
    legs: tuple[tuple[str, ...], ...],
    output: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    optimize: str,
) -> _Recipe:
    scalars = tuple(j for j, shape in enumerate(shapes) if not shape)
    kept = tuple(j for j, shape in enumerate(shapes) if shape)
    kept_legs = [legs[j] for j in kept]
    kept_shapes = [shapes[j] for j in kept]
    counts = Counter(leg for op_legs in kept_legs for leg in op_legs)
    counts.update(output)
    sums = []
    for j, op_legs in enumerate(kept_legs):
        lonely = tuple(d for d, leg in enumerate(op_legs) if counts[leg] == 1)
        if lonely:
            sums.append((j, lonely))
            kept_legs[j] = tuple(leg for leg in op_legs if counts[leg] > 1)
            kept_shapes[j] = tuple(
                size for d, size in enumerate(kept_shapes[j]) if d not in lonely
            )
    sizes = [math.prod(shape) for shape in kept_shapes]
    smallest = min(range(len(sizes)), key=sizes.__getitem__) if sizes else 0
    equation = equation_from_legs(kept_legs, output)
    if len(kept) <= 2:  # a single pairwise step: no path to find
        plan = ((tuple(range(len(kept))), equation),)
    else:
        plan = _plan(equation, tuple(kept_shapes), optimize)
    steps = tuple((pos, eq, _pairwise(eq)) for pos, eq in plan)
    return _Recipe(scalars, kept, tuple(sums), smallest, steps)


def clear_caches():
    """Drop all cached contraction expressions and paths."""
    _recipe.cache_clear()
    _plan.cache_clear()
    _path_info.cache_clear()
