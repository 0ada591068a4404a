"""Evaluation of einsum networks with opt_einsum and cached contraction paths.

The contraction path of a network is computed once per ``(equation, shapes,
optimiser)`` and cached. The optimiser is a setting: :func:`set_optimizer` changes
the default, :func:`optimizer` changes it inside a ``with`` block.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

import opt_einsum
from opt_einsum.parser import convert_to_valid_einsum_chars
from torch import Tensor, einsum

from backpack_tn.engine.gram import gram
from backpack_tn.engine.layout import by_stride, flat_view

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


class _SelfProduct(NamedTuple):
    """A pairwise step that is a Gram product when both operands are one tensor.

    Both operands carry the same legs at the same positions, except for free legs
    (kept in the result) that differ between them: ``x[b, f, c] x[b, f', c]``
    summed over ``c``. ``torch.einsum`` would copy ``x`` into a GEMM layout twice,
    in an order that ignores its strides (on a strided view of a non-overlapping
    pattern, such a copy can take ten times longer than a well-ordered one). One
    copy in a good order and :func:`~backpack_tn.engine.gram.gram` do the same work.

    Attributes:
        batch: Dimensions of the operand that are batch dimensions.
        free: Dimensions that are free (different legs in the two operands).
        contracted: Dimensions that are summed over.
        first: The first operand's letters.
        second: The second operand's letters.
        output: The step result's letters.
    """

    batch: tuple[int, ...]
    free: tuple[int, ...]
    contracted: tuple[int, ...]
    first: str
    second: str
    output: str


def _self_product(equation: str) -> _SelfProduct | None:
    """The Gram form of a pairwise step, if it has one.

    Args:
        equation: Einsum equation of a pairwise step.

    Returns:
        The step's Gram form, or ``None`` when the legs do not have its pattern.
    """
    inputs, output = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2 or len(operands[0]) != len(operands[1]):
        return None
    first, second = operands
    if len(set(first)) != len(first) or len(set(second)) != len(second):
        return None
    batch, free, contracted = [], [], []
    for d, (a, b) in enumerate(zip(first, second, strict=True)):
        if a == b:
            (batch if a in output else contracted).append(d)
        elif a in output and b in output and a not in second and b not in first:
            free.append(d)
        else:
            return None
    legs = [first[d] for d in batch + free] + [second[d] for d in free]
    if not free or sorted(legs) != sorted(output):
        return None
    return _SelfProduct(
        tuple(batch), tuple(free), tuple(contracted), first, second, output
    )


def _gram_operand(
    x: Tensor, product: _SelfProduct
) -> tuple[Tensor, list[int], list[int]]:
    """``x`` as matrices ``[B, F, C]`` for a Gram product, copied at most once.

    A GEMM reads matrices whose rows or columns are contiguous. If a view of ``x``
    has that layout, it is used. Otherwise ``x`` is copied with its largest
    dimension innermost: copies whose innermost dimension is short (a size-2
    kernel leg) are slow.

    Args:
        x: The operand of the step.
        product: The step's Gram form.

    Returns:
        The matrices, and the order of the batch and free dimensions in them.
    """
    batch = by_stride(x, product.batch)
    free = by_stride(x, product.free)
    contracted = by_stride(x, product.contracted)
    for rows, columns in ((free, contracted), (contracted, free)):
        mat = flat_view(x, (batch, rows, columns))
        if mat is not None and 1 in (mat.stride(1), mat.stride(2)):
            return (mat if rows is free else mat.transpose(1, 2)), batch, free
    biggest = max(free + contracted, key=x.shape.__getitem__)
    if biggest in free:
        free = [d for d in free if d != biggest] + [biggest]
        outer, inner = contracted, free
    else:
        contracted = [d for d in contracted if d != biggest] + [biggest]
        outer, inner = free, contracted
    sizes = [math.prod(x.shape[d] for d in group) for group in (batch, outer, inner)]
    mat = x.permute(batch + outer + inner).contiguous().view(sizes)
    return (mat.transpose(1, 2) if inner is free else mat), batch, free


def _run_step(
    step: tuple[tuple[int, ...], str, _SelfProduct | None], operands: list[Tensor]
) -> Tensor:
    """Evaluate one pairwise (or single-operand) step.

    Args:
        step: Positions, equation and Gram form of the step.
        operands: The step's operands, in the equation's order.

    Returns:
        The step's result.
    """
    _, equation, product = step
    if product is None or not _same_view(*operands):
        return einsum(equation, *operands)
    x = operands[0]
    mat, batch, free = _gram_operand(x, product)
    shape = [x.shape[d] for d in batch + free + free]
    legs = [product.first[d] for d in batch + free] + [product.second[d] for d in free]
    result = gram(mat).view(shape)
    return result.permute([legs.index(leg) for leg in product.output])


def _same_view(first: Tensor, second: Tensor) -> bool:
    """Whether two tensors view the same memory the same way.

    Returns:
        ``True`` for the same data pointer, shape, strides and dtype.
    """
    return first is second or (
        first.data_ptr() == second.data_ptr()
        and first.shape == second.shape
        and first.stride() == second.stride()
        and first.dtype == second.dtype
    )


class _Recipe(NamedTuple):
    """What :func:`contract` does for one signature of legs and shapes.

    Attributes:
        scalars: Positions of the scalar operands.
        kept: Positions of the other operands.
        sums: ``(j, dims)``: sum dimensions ``dims`` of kept operand ``j`` first.
        smallest: Kept operand that scalars multiply.
        steps: ``(positions, equation, gram_form)`` per pairwise step, as in
            :func:`_plan`, plus the step's :class:`_SelfProduct` (or ``None``);
            with at most two kept operands, one step that takes them in order.
    """

    scalars: tuple[int, ...]
    kept: tuple[int, ...]
    sums: tuple[tuple[int, tuple[int, ...]], ...]
    smallest: int
    steps: tuple[tuple[tuple[int, ...], str, _SelfProduct | None], ...]


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
    steps = tuple((pos, eq, _self_product(eq)) for pos, eq in plan)
    return _Recipe(scalars, kept, tuple(sums), smallest, steps)


def clear_caches():
    """Drop all cached contraction expressions and paths."""
    _recipe.cache_clear()
    _plan.cache_clear()
    _path_info.cache_clear()
