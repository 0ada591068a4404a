"""Peak memory of one method, measured so that methods cannot affect each other.

CPU: every (layer, op, method) runs in a fresh process, forked from a fork
server (:mod:`backpack_tn.benchmark.fork_server`: an interpreter that has only
imported torch and this package), in which glibc serves every block of 64 KiB or
more by ``mmap`` and returns freed memory at once
(``MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=65536``), so the resident set
follows the live tensors. The worker creates the inputs first, then resets the
kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and reports
``extra = VmHWM - VmRSS(before)`` of a call, which includes the result. Of
:data:`MEASURED_CALLS` calls, the last ("warm") is reported; the first also pays
one-off library workspaces, and the second can still pay one-off costs of code
that only later calls run (the first replay of a recorded evaluation).

CUDA: in the benchmark process, ``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats`` minus the memory allocated before.
"""

from __future__ import annotations

import functools
import os
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from backpack_tn.benchmark.fork_server import ForkServer
from backpack_tn.benchmark.layers import LayerSpec, parse_layer_spec
from backpack_tn.benchmark.ops import get_method, prepare
from backpack_tn.benchmark.timing import LIVE_THRESHOLD
from backpack_tn.derivatives import host

#: Environment of the CPU memory workers.
MALLOC_ENV = dict.fromkeys(
    ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"), str(LIVE_THRESHOLD)
)
#: Calls per memory measurement: the first is reported as cold, the last as warm.
MEASURED_CALLS = 3


@dataclass
class MemoryResult:
    """Peak extra memory of one method.

    Attributes:
        status: ``ok``, ``n/a`` (method does not support the layer), ``oom``
            (allocation failed or process killed), ``timeout``, ``error`` or
            ``unsupported`` (no way to measure on this platform).
        peak: Extra bytes of the warm (last) call.
        cold_peak: Extra bytes of the first call.
        message: Error message, if any.
    """

    status: str
    peak: float | None = None
    cold_peak: float | None = None
    message: str = ""


def classify_error(error: BaseException) -> str:
    """Map an exception to a result status.

    Args:
        error: Exception raised by a method.

    Returns:
        ``n/a``, ``oom`` or ``error``.
    """
    if isinstance(error, NotImplementedError):
        return "n/a"
    if isinstance(error, MemoryError | torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    ):
        return "oom"
    return "error"


def error_message(error: BaseException) -> str:
    """One-line description of an exception.

    Args:
        error: The exception.

    Returns:
        ``"Type: first line of the message"``, at most 200 characters.
    """
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line[:200]


def read_status() -> dict[str, int]:
    """Memory counters of this process from ``/proc/self/status``.

    Returns:
        ``{"VmRSS": bytes, "VmHWM": bytes, ...}``.
    """
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Vm"):
                key, value = line.split(":", 1)
                number, *unit = value.split()
                values[key] = int(number) * (1024 if unit == ["kB"] else 1)
    return values


def can_measure_cpu() -> bool:
    """Whether this platform can reset and read the peak resident set size.

    Returns:
        ``True`` on Linux with a writable ``/proc/self/clear_refs``.
    """
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists(
        "/proc/self/status"
    )


