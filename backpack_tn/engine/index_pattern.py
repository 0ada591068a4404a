"""Index-pattern tensors Π(I, K, S, P, D) describing one spatial dimension.

A convolution with input size ``I``, kernel size ``K``, stride ``S``, padding
``P = (P_left, P_right)`` and dilation ``D`` connects input position ``i`` and
output position ``o`` through kernel element ``k`` if and only if
``i = o * S + k * D - P_left`` (Hayashi et al., 2019). The index pattern is the
binary tensor ``Π[k, o, i]`` that is one exactly there.

Non-zero padding modes (``'reflect'``, ``'replicate'``, ``'circular'``) map a
padded position to an existing input position instead of to zero. The pattern then
stays a binary tensor with at most one non-zero per ``(k, o)``, so every derivative
of the network is automatically correct for these modes, too.

Transposed convolution uses the pattern of the convolution it transposes: the
transposed layer's output plays the role of ``i``, its input the role of ``o``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backpack_tn.engine.tape import constant_cache

#: Supported ``padding_mode`` values.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class IndexPattern:
    """Connectivity of one spatial dimension of a convolution.

    Attributes:
        input_size: Number of (unpadded) input positions ``I``.
        kernel_size: Kernel size ``K``.
        stride: Stride ``S``.
        padding: Padding ``(P_left, P_right)``.
        dilation: Dilation ``D``.
        padding_mode: How padded positions are filled, one of ``PADDING_MODES``.
        num_outputs: Keep only the first ``num_outputs`` output positions. A
            transposed convolution with ``output_padding`` can have fewer inputs
            than the convolution it transposes has outputs. ``None`` keeps all.
    """

    input_size: int
    kernel_size: int
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dilation: int = 1
    padding_mode: str = "zeros"
    num_outputs: int | None = None

    def __post_init__(self):
        """Validate the hyper-parameters.

        Raises:
            ValueError: If a hyper-parameter is out of range or the pattern is empty.
        """
        for name in ("input_size", "kernel_size", "stride", "dilation"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"IndexPattern {name} must be a positive int, got {value!r}."
                )
        if len(self.padding) != 2 or min(self.padding) < 0:
            raise ValueError(
                "IndexPattern padding must be two non-negative ints (left, right),"
                f" got {self.padding!r}."
            )
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"Unsupported padding_mode {self.padding_mode!r}."
                f" Supported: {PADDING_MODES}."
            )
        if self.padding_mode in ("reflect", "circular"):
            limit = self.input_size - (self.padding_mode == "reflect")
            if max(self.padding) > limit:
                raise ValueError(
                    f"padding_mode {self.padding_mode!r} needs padding <= {limit} for"
                    f" input size {self.input_size}, got {self.padding!r}."
                )
        natural = self._natural_output_size
        if self.num_outputs is not None and not 1 <= self.num_outputs <= natural:
            raise ValueError(
                f"IndexPattern num_outputs must be in [1, {natural}], got"
                f" {self.num_outputs!r}."
            )
        if self.output_size < 1:
            raise ValueError(
                f"IndexPattern {self} has no output positions: the dilated kernel"
                f" ({self.dilation * (self.kernel_size - 1) + 1}) is larger than the"
                f" padded input ({self.padded_size})."
            )

    @property
    def padded_size(self) -> int:
        """Number of input positions after padding."""
        return self.input_size + sum(self.padding)

    @property
    def _natural_output_size(self) -> int:
        span = self.dilation * (self.kernel_size - 1) + 1
        return (self.padded_size - span) // self.stride + 1

    @property
    def output_size(self) -> int:
        """Number of output positions ``O``."""
        natural = self._natural_output_size
        return natural if self.num_outputs is None else min(natural, self.num_outputs)

    @property
    def is_unpadded(self) -> bool:
        """Whether the pattern reads no padded position."""
        return self.padding == (0, 0)

    @property
    def is_non_overlapping(self) -> bool:
        """Whether every input position feeds at most one ``(k, o)`` pair.

        Holds for dense (``K = S``), down-sampling (``S > K``) and ``1x1`` patterns.
        Such patterns are rewired into reshapes/strided views without duplicating
        any entry of the operand they act on.
        """
        if self.kernel_size == 1:
            return True
        return self.dilation == 1 and self.stride >= self.kernel_size

    def padding_map(self, device: torch.device | str = "cpu") -> Tensor:
        """Source input position of every padded position (``-1`` for zero).

        Args:
            device: Device of the result (cached per device, so that replays on
                a GPU copy nothing from the host).

        Returns:
            Long tensor of shape ``[I + P_left + P_right]``.
        """
        return _padding_map(self, torch.device(device))

    def index_map(self) -> Tensor:
        """Input position read by kernel element ``k`` at output ``o``.

        Returns:
            Long tensor of shape ``[K, O]`` on the CPU; ``-1`` marks a read of a
            zero-padded position.
        """
        return _index_map(self)

    def scatter_index(self, device: torch.device | str = "cpu") -> Tensor:
        """Input position of every flattened ``(k, o)`` pair, for ``index_add_``.

        Args:
            device: Device of the result (cached per device).

        Returns:
            Long tensor of shape ``[K * O]``; reads of zero padding point to the
            extra position ``I``.
        """
        return _scatter_index(self, torch.device(device))

    def dense(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Materialise the pattern as a dense tensor.

        Args:
            device: Device of the result.
            dtype: Data type of the result.

        Returns:
            Binary tensor ``Π`` of shape ``[K, O, I]``. Cached per
            ``(pattern, device, dtype)``: do not modify it in-place.
        """
        return _dense(self, torch.device(device), dtype)


@constant_cache(maxsize=512)
def _padding_map(pattern: IndexPattern, device: torch.device) -> Tensor:
    if device.type != "cpu":
        return _padding_map(pattern, torch.device("cpu")).to(device)
    size, (left, _) = pattern.input_size, pattern.padding
    q = torch.arange(pattern.padded_size) - left
    mode = pattern.padding_mode
    if mode == "zeros":
        return torch.where((q >= 0) & (q < size), q, -1)
    if mode == "replicate":
        return q.clamp(0, size - 1)
    if mode == "circular":
        return q.remainder(size)
    reflected = torch.where(q < 0, -q, q)  # reflect
    return torch.where(reflected >= size, 2 * (size - 1) - reflected, reflected)


@constant_cache(maxsize=512)
def _index_map(pattern: IndexPattern) -> Tensor:
    k = torch.arange(pattern.kernel_size).unsqueeze(1)
    o = torch.arange(pattern.output_size).unsqueeze(0)
    cpu = torch.device("cpu")
    return _padding_map(pattern, cpu)[o * pattern.stride + k * pattern.dilation]


@constant_cache(maxsize=512)
def _scatter_index(pattern: IndexPattern, device: torch.device) -> Tensor:
    index = _index_map(pattern).flatten()
    return torch.where(index >= 0, index, pattern.input_size).to(device)


@constant_cache(maxsize=256)
def _dense(pattern: IndexPattern, device: torch.device, dtype: torch.dtype) -> Tensor:
    index = pattern.index_map()
    valid = index >= 0
    dense = torch.zeros(
        pattern.kernel_size, pattern.output_size, pattern.input_size + 1, dtype=dtype
    )
    dense.scatter_(2, torch.where(valid, index, pattern.input_size).unsqueeze(2), 1.0)
    return dense[:, :, :-1].contiguous().to(device)


def clear_caches():
    """Drop all cached index maps and dense patterns."""
    for cached in (_padding_map, _index_map, _scatter_index, _dense):
        cached.cache_clear()
