"""Symbolic tensor networks with index-pattern operands.

A :class:`TensorNetwork` holds dense operands (tensors) and symbolic index patterns
(:class:`~backpack_tn.engine.index_pattern.IndexPattern`), each with named legs, and
the names of the output legs. It is simplified by rewiring patterns into strided
views of the operand they act on (input side) or into a write of the result through
a strided view, or a reshape (output side; a scatter-add for non-zero padding
modes), and evaluated with opt_einsum along a cached contraction path.

Simplification is exact: the simplified network computes the same tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backpack_tn.engine.contract import contract, equation_from_legs, path_info
from backpack_tn.engine.index_pattern import IndexPattern
from backpack_tn.engine.layout import view_key

Operand = Tensor | IndexPattern


@dataclass
class TensorNetwork:
    """A tensor network whose operands are tensors or index patterns.

    Attributes:
        operands: Tensors and index patterns.
        legs: Leg names of every operand. A pattern's legs are ``(k, o, i)``.
        output: Leg names of the result, in order.
        finalizers: Functions applied to the contraction result, in order. They
            are added by output-side simplifications.
    """

    operands: list[Operand]
    legs: list[tuple[str, ...]]
    output: tuple[str, ...]
    finalizers: list[Callable[[Tensor], Tensor]] = field(default_factory=list)
    einsum_output: tuple[str, ...] | None = None

    def __post_init__(self):
        """Check that operands and legs match.

        Raises:
            ValueError: If the number of legs of an operand does not match its order,
                or an output leg belongs to no operand.
        """
        if len(self.operands) != len(self.legs):
            raise ValueError(
                f"Got {len(self.operands)} operands but {len(self.legs)} leg tuples."
            )
        for operand, legs in zip(self.operands, self.legs, strict=False):
            order = 3 if isinstance(operand, IndexPattern) else operand.dim()
            if order != len(legs):
                raise ValueError(
                    f"Operand of order {order} was given {len(legs)} legs {legs}."
                )
        known = {leg for legs in self.legs for leg in legs}
        missing = [leg for leg in self._einsum_output if leg not in known]
        if missing:
            raise ValueError(f"Output legs {missing} belong to no operand.")

    @property
    def patterns(self) -> list[IndexPattern]:
        """The index patterns that are still symbolic."""
        return [op for op in self.operands if isinstance(op, IndexPattern)]

    @property
    def tensors(self) -> list[Tensor]:
        """The dense operands."""
        return [op for op in self.operands if isinstance(op, Tensor)]

    def _reference_tensor(self) -> Tensor:
        tensors = self.tensors
        if not tensors:
            raise ValueError("A tensor network needs at least one dense operand.")
        return tensors[0]

    def materialized(self) -> tuple[list[Tensor], list[tuple[str, ...]]]:
        """Operands with all remaining patterns as dense tensors.

        Returns:
            The dense operands and their legs.
        """
        ref = self._reference_tensor()
        operands = [
            op.dense(ref.device, ref.dtype) if isinstance(op, IndexPattern) else op
            for op in self.operands
        ]
        return operands, list(self.legs)

    def einsum_expression(self) -> tuple[str, list[Tensor]]:
        """The network as an einsum equation and dense operands.

        Returns:
            Equation (letters ``a-zA-Z``, then other symbols) and operands.

        Raises:
            ValueError: If output-side simplifications were applied; their
                scatter-add has no einsum form.
        """
        if self.finalizers:
            raise ValueError(
                "The network has output-side simplifications and is not a single"
                " einsum; call contract() instead."
            )
        operands, legs = self.materialized()
        return equation_from_legs(legs, self.output), operands

    def simplify(
        self, lower_all: bool = False, output_side: bool = True
    ) -> TensorNetwork:
        """Rewire index patterns into views and scatters where this is exact.

        Patterns that never duplicate an entry (dense ``K = S``, down-sampling
        ``S > K``, ``1x1``) are always rewired: on the input side into a zero-copy
        strided view of the operand, on the output side into a reshape (patterns
        that tile the input exactly) or a write through a strided view of the
        result (a scatter-add for non-zero padding modes). Padding becomes an
        explicit pad (or, for non-zero modes, a gather) of the operand. With
        ``lower_all``, every other pattern is lowered too, which trades the dense
        pattern's ``K·O·I`` multiply for an ``im2col``-like copy of size ``K·O``.

        Args:
            lower_all: Also lower overlapping patterns.
            output_side: Also rewire patterns acting on the result. The network is
                then no longer a single einsum (see ``einsum_expression``).

        Returns:
            A new, equivalent network.
        """
        net = copy.copy(self)  # validated already; the rewiring keeps it valid
        net.operands = list(self.operands)
        net.legs = list(self.legs)
        net.finalizers = list(self.finalizers)
        inputs: dict[int, list[int]] = {}  # holder: positions of its patterns
        outputs = []
        for pos, pattern in enumerate(net.operands):
            if not isinstance(pattern, IndexPattern):
                continue
            if not (lower_all or pattern.is_non_overlapping):
                continue
            k, o, i = net.legs[pos]
            holders = [
                j
                for j, legs in enumerate(net.legs)
                if j != pos and i in legs and isinstance(net.operands[j], Tensor)
            ]
            if len(holders) == 1 and i not in net.output:
                inputs.setdefault(holders[0], []).append(pos)
            elif (
                output_side
                and not holders
                and i in net.output
                and not {k, o} & set(net._einsum_output)
            ):
                outputs.append(pos)
        padded: dict[tuple, Tensor] = {}  # one pad per operand and padding
        for holder, positions in inputs.items():
            _lower_input_side(net, positions[::-1], holder, padded)
        written = [pos for pos in outputs if _writable(net.operands[pos])]
        for pos in reversed(outputs):
            if pos not in written:
                _lower_output_side(net, pos)
        if written:
            _write_output_side(net, written)
        for pos in sorted([*outputs, *sum(inputs.values(), [])], reverse=True):
            del net.operands[pos], net.legs[pos]
        return net

    def contract(self, optimize: str | None = None) -> Tensor:
        """Evaluate the network.

        Args:
            optimize: opt_einsum path optimiser. ``None`` uses the current default
                (see :func:`backpack_tn.engine.contract.set_optimizer`).

        Returns:
            The contraction result, with legs ordered as ``output``.
        """
        operands, legs = self.materialized()
        result = contract(legs, self._einsum_output, operands, optimize=optimize)
        for finalize in self.finalizers:
            result = finalize(result)
        return result

    @property
    def _einsum_output(self) -> tuple[str, ...]:
        """Output legs of the einsum before the finalizers run."""
        return self.output if self.einsum_output is None else self.einsum_output


def _lower_input_side(
    net: TensorNetwork, positions: list[int], holder: int, padded: dict[tuple, Tensor]
):
    """Turn patterns into a strided view of the operand they read (in place).

    The operand is padded once for all patterns (one copy), then each pattern
    becomes an ``unfold`` view. An operand that occurs twice with the same patterns
    (``x`` in squared networks, as the same view of memory) is padded once for
    both, so that their views are the same and a Gram step reads them with one
    copy at most. The patterns stay in the network for the caller to remove.

    Args:
        net: The network to modify.
        positions: Positions of the patterns, in the order their kernel legs are
            appended to the operand's legs.
        holder: Position of the only dense operand carrying the patterns' ``i``
            legs.
        padded: Padded operands so far, keyed by the operand's
            :func:`~backpack_tn.engine.layout.view_key` and the patterns of its
            dimensions; updated.
    """
    tensor, legs = net.operands[holder], list(net.legs[holder])
    patterns = {legs.index(net.legs[pos][2]): net.operands[pos] for pos in positions}
    key = (view_key(tensor), tuple(sorted(patterns.items())))
    if key not in padded:
        padded[key] = pad(tensor, patterns)
    tensor = padded[key]
    for pos in positions:
        pattern: IndexPattern = net.operands[pos]
        k, o, i = net.legs[pos]
        dim = legs.index(i)
        tensor = _windows(tensor, dim, pattern)
        legs[dim] = o
        legs.append(k)
    net.operands[holder], net.legs[holder] = tensor, tuple(legs)


def _windows(tensor: Tensor, dim: int, pattern: IndexPattern) -> Tensor:
    """The positions a pattern reads along ``dim``, as a strided view (no copy).

    Args:
        tensor: Tensor of shape ``[..., P, ...]`` with the padded size ``P`` of
            ``pattern`` along ``dim``.
        dim: The dimension the pattern reads.
        pattern: The index pattern.

    Returns:
        View of shape ``[..., O, ..., K]``: ``dim`` becomes the output positions,
        and a last dimension holds the kernel elements.
    """
    span = pattern.dilation * (pattern.kernel_size - 1) + 1
    view = tensor.unfold(dim, span, pattern.stride).narrow(dim, 0, pattern.output_size)
    return view[..., :: pattern.dilation] if pattern.dilation > 1 else view


def _lower_output_side(net: TensorNetwork, pos: int):
    """Turn output-side pattern ``pos`` into a scatter-add of the result (in place).

    The einsum then produces the legs ``(k, o)`` in place of ``i``; a finalizer
    adds every ``(k, o)`` entry to the input position it reads. The pattern stays
    in the network for the caller to remove.

    Args:
        net: The network to modify.
        pos: Position of the pattern.
    """
    pattern: IndexPattern = net.operands[pos]
    k, o, i = net.legs[pos]
    einsum_output = list(net._einsum_output)
    dim = einsum_output.index(i)
    einsum_output[dim : dim + 1] = [k, o]
    net.einsum_output = tuple(einsum_output)
    net.finalizers.insert(0, _scatter_finalizer(pattern, dim))


def _writable(pattern: IndexPattern) -> bool:
    """Whether an output-side pattern can be a write through a strided view.

    Returns:
        ``True`` for unpadded or zero-padded non-overlapping patterns (every input
        position receives at most one entry; with other padding modes, reads of
        padded positions fall onto real ones).
    """
    return pattern.is_non_overlapping and (
        pattern.is_unpadded or pattern.padding_mode == "zeros"
    )


def _tiles(pattern: IndexPattern) -> bool:
    """Whether ``(o, k) -> o * S + k`` is a bijection onto the input positions.

    Returns:
        ``True`` for unpadded patterns with ``K = S`` (or ``1x1``, stride 1) that
        cover the input exactly.
    """
    return (
        pattern.is_unpadded
        and pattern.stride == pattern.kernel_size
        and (pattern.dilation == 1 or pattern.kernel_size == 1)
        and pattern.output_size * pattern.stride == pattern.input_size
    )


def _write_output_side(net: TensorNetwork, positions: list[int]):
    """Turn non-overlapping output-side patterns into a strided write (in place).

    The einsum produces ``o`` in place of each pattern's ``i`` leg. If every
    pattern tiles its input exactly (``_tiles``), the ``k`` leg follows ``o`` and
    a reshape merges them (a view where the einsum's result has that order);
    otherwise the ``k`` legs are appended, and a finalizer copies the result into
    a strided view of a zero tensor of the padded size (each ``(k, o)`` entry
    lands on the one input position it reads), then drops the padding. The
    patterns stay in the network for the caller to remove.

    Args:
        net: The network to modify.
        positions: Positions of the patterns, each non-overlapping and
            ``_writable``.
    """
    einsum_output = list(net._einsum_output)
    patterns = [net.operands[pos] for pos in positions]
    if all(_tiles(pattern) for pattern in patterns):
        for pos in positions:
            k, o, i = net.legs[pos]
            dim = einsum_output.index(i)
            einsum_output[dim : dim + 1] = [o, k]
        net.einsum_output = tuple(einsum_output)
        pairs = [einsum_output.index(net.legs[pos][1]) for pos in positions]
        net.finalizers.insert(0, _merge_finalizer(pairs))
        return
    dims = {}
    for pos in positions:
        k, o, i = net.legs[pos]
        dim = einsum_output.index(i)
        einsum_output[dim] = o
        einsum_output.append(k)
        dims[dim] = net.operands[pos]
    net.einsum_output = tuple(einsum_output)
    net.finalizers.insert(0, _write_finalizer(dims))


def _merge_finalizer(pairs: list[int]) -> Callable[[Tensor], Tensor]:
    """Build the merge of adjacent ``(o, k)`` dimensions into one.

    Args:
        pairs: Dimension of each pair's ``o``; its ``k`` follows it.

    Returns:
        A function mapping ``[..., O, K, ...]`` to ``[..., O * K, ...]`` for every
        pair (a view where the strides allow it).
    """

    def finalize(result: Tensor) -> Tensor:
        shape = list(result.shape)
        for dim in sorted(pairs, reverse=True):
            shape[dim : dim + 2] = [shape[dim] * shape[dim + 1]]
        return result.reshape(shape)

    return finalize


def _write_finalizer(dims: dict[int, IndexPattern]) -> Callable[[Tensor], Tensor]:
    """Build the adjoint of reading through non-overlapping, zero-padded patterns.

    Args:
        dims: The pattern of each dimension that holds an ``o`` leg; the ``k``
            legs are the result's last dimensions, in this order.

    Returns:
        A function mapping a tensor ``[..., O, ..., K_1, ...]`` to
        ``[..., I, ...]``.
    """

    def finalize(result: Tensor) -> Tensor:
        shape = list(result.shape[: result.dim() - len(dims)])
        for dim, pattern in dims.items():
            shape[dim] = pattern.padded_size
        out = result.new_zeros(shape)
        view = out
        for dim, pattern in dims.items():
            view = _windows(view, dim, pattern)
        view.copy_(result)
        for dim, pattern in dims.items():
            out = out.narrow(dim, pattern.padding[0], pattern.input_size)
        return out

    return finalize


def _scatter_finalizer(pattern: IndexPattern, dim: int) -> Callable[[Tensor], Tensor]:
    """Build the adjoint of reading through ``pattern`` along ``dim``.

    Args:
        pattern: The index pattern.
        dim: Position of the ``k`` leg; the ``o`` leg follows it.

    Returns:
        A function mapping a tensor ``[..., K, O, ...]`` to ``[..., I, ...]``.
    """

    def finalize(result: Tensor) -> Tensor:
        return scatter_add(result.flatten(dim, dim + 1), dim, pattern)

    return finalize


def pad(tensor: Tensor, patterns: dict[int, IndexPattern]) -> Tensor:
    """Pad ``tensor`` along several dimensions as their patterns do.

    Zero padding of all dimensions is one ``torch.nn.functional.pad`` (one copy of
    the tensor, one call); other modes gather along their dimension.

    Args:
        tensor: Tensor of shape ``[..., I, ...]`` along each padded dimension.
        patterns: The index pattern of each dimension (non-negative) to pad.

    Returns:
        The tensor itself if no pattern pads, else the padded tensor, of shape
        ``[..., P_left + I + P_right, ...]`` along each padded dimension.
    """
    padded = {d: p for d, p in patterns.items() if not p.is_unpadded}
    zeros = {d: p for d, p in padded.items() if p.padding_mode == "zeros"}
    if zeros:
        amounts = []  # functional.pad counts from the last dimension
        for d in range(tensor.dim() - 1, min(zeros) - 1, -1):
            amounts.extend(zeros[d].padding if d in zeros else (0, 0))
        tensor = torch.nn.functional.pad(tensor, amounts)
    for d, pattern in padded.items():
        if d not in zeros:
            tensor = tensor.index_select(d, pattern.padding_map(tensor.device))
    return tensor


def scatter_add(flat: Tensor, dim: int, pattern: IndexPattern) -> Tensor:
    """Adjoint of reading through a pattern, with ``(k, o)`` flattened.

    Args:
        flat: Tensor of shape ``[..., K * O, ...]``.
        dim: Dimension holding the flattened ``(k, o)`` pairs.
        pattern: Index pattern.

    Returns:
        Tensor of shape ``[..., I, ...]`` that sums every entry into the input
        position it was read from (reads of zero padding are dropped).
    """
    size = pattern.input_size
    shape = list(flat.shape)
    shape[dim] = size + 1
    out = flat.new_zeros(shape)
    out.index_add_(dim, pattern.scatter_index(flat.device), flat)
    return out.narrow(dim, 0, size)


def leg_sizes(net: TensorNetwork) -> dict[str, int]:
    """Size of every leg in the network.

    Args:
        net: A tensor network.

    Returns:
        Mapping from leg name to dimension.

    Raises:
        ValueError: If a leg has inconsistent sizes.
    """
    sizes: dict[str, int] = {}
    for operand, legs in zip(net.operands, net.legs, strict=False):
        if isinstance(operand, IndexPattern):
            shape = (operand.kernel_size, operand.output_size, operand.input_size)
        else:
            shape = tuple(operand.shape)
        for leg, size in zip(legs, shape, strict=False):
            if sizes.setdefault(leg, size) != size:
                raise ValueError(
                    f"Leg {leg!r} has inconsistent sizes {sizes[leg]} and {size}."
                )
    return sizes


def _path(net: TensorNetwork, optimize: str | None):
    sizes = leg_sizes(net)
    shapes = [tuple(sizes[leg] for leg in legs) for legs in net.legs]
    return path_info(net.legs, net._einsum_output, shapes, optimize)


def flops(net: TensorNetwork, optimize: str | None = None) -> int:
    """Estimated FLOPs of contracting the network along its path.

    Args:
        net: A tensor network.
        optimize: opt_einsum path optimiser.

    Returns:
        opt_einsum's FLOP estimate (includes the finalizers' size, not their cost).
    """
    return int(_path(net, optimize).opt_cost)


def largest_intermediate(net: TensorNetwork, optimize: str | None = None) -> int:
    """Elements of the largest tensor that contracting the network along its path forms.

    Args:
        net: A tensor network.
        optimize: opt_einsum path optimiser.

    Returns:
        opt_einsum's count, the contraction's result included (not the finalizers').
    """
    return int(_path(net, optimize).largest_intermediate)
