"""The ``bench`` subcommand of ``python -m backpack_tn``."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from backpack_tn.benchmark.models import NETS
from backpack_tn.benchmark.ops import OP_NAMES, REFERENCE_METHODS

_EPILOG = """\
examples:
  python -m backpack_tn bench --quick
  python -m backpack_tn bench --nets resnet18 --ops per_sample_weight_grad,kfac_reduce
  python -m backpack_tn bench --layer "conv2d in=64x56x56 out=128 k=3 s=2 p=1 n=32" \\
      --methods refs,ours --gate
  python -m backpack_tn bench --nets all --list

layer specs: KIND in=C_INxI0[xI1..] out=C_OUT k=K [s= p= d= g= op= bias=0|1 pm= n=]
  KIND: linear, conv1d, conv2d, conv3d, convtranspose1d/2d/3d; tuples as 3x5;
  linear: in=[EXTRAx..]FEATURES. Example: "linear in=512 out=10 n=32".

methods: references %(refs)s;
  backpack_tn's strategies as ours:<strategy>; groups: refs, ours, all.
"""


def _positive_int(text: str) -> int:
    """Argparse type: an integer >= 1.

    Args:
        text: Command line value.

    Returns:
        The integer.

    Raises:
        ArgumentTypeError: If the value is not a positive integer.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """Argparse type: a number >= 0.

    Args:
        text: Command line value.

    Returns:
        The number.

    Raises:
        ArgumentTypeError: If the value is not a non-negative number.
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number, got {text!r}"
        )
    return value


def _load_fraction(text: str) -> float:
    """Argparse type: a load threshold in (0, 1), or a percentage like ``5%``.

    Args:
        text: Command line value.

    Returns:
        The fraction.

    Raises:
        ArgumentTypeError: If the value is not in (0, 1).
    """
    try:
        value = float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a load fraction in (0, 1) such as 0.05 or 5%, got {text!r}"
        )
    return value


def _gib(text: str) -> float:
    """Argparse type: a non-negative number of GiB.

    Args:
        text: Command line value.

    Returns:
        The number.

    Raises:
        ArgumentTypeError: If the value is negative or not a number.
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected GiB >= 0, got {text!r}")
    return value


def _total_memory() -> int | None:
    """Physical memory of the machine.

    Returns:
        Bytes, or ``None`` if unknown.
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand.

    Args:
        subparsers: Subparsers of the top-level parser.

    Returns:
        The ``bench`` parser.
    """
    parser = subparsers.add_parser(
        "bench",
        help="per-layer benchmark against stock BackPACK and PyTorch references",
        description=(
            "Time (and measure the peak memory of) every method of every op on\n"
            "the layers of benchmark networks or on given layers. Writes\n"
            "results.csv, results.md, ratios.png and settings.json to --out."
        ),
        epilog=_EPILOG % {"refs": ", ".join(REFERENCE_METHODS)},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--nets",
        metavar="NAMES",
        help=f"comma-separated networks, 'all' or 'none' (default: all; with "
        f"--layer: none). Available: {', '.join(NETS)}",
    )
    what.add_argument(
        "--layer",
        metavar="SPEC",
        action="append",
        default=[],
        help="a layer spec such as 'conv2d in=64x56x56 out=128 k=3 s=2 p=1 n=32' "
        "(repeatable)",
    )
    what.add_argument(
        "--ops",
        metavar="NAMES",
        help="comma-separated ops (default: all): " + ", ".join(OP_NAMES),
    )
    what.add_argument(
        "--methods",
        metavar="NAMES",
        help="comma-separated methods or groups refs/ours/all (default: all)",
    )
    what.add_argument(
        "--quick",
        action="store_true",
        help="small preset: 3c3d, All-CNN-C, five ResNet18 layers; N=8, 3 rounds, "
        "no memory, methods refs,ours:auto (each unless given); about two "
        "minutes on 2 cores",
    )
    what.add_argument(
        "--list",
        action="store_true",
        help="print the de-duplicated layers and exit without measuring",
    )
    how = parser.add_argument_group("how to measure")
    how.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help="batch size (default 32)"
    )
    how.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    how.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64", "float16", "bfloat16"),
        help="floating point type (default float32)",
    )
    how.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="R",
        help="timed interleaved rounds per layer and op (default 7)",
    )
    how.add_argument(
        "--warmup",
        type=_positive_int,
        default=1,
        metavar="W",
        help="untimed calls per method first (default 1)",
    )
    how.add_argument(
        "--min-block-ms",
        type=_non_negative_float,
        metavar="MS",
        help="time each method in blocks of calls lasting at least MS ms and "
        "report the time per call; 0 times single calls (default 5)",
    )
    how.add_argument(
        "--settle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="call each method once, untimed, right before each timed block, so "
        "the method before it leaves no cold caches (default: on)",
    )
    how.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure peak memory, on CPU in one fresh process per method "
        "(default: on; off with --quick)",
    )
    how.add_argument(
        "--gate",
        nargs="?",
        const=0.05,
        type=_load_fraction,
        metavar="LOAD",
        help="wait for a quiet machine and discard rounds with foreign CPU load "
        "above LOAD (default when given: 0.05 = 5%%)",
    )
    how.add_argument("--threads", type=_positive_int, metavar="T", help="torch threads")
    how.add_argument(
        "--steady-allocator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: reuse freed heap memory instead of page-faulting fresh maps, so"
        " that no method's time depends on the methods before it (default: on)",
    )
    how.add_argument(
        "--ggn-vectors",
        type=_positive_int,
        default=10,
        metavar="V",
        help="vectors for ggn_diag (default 10)",
    )
    how.add_argument(
        "--ggn-batch-divisor",
        type=_positive_int,
        default=None,
        metavar="D",
        help="ggn_diag runs at batch size N // D (default 4)",
    )
    how.add_argument(
        "--mem-limit",
        type=_gib,
        metavar="GIB",
        help="CPU: fail allocations above GIB (reported as oom) instead of "
        "exhausting the machine; 0: no limit (default: 80%% of RAM)",
    )
    how.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        default="bench_results",
        metavar="DIR",
        help="output directory (default bench_results)",
    )
    output.add_argument(
        "--no-figure", action="store_true", help="do not draw ratios.png"
    )
    output.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    parser.set_defaults(command_fn=bench_command, command_parser=parser)
    return parser


