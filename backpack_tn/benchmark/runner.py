"""Run the benchmark: layers x ops x methods -> result rows (and report files)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from backpack_tn.benchmark.layers import (
    LayerEntry,
    LayerSpec,
    deduplicate,
    enumerate_net,
    parse_layer_spec,
    with_batch_size,
)
from backpack_tn.benchmark.memory import (
    MemoryResult,
    classify_error,
    error_message,
    measure_here,
    measure_in_subprocess,
)
from backpack_tn.benchmark.models import NETS, resolve_net
from backpack_tn.benchmark.ops import (
    OP_NAMES,
    OPS,
    OURS_PREFIX,
    REFERENCE_METHODS,
    is_reference,
    op_registry,
    our_strategies,
    prepare,
)
from backpack_tn.benchmark.report import write_csv, write_reports
from backpack_tn.benchmark.timing import (
    LoadGate,
    TimingResult,
    time_interleaved,
)
from backpack_tn.benchmark.timing import steady_allocator as set_steady_allocator
from backpack_tn.engine.gemm import gemm_backend

#: Networks of ``--quick``.
QUICK_NETS: tuple[str, ...] = ("3c3d", "all_cnn_c")
#: ResNet18 layers of ``--quick`` (stem, 3x3 block, strided 3x3, 1x1 shortcut,
#: head); their multiplicities come from the network.
QUICK_RESNET18: tuple[str, ...] = (
    "conv2d in=3x224x224 out=64 k=7 s=2 p=3 bias=0",
    "conv2d in=64x56x56 out=64 k=3 s=1 p=1 bias=0",
    "conv2d in=64x56x56 out=128 k=3 s=2 p=1 bias=0",
    "conv2d in=64x56x56 out=128 k=1 s=2 p=0 bias=0",
    "linear in=512 out=1000",
)
#: Settings that ``quick=True`` changes unless they are given.
QUICK_DEFAULTS = {"batch_size": 8, "repeats": 3, "memory": False}
#: Shortest timed block of calls in milliseconds (see
#: :mod:`backpack_tn.benchmark.timing`): sub-millisecond calls are timed in
#: blocks of several calls, so that neither the timer nor the method before
#: decides their time.
MIN_BLOCK_MS = 5.0
#: Relative error above which a result is flagged as disagreeing.
CHECK_TOLS = {torch.float64: 1e-10, torch.float32: 1e-4}
#: The same for float32 on CUDA with TF32 enabled (cuDNN's default for convolutions).
TF32_TOL = 5e-3

#: Columns of a result row, in CSV order.
COLUMNS: tuple[str, ...] = (
    "layer",
    "kind",
    "origin",
    "count",
    "op",
    "batch_size",
    "method",
    "family",
    "status",
    "time_ms",
    "time_min_ms",
    "rounds",
    "calls",
    "discarded",
    "ratio",
    "fastest_reference",
    "mem_mib",
    "mem_cold_mib",
    "mem_ratio",
    "rel_err",
    "message",
)


@dataclass(frozen=True)
class BenchSettings:
    """Resolved settings of one benchmark run (recorded in the report)."""

    ops: tuple[str, ...]
    methods: tuple[str, ...]
    device: str
    dtype: str
    repeats: int
    warmup: int
    memory: bool
    gate: float | None
    threads: int
    seed: int
    ggn_vectors: int
    ggn_batch_divisor: int
    batch_size: int
    steady_allocator: bool = False
    min_block_ms: float = MIN_BLOCK_MS
    settle: bool = True

    def describe(self) -> dict:
        """Settings plus machine and library versions.

        Returns:
            A JSON-serializable dict.
        """
        info = dict(self.__dict__)
        info.update(
            torch=torch.__version__,
            backpack=_version("backpack-for-pytorch"),
            python=platform.python_version(),
            machine=platform.machine(),
            processor=_cpu_name(),
            cpus=os.cpu_count(),
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        if self.device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
            info["tf32"] = _tf32()
        else:  # the library of large CPU GEMMs (probed on first use)
            info["gemm"] = gemm_backend()
        return info


def _tf32() -> bool:
    """Whether PyTorch may use TF32 for float32 convolutions or matmuls on CUDA.

    Returns:
        ``True`` if cuDNN or cuBLAS TF32 is allowed.
    """
    return bool(
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    )


def _version(package: str) -> str:
    """Installed version of a distribution.

    Args:
        package: Distribution name.

    Returns:
        The version, or ``"unknown"``.
    """
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _cpu_name() -> str:
    """CPU model name from ``/proc/cpuinfo``.

    Returns:
        The name, or :func:`platform.processor` elsewhere.
    """
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _split(values: str | Iterable[str] | None) -> list[str] | None:
    """Accept ``"a,b"`` or ``["a", "b,c"]``.

    Args:
        values: Names, comma-separated or as a sequence.

    Returns:
        The names, or ``None`` for ``None``.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def resolve_ops(ops: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validate op names.

    Args:
        ops: Names, comma-separated or as a sequence; ``None`` or ``"all"``: all.

    Returns:
        The ops in report order.

    Raises:
        ValueError: For an unknown op.
    """
    names = _split(ops)
    if not names or names == ["all"]:
        return OP_NAMES
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ValueError(f"Unknown op(s) {unknown}. Supported: {OP_NAMES}.")
    return tuple(op for op in OP_NAMES if op in names)


def resolve_methods(methods: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validate method names; ``refs`` and ``ours`` stand for groups.

    Args:
        methods: Names, comma-separated or as a sequence; ``None`` or ``"all"``:
            every reference and every strategy of ``backpack_tn.derivatives``.

    Returns:
        The methods in report order (references first).

    Raises:
        ValueError: For an unknown method.
    """
    names = _split(methods) or ["all"]
    wants_ours = any(n in ("all", "ours") or n.startswith(OURS_PREFIX) for n in names)
    ours = tuple(OURS_PREFIX + s for s in our_strategies()) if wants_ours else ()
    known = REFERENCE_METHODS + ours
    selected: list[str] = []
    for name in names:
        if name == "all":
            selected += known
        elif name in ("refs", "references"):
            selected += REFERENCE_METHODS
        elif name == "ours":
            selected += ours
        elif name in known:
            selected.append(name)
        else:
            hint = (
                "" if ours else " (backpack_tn.derivatives provides no strategies yet)"
            )
            raise ValueError(
                f"Unknown method {name!r}. Supported: {known}, 'refs', 'ours', "
                f"'all'{hint}."
            )
    return tuple(m for m in known if m in selected)


def collect_layers(
    nets: str | Iterable[str] | None,
    layers: Sequence[str | LayerSpec] = (),
    batch_size: int = 32,
    quick: bool = False,
) -> list[LayerEntry]:
    """De-duplicated layers of the requested networks and user specs.

    Args:
        nets: Network names (``"all"``: all of :data:`NETS`; ``"none"``: none);
            default: all networks, or the quick subset, unless ``layers`` are
            given.
        layers: User layer specs (strings or :class:`LayerSpec`); a string
            without ``n=`` gets ``batch_size``.
        batch_size: Batch size ``N`` of the network layers.
        quick: Use the quick subset (3c3d, All-CNN-C and five ResNet18 layers)
            when ``nets`` is not given.

    Returns:
        One entry per distinct layer configuration with its multiplicity.
    """
    names = _split(nets)
    if names is None:
        names = [] if layers else list(QUICK_NETS if quick else NETS)
    elif names in (["all"], ["none"]):
        names = list(NETS) if names == ["all"] else []
    pairs: list[tuple[str, LayerSpec]] = []
    for name in names:
        net = resolve_net(name)
        pairs += [(net, spec) for spec in enumerate_net(net, batch_size)]
    if quick and _split(nets) is None and not layers:
        chosen = {parse_layer_spec(text, batch_size) for text in QUICK_RESNET18}
        pairs += [
            ("resnet18", spec)
            for spec in enumerate_net("resnet18", batch_size)
            if spec in chosen
        ]
    for layer in layers:
        spec = (
            layer
            if isinstance(layer, LayerSpec)
            else parse_layer_spec(layer, batch_size)
        )
        pairs.append(("user", spec))
    return deduplicate(pairs)


def _rel_err(value: object, reference: torch.Tensor) -> float:
    """Relative error ``|value - reference| / |reference|``.

    Args:
        value: A method's result.
        reference: The first reference's result.

    Returns:
        The error, or ``nan`` if the results cannot be compared.
    """
    if not isinstance(value, torch.Tensor) or value.numel() != reference.numel():
        return math.nan
    value = value.detach().reshape(reference.shape).double()
    reference = reference.double()
    scale = reference.norm().item() or 1.0
    return (value - reference).norm().item() / scale


def _mib(value: float | None) -> float:
    return math.nan if value is None else value / 2**20


def run_benchmark(
    nets: str | Iterable[str] | None = None,
    layers: Sequence[str | LayerSpec] = (),
    ops: str | Iterable[str] | None = None,
    methods: str | Iterable[str] | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int | None = None,
    warmup: int = 1,
    memory: bool | None = None,
    gate: float | None = None,
    out: str | os.PathLike | None = None,
    quick: bool = False,
    threads: int | None = None,
    seed: int = 0,
    ggn_vectors: int = 10,
    ggn_batch_divisor: int | None = None,
    mem_limit: int | None = None,
    progress: bool = False,
    figure: bool = True,
    steady_allocator: bool = False,
    min_block_ms: float | None = None,
    settle: bool = True,
) -> list[dict]:
    """Time (and optionally measure the memory of) every method on every layer.

    For each distinct layer configuration and op, all methods run in this
    process in interleaved rounds (see :mod:`backpack_tn.benchmark.timing`);
    each method's first result is compared with the first reference's.
    Ratios are relative to the fastest (smallest) reference method of that
    layer and op.

    Args:
        nets: Networks whose layers to measure; see :func:`collect_layers`.
        layers: Extra layer specs, e.g. ``["conv2d in=64x56x56 out=128 k=3"]``.
        ops: Ops to measure (default: all of :data:`OP_NAMES`).
        methods: Methods (default: all references and all of ours); ``"refs"``
            and ``"ours"`` select groups.
        batch_size: Batch size ``N`` (default 32; 8 with ``quick``).
        device: ``"cpu"`` or ``"cuda"``/``"cuda:<i>"``.
        dtype: ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``.
        repeats: Timed rounds per (layer, op) (default 7; 3 with ``quick``).
        warmup: Untimed calls per method before the rounds.
        memory: Measure peak memory (default ``True``; ``False`` with ``quick``).
            On CPU this starts one process per (layer, op, method).
        gate: Foreign CPU load threshold (fraction of all CPUs, e.g. ``0.05``)
            for quiet-machine gating; ``None`` disables gating.
        out: Directory for ``results.csv``, ``results.md``, ``ratios.png`` and
            ``settings.json``; ``None`` writes nothing. ``results.csv`` is
            rewritten after every layer, so that a killed run keeps what it
            measured; a run stopped by an exception (``Ctrl-C`` included) writes
            every report of the layers it finished, with ``interrupted`` in the
            settings, and re-raises.
        quick: Small preset: 3c3d, All-CNN-C and five ResNet18 layers at small
            batch size, few rounds, no memory, and (unless ``methods`` is given)
            only the references and ``ours:auto``.
        threads: ``torch.set_num_threads`` during the run (restored after).
        seed: Seed of layers and operands.
        ggn_vectors: Number ``V`` of vectors for ``ggn_diag``.
        ggn_batch_divisor: ``ggn_diag`` runs at ``N // ggn_batch_divisor``
            (default 4).
        mem_limit: Address-space limit for data (bytes) of the memory workers.
        progress: Show a progress bar.
        figure: Also draw the box plot when writing reports.
        steady_allocator: On CPU, let this process reuse freed heap memory (see
            :func:`backpack_tn.benchmark.timing.steady_allocator`; it stays in
            effect after the run). The command line turns it on.
        min_block_ms: Each timed block of a method's calls lasts at least this
            long; its time per call is reported (see
            :mod:`backpack_tn.benchmark.timing`); default :data:`MIN_BLOCK_MS`.
            ``0`` times single calls.
        settle: Call a method once, untimed, right before each timed block.

    Returns:
        One dict per (layer, op, method) with the keys of :data:`COLUMNS`.

    Raises:
        ValueError: For unknown names or invalid settings.
    """
    if quick:
        batch_size = QUICK_DEFAULTS["batch_size"] if batch_size is None else batch_size
        repeats = QUICK_DEFAULTS["repeats"] if repeats is None else repeats
        memory = QUICK_DEFAULTS["memory"] if memory is None else memory
        if methods is None:
            methods = "refs,ours:auto" if "auto" in our_strategies() else "refs"
    batch_size = 32 if batch_size is None else batch_size
    repeats = 7 if repeats is None else repeats
    memory = True if memory is None else memory
    for name, value in (("batch_size", batch_size), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}.")
    min_block_ms = MIN_BLOCK_MS if min_block_ms is None else min_block_ms
    if not min_block_ms >= 0:
        raise ValueError(
            f"min_block_ms must be a non-negative number of milliseconds, "
            f"got {min_block_ms}."
        )
    if gate is not None and not 0 < gate < 1:
        raise ValueError(f"gate must be a load fraction in (0, 1), got {gate}.")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(
            f"Unsupported dtype {dtype!r}. "
            "Supported: ('float32', 'float64', 'float16', 'bfloat16')."
        )
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} requested, but CUDA is not available.")
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device!r}. Supported: cpu, cuda.")

    op_names = resolve_ops(ops)
    method_names = resolve_methods(methods)
    entries = collect_layers(nets, layers, batch_size, quick)
    divisor = (
        OPS["ggn_diag"].batch_divisor
        if ggn_batch_divisor is None
        else (ggn_batch_divisor)
    )
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if steady_allocator and torch_device.type == "cpu":
        steady_allocator = set_steady_allocator()
    settings = BenchSettings(
        ops=op_names,
        methods=method_names,
        device=str(torch_device),
        dtype=dtype,
        repeats=repeats,
        warmup=warmup,
        memory=memory,
        gate=gate,
        threads=torch.get_num_threads(),
        seed=seed,
        ggn_vectors=ggn_vectors,
        ggn_batch_divisor=divisor,
        batch_size=batch_size,
        steady_allocator=steady_allocator and torch_device.type == "cpu",
        min_block_ms=float(min_block_ms),
        settle=settle,
    )
    registry = op_registry(include_ours=any(not is_reference(m) for m in method_names))
    load_gate = LoadGate(threshold=gate) if gate is not None else None
    tol = CHECK_TOLS.get(torch_dtype, 1e-2)
    if torch_device.type == "cuda" and torch_dtype == torch.float32 and _tf32():
        tol = TF32_TOL

    if torch_device.type == "cpu":
        gemm_backend()  # probe the GEMM libraries now, not inside a timed call
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries) * len(op_names), unit="cell", leave=True)
    rows: list[dict] = []
    done = 0
    try:
        for entry in entries:
            for op in op_names:
                if bar is not None:
                    bar.set_description(f"{op:<22} {entry.spec.kind}")
                rows += _run_cell(
                    entry,
                    op,
                    [m for m in method_names if m in registry[op]],
                    registry[op],
                    settings,
                    torch_dtype,
                    divisor if op == "ggn_diag" else OPS[op].batch_divisor,
                    load_gate,
                    tol,
                    mem_limit,
                )
                if bar is not None:
                    bar.update()
            done += 1
            if out is not None and done < len(entries):
                _checkpoint(rows, out)
    except BaseException as error:
        if out is not None and rows:
            info = settings.describe()
            info["interrupted"] = (
                f"{type(error).__name__} after {done} of {len(entries)} layers"
            )
            write_reports(rows, out, info, figure=figure)
        raise
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(old_threads)
    if out is not None:
        write_reports(rows, out, settings.describe(), figure=figure)
    return rows


