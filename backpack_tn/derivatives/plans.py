"""Recorded evaluations, replayed per layer configuration and input layout.

The first call of a product on a layer configuration evaluates it eagerly under
:func:`~backpack_tn.engine.tape.capture`; later calls with inputs of the same
layout (shapes, strides, storage offsets, dtypes, devices) run the recorded
torch calls directly. This skips building, simplifying and planning the network,
which costs tens of microseconds per call, and several times that when a
backward pass through many layers has left the caches cold. An evaluation that
cannot be recorded exactly stays eager (see :mod:`backpack_tn.engine.tape`).

The settings that steer an evaluation (path optimiser, GEMM library, GEMM and
block thresholds) are part of the key, so changing them never replays stale code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from backpack_tn.derivatives import implementations
from backpack_tn.engine import contract, gemm
from backpack_tn.engine.tape import PLAIN_TYPES, capture, input_problem

#: Bound on the number of stored plans; the store is emptied when it is full.
MAX_PLANS = 4096

_ENABLED = {"enabled": True}
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_PLANS: dict[tuple, Callable[..., Tensor] | None] = {}
_REFUSALS: dict[tuple, str] = {}


def set_replay(enabled: bool):
    """Replay recorded evaluations (default) or evaluate every call eagerly.

    Args:
        enabled: Whether to record and replay.
    """
    _ENABLED["enabled"] = bool(enabled)
    clear_plans()


def clear_plans():
    """Forget all recorded evaluations."""
    _PLANS.clear()
    _REFUSALS.clear()


def _settings() -> tuple:
    """The module-level settings that change what an evaluation does.

    Returns:
        Their current values.
    """
    return (
        contract.get_optimizer(),
        contract.SMALL_STEP,
        contract.MAX_SLICES,
        contract.MIN_SLICE_BYTES,
        contract.MIN_SLICE_ROWS,
        implementations.VJP_BLOCK_BYTES,
        implementations.INPUT_PRODUCT_BLOCK_BYTES,
        implementations.VJP_BLOCK_BYTES_GPU,
        implementations.KERNEL_BLOCK_BYTES,
        implementations.KERNEL_VJP_BLOCK_BYTES,
        implementations.INPUT_VJP_BLOCK_BYTES,
        implementations.INPUT_VJP_ONE_CALL_BYTES,
        implementations.UNFOLDED_BLOCK_BYTES,
        implementations.SQUARED_NETWORK_BLOCK_BYTES,
        implementations.INPUT_VJP_BLOCK_POSITIONS,
        implementations.INPUT_VJP_BLOCK_WEIGHT_BYTES,
        implementations.INPUT_VJP_BLOCK_SAMPLE_BYTES,
        implementations.HIGHER_CONV_GROUPS,
        implementations.HIGHER_CONV_SLOW_GROUPS,
        implementations.HIGHER_CONV_BLOCK_CHANNELS,
        implementations.HIGHER_CONV_BLOCK_INPUT,
        gemm.gemm_backend(),
        gemm.MIN_FLOPS,
        gemm.NARROW_COLUMNS,
    )


def _layouts(inputs: Sequence[Tensor]) -> tuple | None:
    """The layouts of an evaluation's inputs, if a replay can take them.

    Returns:
        Shape, strides, storage offset, dtype and device per input; ``None``
        for a wrapped tensor or a tensor subclass (see
        :func:`~backpack_tn.engine.tape.replayable`, inlined here as this runs
        on every call). The same tensor passed twice is checked only before a
        record: a record of distinct inputs replays them correctly.
    """
    layouts = []
    for tensor in inputs:
        if type(tensor) not in PLAIN_TYPES or _is_wrapped(tensor):
            return None
        layouts.append(
            (
                tensor.shape,
                tensor.stride(),
                tensor.storage_offset(),
                tensor.dtype,
                tensor.device,
            )
        )
    return tuple(layouts)


def run(
    key: tuple, prepare: Callable[[], Callable[[], Tensor]], inputs: Sequence[Tensor]
) -> Tensor:
    """Evaluate through the plan stored for ``key`` and the inputs' layout.

    Args:
        key: Hashable description of the evaluation apart from its inputs (op,
            strategy, layer configuration, non-tensor arguments).
        prepare: Checks the arguments, chooses an evaluation and returns it as a
            function without arguments that reads ``inputs``. It runs only when
            no plan is stored, and outside the record (an autotuned choice times
            its candidates there).
        inputs: Every tensor the evaluation reads.

    Returns:
        The evaluation's result (or its replay's).
    """
    layouts = _layouts(inputs) if _ENABLED["enabled"] else None
    if layouts is None:
        return prepare()()
    full_key = (key, layouts, _settings())
    plan = _PLANS.get(full_key, _MISSING)
    if plan is None:
        return prepare()()
    if plan is not _MISSING:
        return plan(*inputs)
    if input_problem(inputs) is not None:
        return prepare()()
    result, plan, refusal = capture(prepare(), inputs)
    if len(_PLANS) >= MAX_PLANS:
        clear_plans()
    _PLANS[full_key] = plan
    if refusal is not None:
        _REFUSALS[full_key] = refusal
    return result


def refusals() -> dict[tuple, str]:
    """Why evaluations stayed eager, per stored key (for inspection and tests).

    Returns:
        Key to reason.
    """
    return dict(_REFUSALS)


_MISSING = object()
