"""Tests for ``backpack_tn.distributed``.

Two gloo processes on the loopback interface each run BackPACK on a part of a fixed
batch inside ``DistributedDataParallel`` and reduce the quantities. Rank results are
compared, in float64, with BackPACK run on the full batch in the test process.
"""

from __future__ import annotations

import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import backpack, extend
from backpack.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
    Variance,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from backpack_tn.distributed import SUPPORTED_QUANTITIES, reduce_quantities
from test_problems.compare import assert_allclose_report

WORLD_SIZE = 2
NUM_CLASSES = 4
SPAWN_TIMEOUT_S = 120.0
GROUP_TIMEOUT = timedelta(seconds=30)
BACKWARD_HOOK_WARNING = "Full backward hook is firing"
BACKPACK_QUANTITIES = tuple(name for name in SUPPORTED_QUANTITIES if name != "grad")

CASES = [
    {"model": model, "reduction": reduction, "split": split}
    for model in ("mlp", "cnn")
    for reduction in ("sum", "mean")
    for split in ((4, 4), (3, 5))
]


def make_id(case: dict) -> str:
    """Return a test id such as ``mlp-reduction=mean-split=3+5-dev=cpu-dtype=float64``.

    Args:
        case: A dict from ``CASES``.

    Returns:
        The id, without spaces.
    """
    split = "+".join(str(n) for n in case["split"])
    return (
        f"{case['model']}-reduction={case['reduction']}-split={split}"
        "-dev=cpu-dtype=float64"
    )


CASE_IDS = [make_id(case) for case in CASES]


def _problem(name: str) -> tuple[nn.Sequential, Tensor, Tensor]:
    """Build an extended float64 model and the full batch, identically on every call.

    Args:
        name: ``"mlp"`` or ``"cnn"``.

    Returns:
        The model, inputs of shape ``[8, 5]`` or ``[8, 2, 5, 5]``, and labels of
        shape ``[8]``.
    """
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, NUM_CLASSES))
        x = torch.randn(8, 5)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, NUM_CLASSES)
        )
        x = torch.randn(8, 2, 5, 5)
    y = torch.randint(0, NUM_CLASSES, (8,))
    return extend(model.double()), x.double(), y


def _extensions() -> list:
    """Return fresh instances of every BackPACK extension under test.

    Returns:
        The extensions.
    """
    return [
        BatchGrad(),
        BatchL2Grad(),
        SumGradSquared(),
        Variance(),
        DiagGGNExact(),
        BatchDiagGGNExact(),
        DiagHessian(),
        BatchDiagHessian(),
        KFAC(),
        KFLR(),
        KFRA(),
        SqrtGGNExact(),
    ]


def _backward(model: nn.Module, x: Tensor, y: Tensor, reduction: str, exts: list):
    """Run the loss's backward pass with BackPACK extensions.

    Args:
        model: Extended model or its DDP wrapper.
        x: Inputs of shape ``[N, ...]``.
        y: Labels of shape ``[N]``.
        reduction: ``"sum"`` or ``"mean"``.
        exts: BackPACK extensions to run.
    """
    lossfunc = extend(nn.CrossEntropyLoss(reduction=reduction))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=BACKWARD_HOOK_WARNING)
        with backpack(*exts):
            lossfunc(model(x), y).backward()


def _collect(model: nn.Module, names=BACKPACK_QUANTITIES) -> dict:
    """Copy the quantities stored on a model's parameters.

    Args:
        model: Model whose parameters hold BackPACK quantities.
        names: Quantity names to copy.

    Returns:
        ``{param_name: {quantity: tensor or list of tensors}}``.
    """
    out = {}
    for pname, param in model.named_parameters():
        out[pname] = {}
        for name in names:
            value = param.grad if name == "grad" else getattr(param, name, None)
            if isinstance(value, list):
                out[pname][name] = [v.detach().clone() for v in value]
            elif value is not None:
                out[pname][name] = value.detach().clone()
    return out


def _clear(model: nn.Module):
    """Remove BackPACK quantities and gradients from a model's parameters.

    Args:
        model: Model to clean up.
    """
    for param in model.parameters():
        param.grad = None
        for name in SUPPORTED_QUANTITIES:
            if name != "grad" and hasattr(param, name):
                delattr(param, name)


