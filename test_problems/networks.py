"""Small networks with a loss, as data, and where stock BackPACK is known to fail.

A network case is a dict with the keys

- ``seed``: seed set before ``model_fn``, ``input_fn`` and ``target_fn`` are called,
- ``model_fn``: lazy constructor of a ``torch.nn.Sequential`` (default dtype, CPU),
- ``input_fn``: lazy constructor of the input ``[N, *in]``,
- ``target_fn``: lazy constructor of the target (class indices ``[N]`` for
  ``CrossEntropyLoss``, ``[N, C]`` for ``MSELoss``),
- ``loss_fn``: lazy constructor of the loss module,
- ``id``: description used in the test id,
- ``tols`` (optional): ``{"rtol": ..., "atol": ...}`` overriding ``DEFAULT_TOLS``.

Sizes are tiny because the references build full Jacobians and Hessians. Every model
output is ``[N, C]``.

``STOCK_LIMITS`` lists the configurations that stock BackPACK gets wrong or rejects,
per extension, and marks as inherited those of the modules backpack_tn keeps from
stock BackPACK (activations, pooling, losses); :func:`stock_limit` applies it to a
network. ``STOCK_DEFECTS`` names one network and extension per defect, for the tests
that show stock BackPACK's answer differs from the reference while backpack_tn's
matches (an expected failure where backpack_tn inherits the defect).
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor, randint, randn
from torch.nn import (
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    CrossEntropyLoss,
    Flatten,
    Linear,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    Module,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)

from test_problems.cases import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    check_keys,
    expand_cases,
)

NETWORK_REQUIRED_KEYS = frozenset(
    {"seed", "model_fn", "input_fn", "target_fn", "loss_fn", "id"}
)
"""Keys every network case must have."""

NETWORK_OPTIONAL_KEYS = {"tols": None}
"""Keys a network case may have, with their defaults."""

"""Keys a network case may have."""

PARAM_LAYER_TYPES = (Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)
"""Layers whose parameters backpack_tn handles; all other modules are stock."""

AVG_POOL_TYPES = (AvgPool1d, AvgPool2d, AvgPool3d)
MAX_POOL_TYPES = (MaxPool1d, MaxPool2d, MaxPool3d)

NETWORK_BASE_CASES = [
    # everything stock BackPACK supports, ReLU: the Hessian blocks equal the GGN blocks
    {
        "seed": 0,
        "model_fn": lambda: Sequential(Linear(5, 4), ReLU(), Linear(4, 3)),
        "input_fn": lambda: randn(3, 5),
        "target_fn": lambda: randint(0, 3, (3,)),
        "loss_fn": CrossEntropyLoss,
        "id": "mlp-relu-ce-mean",
    },
    # Sigmoid and Tanh have residual terms: Hessian, GGN and PCH blocks differ
    {
        "seed": 1,
        "model_fn": lambda: Sequential(
            Linear(4, 3), Sigmoid(), Linear(3, 3), Tanh(), Linear(3, 2)
        ),
        "input_fn": lambda: randn(3, 4),
        "target_fn": lambda: randn(3, 2),
        "loss_fn": lambda: MSELoss(reduction="sum"),
        "id": "mlp-sigmoid-tanh-mse-sum",
    },
    {
        "seed": 2,
        "model_fn": lambda: Sequential(
            Conv2d(2, 3, 3, padding=1),
            ReLU(),
            MaxPool2d(2),
            Flatten(),
            Linear(27, 3),
        ),
        "input_fn": lambda: randn(2, 2, 6, 6),
        "target_fn": lambda: randint(0, 3, (2,)),
        "loss_fn": lambda: CrossEntropyLoss(reduction="sum"),
        "id": "conv2d-relu-maxpool2d-linear-ce-sum",
    },
    # two convolutions: the second one's input Jacobian is backpropagated through
    {
        "seed": 3,
        "model_fn": lambda: Sequential(
            Conv2d(2, 3, 2, stride=2, bias=False),
            Sigmoid(),
            Conv2d(3, 2, 2, padding=1, dilation=2),
            Flatten(),
            Linear(18, 2),
        ),
        "input_fn": lambda: randn(2, 2, 6, 6),
        "target_fn": lambda: randn(2, 2),
        "loss_fn": MSELoss,
        "id": "conv2d-sigmoid-conv2d-linear-mse-mean",
    },
    # grouped convolution
    {
        "seed": 4,
        "model_fn": lambda: Sequential(
            Conv2d(2, 4, 3, padding=1, groups=2),
            Sigmoid(),
            Flatten(),
            Linear(36, 2),
        ),
        "input_fn": lambda: randn(2, 2, 3, 3),
        "target_fn": lambda: randn(2, 2),
        "loss_fn": MSELoss,
        "id": "conv2d-groups2-sigmoid-linear-mse-mean",
    },
    # depthwise convolution with channel multiplier 2 behind a regular one
    {
        "seed": 5,
        "model_fn": lambda: Sequential(
            Conv2d(2, 3, 2),
            ReLU(),
            Conv2d(3, 6, 3, stride=2, groups=3),
            Flatten(),
            Linear(24, 3),
        ),
        "input_fn": lambda: randn(2, 2, 6, 6),
        "target_fn": lambda: randint(0, 3, (2,)),
        "loss_fn": CrossEntropyLoss,
        "id": "conv2d-relu-conv2d-depthwise-linear-ce-mean",
    },
    # uneven 'same': total padding 3 (dilation 3, height) and 3 (kernel 4, width)
    {
        "seed": 6,
        "model_fn": lambda: Sequential(
            Conv2d(2, 2, (2, 4), padding="same", dilation=(3, 1)),
            ReLU(),
            Flatten(),
            Linear(40, 3),
        ),
        "input_fn": lambda: randn(2, 2, 4, 5),
        "target_fn": lambda: randint(0, 3, (2,)),
        "loss_fn": lambda: CrossEntropyLoss(reduction="sum"),
        "id": "conv2d-same-uneven-relu-linear-ce-sum",
    },
    # 'same' with an even kernel in 1d
    {
        "seed": 7,
        "model_fn": lambda: Sequential(
            Conv1d(2, 3, 4, padding="same"), Tanh(), Flatten(), Linear(21, 2)
        ),
        "input_fn": lambda: randn(2, 2, 7),
        "target_fn": lambda: randn(2, 2),
        "loss_fn": lambda: MSELoss(reduction="sum"),
        "id": "conv1d-same-even-tanh-linear-mse-sum",
    },
    # reflect padding behind another layer: its input Jacobian is backpropagated
    {
        "seed": 8,
        "model_fn": lambda: Sequential(
            Conv1d(2, 3, 3),
            ReLU(),
            Conv1d(3, 2, 3, padding=1, padding_mode="reflect"),
            Flatten(),
            Linear(10, 3),
        ),
        "input_fn": lambda: randn(3, 2, 7),
        "target_fn": lambda: randint(0, 3, (3,)),
        "loss_fn": CrossEntropyLoss,
        "id": "conv1d-relu-conv1d-reflect-linear-ce-mean",
    },
    {
        "seed": 9,
        "model_fn": lambda: Sequential(
            Conv2d(2, 2, 3, padding=(1, 2), padding_mode="replicate"),
            Sigmoid(),
            MaxPool2d(2),
            Flatten(),
            Linear(12, 2),
        ),
        "input_fn": lambda: randn(2, 2, 4, 5),
        "target_fn": lambda: randn(2, 2),
        "loss_fn": lambda: MSELoss(reduction="sum"),
        "id": "conv2d-replicate-sigmoid-maxpool2d-linear-mse-sum",
    },
    {
        "seed": 10,
        "model_fn": lambda: Sequential(
            Conv3d(2, 2, 2, stride=2, padding=1, padding_mode="circular"),
            ReLU(),
            Flatten(),
            Linear(16, 3),
        ),
        "input_fn": lambda: randn(2, 2, 3, 3, 3),
        "target_fn": lambda: randint(0, 3, (2,)),
        "loss_fn": CrossEntropyLoss,
        "id": "conv3d-circular-relu-linear-ce-mean",
    },
    {
        "seed": 11,
        "model_fn": lambda: Sequential(
            Conv3d(1, 2, 2), ReLU(), AvgPool3d(2), Flatten(), Linear(2, 2)
        ),
        "input_fn": lambda: randn(2, 1, 3, 3, 3),
        "target_fn": lambda: randn(2, 2),
        "loss_fn": lambda: MSELoss(reduction="sum"),
        "id": "conv3d-relu-avgpool3d-linear-mse-sum",
    },
    # output_padding, behind a Linear layer: its input Jacobian is backpropagated
    {
        "seed": 12,
        "model_fn": lambda: Sequential(
            ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1),
            ReLU(),
            Flatten(),
            Linear(32, 2),
        ),
        "input_fn": lambda: randn(2, 2, 2, 2),
        "target_fn": lambda: randn(2, 2),
        "loss_fn": MSELoss,
        "id": "convtranspose2d-outpad-relu-linear-mse-mean",
    },
    {
        "seed": 18,
        "model_fn": lambda: Sequential(
            ConvTranspose2d(2, 3, 2, stride=2), ReLU(), Flatten(), Linear(48, 2)
        ),
        "input_fn": lambda: randn(2, 2, 2, 2),
        "target_fn": lambda: randint(0, 2, (2,)),
        "loss_fn": CrossEntropyLoss,
        "id": "convtranspose2d-relu-linear-ce-mean",
    },
    {
        "seed": 13,
        "model_fn": lambda: Sequential(
            ConvTranspose1d(4, 4, 3, stride=2, groups=2),
            Sigmoid(),
            Flatten(),
            Linear(28, 3),
        ),
        "input_fn": lambda: randn(2, 4, 3),
        "target_fn": lambda: randint(0, 3, (2,)),
        "loss_fn": lambda: CrossEntropyLoss(reduction="sum"),
        "id": "convtranspose1d-groups2-sigmoid-linear-ce-sum",
    },
    {
        "seed": 14,
        "model_fn": lambda: Sequential(
            ConvTranspose3d(1, 2, 2, stride=2, output_padding=1, bias=False),
            Flatten(),
            Linear(250, 2),
        ),
        "input_fn": lambda: randn(2, 1, 2, 2, 2),
        "target_fn": lambda: randint(0, 2, (2,)),
        "loss_fn": CrossEntropyLoss,
        "id": "convtranspose3d-outpad-linear-ce-mean",
    },
    # Linear with input [N, T, d] (weight sharing over T), then Flatten
    {
        "seed": 15,
        "model_fn": lambda: Sequential(Linear(4, 3), ReLU(), Flatten(), Linear(9, 3)),
        "input_fn": lambda: randn(2, 3, 4),
        "target_fn": lambda: randint(0, 3, (2,)),
        "loss_fn": CrossEntropyLoss,
        "id": "linear-ntd-relu-flatten-linear-ce-mean",
    },
    {
        "seed": 16,
        "model_fn": lambda: Sequential(
            Linear(3, 2, bias=False), Sigmoid(), Flatten(), Linear(8, 2)
        ),
        "input_fn": lambda: randn(3, 2, 2, 3),
        "target_fn": lambda: randn(3, 2),
        "loss_fn": lambda: MSELoss(reduction="sum"),
        "id": "linear-ntsd-sigmoid-flatten-linear-mse-sum",
    },
    # batch size 1, 1d max pooling
    {
        "seed": 17,
        "model_fn": lambda: Sequential(
            Conv1d(2, 3, 3), ReLU(), MaxPool1d(2), Flatten(), Linear(9, 3)
        ),
        "input_fn": lambda: randn(1, 2, 8),
        "target_fn": lambda: randint(0, 3, (1,)),
        "loss_fn": lambda: CrossEntropyLoss(reduction="sum"),
        "id": "conv1d-relu-maxpool1d-linear-ce-sum-n=1",
    },
]
"""Network cases before expansion over devices and dtypes."""


class Network(NamedTuple):
    """A network built from a case.

    Attributes:
        case_id: Test id of the expanded case.
        model: ``torch.nn.Sequential`` on the case's device and dtype, not extended.
        loss_func: Loss module, not extended.
        x: Input of shape ``[N, *in]``.
        y: Target: class indices ``[N]`` or regression targets ``[N, C]``.
        tols: Tolerance overrides for the comparator, possibly empty.
    """

    case_id: str
    model: Sequential
    loss_func: Module
    x: Tensor
    y: Tensor
    tols: dict[str, float]


def check_network_case(case: dict[str, Any]) -> dict[str, Any]:
    """Check a network case's keys and fill in the optional ones.

    Args:
        case: Network case dict.

    Returns:
        Copy of the case with every key of ``NETWORK_OPTIONAL_KEYS`` present.
    """
    return check_keys(
        case, NETWORK_REQUIRED_KEYS, NETWORK_OPTIONAL_KEYS, "network case"
    )


def make_network_id(case: dict[str, Any], device: str, dtype: torch.dtype) -> str:
    """Make the test id of a network case on a device and dtype.

    Args:
        case: Network case dict.
        device: Device name, e.g. ``'cpu'`` or ``'cuda'``.
        dtype: Floating point dtype.

    Returns:
        Id without spaces like ``mlp-relu-ce-mean-dev=cpu-dtype=float64``.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{case['id']}-dev={device}-dtype={dtype_name}".replace(" ", "")


