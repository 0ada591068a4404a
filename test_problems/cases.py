"""Shared machinery for case lists: key checks, ids, devices and problem building.

A case is a dict with the keys

- ``seed``: seed set before ``module_fn`` and ``input_fn`` are called,
- ``module_fn``: lazy constructor of the layer (default dtype, CPU),
- ``input_fn``: lazy constructor of the input (default dtype, CPU),
- ``id`` (optional): description used in place of the generated one,
- ``tols`` (optional): ``{"rtol": ..., "atol": ...}`` overriding ``DEFAULT_TOLS``.

:func:`expand_cases` checks the keys and expands every case over ``DEVICES`` and
``DTYPES``; :func:`build_problem` turns an expanded case into a layer whose input and
output are stored the way BackPACK's forward hooks store them.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor
from torch.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Linear,
    Module,
)

REQUIRED_KEYS = frozenset({"seed", "module_fn", "input_fn"})
"""Keys every case must have."""

OPTIONAL_KEYS = {"id": None, "tols": None}
"""Keys a case may have, with their defaults."""

"""Keys a case may have."""

DEVICES = ("cpu", "cuda")
"""Devices every case runs on; ``cuda`` cases are skipped when CUDA is absent."""

DTYPES = (torch.float64,)
"""Dtypes every case runs in. Exact tests run in double precision."""

CONV_TYPES = (Conv1d, Conv2d, Conv3d)
CONV_TRANSPOSE_TYPES = (ConvTranspose1d, ConvTranspose2d, ConvTranspose3d)


class Problem(NamedTuple):
    """A layer built from a case, with input and output stored as BackPACK does.

    Attributes:
        case_id: Test id of the expanded case.
        module: Layer on the case's device and dtype, with ``module.input0`` (shape
            ``[N, *in]``) and ``module.output`` (shape ``[N, *out]``) set.
        x: Input of shape ``[N, *in]``, the same tensor as ``module.input0``.
        tols: Tolerance overrides for the comparator, possibly empty.
    """

    case_id: str
    module: Module
    x: Tensor
    tols: dict[str, float]


def check_keys(
    case: dict[str, Any],
    required: frozenset[str],
    optional: dict[str, Any],
    kind: str = "case",
) -> dict[str, Any]:
    """Check a case dict's keys against a family's sets and fill in the defaults.

    Args:
        case: Case dict.
        required: Keys the case must have.
        optional: Keys it may have, with their defaults.
        kind: Name of the case family, for the messages.

    Returns:
        Copy of the case with every optional key present.

    Raises:
        ValueError: If the case has unknown keys or lacks required ones.
    """
    allowed = required | optional.keys()
    unknown = case.keys() - allowed
    if unknown:
        raise ValueError(
            f"Unknown {kind} keys {sorted(unknown)}. Allowed: {sorted(allowed)}."
        )
    missing = required - case.keys()
    if missing:
        raise ValueError(
            f"Missing {kind} keys {sorted(missing)}. Required: {sorted(required)}."
        )
    return {**optional, **case}


def check_case(case: dict[str, Any]) -> dict[str, Any]:
    """Check a layer case's keys and fill in the optional ones.

    Args:
        case: Case dict.

    Returns:
        Copy of the case with all keys of ``REQUIRED_KEYS`` and ``OPTIONAL_KEYS``.
    """
    return check_keys(case, REQUIRED_KEYS, OPTIONAL_KEYS)


def _fmt(value: int | str | Sequence[int]) -> str:
    """Format a hyperparameter for an id: ``3``, ``3x2`` or ``same``.

    Args:
        value: An int, a string, or a tuple of ints (collapsed if all entries agree).

    Returns:
        The formatted value, without spaces.
    """
    if isinstance(value, str | int):
        return str(value)
    if len(set(value)) == 1:
        return str(value[0])
    return "x".join(str(v) for v in value)


def describe(module: Module, x: Tensor) -> str:
    """Describe a layer and its input for a test id.

    Args:
        module: ``Linear``, ``ConvNd`` or ``ConvTransposeNd`` layer.
        x: Input of shape ``[N, *in]``.

    Returns:
        Description like ``conv2d-in=2x3x8x8-k=3-s=2-p=1-d=1-g=1-pm=zeros``.

    Raises:
        NotImplementedError: If the layer type has no description.
    """
    parts = [type(module).__name__.lower(), f"in={'x'.join(map(str, x.shape))}"]
    if isinstance(module, Linear):
        parts.append(f"out={module.out_features}")
    elif isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES):
        parts += [
            f"k={_fmt(module.kernel_size)}",
            f"s={_fmt(module.stride)}",
            f"p={_fmt(module.padding)}",
        ]
        if isinstance(module, CONV_TRANSPOSE_TYPES):
            parts.append(f"op={_fmt(module.output_padding)}")
        parts += [
            f"d={_fmt(module.dilation)}",
            f"g={module.groups}",
            f"pm={module.padding_mode}",
        ]
    else:
        raise NotImplementedError(
            f"No id description for {type(module).__name__}. Supported: Linear, "
            "ConvNd, ConvTransposeNd."
        )
    if module.bias is None:
        parts.append("bias=False")
    return "-".join(parts)


def make_id(case: dict[str, Any], device: str, dtype: torch.dtype) -> str:
    """Make the test id of a case on a device and dtype.

    Builds the layer and input (without touching the global random state) unless the
    case sets ``id``.

    Args:
        case: Case dict.
        device: Device name, e.g. ``'cpu'`` or ``'cuda'``.
        dtype: Floating point dtype.

    Returns:
        Id without spaces like
        ``conv2d-in=2x3x8x8-k=3-s=2-p=1-d=1-g=1-pm=zeros-dev=cpu-dtype=float64``.
    """
    case = check_case(case)
    if case["id"] is None:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(case["seed"])
            description = describe(case["module_fn"](), case["input_fn"]())
    else:
        description = case["id"]
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{description}-dev={device}-dtype={dtype_name}".replace(" ", "")


def expand_cases(
    cases: Sequence[dict[str, Any]],
    devices: Sequence[str] = DEVICES,
    dtypes: Sequence[torch.dtype] = DTYPES,
    check: Callable[[dict[str, Any]], dict[str, Any]] = check_case,
    make_case_id: Callable[[dict[str, Any], str, torch.dtype], str] = make_id,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Check cases and expand them over devices and dtypes.

    Args:
        cases: Case dicts.
        devices: Device names.
        dtypes: Floating point dtypes.
        check: Checks a case's keys and fills in defaults. Case families with other
            keys pass their own.
        make_case_id: Makes the test id of a case on a device and dtype.

    Returns:
        Expanded cases, each with the additional keys ``device``, ``dtype`` and
        ``case_id`` (its test id), and the test ids.

    Raises:
        ValueError: If two expanded cases get the same id.
    """
    expanded, ids = [], []
    for case in map(check, cases):
        for device in devices:
            for dtype in dtypes:
                case_id = make_case_id(case, device, dtype)
                expanded.append(
                    {**case, "device": device, "dtype": dtype, "case_id": case_id}
                )
                ids.append(case_id)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"Case ids must be unique. Duplicates: {duplicates}.")
    return expanded, ids


