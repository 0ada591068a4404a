"""Wall-clock timing: warm-up, interleaved rounds, medians, quiet-machine gating.

All methods of one (layer, op) run in the same process. After one warm-up call
each, every *round* calls each method once, in an order shuffled anew for each
round (seeded, so runs repeat), so that slow drifts of the machine (frequency,
other processes, allocator state) hit all methods alike, and no method always
follows the same one (a method run right after another that uses the same
kernel finds its memory and caches warm: up to 1.6x faster on small layers).
The reported time is the median over rounds.

Calls that take well under a millisecond are dominated by the state the method
before them left (cold caches, a heap shaped by other sizes): in one round their
time can be twice their time in the next. Two settings measure them in their
own steady state instead, as ``timeit`` and ``torch.utils.benchmark`` do:

* *blocks*: each round times a block of calls of one method, enough calls to
  fill ``min_block`` seconds (judged from timed blocks of growing size after
  the warm-up), and reports the block's time per call;
* *settling*: one untimed call of the method right before its block, so that
  the block starts from the method's own caches and allocator state.

On a shared machine, another process using a core makes multi-threaded kernels
erratically slow. With gating, a round is judged by the *foreign* CPU load over
the trailing window of at least ``window`` seconds that ends with it (busy time
of all CPUs from ``/proc/stat``, including steal, minus this process's own CPU
time from :func:`os.times`, per CPU and second). A round judged too loaded is
discarded and repeated once the machine has been quiet for a whole window; the
first round waits for such a window too. Rounds on a quiet machine run back to
back: the window reaches back over the rounds before, instead of being slept
before each round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import random
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

#: Most calls in one timed block.
MAX_BLOCK_CALLS = 1000
#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit systems.
MAX_MMAP_THRESHOLD = 32 * 2**20
#: Trim and mmap threshold of :func:`live_allocator` (``memory.MALLOC_ENV``'s).
LIVE_THRESHOLD = 65536


def steady_allocator() -> bool:
    """Let this process reuse freed heap memory instead of page-faulting fresh maps.

    glibc serves large allocations with fresh ``mmap`` s (page faults on first
    touch) and moves its threshold for that with the sizes freed before, so a
    method's time depends on which methods ran before it: up to 4x on layers that
    take a millisecond. Raising the mmap threshold to its maximum (32 MiB) and
    never trimming the heap makes every method reuse warm memory below that size.
    Only for timing processes: the heap keeps its peak size afterwards.

    Returns:
        Whether the setting took effect (glibc only).
    """
    return _set_allocator(2**31 - 1, MAX_MMAP_THRESHOLD)


def live_allocator() -> bool:
    """Make this process's resident set follow its live memory, from now on.

    The settings of the memory workers (``memory.MALLOC_ENV``: every block of 64
    KiB or more by ``mmap``, freed memory returned at once), then the heap's free
    memory returned (``malloc_trim``). Without them, a call that reuses memory
    freed earlier adds nothing to the resident set: the main job measured 0 MiB
    of extra peak for KFAC on All-CNN-C after other extensions had run.
    :func:`steady_allocator` restores fast reuse for timing.

    Returns:
        Whether the setting took effect (glibc only).
    """
    if not _set_allocator(LIVE_THRESHOLD, LIVE_THRESHOLD):
        return False
    try:
        _libc().malloc_trim(ctypes.c_size_t(0))
    except AttributeError:
        return False
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, or ``None`` where it cannot be loaded (loaded once).

    Returns:
        The library handle, or ``None``.
    """
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _set_allocator(trim_threshold: int, mmap_threshold: int) -> bool:
    """Set glibc's trim and mmap thresholds (``mallopt``).

    Returns:
        Whether both took effect.
    """
    try:
        mallopt = _libc().mallopt
    except AttributeError:
        return False
    trimmed = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    mapped = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    return bool(trimmed and mapped)


def _busy_cpu_seconds() -> float | None:
    """Busy time of all CPUs since boot (user, nice, system, irq, softirq, steal).

    Returns:
        Seconds summed over CPUs, or ``None`` where ``/proc/stat`` is missing.
    """
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / ticks


def _own_cpu_seconds() -> float:
    """CPU time of this process (all threads).

    Returns:
        User plus system seconds.
    """
    times = os.times()
    return times.user + times.system