def build_network(case: dict[str, Any]) -> Network:
    """Build the model, loss, input and target of an expanded network case.

    Seeds, then builds model, input and target in this order and moves them to the
    case's device and dtype (class-index targets keep their integer dtype). Calling
    it twice gives identical networks.

    Args:
        case: Expanded network case with ``device``, ``dtype`` and ``case_id`` keys.

    Returns:
        The case id, model, loss, input, target and tolerance overrides.
    """
    torch.manual_seed(case["seed"])
    device, dtype = case["device"], case["dtype"]
    model = case["model_fn"]().to(device=device, dtype=dtype)
    x = case["input_fn"]().to(device=device, dtype=dtype)
    y = case["target_fn"]().to(device=device)
    if y.is_floating_point():
        y = y.to(dtype=dtype)
    loss_func = case["loss_fn"]().to(device=device)
    return Network(case["case_id"], model, loss_func, x, y, dict(case["tols"] or {}))


NETWORK_CASES, NETWORK_IDS = expand_cases(
    NETWORK_BASE_CASES, check=check_network_case, make_case_id=make_network_id
)

FIRST_ORDER = ("BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance")
SECOND_ORDER = (
    "DiagGGNExact",
    "DiagGGNMC",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "KFAC",
    "KFLR",
    "KFRA",
    "GGNMP",
    "HMP",
    "PCHMP",
)
EXTENSION_NAMES = FIRST_ORDER + SECOND_ORDER
"""Names of all extensions in ``backpack.extensions`` (and ``backpack_tn``)."""