def _free_port() -> int:
    """Return a currently free TCP port on the loopback interface.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_slice(split: tuple[int, ...], rank: int) -> slice:
    """Return the samples of one rank.

    Args:
        split: Local batch sizes of all ranks.
        rank: The rank.

    Returns:
        Slice into the full batch.
    """
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _worker(rank: int, port: int, out_dir: str):
    """Run every case on one rank and save the reduced quantities.

    Args:
        rank: Process rank.
        port: Loopback port of the TCP store.
        out_dir: Directory for ``rank<r>.pt``.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=GROUP_TIMEOUT,
    )
    results: dict = {"cases": {}, "errors": {}}
    try:
        for case, case_id in zip(CASES, CASE_IDS, strict=True):
            model, x, y = _problem(case["model"])
            local = _local_slice(case["split"], rank)
            ddp = DistributedDataParallel(model)
            _backward(ddp, x[local], y[local], case["reduction"], _extensions())
            reduce_quantities(ddp, reduction=case["reduction"])
            all_quantities = _collect(model)

            # Variance from the local gradient, which DDP leaves alone in no_sync().
            _clear(model)
            with ddp.no_sync():
                _backward(ddp, x[local], y[local], case["reduction"], [Variance()])
            reduce_quantities(
                ddp.module,
                ["variance", "grad"],
                reduction=case["reduction"],
                batch_size=case["split"][rank],
            )
            results["cases"][case_id] = {
                "all": all_quantities,
                "no_sync": _collect(model, ("variance", "grad")),
            }

        model, x, y = _problem("mlp")
        local = _local_slice((4, 4), rank)
        _backward(model, x[local], y[local], "sum", [DiagGGNExact(), BatchGrad()])
        if rank == 1:
            del model[0].weight.diag_ggn_exact
        try:
            reduce_quantities(model, reduction="sum")
        except RuntimeError as error:
            results["errors"]["presence"] = error
        try:
            reduce_quantities(
                model, ["grad_batch"], reduction="sum", batch_size=4 + rank
            )
        except ValueError as error:
            results["errors"]["batch_size"] = error
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Spawn the ranks once, run all cases, and load each rank's results.

    Args:
        tmp_path_factory: pytest's temporary directory factory.

    Returns:
        One results dict per rank.
    """
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.spawn(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"Ranks did not finish within {SPAWN_TIMEOUT_S} s.")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
    return [
        torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
        for rank in range(WORLD_SIZE)
    ]


@pytest.fixture
def single_process_group():
    """Initialize a one-process gloo group in the test process and tear it down.

    Yields:
        None.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=GROUP_TIMEOUT,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mismatch(actual: Tensor, expected: Tensor, label: str) -> str | None:
    """Describe how two tensors differ, or return ``None`` if they match.

    Args:
        actual: Reduced tensor.
        expected: Full-batch reference.
        label: Where the tensors come from, for the report.

    Returns:
        The comparator's report, or ``None``.
    """
    try:
        assert_allclose_report(actual, expected, name=label)
    except AssertionError as error:
        return str(error)
    return None


def _compare(actual: dict, expected: dict, rank: int, skip_factors) -> list[str]:
    """Compare collected quantities and list every mismatch.

    Args:
        actual: Reduced quantities from ``_collect``.
        expected: Full-batch quantities from ``_collect``.
        rank: Rank the results come from.
        skip_factors: Function ``(param_name, quantity) -> set`` of Kronecker factor
            indices that are not expected to match.

    Returns:
        Mismatch reports; empty if everything matches.
    """
    reports = []
    for pname, quantities in expected.items():
        if set(actual[pname]) != set(quantities):
            reports.append(
                f"rank {rank} {pname}: quantities {sorted(actual[pname])} != "
                f"{sorted(quantities)}"
            )
            continue
        for name, value in quantities.items():
            label = f"rank {rank} {pname}.{name}"
            if isinstance(value, list):
                if len(actual[pname][name]) != len(value):
                    reports.append(f"{label}: number of factors differs")
                    continue
                skip = skip_factors(pname, name)
                for i, (a, e) in enumerate(
                    zip(actual[pname][name], value, strict=True)
                ):
                    if i not in skip:
                        reports.append(_mismatch(a, e, f"{label}[{i}]"))
            else:
                reports.append(_mismatch(actual[pname][name], value, label))
    return [r for r in reports if r is not None]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reduce_matches_full_batch(case: dict, rank_results: list[dict]):
    """Reduced quantities on every rank equal BackPACK's on the full batch.

    KFAC samples the loss Hessian, so only its input-side factor is compared. KFRA
    multiplies batch averages, so its output-side factor is exact only for the last
    layer, which feeds the loss.

    Args:
        case: The case.
        rank_results: Results of all ranks.
    """
    model, x, y = _problem(case["model"])
    _backward(model, x, y, case["reduction"], _extensions())
    expected = _collect(model)
    last_layer = f"{len(model) - 1}."

    def skip_factors(pname: str, name: str) -> set[int]:
        if name == "kfac" or (name == "kfra" and not pname.startswith(last_layer)):
            return {0}
        return set()

    reports = []
    for rank, results in enumerate(rank_results):
        actual = results["cases"][make_id(case)]["all"]
        reports += _compare(actual, expected, rank, skip_factors)
    assert not reports, "Mismatches:\n" + "\n".join(reports)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reduce_variance_and_grad_from_local_grad(case: dict, rank_results: list[dict]):
    """``variance`` and ``grad`` reduced from local gradients match the full batch.

    Args:
        case: The case.
        rank_results: Results of all ranks.
    """
    model, x, y = _problem(case["model"])
    _backward(model, x, y, case["reduction"], [Variance()])
    expected = _collect(model, ("variance", "grad"))

    reports = []
    for rank, results in enumerate(rank_results):
        actual = results["cases"][make_id(case)]["no_sync"]
        reports += _compare(actual, expected, rank, lambda *_: set())
    assert not reports, "Mismatches:\n" + "\n".join(reports)