@dataclass
class LoadGate:
    """Wait for a quiet machine and detect rounds disturbed by other processes.

    Attributes:
        threshold: Largest tolerated foreign load, as a fraction of all CPUs.
        window: Seconds over which the load is measured before a round.
        max_wait: Give up waiting after this many seconds (and warn once).
        cpus: Number of CPUs.
    """

    threshold: float = 0.05
    window: float = 0.5
    max_wait: float = 120.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    _warned: bool = field(default=False, repr=False)
    _marks: deque = field(default_factory=deque, repr=False)
    _wait: bool = field(default=True, repr=False)

    @property
    def available(self) -> bool:
        """Whether the machine exposes ``/proc/stat``."""
        return _busy_cpu_seconds() is not None

    @staticmethod
    def mark() -> tuple[float, float, float]:
        """Snapshot of busy, own and wall-clock time.

        Returns:
            ``(busy_cpu_s, own_cpu_s, wall_s)``.
        """
        return (_busy_cpu_seconds() or 0.0, _own_cpu_seconds(), time.perf_counter())

    def foreign_load(self, since: tuple[float, float, float]) -> float:
        """Foreign load since a snapshot.

        Args:
            since: Snapshot from :meth:`mark`.

        Returns:
            Busy CPU time of other processes per CPU and second, in ``[0, 1]``.
        """
        busy, own, wall = self.mark()
        elapsed = max(wall - since[2], 1e-9)
        foreign = (busy - since[0]) - (own - since[1])
        return max(0.0, foreign / (elapsed * self.cpus))

    def wait_quiet(self) -> tuple[float, tuple[float, float, float]]:
        """Block until the foreign load over one window is below the threshold.

        Returns:
            Seconds waited, and the snapshot that starts the quiet window (use it
            to judge the round that follows, so short rounds are judged over at
            least one window).
        """
        start = time.perf_counter()
        while True:
            since = self.mark()
            time.sleep(self.window)
            if self.foreign_load(since) < self.threshold:
                return time.perf_counter() - start, since
            if time.perf_counter() - start > self.max_wait:
                if not self._warned:
                    warnings.warn(
                        f"Foreign CPU load stayed above {self.threshold:.0%} for "
                        f"{self.max_wait:.0f} s; timing anyway.",
                        stacklevel=2,
                    )
                    self._warned = True
                return time.perf_counter() - start, since

    def begin_round(self) -> float:
        """Mark the start of a round; first wait for a quiet window if needed.

        Waits before the first round and after a disturbed one.

        Returns:
            Seconds waited.
        """
        waited = 0.0
        if self._wait:
            waited, since = self.wait_quiet()
            self._marks.clear()
            self._marks.append(since)
            self._wait = False
        self._marks.append(self.mark())
        return waited

    def disturbed(self) -> bool:
        """Whether the round that just ended ran under too much foreign load.

        The load is measured since the latest mark at least one window old (the
        oldest mark if none is), so a short round is judged together with the
        rounds before it. A disturbed round makes the next one wait.

        Returns:
            ``True`` if the foreign load reached the threshold.
        """
        now = time.perf_counter()
        while len(self._marks) > 1 and self._marks[1][2] <= now - self.window:
            self._marks.popleft()
        if self.foreign_load(self._marks[0]) < self.threshold:
            return False
        self._wait = True
        return True