KRONECKER = ("KFAC", "KFLR", "KFRA")
CURVATURE_PRODUCTS = ("GGNMP", "HMP", "PCHMP")


def _padding_mode_not_zeros(module: Module) -> bool:
    return getattr(module, "padding_mode", "zeros") != "zeros"


def _string_padding(module: Module) -> bool:
    return isinstance(getattr(module, "padding", None), str)


def _output_padding(module: Module) -> bool:
    return any(getattr(module, "output_padding", (0,)))


def _grouped(module: Module) -> bool:
    return getattr(module, "groups", 1) != 1


def _not_default_dtype(x: Tensor) -> bool:
    return x.dtype != torch.get_default_dtype()


STOCK_LIMITS: list[dict[str, Any]] = [
    {
        "extensions": EXTENSION_NAMES,
        "applies": lambda module, x: _padding_mode_not_zeros(module),
        "reason": "stock BackPACK treats every padding_mode as 'zeros'",
    },
    {
        "extensions": EXTENSION_NAMES,
        "applies": lambda module, x: _string_padding(module),
        "reason": "stock BackPACK passes padding='same'/'valid' on to unfold and "
        "transposed convolutions",
    },
    {
        "extensions": EXTENSION_NAMES,
        "applies": lambda module, x: _output_padding(module),
        "reason": "stock BackPACK ignores output_padding of transpose convolutions",
    },
    {
        "extensions": ("BatchL2Grad",),
        "applies": lambda module, x: _grouped(module),
        "reason": "stock BackPACK's BatchL2Grad mixes the groups of grouped "
        "convolutions",
    },
    {
        "extensions": KRONECKER,
        "applies": lambda module, x: _grouped(module),
        "reason": "stock BackPACK's Kronecker factors reject groups != 1",
    },
    {
        "extensions": KRONECKER,
        "applies": lambda module, x: isinstance(module, Linear) and x.dim() != 2,
        "reason": "stock BackPACK's Kronecker factors reject Linear inputs [N, *, d]",
    },
    {
        "extensions": CURVATURE_PRODUCTS,
        "applies": lambda module, x: isinstance(
            module, (Conv1d, Conv3d, *CONV_TRANSPOSE_TYPES)
        ),
        "reason": "stock BackPACK's curvature-matrix products only have Linear and "
        "Conv2d",
    },
    # the stock modules below are kept by backpack_tn, so it inherits their defects
    {
        "extensions": ("PCHMP",),
        "applies": lambda module, x: isinstance(module, (Sigmoid, Tanh)),
        "reason": "stock BackPACK's PCHMP multiplies the residual of element-wise "
        "activations by the output gradient twice",
        "inherited": True,
    },
    {
        "extensions": SECOND_ORDER,
        "applies": lambda module, x: (
            isinstance(module, AVG_POOL_TYPES) and _not_default_dtype(x)
        ),
        "reason": "stock BackPACK's AvgPoolNd derivatives build their kernel in the "
        "default dtype",
        "inherited": True,
    },
    {
        "extensions": ("KFRA",),
        "applies": lambda module, x: (
            isinstance(module, MAX_POOL_TYPES) and _not_default_dtype(x)
        ),
        "reason": "stock BackPACK's MaxPoolNd KFRA backpropagation scatters into a "
        "default-dtype tensor",
        "inherited": True,
    },
    {
        "extensions": ("KFRA",),
        "applies": lambda module, x: (
            isinstance(module, MSELoss) and _not_default_dtype(x)
        ),
        "reason": "stock BackPACK's MSELoss builds the summed Hessian for KFRA in the "
        "default dtype",
        "inherited": True,
    },
]
"""Where stock BackPACK gives a wrong result or raises: for the ``extensions``, when
``applies(module, module_input)`` holds for some module of the network (the loss
included). ``inherited`` limits come from modules that backpack_tn keeps from stock
BackPACK (activations, pooling, losses), so backpack_tn has them too."""