def _interrupt(signum: int, frame) -> None:
    """Turn a termination signal into ``KeyboardInterrupt``.

    Raises:
        KeyboardInterrupt: Always.
    """
    raise KeyboardInterrupt(signal.Signals(signum).name)


def bench_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``bench`` with parsed arguments.

    Args:
        args: Parsed arguments.
        parser: The ``bench`` parser (for one-line errors, exit code 2).

    Returns:
        Exit code.
    """
    from backpack_tn.benchmark.layers import parse_layer_spec
    from backpack_tn.benchmark.memory import set_memory_limit
    from backpack_tn.benchmark.models import resolve_net
    from backpack_tn.benchmark.report import summary_table
    from backpack_tn.benchmark.runner import (
        QUICK_DEFAULTS,
        collect_layers,
        resolve_methods,
        resolve_ops,
        run_benchmark,
    )

    batch_size = args.batch_size or (QUICK_DEFAULTS["batch_size"] if args.quick else 32)
    try:  # validate everything before touching the process's memory limit
        layers = [parse_layer_spec(text, batch_size) for text in args.layer]
        for name in (args.nets or "").split(","):
            if name.strip() not in ("", "all", "none"):
                resolve_net(name.strip())
        resolve_ops(args.ops)
        resolve_methods(args.methods)
        if args.list:
            entries = collect_layers(args.nets, layers, batch_size, args.quick)
            for entry in entries:
                print(f"{entry.count:>4}  {entry.spec}   [{entry.origin}]")
            total = sum(e.count for e in entries)
            print(f"{len(entries)} distinct layers, {total} in all")
            return 0
    except ValueError as error:
        parser.error(str(error))

    # a crash inside a native kernel during a long run prints the Python stack
    faulthandler.enable()
    limit_bytes = None
    if args.device == "cpu":
        if args.mem_limit is None:
            total = _total_memory()
            limit_bytes = int(0.8 * total) if total else None
        elif args.mem_limit > 0:
            limit_bytes = int(args.mem_limit * 2**30)
        set_memory_limit(limit_bytes)
    # `kill`, `timeout` and job schedulers stop a run as Ctrl-C does: with reports
    terminate = signal.signal(signal.SIGTERM, _interrupt)
    try:
        rows = run_benchmark(
            nets=args.nets,
            layers=layers,
            ops=args.ops,
            methods=args.methods,
            batch_size=batch_size,
            device=args.device,
            dtype=args.dtype,
            repeats=args.repeats,
            warmup=args.warmup,
            memory=args.memory,
            gate=args.gate,
            out=args.out,
            quick=args.quick,
            threads=args.threads,
            seed=args.seed,
            ggn_vectors=args.ggn_vectors,
            ggn_batch_divisor=args.ggn_batch_divisor,
            mem_limit=limit_bytes,
            progress=not args.no_progress,
            figure=not args.no_figure,
            steady_allocator=args.steady_allocator,
            min_block_ms=args.min_block_ms,
            settle=args.settle,
        )
    except ValueError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted. The reports of the cells measured so far, if any,"
            f" are in {args.out}.",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, terminate)
    print(summary_table(rows))
    print(
        f"\nWrote {args.out}/results.csv, results.md, settings.json"
        + ("" if args.no_figure else ", ratios.png")
    )
    return 0