@dataclass
class TimingResult:
    """Timings of the methods of one (layer, op).

    Attributes:
        times: Seconds per accepted round, per method.
        errors: Exceptions raised by methods (those are not timed).
        outputs: Result of each method's warm-up call, if kept.
        discarded: Number of rounds discarded because of foreign load.
        waited: Seconds spent waiting for a quiet machine.
        calls: Calls per timed block, per method (the times are per call).
    """

    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)
    discarded: int = 0
    waited: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)

    def median(self, method: str) -> float:
        """Median time of a method.

        Args:
            method: Method name.

        Returns:
            Seconds; ``nan`` if the method was not timed.
        """
        values = self.times.get(method, [])
        return statistics.median(values) if values else float("nan")


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """A function that times a block of calls on a device.

    Args:
        device: Where the methods run.

    Returns:
        ``timer(fn, calls) -> seconds per call``; uses CUDA events and
        synchronization on CUDA.
    """
    if device.type == "cuda":

        def cuda_timer(fn: Callable[[], object], calls: int) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3 / calls

        return cuda_timer

    def cpu_timer(fn: Callable[[], object], calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return cpu_timer


def block_calls(seconds: float, min_block: float) -> int:
    """Number of calls that fill a timed block.

    Args:
        seconds: Time of one call (from the warm-up).
        min_block: Shortest block in seconds; ``0`` times single calls.

    Returns:
        ``ceil(min_block / seconds)``, between 1 and :data:`MAX_BLOCK_CALLS`.
    """
    if min_block <= 0 or seconds >= min_block:
        return 1
    return min(MAX_BLOCK_CALLS, math.ceil(min_block / max(seconds, 1e-9)))


def calibrate_block(
    timer: Callable[[Callable[[], object], int], float],
    fn: Callable[[], object],
    min_block: float,
) -> int:
    """Number of calls that fill a timed block, from timed blocks of growing size.

    One call right after the warm-up can be many times slower than the calls
    that follow (page faults, cold caches), so a block sized from it alone can
    last a fraction of ``min_block``. Starting from one call, each step times a
    block of the size that the previous block's time per call asks for, until a
    block holds at least as many calls as its own time per call asks for.

    Args:
        timer: ``timer(fn, calls) -> seconds per call`` (see :func:`_timer`).
        fn: The method.
        min_block: Shortest block in seconds; ``0`` times single calls.

    Returns:
        Calls per block, between 1 and :data:`MAX_BLOCK_CALLS`.
    """
    calls = 1
    if min_block <= 0:
        return calls
    needed = block_calls(timer(fn, calls), min_block)
    while needed > calls:
        calls = needed
        needed = block_calls(timer(fn, calls), min_block)
    return calls


def time_interleaved(
    methods: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    gate: LoadGate | None = None,
    keep_output: Callable[[str, object], None] | None = None,
    max_discards: int | None = None,
    min_block: float = 0.0,
    settle: bool = False,
) -> TimingResult:
    """Time several methods in interleaved rounds, in a shuffled order per round.

    Args:
        methods: ``{name: fn}``; each ``fn()`` computes one result.
        repeats: Number of accepted rounds.
        warmup: Untimed calls per method before the rounds. A method that raises
            during warm-up is left out of the rounds.
        device: Device the methods run on (CUDA uses events).
        gate: Quiet-machine gate; ``None`` disables gating.
        keep_output: Called as ``keep_output(name, result)`` with the result of
            each method's first warm-up call (e.g. to check correctness).
        max_discards: Stop discarding after this many rounds (default
            ``3 * repeats``) and accept disturbed rounds.
        min_block: Seconds each timed block should at least take: a method whose
            call takes ``t`` seconds runs ``ceil(min_block / t)``
            times per block (see :func:`calibrate_block`, which times blocks
            of growing size after the warm-up). ``0`` times single calls.
        settle: Call each method once, untimed, right before its block.

    Returns:
        Round times per method, errors, and gating statistics.
    """
    device = torch.device(device)
    timer = _timer(device)
    result = TimingResult()
    if gate is not None and not gate.available:
        warnings.warn("No /proc/stat: quiet-machine gating is off.", stacklevel=2)
        gate = None
    active: list[str] = []
    for name, fn in methods.items():
        try:
            for i in range(max(warmup, 1)):
                output = fn()
                if i == 0 and keep_output is not None:
                    keep_output(name, output)
                del output
            calls = calibrate_block(timer, fn, min_block)
        except Exception as error:
            result.errors[name] = error
            continue
        active.append(name)
        result.times[name] = []
        result.calls[name] = calls
    max_discards = 3 * repeats if max_discards is None else max_discards
    accepted = 0
    shuffler = random.Random(0)
    while active and accepted < repeats:
        if gate is not None:
            result.waited += gate.begin_round()
        order: Sequence[str] = list(active)
        shuffler.shuffle(order)
        times = {}
        for name in order:
            try:
                if settle:
                    methods[name]()
                times[name] = timer(methods[name], result.calls[name])
            except Exception as error:
                result.errors[name] = error
                active.remove(name)
                del result.times[name]
        if gate is not None and gate.disturbed() and result.discarded < max_discards:
            result.discarded += 1
            continue
        for name, seconds in times.items():
            result.times[name].append(seconds)
        accepted += 1
    return result
