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
        result = einsum(recipe.steps[0][1], *kept)
    else:
        for positions, step in recipe.steps:
            kept.append(einsum(step, *[kept.pop(p) for p in positions]))
        (result,) = kept
    return result if scale is None else result * scale


class _Recipe(NamedTuple):
    """What :func:`contract` does for one signature of legs and shapes.

    Attributes:
        scalars: Positions of the scalar operands.
        kept: Positions of the other operands.
        sums: ``(j, dims)``: sum dimensions ``dims`` of kept operand ``j`` first.
        smallest: Kept operand that scalars multiply.
        steps: ``(positions, equation)`` per pairwise step, as in :func:`_plan`;
            with at most two kept operands, one step that takes them in order.
    """

    scalars: tuple[int, ...]
    kept: tuple[int, ...]
    sums: tuple[tuple[int, tuple[int, ...]], ...]
    smallest: int
    steps: tuple[tuple[tuple[int, ...], str], ...]


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
        steps = ((tuple(range(len(kept))), equation),)
    else:
        steps = _plan(equation, tuple(kept_shapes), optimize)
    return _Recipe(scalars, kept, tuple(sums), smallest, steps)


def clear_caches():
    """Drop all cached contraction expressions and paths."""
    _recipe.cache_clear()
    _plan.cache_clear()
    _path_info.cache_clear()