def cpu_extra_peak(fn: Callable[[], object]) -> int:
    """Peak resident memory a call adds on top of what is resident before it.

    Args:
        fn: The call; its result is kept until the peak has been read.

    Returns:
        ``VmHWM`` after the call minus ``VmRSS`` before it, in bytes.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = read_status()["VmRSS"]
    output = fn()
    peak = read_status()["VmHWM"]
    del output
    return peak - before


def cuda_extra_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory a call allocates on top of what is allocated before it.

    Args:
        fn: The call; its result is kept until the peak has been read.
        device: The CUDA device.

    Returns:
        Bytes.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    output = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del output
    return peak - before


def measure_here(
    spec: LayerSpec,
    op: str,
    method: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ggn_vectors: int = 10,
) -> MemoryResult:
    """Measure one method in this process (a fresh worker on CPU).

    Args:
        spec: Layer configuration.
        op: Op name.
        method: Method name.
        device: Device.
        dtype: Floating point type.
        seed: Random seed of the operands.
        ggn_vectors: ``V`` for ``ggn_diag``.

    Returns:
        The cold and warm peaks, or the failure.
    """
    device = torch.device(device)
    if device.type == "cpu" and not can_measure_cpu():
        return MemoryResult("unsupported", message="needs Linux /proc/self/clear_refs")
    try:
        fn = get_method(op, method)
        module, x, extra = prepare(spec, op, device, dtype, seed, ggn_vectors)
    except Exception as error:
        return MemoryResult(classify_error(error), message=error_message(error))

    def call() -> object:
        with torch.no_grad():
            return fn(module, x, extra)

    def measure(f: Callable[[], object]) -> int:
        if device.type == "cpu":
            return cpu_extra_peak(f)
        return cuda_extra_peak(f, device)

    try:
        cold = measure(call)
        for _ in range(MEASURED_CALLS - 1):
            warm = measure(call)
    except Exception as error:
        return MemoryResult(classify_error(error), message=error_message(error))
    return MemoryResult("ok", peak=float(warm), cold_peak=float(cold))


def set_memory_limit(limit_bytes: int | None):
    """Make allocations beyond a size fail instead of exhausting the machine.

    Sets ``RLIMIT_DATA``, which covers ``malloc``/``mmap`` allocations, so an
    oversized tensor raises a ``RuntimeError`` that the benchmark reports as
    ``oom``.

    Args:
        limit_bytes: Limit in bytes; ``None`` leaves the limit unchanged.
    """
    if limit_bytes is None:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (int(limit_bytes), hard))


def measure_in_subprocess(
    spec: LayerSpec,
    op: str,
    method: str,
    dtype: str = "float32",
    seed: int = 0,
    ggn_vectors: int = 10,
    threads: int | None = None,
    mem_limit: int | None = None,
    timeout: float = 600.0,
) -> MemoryResult:
    """Measure one method on CPU in a fresh child of the memory workers' fork server.

    The worker takes this process's host-probe results (see
    :mod:`backpack_tn.derivatives.host`), so that ``auto`` measures the routes
    that were timed here.

    Args:
        spec: Layer configuration (its string travels to the worker).
        op: Op name.
        method: Method name.
        dtype: Name of the floating point type, e.g. ``"float32"``.
        seed: Random seed of the operands.
        ggn_vectors: ``V`` for ``ggn_diag``.
        threads: ``torch.set_num_threads`` in the worker; default: torch's.
        mem_limit: ``RLIMIT_DATA`` of the worker in bytes.
        timeout: Seconds before the worker is stopped.

    Returns:
        The worker's result, or why it gave none.
    """
    result = fork_server().run(
        f"{__name__}:measure_job",
        {
            "spec": spec.to_string(),
            "op": op,
            "method": method,
            "dtype": dtype,
            "seed": seed,
            "ggn_vectors": ggn_vectors,
            "threads": threads,
            "mem_limit": mem_limit,
            "probes": host.configuration(),
        },
        timeout,
    )
    return MemoryResult(**result)


@functools.cache
def fork_server() -> ForkServer:
    """The fork server of the memory workers (started with their first job).

    Returns:
        A server that imported this module under :data:`MALLOC_ENV`.
    """
    return ForkServer([__name__], MALLOC_ENV)


def measure_job(
    spec: str,
    op: str,
    method: str,
    dtype: str,
    seed: int,
    ggn_vectors: int,
    threads: int | None,
    mem_limit: int | None,
    probes: dict[str, float | bool | None],
) -> dict:
    """Body of a memory worker, run in a fresh child of the fork server.

    Args:
        spec: Layer configuration as a string.
        op: Op name.
        method: Method name.
        dtype: Name of the floating point type.
        seed: Random seed of the operands.
        ggn_vectors: ``V`` for ``ggn_diag``.
        threads: ``torch.set_num_threads``; ``None``: torch's default.
        mem_limit: ``RLIMIT_DATA`` in bytes, or ``None``.
        probes: The benchmark process's host-probe configuration.

    Returns:
        :func:`dataclasses.asdict` of the :class:`MemoryResult`.
    """
    if threads:
        torch.set_num_threads(threads)
    host.configure(**probes)
    set_memory_limit(mem_limit)
    result = measure_here(
        parse_layer_spec(spec),
        op,
        method,
        dtype=getattr(torch, dtype),
        seed=seed,
        ggn_vectors=ggn_vectors,
    )
    return asdict(result)