def test_reduce_raises_on_every_rank_if_quantities_differ(rank_results: list[dict]):
    """A quantity missing on one rank raises on both ranks instead of hanging.

    Args:
        rank_results: Results of all ranks.
    """
    for results in rank_results:
        with pytest.raises(
            RuntimeError, match=r"different BackPACK quantities.*0\.weight"
        ):
            raise results["errors"]["presence"]


def test_reduce_raises_on_every_rank_if_batch_size_conflicts(rank_results: list[dict]):
    """A wrong ``batch_size`` on one rank raises on both ranks.

    Args:
        rank_results: Results of all ranks.
    """
    for results in rank_results:
        with pytest.raises(
            ValueError, match=r"Local batch sizes disagree on rank\(s\) \[1\]"
        ):
            raise results["errors"]["batch_size"]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduce_single_process_is_identity(single_process_group, reduction: str):
    """With one process the reduction leaves every quantity unchanged.

    Args:
        single_process_group: Initialises the process group.
        reduction: Loss reduction.
    """
    model, x, y = _problem("mlp")
    _backward(model, x, y, reduction, _extensions())
    expected = _collect(model)
    reduce_quantities(model, reduction=reduction)
    reports = _compare(_collect(model), expected, 0, lambda *_: set())
    assert not reports, "Mismatches:\n" + "\n".join(reports)


def test_reduce_without_process_group_raises():
    """Calling without ``init_process_group`` names the function and the fix."""
    model, x, y = _problem("mlp")
    _backward(model, x, y, "sum", [DiagGGNExact()])
    with pytest.raises(RuntimeError, match="reduce_quantities.*init_process_group"):
        reduce_quantities(model, reduction="sum")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"quantities": ["diag_ggn_exact", "foo"]},
            r"Unknown BackPACK quantities \['foo'\]\. Supported",
        ),
        ({"quantities": "diag_ggn_exact"}, "wrap it in a list"),
        (
            {"reduction": "none"},
            r"Unsupported reduction 'none'\. Supported: \('sum', 'mean'\)",
        ),
        ({"batch_size": 0}, "batch_size must be a positive int or None, got 0"),
        ({"batch_size": 2.0}, "batch_size must be a positive int or None, got 2.0"),
        (
            {"quantities": ["diag_ggn_exact", "kflr"]},
            r"Requested quantities \['kflr'\] are on no parameter",
        ),
        (
            {"batch_size": 3},
            r"Local batch sizes disagree on rank\(s\) \[0\] \(this rank saw \[3, 8\]\)",
        ),
    ],
    ids=[
        "unknown",
        "string",
        "reduction",
        "batch-size-0",
        "batch-size-float",
        "missing",
        "conflict",
    ],
)
def test_reduce_invalid_arguments_raise(single_process_group, kwargs: dict, match: str):
    """Invalid arguments raise a ``ValueError`` that says what is allowed.

    Args:
        single_process_group: Initialises the process group.
        kwargs: Arguments overriding the valid defaults.
        match: Expected message pattern.
    """
    model, x, y = _problem("mlp")
    _backward(model, x, y, "mean", [DiagGGNExact(), BatchGrad()])
    kwargs = {"reduction": "mean", **kwargs}
    with pytest.raises(ValueError, match=match):
        reduce_quantities(model, **kwargs)


def test_reduce_not_extended_raises(single_process_group):
    """A model without BackPACK quantities names the model and the attributes.

    Args:
        single_process_group: Initialises the process group.
    """
    model = nn.Linear(5, NUM_CLASSES).double()
    _, x, y = _problem("mlp")
    nn.CrossEntropyLoss()(model(x), y).backward()
    with pytest.raises(
        ValueError,
        match=r"Model Linear holds none of the BackPACK quantities \('variance', ",
    ):
        reduce_quantities(DistributedDataParallel(model), reduction="sum")


def test_reduce_unknown_batch_size_raises(single_process_group):
    """A mean-reduced batch sum without per-sample quantities needs ``batch_size``.

    Args:
        single_process_group: Initialises the process group.
    """
    model, x, y = _problem("mlp")
    _backward(model, x, y, "mean", [DiagGGNExact()])
    with pytest.raises(
        ValueError,
        match=r"needs the local batch size for \['diag_ggn_exact'\].*batch_size=",
    ):
        reduce_quantities(model, reduction="mean")
    reduce_quantities(model, reduction="sum")


def test_reduce_variance_without_local_gradient_raises(single_process_group):
    """``variance`` without ``grad_batch`` or ``grad`` cannot be combined.

    Args:
        single_process_group: Initialises the process group.
    """
    model, x, y = _problem("mlp")
    _backward(model, x, y, "sum", [Variance()])
    for param in model.parameters():
        param.grad = None
    with pytest.raises(
        ValueError, match="Reducing 'variance' needs the local gradient"
    ):
        reduce_quantities(model, reduction="sum", batch_size=8)