def module_inputs(
    model: Sequential, x: Tensor, loss_func: Module | None = None
) -> list[tuple[Module, Tensor]]:
    """Run the model and record each child module (and the loss) with its input.

    Args:
        model: Sequential model.
        x: Input of shape ``[N, *in]``.
        loss_func: Loss module, appended with the model output if given.

    Returns:
        ``(module, module_input)`` for each child, in order, then for the loss.
    """
    pairs = []
    with torch.no_grad():
        for child in model:
            pairs.append((child, x))
            x = child(x)
    if loss_func is not None:
        pairs.append((loss_func, x))
    return pairs


def stock_limit(
    model: Sequential,
    loss_func: Module,
    x: Tensor,
    extension: str,
    inherited_only: bool = False,
) -> str | None:
    """Return why stock BackPACK cannot be trusted with an extension on a network.

    Args:
        model: Sequential model.
        loss_func: Loss module.
        x: Input of shape ``[N, *in]``.
        extension: Extension name, e.g. ``'KFAC'``.
        inherited_only: Only consider limits that backpack_tn inherits.

    Returns:
        The reason of the first limit in ``STOCK_LIMITS`` that applies, or ``None``.
    """
    for module, module_input in module_inputs(model, x, loss_func):
        for limit in STOCK_LIMITS:
            if inherited_only and not limit.get("inherited", False):
                continue
            if extension in limit["extensions"] and limit["applies"](
                module, module_input
            ):
                return f"{type(module).__name__}: {limit['reason']}"
    return None


