"""The main job: one network, every extension, stock BackPACK against backpack_tn.

``python -m backpack_tn`` (or ``python -m backpack_tn run``) builds a CNN with
random weights, draws a synthetic batch, runs each extension's backward pass with
stock BackPACK and with backpack_tn (after a warm-up pass; the fastest of
``--repeats`` passes counts), checks that the results agree, and prints time and
peak memory of both. On CPU the peak memory of each extension and library comes
from a fresh process (a child of the memory workers' fork server, see
:mod:`backpack_tn.benchmark.fork_server`) with the benchmark's memory-worker
settings: one warm-up pass, then the growth of the resident set during one more
pass. Measured in the running process, the peak depended on the extensions run
before (All-CNN-C's one-pass BatchGrad + DiagGGNExact + KFAC: 192-339 MiB). On CUDA
it is the allocator's peak in the running process.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from backpack import backpack, extend
from backpack import extensions as stock
from torch import nn

from backpack_tn import extensions as tn
from backpack_tn.benchmark.memory import (
    MemoryResult,
    can_measure_cpu,
    cpu_extra_peak,
    cuda_extra_peak,
    fork_server,
)
from backpack_tn.benchmark.models import NETS, net_resnet18_nobn
from backpack_tn.benchmark.timing import live_allocator, steady_allocator

#: name -> (stock factory or None, TN factory)
EXTENSIONS: dict[str, tuple[Callable | None, Callable]] = {
    "BatchGrad": (stock.BatchGrad, tn.BatchGrad),
    "DiagGGNExact": (stock.DiagGGNExact, tn.DiagGGNExact),
    "KFAC": (stock.KFAC, tn.KFAC),
    "KFAC-reduce": (None, lambda: tn.KFAC(kfac_approx="reduce")),
    "BatchGrad+DiagGGNExact+KFAC": (
        lambda: (stock.BatchGrad(), stock.DiagGGNExact(), stock.KFAC()),
        lambda: (tn.BatchGrad(), tn.DiagGGNExact(), tn.KFAC()),
    ),
    # last: on CUDA, stock BackPACK's same-order convolution for many classes builds
    # operands past cuDNN's 32-bit indices (All-CNN-C at batch size 32 on an H100 and
    # an H200): the illegal memory access leaves the CUDA context unusable for the
    # rows after it
    "SqrtGGNExact": (stock.SqrtGGNExact, tn.SqrtGGNExact),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Model(NamedTuple):
    """A network of the main job.

    Attributes:
        constructor: Builds the network with random weights.
        input_shape: Shape of one input sample.
        use_converter: Whether BackPACK needs its converter (residual connections).
    """

    constructor: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    use_converter: bool = False


#: Networks the main job runs on: the sequential CNNs of the benchmark and a
#: ResNet18 for small inputs that stock KFAC supports.
MODELS: dict[str, Model] = {
    **{name: Model(*NETS[name]) for name in ("all_cnn_c", "3c3d", "2c2d")},
    "resnet18_nobn": Model(net_resnet18_nobn, (3, 32, 32), use_converter=True),
}


@dataclass
class Outcome:
    """Result of one extension run.

    Attributes:
        seconds: Wall time of forward + backward.
        peak_mib: Peak memory during the run, in MiB (``nan`` if unmeasurable).
        values: The extensions' quantities per ``<parameter>.<savefield>``.
        error: Why the run failed, if it did.
    """

    seconds: float = float("nan")
    peak_mib: float = float("nan")
    values: dict | None = None
    error: str = ""


def _measured_pass(one_pass: Callable[[], object], device: torch.device) -> float:
    """Peak memory one pass adds: the CUDA allocator's peak, or the growth of VmHWM.

    The resident set is measured with the memory workers' allocator settings
    (``timing.live_allocator``), then the steady allocator is restored for timing.

    Returns:
        MiB, or ``nan`` where the platform cannot measure it.
    """
    if device.type == "cuda":
        return cuda_extra_peak(one_pass, device) / 2**20
    if not can_measure_cpu():
        one_pass()
        return float("nan")
    live_allocator()
    try:
        return cpu_extra_peak(one_pass) / 2**20
    finally:
        steady_allocator()


def run_extension(
    model, loss_fn, x, y, factory, seed: int, repeats: int = 1, measure: bool = True
) -> Outcome:
    """Run backward passes with an extension and collect its quantities.

    Args:
        model: Extended model.
        loss_fn: Extended loss.
        x: Inputs.
        y: Targets.
        factory: Builds the extension (or a tuple of extensions for one pass).
        seed: Seed set before each pass (same MC samples for stock and TN).
        repeats: Number of timed passes; the time is the fastest (``nan`` for 0).
        measure: Whether one more pass before them measures the peak memory in
            this process, with the resident set following the live memory (CPU:
            ``timing.live_allocator``; the timed passes then reuse freed memory,
            ``timing.steady_allocator``).

    Returns:
        The outcome.
    """
    extensions = factory()
    if not isinstance(extensions, tuple):
        extensions = (extensions,)
    seconds = []

    def one_pass():
        model.zero_grad()
        torch.manual_seed(seed)
        start = time.perf_counter()
        with backpack(*extensions):
            loss_fn(model(x), y).backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds.append(time.perf_counter() - start)

    peak_mib = float("nan")
    try:
        if measure:
            peak_mib = _measured_pass(one_pass, x.device)
            del seconds[:]  # the measured pass page-faults all its memory
        for _ in range(repeats):
            one_pass()
    except (NotImplementedError, RuntimeError, ValueError) as error:
        return Outcome(error=f"{type(error).__name__}: {error}".splitlines()[0])
    values = {}
    for extension in extensions:
        for name, p in model.named_parameters():
            if hasattr(p, extension.savefield):
                values[f"{name}.{extension.savefield}"] = getattr(
                    p, extension.savefield
                )
                delattr(p, extension.savefield)
    return Outcome(min(seconds, default=float("nan")), peak_mib, values)


#: The libraries of :data:`EXTENSIONS`' factories, in order.
LIBRARIES = ("stock", "tn")


def _setup(model_name: str, batch_size: int, device: str, dtype: str, seed: int):
    """The extended network, loss, inputs and targets of one main job.

    Args:
        model_name: One of :data:`MODELS`.
        batch_size: Batch size of the synthetic batch.
        device: Torch device.
        dtype: ``'float32'`` or ``'float64'``.
        seed: Seed for weights and data.

    Returns:
        ``(model, loss_fn, x, y)``; ``x`` has shape ``[N, *input_shape]``.
    """
    torch.manual_seed(seed)
    constructor, sample_shape, use_converter = MODELS[model_name]
    torch_device, torch_dtype = torch.device(device), DTYPES[dtype]
    model = constructor().to(torch_device, torch_dtype)
    model = extend(model, use_converter=use_converter)
    loss_fn = extend(nn.CrossEntropyLoss())
    x = torch.randn(batch_size, *sample_shape, device=torch_device, dtype=torch_dtype)
    with torch.no_grad():
        classes = model(x).shape[1]
    y = torch.randint(0, classes, (batch_size,), device=torch_device)
    return model, loss_fn, x, y


def peak_in_fresh_process(
    model_name: str,
    batch_size: int,
    extension: str,
    library: str,
    dtype: str = "float32",
    seed: int = 0,
) -> float:
    """Peak memory of one extension's pass on CPU, in a fresh worker process.

    Args:
        model_name: One of :data:`MODELS`.
        batch_size: Batch size.
        extension: Key of :data:`EXTENSIONS`.
        library: One of :data:`LIBRARIES`.
        dtype: ``'float32'`` or ``'float64'``.
        seed: Seed for weights, data and MC samples.

    Returns:
        MiB, or ``nan`` where the worker gave no measurement.
    """
    result = fork_server().run(
        f"{__name__}:measure_job",
        {
            "model_name": model_name,
            "batch_size": batch_size,
            "extension": extension,
            "library": library,
            "dtype": dtype,
            "seed": seed,
        },
        timeout=600.0,
    )
    return result["peak"] / 2**20 if result["status"] == "ok" else float("nan")


def measure_job(
    model_name: str,
    batch_size: int,
    extension: str,
    library: str,
    dtype: str,
    seed: int,
) -> dict:
    """Body of a main-job memory worker, run in a fresh child of the fork server.

    Builds the main job's network, runs one warm-up pass of one extension and
    measures the peak memory of one more pass (``cold_peak``: the warm-up pass's).

    Args:
        model_name: One of :data:`MODELS`.
        batch_size: Batch size.
        extension: Key of :data:`EXTENSIONS`.
        library: One of :data:`LIBRARIES`.
        dtype: ``'float32'`` or ``'float64'``.
        seed: Seed for weights, data and MC samples.

    Returns:
        :func:`dataclasses.asdict` of a ``MemoryResult`` (failures of the extension
        are part of the result).
    """
    factory = EXTENSIONS[extension][LIBRARIES.index(library)]
    if factory is None:
        return asdict(
            MemoryResult("n/a", message="stock BackPACK has no such extension")
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        model, loss_fn, x, y = _setup(model_name, batch_size, "cpu", dtype, seed)
        cold = run_extension(model, loss_fn, x, y, factory, seed, repeats=0)
        cold.values = None
        warm = run_extension(model, loss_fn, x, y, factory, seed, repeats=0)
    if warm.error:
        return asdict(MemoryResult("error", message=warm.error))
    return asdict(MemoryResult("ok", warm.peak_mib * 2**20, cold.peak_mib * 2**20))


def max_relative_error(first: dict, second: dict) -> float:
    """Largest relative deviation between two results, over all parameters.

    Args:
        first: Quantity per parameter name (tensors or lists of tensors).
        second: Same structure.

    Returns:
        ``max |a - b| / max(|b|)`` over all parameters and factors.
    """
    worst = 0.0
    for name, a in first.items():
        b = second[name]
        pairs = zip(a, b, strict=False) if isinstance(a, (list, tuple)) else [(a, b)]
        for u, v in pairs:
            scale = v.abs().max().clamp(min=torch.finfo(v.dtype).tiny)
            worst = max(worst, ((u - v).abs().max() / scale).item())
    return worst


def run_network(
    model_name: str = "all_cnn_c",
    batch_size: int = 8,
    extensions: list[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    repeats: int = 1,
    memory: bool = True,
) -> list[dict]:
    """Compare stock BackPACK and backpack_tn on one network.

    Args:
        model_name: One of :data:`MODELS`.
        batch_size: Batch size of the synthetic batch.
        extensions: Keys of :data:`EXTENSIONS` (default: all).
        device: Torch device.
        dtype: ``'float32'`` or ``'float64'``.
        seed: Seed for weights, data and MC samples.
        repeats: Timed backward passes per extension and library (the fastest
            counts).
        memory: Whether to measure the peak memory (CPU: in fresh processes).

    Returns:
        One row per extension with times, peak memories, ratios and agreement.
    """
    model, loss_fn, x, y = _setup(model_name, batch_size, device, dtype, seed)
    tolerance = 1e-3 if x.dtype == torch.float32 else 1e-8
    in_workers = memory and x.device.type == "cpu" and can_measure_cpu()
    rows = []
    for name in extensions or list(EXTENSIONS):
        stock_factory, tn_factory = EXTENSIONS[name]
        run_extension(model, loss_fn, x, y, tn_factory, seed, measure=False)  # warm-up
        measure = memory and not in_workers
        ours = run_extension(model, loss_fn, x, y, tn_factory, seed, repeats, measure)
        theirs = (
            run_extension(model, loss_fn, x, y, stock_factory, seed, repeats, measure)
            if stock_factory
            else Outcome(error="stock BackPACK has no such extension")
        )
        if in_workers:
            for library, outcome in zip(LIBRARIES, (theirs, ours), strict=True):
                if not outcome.error:
                    outcome.peak_mib = peak_in_fresh_process(
                        model_name, batch_size, name, library, dtype, seed
                    )
        row = {"extension": name, "tn": ours, "stock": theirs, "agree": ""}
        if ours.error:
            row["agree"] = "backpack_tn failed"
        elif theirs.error:
            row["agree"] = f"stock cannot run ({theirs.error[:60]})"
        else:
            error = max_relative_error(ours.values, theirs.values)
            row["agree"] = (
                f"{'yes' if error < tolerance else 'NO'} (rel. err {error:.1e})"
            )
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`run_network`'s rows.

    Args:
        rows: Rows from :func:`run_network`.

    Returns:
        The table.
    """

    def ms(outcome):
        return "n/a" if outcome.error else f"{outcome.seconds * 1e3:.1f}"

    def mib(outcome):
        if outcome.error or math.isnan(outcome.peak_mib):
            return "n/a"
        return f"{outcome.peak_mib:.0f}"

    def ratio(ours, theirs, attr):
        mine, reference = getattr(ours, attr), getattr(theirs, attr)
        if ours.error or theirs.error or math.isnan(mine) or not reference > 0:
            return "n/a"
        return f"{mine / reference:.2f}x"

    lines = [
        "| extension | stock [ms] | tn [ms] | time tn/stock | stock peak [MiB]"
        " | tn peak [MiB] | memory tn/stock | results agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = row["tn"], row["stock"]
        lines.append(
            f"| {row['extension']} | {ms(theirs)} | {ms(ours)} |"
            f" {ratio(ours, theirs, 'seconds')} | {mib(theirs)} | {mib(ours)} |"
            f" {ratio(ours, theirs, 'peak_mib')} | {row['agree']} |"
        )
    return "\n".join(lines)


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``run`` command (the default main job).

    Args:
        subparsers: Subparsers of the top-level parser.

    Returns:
        The command's parser.
    """
    parser = subparsers.add_parser(
        "run",
        help="compare stock BackPACK and backpack_tn on a whole network (default)",
        description=__doc__.splitlines()[0],
    )
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser):
    """Add the main job's options to a parser.

    Args:
        parser: The parser.
    """
    parser.add_argument("--model", default="all_cnn_c", choices=list(MODELS))
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument(
        "--extensions",
        nargs="+",
        default=list(EXTENSIONS),
        choices=list(EXTENSIONS),
        metavar="EXT",
        help=f"extensions to run (default: all of {', '.join(EXTENSIONS)})",
    )
    parser.add_argument("--device", default="cpu", type=_device)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="timed backward passes per extension; the fastest counts (default 3)",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the peak memory of each pass (CPU: one fresh process per"
        " extension and library; default: on)",
    )
    parser.set_defaults(command_fn=run_command)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return text


def run_command(args: argparse.Namespace, parser=None) -> int:
    """Execute the main job and print its table.

    Args:
        args: Parsed options.
        parser: Unused.

    Returns:
        Exit code: 0 if all results agree, 1 otherwise.
    """
    print(
        f"{args.model}, batch size {args.batch_size}, {args.dtype} on {args.device}:"
        f" stock BackPACK vs backpack_tn (fastest of {args.repeats} backward"
        " passes each, after warm-up)"
    )
    with warnings.catch_warnings():
        # BackPACK's hooks on the model's output layer trigger this PyTorch warning
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        rows = run_network(
            args.model,
            args.batch_size,
            args.extensions,
            args.device,
            args.dtype,
            args.seed,
            args.repeats,
            args.memory,
        )
    print(format_table(rows))
    return (
        1 if any(row["agree"].startswith(("NO", "backpack_tn")) for row in rows) else 0
    )