def _checkpoint(rows: list[dict], out: str | os.PathLike):
    """Write the rows so far to ``results.csv``, so that a killed run keeps them.

    Rewriting the whole file after every layer costs milliseconds against the
    layers' seconds of measuring.
    """
    Path(out).mkdir(parents=True, exist_ok=True)
    write_csv(rows, Path(out) / "results.csv")


def _run_cell(
    entry: LayerEntry,
    op: str,
    methods: list[str],
    registry: dict,
    settings: BenchSettings,
    dtype: torch.dtype,
    batch_divisor: int,
    gate: LoadGate | None,
    tol: float,
    mem_limit: int | None,
) -> list[dict]:
    """Time and measure all methods of one (layer, op).

    Args:
        entry: The layer and where it occurs.
        op: Op name.
        methods: Methods to run, in report order.
        registry: ``{method: callable}`` of the op.
        settings: Run settings.
        dtype: Floating point type.
        batch_divisor: The op runs at ``max(1, N // batch_divisor)``.
        gate: Quiet-machine gate or ``None``.
        tol: Relative error above which a result is flagged.
        mem_limit: ``RLIMIT_DATA`` of memory workers in bytes.

    Returns:
        One row per method.
    """
    spec = entry.spec
    if batch_divisor > 1:
        spec = with_batch_size(spec, max(1, spec.batch_size // batch_divisor))
    base = {
        "layer": spec.to_string(),
        "kind": spec.kind,
        "origin": entry.origin,
        "count": entry.count,
        "op": op,
        "batch_size": spec.batch_size,
    }
    rows = {
        m: {
            **base,
            "method": m,
            "family": "reference" if is_reference(m) else "ours",
            "status": "n/a",
            "message": "",
        }
        for m in methods
    }
    try:
        timing, errors = _time_cell(spec, op, methods, registry, settings, dtype, gate)
    except Exception as error:
        for row in rows.values():
            row.update(status=classify_error(error), message=error_message(error))
        return [_complete(row) for row in rows.values()]
    for m, row in rows.items():
        if m in timing.errors:
            error = timing.errors[m]
            row.update(status=classify_error(error), message=error_message(error))
            continue
        times = timing.times[m]
        row.update(
            status="ok",
            time_ms=timing.median(m) * 1e3,
            time_min_ms=min(times) * 1e3,
            rounds=len(times),
            calls=timing.calls[m],
            discarded=timing.discarded,
            rel_err=errors.get(m, math.nan),
        )
        if row["rel_err"] > tol:
            row["message"] = f"disagrees with the first reference: {row['rel_err']:.1e}"

    if settings.memory:
        for m, row in rows.items():
            if row["status"] != "ok":
                continue
            result = _measure(spec, op, m, settings, mem_limit)
            if result.status == "ok":
                row.update(
                    mem_mib=_mib(result.peak), mem_cold_mib=_mib(result.cold_peak)
                )
            else:
                row["message"] = f"memory: {result.status} {result.message}".strip() + (
                    f"; {row['message']}" if row["message"] else ""
                )

    _add_ratios(rows.values())
    return [_complete(row) for row in rows.values()]


def _time_cell(
    spec: LayerSpec,
    op: str,
    methods: list[str],
    registry: dict,
    settings: BenchSettings,
    dtype: torch.dtype,
    gate: LoadGate | None,
) -> tuple[TimingResult, dict[str, float]]:
    """Prepare the operands of one (layer, op) and time its methods.

    The operands are released when this function returns, before the memory
    workers start.

    Args:
        spec: Layer configuration (with the op's batch size).
        op: Op name.
        methods: Methods to run, in report order.
        registry: ``{method: callable}`` of the op.
        settings: Run settings.
        dtype: Floating point type.
        gate: Quiet-machine gate or ``None``.

    Returns:
        The timings, and each method's relative error against the first
        reference that succeeded.
    """
    device = torch.device(settings.device)
    module, x, extra = prepare(
        spec, op, device, dtype, settings.seed, settings.ggn_vectors
    )
    reference: list[torch.Tensor] = []
    errors: dict[str, float] = {}

    def keep_output(name: str, output: object):
        if not reference and is_reference(name) and isinstance(output, torch.Tensor):
            reference.append(output.detach())
            errors[name] = 0.0
        elif reference:
            errors[name] = _rel_err(output, reference[0])

    calls = {m: (lambda fn=registry[m]: fn(module, x, extra)) for m in methods}
    with torch.no_grad():
        timing = time_interleaved(
            calls,
            repeats=settings.repeats,
            warmup=settings.warmup,
            device=device,
            gate=gate,
            keep_output=keep_output,
            min_block=settings.min_block_ms / 1e3,
            settle=settings.settle,
        )
    return timing, errors


def _measure(
    spec: LayerSpec,
    op: str,
    method: str,
    settings: BenchSettings,
    mem_limit: int | None,
) -> MemoryResult:
    """Peak memory of one method: fresh process on CPU, in-process on CUDA.

    Args:
        spec: Layer configuration (with the op's batch size).
        op: Op name.
        method: Method name.
        settings: Run settings.
        mem_limit: ``RLIMIT_DATA`` of the worker in bytes.

    Returns:
        The measurement.
    """
    if settings.device.startswith("cuda"):
        return measure_here(
            spec,
            op,
            method,
            device=settings.device,
            dtype=getattr(torch, settings.dtype),
            seed=settings.seed,
            ggn_vectors=settings.ggn_vectors,
        )
    return measure_in_subprocess(
        spec,
        op,
        method,
        dtype=settings.dtype,
        seed=settings.seed,
        ggn_vectors=settings.ggn_vectors,
        threads=settings.threads,
        mem_limit=mem_limit,
    )


#: Peaks below this many MiB count as this many in memory ratios: the resident set
#: moves by tens of KiB between runs of one method (page-granular counting, the
#: allocator's and the interpreter's own memory), so a ratio of two peaks of a few
#: KiB says nothing about the method.
MEMORY_RESOLUTION_MIB = 0.25


def _add_ratios(rows: Iterable[dict]):
    """Add time and memory ratios against the best reference, in place.

    Memory ratios count peaks below :data:`MEMORY_RESOLUTION_MIB` as that much.

    Args:
        rows: Rows of one (layer, op).
    """
    rows = list(rows)
    refs = [r for r in rows if r["family"] == "reference" and r["status"] == "ok"]
    timed = [r for r in refs if not math.isnan(r.get("time_ms", math.nan))]
    if timed:
        fastest = min(timed, key=lambda r: r["time_ms"])
        for row in rows:
            row["fastest_reference"] = fastest["method"]
            if row["status"] == "ok":
                row["ratio"] = row["time_ms"] / fastest["time_ms"]
    measured = [r for r in refs if not math.isnan(r.get("mem_mib", math.nan))]
    if measured:
        smallest = max(min(r["mem_mib"] for r in measured), MEMORY_RESOLUTION_MIB)
        for row in rows:
            if not math.isnan(row.get("mem_mib", math.nan)):
                row["mem_ratio"] = max(row["mem_mib"], MEMORY_RESOLUTION_MIB) / smallest


def _complete(row: dict) -> dict:
    """Fill missing columns with ``nan``/empty values, in :data:`COLUMNS` order.

    Args:
        row: A partial row.

    Returns:
        The full row.
    """
    text = {"fastest_reference", "message", "layer", "kind", "origin", "op"}
    text |= {"method", "family", "status"}
    return {c: row.get(c, "" if c in text else math.nan) for c in COLUMNS}