def with_device_marks(cases: Sequence[dict[str, Any]]) -> list[Any]:
    """Wrap expanded cases for ``params=`` so that CUDA cases are marked and skipped.

    CUDA cases keep their place in the parametrization (and so in the report) and
    are skipped when no CUDA device is available.

    Args:
        cases: Expanded cases with a ``device`` key.

    Returns:
        One ``pytest.param`` per case.
    """
    no_cuda = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA is not available."
    )
    return [
        pytest.param(case, marks=(pytest.mark.cuda, no_cuda))
        if case["device"].startswith("cuda")
        else pytest.param(case)
        for case in cases
    ]


def build_problem(case: dict[str, Any]) -> Problem:
    """Build the layer and input of an expanded case and run the forward pass.

    Seeds the CPU generator, builds, moves to the case's device and dtype, then stores
    ``module.input0`` and ``module.output`` like BackPACK's forward hook. Draw further
    random tensors on the CPU too, so that they do not depend on the device.

    Args:
        case: Expanded case with ``device``, ``dtype`` and ``case_id`` keys.

    Returns:
        The case id, the layer, its input and the tolerance overrides.
    """
    # layers and inputs are drawn on the CPU, so its generator is the one to seed
    torch.random.default_generator.manual_seed(case["seed"])
    module = case["module_fn"]().to(device=case["device"], dtype=case["dtype"])
    x = case["input_fn"]().to(device=case["device"], dtype=case["dtype"])
    with torch.no_grad():
        output = module(x)
    module.input0 = x
    module.output = output
    return Problem(case["case_id"], module, x, dict(case["tols"] or {}))