STOCK_DEFECTS = [
    {
        "network": "conv2d-same-uneven-relu-linear-ce-sum",
        "extension": "BatchGrad",
        "stock": RuntimeError,
        "match": "padding='same' is not supported for strided convolutions",
    },
    {
        "network": "conv2d-same-uneven-relu-linear-ce-sum",
        "extension": "DiagGGNExact",
        "stock": TypeError,
        "match": "padding",
    },
    {
        "network": "conv1d-same-even-tanh-linear-mse-sum",
        "extension": "BatchGrad",
        "stock": "wrong",
    },
    {
        "network": "conv2d-replicate-sigmoid-maxpool2d-linear-mse-sum",
        "extension": "BatchGrad",
        "stock": "wrong",
    },
    {
        "network": "conv2d-replicate-sigmoid-maxpool2d-linear-mse-sum",
        "extension": "DiagGGNExact",
        "stock": "wrong",
    },
    {
        "network": "conv1d-relu-conv1d-reflect-linear-ce-mean",
        "extension": "BatchL2Grad",
        "stock": "wrong",
    },
    # the reflect layer's wrong input Jacobian corrupts the layer in front of it
    {
        "network": "conv1d-relu-conv1d-reflect-linear-ce-mean",
        "extension": "KFLR",
        "stock": "wrong",
    },
    {
        "network": "conv3d-circular-relu-linear-ce-mean",
        "extension": "SumGradSquared",
        "stock": "wrong",
    },
    {
        "network": "conv2d-groups2-sigmoid-linear-mse-mean",
        "extension": "BatchL2Grad",
        "stock": "wrong",
    },
    {
        "network": "conv2d-relu-conv2d-depthwise-linear-ce-mean",
        "extension": "BatchL2Grad",
        "stock": "wrong",
    },
    {
        "network": "conv2d-groups2-sigmoid-linear-mse-mean",
        "extension": "KFLR",
        "stock": NotImplementedError,
        "match": "groups",
    },
    {
        "network": "convtranspose1d-groups2-sigmoid-linear-ce-sum",
        "extension": "KFAC",
        "stock": NotImplementedError,
        "match": "groups",
    },
    {
        "network": "linear-ntd-relu-flatten-linear-ce-mean",
        "extension": "KFLR",
        "stock": NotImplementedError,
        "match": "Only 2d inputs",
    },
    {
        "network": "linear-ntsd-sigmoid-flatten-linear-mse-sum",
        "extension": "KFAC",
        "stock": NotImplementedError,
        "match": "Only 2d inputs",
    },
    {
        "network": "convtranspose2d-outpad-relu-linear-mse-mean",
        "extension": "BatchGrad",
        "stock": RuntimeError,
        "match": "invalid for input of size",
    },
    # the input factor misses the unfolded columns of the output padding
    {
        "network": "convtranspose2d-outpad-relu-linear-mse-mean",
        "extension": "KFLR",
        "stock": "wrong",
    },
    {
        "network": "convtranspose2d-outpad-relu-linear-mse-mean",
        "extension": "DiagGGNExact",
        "stock": RuntimeError,
        "match": "einsum",
    },
    {
        "network": "conv1d-relu-conv1d-reflect-linear-ce-mean",
        "extension": "GGNMP",
        "stock": NotImplementedError,
        "match": "Conv1d",
    },
    {
        "network": "conv3d-circular-relu-linear-ce-mean",
        "extension": "GGNMP",
        "stock": NotImplementedError,
        "match": "Conv3d",
    },
    # defects of stock modules that backpack_tn keeps (see ``STOCK_LIMITS``)
    {
        "network": "mlp-sigmoid-tanh-mse-sum",
        "extension": "PCHMP",
        "stock": "wrong",
    },
    {
        "network": "mlp-sigmoid-tanh-mse-sum",
        "extension": "KFRA",
        "stock": RuntimeError,
        "match": "expected scalar type Double but found Float",
    },
    {
        "network": "conv2d-relu-maxpool2d-linear-ce-sum",
        "extension": "KFRA",
        "stock": RuntimeError,
        "match": "Expected self.dtype to be equal to src.dtype",
    },
    {
        "network": "conv3d-relu-avgpool3d-linear-mse-sum",
        "extension": "DiagGGNExact",
        "stock": RuntimeError,
        # the CPU and CUDA kernels word the dtype mismatch differently
        "match": "(?i)double.*float",
    },
]
"""One entry per stock BackPACK defect: the network (id without device and dtype),
the extension, and what stock does: ``'wrong'`` (a silently wrong result) or the
exception class it raises, whose message matches ``match``."""
