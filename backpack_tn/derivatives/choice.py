"""Which evaluation each (op, layer, strategy) gets, and why.

``auto`` picks per layer configuration and op by a cost model:

- Products that are plain (transposed) convolutions or matrix multiplications
  (input JVP/VJP, weight JVP) use PyTorch's kernels directly, except input VJPs of
  ungrouped convolutions with non-overlapping patterns and at most
  ``FEW_OUTPUT_CHANNELS`` input channels (1x1 kernels: ``FEW_OUTPUT_CHANNELS_1X1``,
  strided ones ``STRIDED_1X1_OUTPUT_CHANNELS``), which take the network: one GEMM
  and a strided write; and input VJPs of ungrouped Conv2d with at most
  ``FEW_OUTPUT_CHANNELS`` input channels whose channels times largest dense pattern
  stay within ``FEW_CHANNEL_PATTERNS``, which take the dense-pattern network (CPU).
- Weight VJPs use the simplified network when every index pattern is
  non-overlapping (dense ``K = S``, down-sampling ``S > K``, ``1x1``): it becomes
  a strided view and one batched GEMM (on CPU, several vectors of several samples
  on ``MANY_POSITIONS`` or more output positions with at most ``NARROW_GEMM``
  weight entries per output channel take the ``kernel`` route instead: the GEMM
  view would copy all vectors sample-major first). Otherwise the
  ``kernel`` route (the convolution's weight-gradient kernel with the samples as
  groups and the vectors as output channels) is the default, with these exceptions.
  Ungrouped Conv2d with a single input channel take the higher-order convolution
  (several vectors: only without stride). Depthwise layers take a same-order
  grouped convolution, except those with kernels of at most ``SMALL_KERNEL``
  entries that are strided with ``STRIDED_DEPTHWISE_MAP`` input positions (one
  vector) or whose input, repeated per vector and sample, is large (unstrided:
  ``DEPTHWISE_BYTES``; one vector: ``DEPTHWISE_BYTES_ONE_VECTOR`` or
  ``LARGE_DEPTHWISE_MAP`` input positions), which take the kernel route; several
  vectors on strided Conv2d take im2col and one GEMM. For one vector: the higher-order
  convolution of Rochette et al. on Conv1d and on 2d layers with at most
  ``FEW_CHANNELS`` input channels per group below ``LARGE_MAP`` output positions
  (never for kernels of width 1, like 7x1); on ungrouped Conv2d with more input
  channels, the lowered network (a strided view, one copy) and one GEMM up to
  ``SMALL_MAP`` output positions (strided: below ``STRIDED_MAP``; with
  ``MANY_CHANNELS`` input channels and ``SEVERAL_SAMPLES`` samples: up to
  ``MEDIUM_MAP``); on other layers,
  the lowered network (2d) or the dense-pattern network up to ``FEW_POSITIONS``.
  For several vectors: on a single sample with more than
  ``FEW_CHANNELS`` input channels per group, im2col and one GEMM below
  ``MANY_POSITIONS`` output positions (Conv2d); the higher-order convolution for few
  input channels without groups (not on strided layers for a single sample); the
  dense-pattern network on 2d/3d layers with fewer than ``MANY_POSITIONS`` output
  positions and small patterns.
- Squared quantities (GGN diagonal, per-sample L2 norms) compare the FLOPs of the
  single network that never forms per-sample VJPs against forming them (VJPs from
  the kernel route count ``1 / KERNEL_SPEEDUP`` of their FLOPs, from the lowered
  network ``1 / LOWERED_SPEEDUP``); in the latter
  case the VJPs are evaluated as above, then squared. The single network lowers
  unpadded patterns to strided views where that saves FLOPs.
- The KFAC-expand input factor is the Gram matrix of the unfolded input: a strided
  view, one copy and GEMMs for the upper block triangle only (the factor is
  symmetric; PyTorch has no ``syrk``). KFAC-reduce sums over positions inside the
  network with dense patterns while those are small, and over strided views otherwise
  (e.g. long Conv1d signals, whose patterns are almost empty).

On GPU, where these layers' products take well under a millisecond and kernel
launches dominate, overlapping patterns are always lowered to strided views
(one copy, one batched GEMM): in weight VJPs, KFAC-reduce, and the single networks
of GGN diagonals and norms, which compete with squared VJPs by FLOPs as on CPU.
Norms and GGN diagonals of small Linear layers square their per-sample VJPs (three
launches), and Gram matrices take one GEMM below
:data:`~backpack_tn.engine.gram.GPU_MIN_BLOCK_MACS`.

The strategy ``autotune`` (or ``auto`` after :func:`set_autotune`) instead times
every candidate once per configuration and keeps the fastest (like cuDNN's benchmark
mode).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from math import prod

import torch
from torch import Tensor
from torch.nn import Module

from backpack_tn._timing import fastest_times
from backpack_tn.derivatives import host, plans
from backpack_tn.derivatives.implementations import (
    APPLIES,
    IMPLEMENTATIONS,
    SQUARE,
    STOCK_WEIGHT_VJP,
    TN_STRATEGIES,
    UNFOLDED_BLOCK_BYTES,
    check_stock_strategy,
    input_vjp_step,
    lag_applies,
    lag_zeros,
    prepare,
    sample_vector_bytes,
)
from backpack_tn.engine import lag_gram
from backpack_tn.engine.gram import num_blocks
from backpack_tn.engine.network import flops
from backpack_tn.expressions import (
    weight_batch_l2,
    weight_diag_ggn,
    weight_jac_t_mat_prod,
)
from backpack_tn.expressions.layer_spec import LayerSpec

#: The strategy that times the candidates once per configuration, as ``auto`` does
#: after ``set_autotune(True)``: an opt-in for one extension or derivatives object.
AUTOTUNE = "autotune"
#: Strategies a derivative class accepts.
STRATEGIES = (
    "auto",
    AUTOTUNE,
    *TN_STRATEGIES,
    "kernel",
    "unfold",
    *STOCK_WEIGHT_VJP,
)

_AUTOTUNE = {"enabled": False}
_TUNED: dict[tuple, tuple[str, str]] = {}


def set_autotune(enabled: bool):
    """Let ``auto`` time the candidates once per configuration instead of guessing.

    Every derivatives object with strategy ``auto`` then behaves as with strategy
    ``autotune``. Either way, the measurements are shared and cleared here.

    Args:
        enabled: Whether to measure. Measurements are cached per
            ``(op, layer configuration, tensor shapes, device, dtype)``.
    """
    _AUTOTUNE["enabled"] = bool(enabled)
    _TUNED.clear()
    plans.clear_plans()


def set_host_probe(
    enabled: bool,
    speedup: float | None = None,
    lowered_speedup: float | None = None,
    depthwise_lowered_speedup: float | None = None,
    narrow_speedup: float | None = None,
):
    """Let ``auto`` time per-sample routes once on this host, or pin the results.

    See :mod:`backpack_tn.derivatives.host`: the first decision between the
    convolution kernel's weight gradient and the higher-order convolution times
    both on a probe layer, and the first between the kernel route and the lowered
    network for several vectors times those two, on a dense and on a depthwise
    probe layer, and the first between the kernel route and the network's GEMM
    view of a narrow 1x1 layer times those (default: on, unless
    ``BACKPACK_TN_HOST_PROBE=0``).

    Args:
        enabled: Whether the probes may run. Off, ``auto`` keeps the kernel route.
        speedup: The kernel route's time divided by the higher-order
            convolution's, used instead of measuring (``None``: measure).
        lowered_speedup: The kernel route's time divided by the lowered
            network's for several vectors of one sample (``None``: measure).
        depthwise_lowered_speedup: The same ratio on a depthwise layer
            (``None``: measure).
        narrow_speedup: The kernel route's time divided by the network's view
            and GEMM on a narrow 1x1 layer, for several vectors of several
            samples (``None``: measure).
    """
    host.configure(
        enabled, speedup, lowered_speedup, depthwise_lowered_speedup, narrow_speedup
    )
    _CHOSEN.clear()
    plans.clear_plans()


def autotune_enabled() -> bool:
    """Whether ``auto`` measures its candidates, as ``autotune`` always does.

    See :func:`set_autotune`.

    Returns:
        The current setting.
    """
    return _AUTOTUNE["enabled"]


def check_strategy(strategy: str, owner: str):
    """Raise if ``strategy`` is unknown.

    Args:
        strategy: Strategy name.
        owner: Name of the class that received it.

    Raises:
        ValueError: If the strategy is not in ``STRATEGIES``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{owner} got unknown strategy {strategy!r}. Supported: {STRATEGIES}."
        )


def choose(
    op: str, module: Module, spec: LayerSpec, strategy: str, tensors: dict
) -> tuple[str, str]:
    """Pick the evaluation of ``op`` for a layer.

    Args:
        op: Key of ``IMPLEMENTATIONS``.
        module: The layer.
        spec: Its description.
        strategy: The derivative's strategy.
        tensors: The op's tensor arguments (shapes drive the cost model).

    Returns:
        The implementation key and a one-sentence reason.
    """
    if strategy == AUTOTUNE or (strategy == "auto" and _AUTOTUNE["enabled"]):
        return _autotuned(op, module, spec, tensors)
    candidates = IMPLEMENTATIONS[op]
    if strategy in STOCK_WEIGHT_VJP:
        if spec.kind == "linear":
            return "tn", (
                f"stock BackPACK's Linear products (strategy {strategy!r}) are this"
                " network's single einsum"
            )
        if op in _WEIGHT_VJP_OPS:
            check_stock_strategy(module, spec, strategy)
    if strategy != "auto":
        if strategy in candidates:
            if op in _SQUARED:
                return _cheaper_squared(op, spec, strategy, tensors)
            return strategy, f"strategy {strategy!r} was requested"
        if f"{strategy}{SQUARE}" in candidates:
            return f"{strategy}{SQUARE}", (
                f"strategy {strategy!r} squares its per-sample weight VJPs"
            )
        key, reason = choose(op, module, spec, "auto", tensors)
        return key, f"{reason} (strategy {strategy!r} does not cover {op})"
    key = (op, spec, _signature(tensors))
    if key not in _CHOSEN:
        _remember(_CHOSEN, key, _RULES[op](spec, tensors))
    return _CHOSEN[key]


#: Bound on the number of cached ``auto`` decisions.
MAX_CACHED_CHOICES = 4096
_CHOSEN: dict[tuple, tuple[str, str]] = {}


def _remember(cache: dict, key: tuple, choice: tuple[str, str]):
    """Store a choice, emptying the cache first when it holds ``MAX_CACHED_CHOICES``."""
    if len(cache) >= MAX_CACHED_CHOICES:
        cache.clear()
    cache[key] = choice


def _signature(tensors: dict) -> tuple:
    """Shapes, dtypes and device types of the op's arguments (the cache key).

    Returns:
        A hashable summary of ``tensors``.
    """
    return tuple(
        (k, tuple(v.shape), v.dtype, v.device.type) if isinstance(v, Tensor) else (k, v)
        for k, v in sorted(tensors.items())
    )


#: Above this many entries of a dense pattern, strided views or kernels are cheaper.
DENSE_PATTERN_LIMIT = 2**18

#: Input VJPs of ungrouped convolutions with non-overlapping patterns (patchify
#: stems, 1x1 and down-sampling layers) and at most this many input channels take
#: the network (one GEMM, a strided write) instead of the transposed convolution,
#: whose kernel vectorises over the channels it writes (2 threads, N = 4: ConvNeXt's
#: 3x224x224 4x4 stride-4 stem 1.0 against 2.6 ms; 3x224x224 1x1 to 64 channels 2.4
#: against 20 ms; 4x128x128 2x2 stride 2 to 64 channels: equal; 8 channels: 1.4x
#: slower) ...
FEW_OUTPUT_CHANNELS = 4
#: ... or, for 1x1 kernels, this many (8, 16 and 24 channels on 56x56: 0.52x,
#: 0.82x and 0.89x of the kernel's time; 32: 1.23x) ...
FEW_OUTPUT_CHANNELS_1X1 = 16
#: ... or, for strided 1x1 kernels, whose transposed convolution also fills the
#: skipped positions with zeros, this many (stride 2: 64x56x56 0.70x, 128x28x28
#: 0.84x, 256x56x56 0.69x, 256x14x14 1.0x; 512x28x28 1.16x).
STRIDED_1X1_OUTPUT_CHANNELS = 256
#: Unit-stride 1x1 layers whose kernel input VJP (inputs plus output gradients)
#: would take more than this many bytes take one batched GEMM instead: at N = 32
#: 0.66-1.05x of the kernel's time in blocks (geometric mean 0.86x), 10 vectors of
#: 8 samples 0.55-1.00x (0.81x); between 16 and 56 MiB, where the kernel runs in
#: one call (``INPUT_VJP_ONE_CALL_BYTES``), 0.22-1.11x of its time (MobileNetV2's
#: 144x56x56 -> 24 layer at 16 samples 0.22x, 32 MiB; Inception's 64x73x73 layer at
#: 8 samples 1.11x; glibc's heap not kept).
GEMM_1X1_INPUT_VJP_BYTES = 16 * 2**20
#: Input VJPs of ungrouped Conv2d with overlapping patterns and at most
#: ``FEW_OUTPUT_CHANNELS`` input channels take the dense-pattern network where the
#: input channels times the largest pattern's entries stay below this (CPU, 2
#: threads, N = 4 unless stated; the transposed convolution vectorises over the few
#: channels it writes): 1x28x28 5x5 0.43x of the kernel's time (also at N = 64),
#: 3x32x32 5x5 0.62x, 3x32x32 3x3 0.69x, 4x32x32 3x3 0.80x, 2x64x64 3x3 0.61x,
#: 3x64x64 3x3 0.86x; beyond it the patterns' GEMMs cost more: 4x48x48 5x5 at
#: N = 32 1.11x, 3x128x128 3x3 1.45x, ResNet18's 3x224x224 7x7 stride-2 stem 1.55x.
FEW_CHANNEL_PATTERNS = 2**15

#: Per-sample VJPs use the higher-order convolution up to this many input channels.
FEW_CHANNELS = 8
#: Per-sample VJPs use the dense-pattern network up to this many output positions.
FEW_POSITIONS = 256
#: Up to this many output positions, GEMMs over channels beat convolution kernels
#: (one vector, unstrided).
SMALL_MAP = 64
#: Below this many output positions, the lowered network and one GEMM beat
#: convolution kernels for one vector on strided layers.
STRIDED_MAP = 256
#: Unstrided maps up to this many output positions also take the lowered network for
#: one vector of at least ``SEVERAL_SAMPLES`` samples with at least
#: ``MANY_CHANNELS`` input channels: its GEMM per sample is deep enough
#: (``C_in * prod(K)``) to pay for the one copy, and it holds only its result, where
#: the kernel route holds about three times it. Per-sample gradients of the nine
#: networks' seven such layers (3c3d's 64x14x14, All-CNN-C's 96x16x16 and 192x16x16,
#: AlexNet's 13x13, ResNet18's 256x14x14), lowered network against kernel route: at
#: N = 4 0.81-1.02x (two runs), at N = 8 0.82-0.96x (three of them), at N = 16
#: 0.82-1.04x; at N = 1 and 2 the kernel route could be faster (192x16x16 at N = 1:
#: 1.1 against 2.0 ms). 3c3d's 64x14x14 layer at N = 8: 4.0 against 4.9 MiB.
MEDIUM_MAP = 256
#: See ``MEDIUM_MAP``.
MANY_CHANNELS = 64
#: See ``MEDIUM_MAP``.
SEVERAL_SAMPLES = 4
#: From this many output positions on, convolution kernels beat the higher-order
#: convolution for one vector on 2d layers with few input channels.
LARGE_MAP = 2048
#: Only depthwise-like layers with kernels of at most this many entries may take the
#: kernel route when unstrided (with 7x7 kernels it was 8-14x slower).
SMALL_KERNEL = 9
#: Depthwise-like layers with small kernels take the convolution kernel's weight
#: gradient (instead of the same-order convolution) when the same-order
#: convolution's input, repeated per vector and sample, reaches this many bytes
#: (several vectors) ...
DEPTHWISE_BYTES = 8 * 2**20
#: ... or, for one vector, this many bytes ...
DEPTHWISE_BYTES_ONE_VECTOR = 16 * 2**20
#: ... or this many input positions.
LARGE_DEPTHWISE_MAP = 2048
#: Strided depthwise-like layers with small kernels take the kernel route for one
#: vector from this many input positions on: the same-order convolution dilates its
#: kernel by the stride. Per-sample gradients of MobileNetV2's strided 3x3 layers on
#: 112x112, 56x56 and 28x28 inputs at N = 1-32 took 0.11-0.95x of the fastest
#: reference's time through the kernel route (112x112: 0.27x against 0.94x for the
#: same-order convolution at N = 4, 0.12x against 1.29x at N = 32) and 0.3-0.6x of
#: the leanest reference's memory at N = 4, where the same-order convolution took
#: 2.2-2.6x. On 14x14 inputs it took 0.95-1.03x at N = 8, the same-order
#: convolution 0.80-0.87x.
STRIDED_DEPTHWISE_MAP = 512
#: Depthwise Conv2d layers (groups > 1) with small kernels and several vectors take
#: the lowered network between these numbers of output positions (exclusive), and
#: the kernel route from the upper one on when strided. GGN diagonals (V = 10) of
#: MobileNetV2's 3x3 layers at N = 1, 2 and 8: on 196-784 positions the lowered
#: network took 0.23-0.96x of the kernel route's time and beat the same-order
#: convolution and im2col (192x28x28: 0.23-0.25x, same-order convolution
#: 0.37-1.50x); from 3136 positions on the kernel route was fastest (lowered
#: 1.0-2.6x, im2col on the 96x112x112 stride-2 layer 1.5-3.0x); on 7x7 maps all
#: were within 0.8-1.1x of each other.
DEPTHWISE_LOWERED_POSITIONS = (64, 1024)
#: Depthwise layers with small kernels take the lowered network for several vectors
#: on every map where the depthwise host probe (``host.depthwise_lowered_speedup``)
#: ran it more than this many times as fast as the kernel route. On an Intel Xeon
#: with AVX-512 (2 cores, MKL, 290 GFLOP/s float32 GEMMs), GGN diagonals (V = 10) of
#: MobileNetV2's depthwise 3x3 layers outside ``DEPTHWISE_LOWERED_POSITIONS`` took
#: 0.38-0.86x of the kernel route's time at N = 1 and 4 (96x112x112 stride 2: 0.39x,
#: 32x112x112 0.41-0.46x, 960x7x7 0.61-0.72x), 0.96-1.10x inside that range; on the
#: AMD hosts the kernel route won from 3136 positions on. The lowered network's
#: blocks split the groups of large maps (``UNFOLDED_GROUPED_BLOCK_BYTES``): on the
#: 96x112x112 stride-2 layer at N = 1 it held 1.3 MiB, against 10.2 MiB for the
#: leanest reference and 5.4 MiB for the kernel route (in blocks of samples only:
#: 14.9 MiB).
DEPTHWISE_LOWERED_MARGIN = 1.15
#: Non-overlapping layers with at most this many weight entries per output channel
#: (``C_in / G * prod(K)``) take the kernel route for several vectors of several
#: samples on large maps: the GEMM view first copies all vectors sample-major, and
#: its GEMM is too narrow to hide that (GGN diagonals at N = 8, V = 10: 24x56x56 1x1
#: layer 17 ms against 47 ms, ConvNeXt's 3-channel 4x4 stem 17 against 44 ms; but
#: 64x56x56 1x1 stride 2: 7.7 against 5.5 ms, 144x56x56 1x1 to 24 channels: 16.6
#: against 6.9 ms). The engine avoids that copy by slicing only for GEMMs of at
#: least ``contract.MIN_SLICE_ROWS`` rows (output channels), which these layers lack.
NARROW_GEMM = 48
#: 1x1 layers among those keep the network's view and GEMM where the narrow host
#: probe (``host.narrow_speedup``) ran it more than this many times as fast as the
#: kernel route. On an Intel Xeon with AVX-512 (2 cores, MKL) the probe measured
#: 2.0-2.2, and GGN diagonals (V = 10) took 0.49x of the kernel route's time on the
#: 24x56x56 1x1 layer at N = 8 (17.8 against 36.7 ms), 0.40-0.53x at N = 2-4, and
#: 0.27-0.88x on MobileNetV2's 32x112x112, 16x112x112 and 32x28x28 1x1 layers at
#: N = 4 and 8; ConvNeXt's 4x4 patchify stem kept the kernel route's lead there
#: (34.7 against 62.0 ms), so larger kernels do not follow the probe.
NARROW_MARGIN = 1.15
#: Strided layers with at most ``FEW_CHANNELS`` input channels and several vectors
#: lower their patterns from this many unfolded entries per output position
#: (``C_in * prod(K)``) on. GGN diagonals (V = 10, 2 cores, AVX2) with the lowered
#: network against the kernel route: AlexNet's 3x224x224 11x11 stride-4 stem at N = 1,
#: 4 and 8 0.83, 0.82, 0.66 against 1.04, 1.23, 1.26 of the unfold reference's time;
#: ResNet18's 7x7 stride-2 stem 0.95, 0.68, 0.56 against 1.09, 0.67, 0.64; 8x56x56 3x3
#: 0.74 against 1.49, 6x64x64 3x3 0.67 against 1.45, 4x112x112 5x5 0.83 against 2.19,
#: 3x128x128 5x5 at N = 1 0.87 against 1.15 (all N = 4 unless given). With 27 entries
#: (3-channel 3x3 stride-2 stems at N = 4) the kernel route won, 0.32-0.39 against
#: 0.51-0.92. Where a sample's vectors exceed ``UNFOLDED_BLOCK_BYTES`` the lowered
#: network's blocks of one sample copy them (ResNet18's stem at N = 4: 38 MiB peak
#: against 31 MiB for the leanest reference and 4 MiB for the kernel route), so
#: such layers keep the kernel route from two samples on.
STRIDED_FEW_CHANNEL_ROWS = 48
#: From this many output positions on, batched convolution kernels beat the
#: dense-pattern network for several vectors (measured on 2d layers, 2 CPU cores).
MANY_POSITIONS = 512

_WEIGHT_VJP_OPS = ("weight_jac_t_mat_prod", "weight_diag_ggn", "weight_batch_l2")


def _non_overlapping(spec: LayerSpec) -> bool:
    return all(p.is_non_overlapping for p in spec.patterns)


def _kernel(spec: LayerSpec, tensors: dict) -> tuple[str, str]:
    if spec.kind == "linear":
        return "kernel", "the product is one matrix multiplication"
    return "kernel", "the product is a (transposed) convolution: use its kernel"


def _input_vjp_rule(spec: LayerSpec, tensors: dict) -> tuple[str, str]:
    if spec.kind != "conv" or spec.groups > 1 or _on_gpu(tensors):
        return _kernel(spec, tensors)
    channels = spec.in_channels
    if not _non_overlapping(spec):
        size = channels * _largest_pattern(spec)
        if (
            len(spec.patterns) == 2
            and channels <= FEW_OUTPUT_CHANNELS
            and size <= FEW_CHANNEL_PATTERNS
        ):
            return "tn", (
                f"{channels} input channels and small dense patterns ({size} entries"
                " times channels): the patterns' GEMMs beat the transposed"
                " convolution's kernel, which vectorises over the channels it writes"
            )
        return _kernel(spec, tensors)
    most = FEW_OUTPUT_CHANNELS
    if prod(spec.kernel_size) == 1:
        strided = any(p.stride > 1 for p in spec.patterns)
        most = STRIDED_1X1_OUTPUT_CHANNELS if strided else FEW_OUTPUT_CHANNELS_1X1
        # one batched GEMM where one kernel call would outgrow the caches
        mat = tensors["mat"]
        total = mat.shape[0] * mat.shape[1]
        if not strided and input_vjp_step(spec, mat, GEMM_1X1_INPUT_VJP_BYTES) < total:
            return "tn", (
                f"a 1x1 layer on {spec.num_positions} positions whose transposed"
                " convolution would outgrow the caches: one batched GEMM beats"
                " the kernel"
            )
    if channels <= most:
        return "tn", (
            f"non-overlapping patterns and {channels} input channels: one GEMM"
            " and a strided write beat the transposed convolution's kernel, which"
            " vectorises over the channels it writes"
        )
    return _kernel(spec, tensors)


def _stock_compatible(spec: LayerSpec) -> bool:
    """Whether stock BackPACK's convolution-based weight VJPs apply to the layer.

    Returns:
        ``True`` for convolutions with even zero padding.
    """
    return spec.kind == "conv" and all(
        p.padding_mode == "zeros" and p.padding[0] == p.padding[1]
        for p in spec.patterns
    )


def _largest_pattern(spec: LayerSpec) -> int:
    return max(p.kernel_size * p.output_size * p.input_size for p in spec.patterns)


def _on_gpu(tensors: dict) -> bool:
    return any(isinstance(t, Tensor) and t.is_cuda for t in tensors.values())


def _weight_vjp_rule(spec: LayerSpec, tensors: dict) -> tuple[str, str]:
    if spec.kind == "linear":
        return "tn", "a Linear layer's network is a single GEMM"
    vectors, samples = tensors["mat"].shape[:2]
    if _non_overlapping(spec):
        summed = spec.in_channels // spec.groups * prod(spec.kernel_size)
        if (
            vectors > 1
            and samples > 1
            and spec.num_positions >= MANY_POSITIONS
            and summed <= NARROW_GEMM
            and not _on_gpu(tensors)
        ):
            speedup = host.narrow_speedup() if prod(spec.kernel_size) == 1 else 1.0
            if speedup > NARROW_MARGIN:
                return "tn", (
                    f"non-overlapping 1x1 patterns, {vectors} vectors of {samples}"
                    f" samples and {summed} weight entries per output channel: on"
                    f" this host a view and one GEMM ran {speedup:.2f}x as fast as"
                    " the convolution kernel's weight gradient (host probe)"
                )
            return "kernel", (
                f"non-overlapping patterns, {vectors} vectors of {samples} samples"
                f" on {spec.num_positions} output positions and {summed} weight"
                " entries per output channel: one GEMM per sample would first copy"
                " all vectors sample-major, which costs more than its narrow GEMM;"
                " the convolution kernel's weight gradient reads them in blocks"
            )
        return "tn", "all index patterns are non-overlapping: a view and one GEMM"
    if _on_gpu(tensors):
        return "tn_lowered", (
            "on GPU, a strided view, one copy and one batched GEMM need the fewest"
            " kernel launches"
        )
    strided = any(p.stride > 1 for p in spec.patterns)
    if vectors > 1:
        lowered = _probed_lowered_rule(spec, vectors, samples, tensors["mat"])
        if lowered is not None:
            return lowered
    if (
        spec.in_channels == 1
        and len(spec.patterns) == 2
        and vectors > 1
        and samples <= SINGLE_CHANNEL_SAMPLES
        and spec.num_positions <= SINGLE_CHANNEL_POSITIONS
        and not strided
    ):
        return "tn_lowered", (
            f"{vectors} vectors of {samples} sample(s) of a single input channel:"
            f" {_LOWERED_GEMM}, whose unfolded input holds only the kernel's"
            f" {prod(spec.kernel_size)} entries per output position"
        )
    if _stock_compatible(spec) and spec.in_channels == spec.groups:
        # a single input channel (ungrouped Conv2d): the higher-order convolution
        # beat the depthwise routes on 1x28x28, 1x64x64 and 1x128x128 layers (3x3,
        # 5x5; 2 threads): per-sample gradients at N = 4 and 32 0.55-0.87x of their
        # time, GGN diagonals (V = 10) 0.60-0.95x at N = 1, at N = 4 0.90x and 0.18x
        # (1x128x128 3x3: 5.0 against 27.9 ms); strided with several vectors, im2col
        # stays faster
        if (
            spec.groups == 1
            and len(spec.patterns) == 2
            and (vectors == 1 or not strided)
            and _higher_conv_applies(spec)
        ):
            return "higher_conv", (
                f"{_higher_conv_reason(spec, vectors, samples)}; with a single input"
                " channel it beats the depthwise routes"
            )
        return _depthwise_rule(spec, vectors, strided, tensors)
    if vectors == 1:
        return _one_vector_rule(spec, strided, samples)
    channels = spec.in_channels // spec.groups
    many = spec.num_positions >= MANY_POSITIONS
    if many and not strided:
        probed = _probed_rule(spec, vectors, samples, strided)
        if probed is not None:
            return probed
    if samples == 1 and channels > FEW_CHANNELS:
        if many:
            return "kernel", (
                f"one sample, {vectors} vectors on {spec.num_positions} output"
                " positions: the convolution kernel's weight gradient with the"
                " vectors as output channels"
            )
        if len(spec.patterns) == 2:
            return "unfold", (
                f"one sample, {vectors} vectors on {spec.num_positions} output"
                " positions: PyTorch's im2col kernel on the sample and one GEMM"
            )
    # grouped layers with few channels per group lose with several vectors, and
    # so do single samples and strided layers. GGN diagonals (V = 10) on a second
    # VM of the same kind, higher-order against kernel route: the 3-channel
    # strided stems of ResNet18, AlexNet, Inception and MobileNetV2 1.35-2.24x at
    # N = 1-8 (ResNet18's at N = 8: 189 against 113 ms), seven unstrided
    # few-channel layers at N = 1 0.81-1.93x (geometric mean 1.36x); the first
    # host ran ResNet18's stem at N = 4 in 72 against 82 ms
    few = channels <= FEW_CHANNELS and spec.groups == 1
    if few and not strided and samples > 1 and _higher_conv_applies(spec):
        return "higher_conv", _higher_conv_reason(spec, vectors, samples)
    rows = channels * prod(spec.kernel_size)
    if (
        few
        and strided
        and len(spec.patterns) == 2
        and rows >= STRIDED_FEW_CHANNEL_ROWS
        and (
            samples == 1 or sample_vector_bytes(tensors["mat"]) <= UNFOLDED_BLOCK_BYTES
        )
    ):
        return "tn_lowered", (
            f"{vectors} vectors, strided with {channels} input channels and"
            f" {rows} unfolded entries per output position: {_LOWERED_GEMM}, wide"
            " enough to beat the convolution kernel's strided weight gradient"
        )
    # GGN diagonals (V = 10) of the 32 such layers of the nine networks, squared
    # lowered VJPs against squared dense-pattern ones: 0.89x of their time at N = 4
    # (geometric mean; 0.72-1.02x, 512x7x7 0.76x), 0.92x and 0.88x at N = 2 and 8
    # on twelve of them
    if (
        len(spec.patterns) > 1
        and spec.num_positions < MANY_POSITIONS
        and _largest_pattern(spec) <= DENSE_PATTERN_LIMIT
    ):
        return "tn_lowered", (
            f"{vectors} vectors and {spec.num_positions} output positions: the"
            " patterns as strided views, one copy and one batched GEMM over"
            " channels beat batched convolutions"
        )
    return "kernel", _KERNEL_REASON


_KERNEL_REASON = (
    "overlapping patterns: the convolution kernel's weight gradient, samples as"
    " groups and vectors as output channels"
)


def _depthwise_rule(
    spec: LayerSpec, vectors: int, strided: bool, tensors: dict
) -> tuple[str, str]:
    """Weight VJPs of depthwise-like layers (one input channel per group).

    The same-order grouped convolution repeats the input once per vector; while
    that copy is small it wins, on large ones it falls out of the caches and the
    convolution kernel's weight gradient (samples as groups, vectors as output
    channels) wins by up to 10x (measured on MobileNetV2's 3x3 layers, 2 CPU
    cores with a 32 MiB L3 cache: GGN diagonal of the 144x56x56 layer, N = 8,
    V = 10: 15.6 ms against 156 ms; per-sample gradients of the 192x28x28
    layer, N = 16: 2.0 ms against 1.5 ms).

    Returns:
        The evaluation's name and the reason.
    """
    size = prod(spec.kernel_size)
    if vectors > 1 and spec.groups > 1 and len(spec.patterns) == 2:
        if size <= SMALL_KERNEL:
            speedup = host.depthwise_lowered_speedup()
            if speedup > DEPTHWISE_LOWERED_MARGIN:
                return "tn_lowered", (
                    f"depthwise with a {'x'.join(map(str, spec.kernel_size))} kernel"
                    f" and {vectors} vectors: on this host {_LOWERED_GEMM} ran"
                    f" {speedup:.2f}x as fast as the convolution kernel's weight"
                    " gradient (host probe); its blocks split the groups of large maps"
                )
        low, high = DEPTHWISE_LOWERED_POSITIONS
        if size <= SMALL_KERNEL and low < spec.num_positions < high:
            return "tn_lowered", (
                f"depthwise with a {'x'.join(map(str, spec.kernel_size))} kernel,"
                f" {vectors} vectors on {spec.num_positions} output positions:"
                f" {_LOWERED_GEMM}"
            )
        if size <= SMALL_KERNEL and strided and spec.num_positions >= high:
            return "kernel", (
                f"depthwise and strided, {vectors} vectors on {spec.num_positions}"
                " output positions: the convolution kernel's weight gradient,"
                " samples as groups"
            )
    positions = prod(spec.input_spatial)
    if (
        size <= SMALL_KERNEL
        and vectors == 1
        and strided
        and positions >= STRIDED_DEPTHWISE_MAP
    ):
        return "kernel", (
            f"depthwise-like and strided with a {'x'.join(map(str, spec.kernel_size))}"
            f" kernel, one vector, {positions} input positions: the convolution"
            " kernel's weight gradient, samples as groups (the same-order"
            " convolution dilates its kernel by the stride)"
        )
    if size <= SMALL_KERNEL and not strided:
        mat = tensors["mat"]
        repeated = vectors * mat.shape[1] * spec.in_channels
        repeated *= positions * mat.element_size()
        if vectors == 1:
            large = (
                positions >= LARGE_DEPTHWISE_MAP
                or repeated >= DEPTHWISE_BYTES_ONE_VECTOR
            )
        else:
            large = repeated >= DEPTHWISE_BYTES
        if large:
            return "kernel", (
                f"depthwise-like with a {'x'.join(map(str, spec.kernel_size))}"
                f" kernel, {vectors} vector(s), {positions} input positions and"
                f" {repeated / 2**20:.1f} MiB of repeated inputs: the convolution"
                " kernel's weight gradient, samples as groups"
            )
    if vectors == 1 or not strided:
        return "same_conv", (
            "depthwise-like (one input channel per group): one grouped"
            " convolution of the same order"
        )
    if len(spec.patterns) == 2:
        return "unfold", (
            f"depthwise-like and strided, {vectors} vectors: PyTorch's im2col"
            " kernel and one batched GEMM (the same-order convolution repeats"
            " the input per vector and dilates its kernel by the stride)"
        )
    return "kernel", (
        f"depthwise-like and strided, {vectors} vectors: the convolution kernel's"
        " weight gradient"
    )


#: How the lowered network forms per-sample weight VJPs.
_LOWERED_GEMM = (
    "the lowered network, a strided view of the input (one copy) and one batched GEMM"
)


def _one_vector_rule(spec: LayerSpec, strided: bool, samples: int) -> tuple[str, str]:
    """Per-sample VJPs of one vector (per-sample gradients, batch L2 norms).

    Measured on the layers of the benchmark networks (2 CPU cores, N = 4): the
    convolution kernel's weight gradient, with the samples as groups, wins from
    medium feature maps on; the lowered network and one GEMM win on small maps with
    many channels (2-25% faster than im2col and one GEMM on all 11 such layers of
    the nine networks, at N = 4 and N = 16); the higher-order convolution on small
    maps with few channels.

    Returns:
        The implementation key and the reason.
    """
    channels = spec.in_channels // spec.groups
    positions = spec.num_positions
    if channels > FEW_CHANNELS and spec.groups > 1:
        return "kernel", (
            f"one vector, {spec.groups} groups of {channels} input channels: the"
            " convolution kernel's weight gradient, samples as groups"
        )
    few = channels <= FEW_CHANNELS and positions < LARGE_MAP
    if (few or len(spec.patterns) == 1) and _higher_conv_applies(spec):
        return "higher_conv", _higher_conv_reason(spec, 1, None)
    if channels > FEW_CHANNELS and len(spec.patterns) == 2:
        probed = _probed_rule(spec, 1, samples, strided)
        if probed is not None:
            return probed
        medium = (
            positions <= MEDIUM_MAP
            and channels >= MANY_CHANNELS
            and samples >= SEVERAL_SAMPLES
        )
        if (positions < STRIDED_MAP) if strided else (positions <= SMALL_MAP or medium):
            return "tn_lowered", (
                f"one vector, {'strided, ' if strided else ''}{positions} output"
                f" positions, {channels} input channels: {_LOWERED_GEMM}"
            )
        return "kernel", (
            f"one vector, {positions} output positions: the convolution kernel's"
            " weight gradient, samples as groups"
        )
    if positions <= FEW_POSITIONS:
        if len(spec.patterns) == 2:
            return "tn_lowered", (
                f"one vector, {positions} output positions: {_LOWERED_GEMM}"
            )
        return "tn", (
            f"one vector, {positions} output positions: the network's small dense"
            " patterns and GEMMs over channels"
        )
    return "kernel", _KERNEL_REASON


def _probed_rule(
    spec: LayerSpec, vectors: int, samples: int, strided: bool
) -> tuple[str, str] | None:
    """The higher-order convolution, where the host probe ran it faster than kernels.

    For ungrouped Conv2d layers with more than ``FEW_CHANNELS`` input channels, more
    than one (vector, sample) pair, and more than ``SMALL_MAP`` output positions
    (strided: without padding, from ``STRIDED_MAP`` on); see ``HIGHER_CONV_MARGIN``.

    Returns:
        The implementation key and the reason, or ``None`` where the rules decide.
    """
    positions = spec.num_positions
    if strided:
        large = positions >= STRIDED_MAP and all(p.is_unpadded for p in spec.patterns)
    else:
        large = positions > SMALL_MAP
    if not (
        large
        and vectors * samples > 1
        and spec.groups == 1
        and spec.in_channels > FEW_CHANNELS
        and len(spec.patterns) == 2
        and _higher_conv_applies(spec)
    ):
        return None
    speedup = host.higher_conv_speedup()
    if speedup <= HIGHER_CONV_MARGIN:
        return None
    return "higher_conv", (
        f"{vectors} vector(s) of {samples} sample(s), {positions} output positions,"
        f"{' strided without padding,' if strided else ''} {spec.in_channels} input"
        f" channels: on this host the higher-order convolution ran {speedup:.2f}x as"
        " fast as the convolution kernel's weight gradient (host probe)"
    )


#: Many-channel Conv2d layers take the higher-order convolution for one vector of
#: several samples where the host probe (``host.higher_conv_speedup``) ran it more
#: than this many times as fast as the kernel route (with the probe off, the ratio is
#: 1.0 and the kernel route stays): unstrided ones above ``SMALL_MAP`` output
#: positions, strided ones without padding from ``STRIDED_MAP`` on. Where it did, it
#: beat both the kernel route and the lowered network on the 17 unstrided such layers
#: of the nine networks at N = 4 (0.94-1.05x of stock BackPACK's same route, against
#: 1.05-1.38x for what ``auto`` took before), and in blocks at N = 8 and 16
#: (0.73-0.97x of the kernel route on five layers); on Inception's two unpadded
#: stride-2 35x35 layers 0.84-1.02x against the kernel route's 0.94-1.14x. Strided
#: padded layers lost with it (0.92-1.8x against 0.6-0.76x), as did small maps; on a
#: single sample, the kernel route was as fast. Several vectors (GGN diagonals, V =
#: 10) take it from ``MANY_POSITIONS`` on, unstrided, where the kernel route was the
#: rule: on four such layers 0.74-0.91x of the fastest reference at N = 1 (kernels
#: 0.88-1.06x) and 0.80-0.97x at N = 8 (kernels 0.97-1.12x).
HIGHER_CONV_MARGIN = 1.0


#: Several vectors (GGN diagonals) of at most this many samples on unstrided 2d
#: layers with a single input channel take the lowered network, on any host. Against the
#: higher-order convolution, the rule before, V = 10, ratios to the fastest
#: reference: on 1x28x28 (3x3, 5x5, padded or not) and 1x64x64 maps at N = 1,
#: 0.71-0.81x against 1.01-1.43x on one AVX2 EPYC VM, where the host probe
#: (``LOWERED_MARGIN``) gave 1.05 and kept the higher-order convolution; an
#: earlier VM ran 1x28x28, 1x64x64 and 1x128x128 layers lowered in 0.59-0.94x of
#: its time. With more samples the two traded places (N = 2: 1x28x28 0.70x
#: against 1.06x, 1x64x64 0.96x against 0.89x; N = 4 and 8 on 1x64x64: 1.0-2.6x
#: against 0.97-1.16x). Larger maps than ``SINGLE_CHANNEL_POSITIONS`` output
#: positions lost on that VM as well: 1x96x96 5x5 1.02x against 0.96x, 1x128x128
#: 1.11-1.23x against 0.98-1.02x (the earlier VM: 0.93x against 1.34x).
SINGLE_CHANNEL_SAMPLES = 1
#: See ``SINGLE_CHANNEL_SAMPLES``.
SINGLE_CHANNEL_POSITIONS = 64 * 64


#: Several vectors on many-channel Conv2d layers from ``MANY_POSITIONS`` output
#: positions on take the lowered network where the host probe
#: (``host.lowered_speedup``) ran it more than this many times as fast as the
#: kernel route, and its unfolded input stays within ``LOWERED_UNFOLDED_BYTES``.
#: On an AVX2-only EPYC (MKL's GEMM) the probe measured 1.35-1.5; GGN diagonals
#: (V = 10) of ungrouped 3x3 layers there, lowered network against kernel route:
#: 0.60-0.83x at N = 1-8 on 64x56x56, 128x28x28, 96x32x32, 80x73x73 and
#: 32x147x147 maps, strided or not (the higher-order convolution: 0.71-0.82x);
#: grouped layers only on one sample (ResNeXt's 512x56x56 g = 32 stride-2 layer
#: 0.73x at N = 1, 1.18x at N = 2); 3-channel stems lost (1.14x at N = 1).
#: Single input channels do not follow this probe (``SINGLE_CHANNEL_SAMPLES``).
#: The probe's small map understates the gain on larger ones: on an Intel Xeon with
#: AVX-512 (MKL) it measured 1.05-1.3 from process to process, while the real
#: layers ran lowered 1.2-1.5x as fast as the kernel route (GGN diagonals, V = 10:
#: 64x56x56 at N = 1 8.3 against 12.2 ms, at N = 2 0.89 against 1.06 of the unfold
#: reference; 64x56x56 stride 2 at N = 2 and 8 1.05 and 0.85 against 1.25 and 1.27;
#: 96x32x32 at N = 2 0.92 against 1.13), so any probe result above 1 counts (at
#: the earlier margin of 1.15 the choice flipped between processes there).
LOWERED_MARGIN = 1.0
#: Largest unfolded input (``N * C_in * prod(K) * prod(O)`` elements) of that
#: rule: Inception's 32x147x147 layer took 0.76x at N = 1 (25 MB) but 1.26x at
#: N = 2 (50 MB); its 80x73x73 layer 0.87x at N = 2 (29 MB).
LOWERED_UNFOLDED_BYTES = 32 * 2**20


def _probed_lowered_rule(
    spec: LayerSpec, vectors: int, samples: int, mat: Tensor
) -> tuple[str, str] | None:
    """The lowered network for several vectors, where the host probe ran it faster.

    For 2d convolutions with more than ``FEW_CHANNELS`` input channels per group
    (several samples: ungrouped only) on at least ``MANY_POSITIONS`` output
    positions; see ``LOWERED_MARGIN``.

    Returns:
        The implementation key and the reason, or ``None`` where the rules decide.
    """
    unfolded = samples * spec.in_channels * prod(spec.kernel_size)
    unfolded *= spec.num_positions * mat.element_size()
    if not (
        spec.kind == "conv"
        and len(spec.patterns) == 2
        and spec.in_channels // spec.groups > FEW_CHANNELS
        and (spec.groups == 1 or samples == 1)
        and spec.num_positions >= MANY_POSITIONS
        and unfolded <= LOWERED_UNFOLDED_BYTES
    ):
        return None
    speedup = host.lowered_speedup()
    if speedup <= LOWERED_MARGIN:
        return None
    return "tn_lowered", (
        f"{vectors} vectors of {samples} sample(s) on {spec.num_positions} output"
        f" positions, {spec.in_channels // spec.groups} input channels per group:"
        f" on this host {_LOWERED_GEMM} ran {speedup:.2f}x as fast as the"
        " convolution kernel's weight gradient (host probe)"
    )


def _higher_conv_applies(spec: LayerSpec) -> bool:
    """Whether the higher-order convolution is a candidate for the layer.

    Its output is the kernel; oneDNN vectorises over the output's last axis, and
    a 7x1 kernel ran 1.3x slower than with batched kernels (1x7: 1.6x faster).

    Returns:
        ``True`` for 1d/2d layers with even zero padding and a kernel wider than 1.
    """
    wide = spec.patterns[-1].kernel_size > 1
    return wide and _stock_compatible(spec) and len(spec.patterns) < 3


def _higher_conv_reason(spec: LayerSpec, vectors: int, samples: int | None) -> str:
    count = "" if samples is None else f", {samples} sample(s)"
    channels = spec.in_channels // spec.groups
    return (
        f"{vectors} vector(s){count}, {len(spec.patterns)}d with {channels} input"
        " channels per group: one grouped convolution of one order higher"
        " (Rochette et al., 2019)"
    )


_SQUARED = {
    "weight_diag_ggn": lambda spec, t: weight_diag_ggn.tensor_network(
        spec, t["x"], t["mat"], t["sum_batch"]
    ),
    "weight_batch_l2": lambda spec, t: weight_batch_l2.tensor_network(
        spec, t["x"], t["mat"]
    ),
}


def _cheaper_squared(
    op: str,
    spec: LayerSpec,
    strategy: str,
    tensors: dict,
    vjp_key: str = "",
    lower: bool = False,
) -> tuple[str, str]:
    """Single squared network or squared per-sample VJPs, by FLOPs.

    With ``lower``, the single network may also be lowered: its patterns become
    strided views of the input, padded once for both of its copies of ``x``, and
    its FLOPs count ``LOWERED_SPEEDUP`` times cheaper, as the lowered VJPs' do
    (GEMMs on one copy of the unfolded input). Batch L2 norms at N = 8 on the 25
    overlapping convolutions of 3c3d, 2c2d, All-CNN-C, AlexNet and ResNet18 (2
    cores): the lowered network was faster than the dense-pattern one wherever it
    needed fewer FLOPs (0.17-0.90x of them: 0.17-0.88x of the time; 192x16x16
    stride 2: 0.58x, 0.56x) and up to 1.3x as many (64x14x14, 1.12x: 0.71x;
    96x16x16, 1.32x: 0.90x, a near-tie at this weight), and slower from about
    twice as many (192x8x8, 1.96x: 2.3x; 512x7x7, 4.6x: 4.8x).

    Args:
        op: ``weight_diag_ggn`` or ``weight_batch_l2``.
        spec: Layer description.
        strategy: Evaluation of the single network.
        tensors: The op's tensor arguments.
        vjp_key: The VJPs' evaluation, whose speed per FLOP weights their FLOPs
            (``_vjp_speedup``).
        lower: Whether the single network may be lowered (``tn_lowered``)
            where that costs less.

    Returns:
        The implementation key and the reason.
    """
    net, _ = _SQUARED[op](spec, tensors)
    vjp, _ = weight_jac_t_mat_prod.tensor_network(
        spec, tensors["x"], tensors["mat"], False
    )
    # forming VJPs costs about as much as the lowered (GEMM-like) network
    single = flops(prepare(net, strategy))
    speedup, route = _vjp_speedup(vjp_key)
    via_vjp = flops(prepare(vjp, "tn_lowered")) / speedup
    weighted = f", counted {speedup:g}x faster by {route}" if speedup != 1 else ""
    lowered = None  # the lowered network's FLOPs, where they count as cheaper
    if lower and strategy != "tn_lowered" and not _non_overlapping(spec):
        cost = flops(prepare(net, "tn_lowered"))
        if cost / LOWERED_SPEEDUP < single:
            lowered = cost
    cheapest = single if lowered is None else lowered / LOWERED_SPEEDUP
    if cheapest < via_vjp:
        reason = (
            f"one network without per-sample VJPs ({single:.2e} FLOPs) is cheaper"
            f" than forming them ({via_vjp:.2e} FLOPs{weighted})"
        )
        if lowered is not None:
            return "tn_lowered", (
                f"one network without per-sample VJPs, its patterns as strided"
                f" views ({lowered:.2e} FLOPs, counted {LOWERED_SPEEDUP:g}x faster"
                f" by GEMMs), is cheaper than with dense patterns ({single:.2e}"
                f" FLOPs) and than forming the VJPs ({via_vjp:.2e} FLOPs{weighted})"
            )
        return strategy, reason
    return f"{strategy}{SQUARE}", (
        f"forming per-sample VJPs ({via_vjp:.2e} FLOPs{weighted}) is cheaper than"
        f" one network without them ({cheapest:.2e} FLOPs)"
    )


#: Convolution kernels form per-sample VJPs this many times faster per FLOP than the
#: networks' contractions: squared ``kernel`` VJPs compete with the single network at
#: FLOPs divided by this (batch L2 norms of Inception's 160x17x17 1x7 layer at N = 4,
#: equal FLOPs: 1.24x → 0.70x of the fastest reference; ResNet18's 256x14x14 layer,
#: 3.3x the FLOPs: 0.44x single, 0.85x kernels).
KERNEL_SPEEDUP = 2.0
#: Likewise for the lowered network's VJPs (one copy and one batched GEMM), against
#: the single network's dense-pattern contractions, which run below GEMM speed. It
#: decides near-ties only: norms of All-CNN-C's 96x16x16 layer at N = 4, 3.36e8 FLOPs
#: for the single network against 3.40e8 for the VJPs, took 2.66 ms single and 2.00 ms
#: squared (the only changed choice on the nine networks' layers at N = 1, 4 and 16).
LOWERED_SPEEDUP = 1.25


def _vjp_speedup(vjp_key: str) -> tuple[float, str]:
    """How many times faster per FLOP than the networks' contractions, and by what.

    Returns:
        The factor for VJPs of ``vjp_key`` and the route's name for reasons.
    """
    if vjp_key in ("kernel", "higher_conv"):
        return KERNEL_SPEEDUP, "kernels"
    if vjp_key == "tn_lowered":
        return LOWERED_SPEEDUP, "one GEMM"
    return 1.0, ""


#: On GPU, per-sample VJPs of a Linear layer with at most this many entries
#: (``V * N * C_out * C_in``) are formed and squared for norms and GGN diagonals:
#: three kernel launches, against four to six for the single network, which is
#: bound by launches there (H200, 512 -> 256: norms at N = 8 82 µs against 117 µs,
#: GGN diagonal at N = 2, V = 10 78 µs against 151 µs).
GPU_SMALL_LINEAR_VJPS = 1 << 22


def _squared_rule(op: str) -> Callable:
    def rule(spec: LayerSpec, tensors: dict) -> tuple[str, str]:
        vjp_key, vjp_reason = _weight_vjp_rule(spec, tensors)
        if _on_gpu(tensors):
            return _gpu_squared_rule(op, spec, tensors, vjp_key, vjp_reason)
        key, reason = _cheaper_squared(op, spec, "tn", tensors, vjp_key, lower=True)
        if not key.endswith(SQUARE):
            return key, reason
        return f"{vjp_key}{SQUARE}", f"{reason}; VJPs: {vjp_reason}"

    return rule


def _gpu_squared_rule(
    op: str, spec: LayerSpec, tensors: dict, vjp_key: str, vjp_reason: str
) -> tuple[str, str]:
    """The squared rule on GPU, where kernel launches bound the time.

    Returns:
        The implementation key and the reason.
    """
    vectors, samples = tensors["mat"].shape[:2]
    entries = vectors * samples * prod(spec.weight_shape)
    if spec.kind == "linear" and entries <= GPU_SMALL_LINEAR_VJPS:
        return f"{vjp_key}{SQUARE}", (
            f"on GPU, {entries} per-sample VJP entries squared and summed need"
            " fewer kernel launches than the single network"
        )
    # strided views and one copy launch fewer kernels than dense patterns' GEMMs
    key, reason = _cheaper_squared(op, spec, "tn_lowered", tensors)
    if not key.endswith(SQUARE):
        return key, f"on GPU, {reason}"
    return f"{vjp_key}{SQUARE}", f"on GPU, {reason}; VJPs: {vjp_reason}"


#: Layers with fewer input channels per group take the lagged products only with
#: kernels of at most ``LAG_SMALL_KERNEL`` entries. Each GEMM call then runs one tiny
#: GEMM per group, and 7x7 kernels need 85 lags and about 150 border boxes: ConvNeXt's
#: depthwise 256x28x28 and 512x14x14 7x7 layers took 1.43x and 3.18x the Gram
#: matrix's time at N = 8 (the cost model counts multiply-adds, not calls per group).
LAG_MIN_CHANNELS = 32
#: See ``LAG_MIN_CHANNELS``; depthwise 3x3 layers gained most (MobileNetV2's
#: 144x56x56 and 32x112x112 at N = 8: 0.18x and 0.17x of the Gram matrix's time).
LAG_SMALL_KERNEL = 9
#: The lagged products must cost less than this multiple of the Gram matrix's
#: multiply-adds. The weighted cost model is conservative: on 18 3x3 layers at
#: N = 8 and 32 (2 cores, C = 96-512, maps 7x7-56x56), every layer whose cost ratio
#: was below 1.1 measured 0.44-0.85x of the Gram matrix's time (192x16x16 at N = 8:
#: 1.01 -> 0.74x; 384x13x13 at N = 32: 1.05 -> 0.85x), and those above it 0.91-3.0x
#: (384x13x13 at N = 8: 1.59 -> 1.41x, 256x13x13: 1.24 -> 1.02x). The same held on
#: 16 layers with 1-64 channels per group, depthwise included: below 1.1, 0.25-0.72x
#: (64x56x56 depthwise 3x3: 0.81 -> 0.25x; 3x224x224: 0.43 -> 0.33x); above,
#: 1.3-4.9x (8x32x32: 2.1 -> 1.3x; 32x14x14 5x5: 1.4 -> 1.8x).
LAG_MARGIN = 1.1


def _kfac_expand_rule(spec: LayerSpec, tensors: dict) -> tuple[str, str]:
    what = (
        "input"
        if spec.kind == "linear"
        else "unfolded input (a strided view, one copy)"
    )
    channels = spec.in_channels // spec.groups
    if (
        lag_applies(spec)
        and not _on_gpu(tensors)
        and (channels >= LAG_MIN_CHANNELS or prod(spec.kernel_size) <= LAG_SMALL_KERNEL)
    ):
        samples = tensors["x"].shape[0]
        gram_cost = _gram_cost(spec, samples)
        sizes = tuple(p.padded_size for p in spec.patterns)
        lag_cost = lag_gram.cost(
            sizes,
            spec.kernel_size,
            tuple(p.dilation for p in spec.patterns),
            channels,
            spec.groups,
            samples,
            lag_zeros(spec),
        )
        if lag_cost < LAG_MARGIN * gram_cost:
            return "lag", (
                f"unit strides: lagged products of the padded input and border"
                f" corrections ({lag_cost:.3g} weighted multiply-adds) cost less"
                f" than the Gram matrix of the unfolded input ({gram_cost:.3g})"
            )
    return "tn_lowered", (
        f"the Gram matrix of the {what}: GEMMs for its upper block triangle only"
        " where that saves FLOPs"
    )


def _gram_cost(spec: LayerSpec, samples: int) -> float:
    """Multiply-adds of the Gram matrices of the unfolded input, in blocks.

    Returns:
        ``G * R² * M`` times the blocks' share, ``R = C_in // G * prod(K)`` rows
        and ``M = N * prod(O)`` columns.
    """
    rows = spec.in_channels // spec.groups * prod(spec.kernel_size)
    columns = samples * spec.num_positions
    blocks = num_blocks(rows, columns, spec.groups)
    return spec.groups * rows**2 * columns * (blocks + 1) / (2 * blocks)


def _kfac_reduce_rule(spec: LayerSpec, tensors: dict) -> tuple[str, str]:
    if spec.kind == "linear" or _non_overlapping(spec):
        return "tn", "non-overlapping patterns become views"
    if _on_gpu(tensors):
        return "tn_lowered", "on GPU, summing strided views needs the fewest launches"
    size = _largest_pattern(spec)
    if size > DENSE_PATTERN_LIMIT:
        return "tn_lowered", (
            f"a dense pattern would have {size} entries: sum strided views instead"
        )
    return "tn", (
        f"small dense patterns ({size} entries) sum over positions before the"
        " channels are touched"
    )


_RULES: dict[str, Callable] = {
    "forward": _kernel,
    "jac_mat_prod": _kernel,
    "jac_t_mat_prod": _input_vjp_rule,
    "weight_jac_mat_prod": _kernel,
    "weight_jac_t_mat_prod": _weight_vjp_rule,
    "weight_diag_ggn": _squared_rule("weight_diag_ggn"),
    "weight_batch_l2": _squared_rule("weight_batch_l2"),
    "unfold_input": lambda spec, t: ("tn_lowered", "unfolding is a strided view"),
    "kfac_expand": _kfac_expand_rule,
    "kfac_reduce": _kfac_reduce_rule,
}


def _autotuned(op: str, module: Module, spec: LayerSpec, tensors: dict):
    """The fastest candidate of ``op``, timed once per configuration.

    Returns:
        The implementation key and a reason that lists the measured times.
    """
    key = (op, spec, _signature(tensors))
    if key not in _TUNED:
        candidates = {}
        for name, fn in IMPLEMENTATIONS[op].items():
            if name in APPLIES and not APPLIES[name](spec):
                continue
            if name.removesuffix(SQUARE) in STOCK_WEIGHT_VJP:
                try:  # stock routes compete only where they are right
                    check_stock_strategy(module, spec, name.removesuffix(SQUARE))
                except NotImplementedError:
                    continue
            candidates[name] = partial(_call, fn, module, spec, name, tensors)
        timings = fastest_times(candidates, AUTOTUNE_ROUNDS)
        ranked = sorted(timings.items(), key=lambda item: item[1])
        times = ", ".join(f"{name} {1e3 * seconds:.3g} ms" for name, seconds in ranked)
        _remember(
            _TUNED,
            key,
            (
                ranked[0][0],
                f"fastest candidate measured for this configuration ({times})",
            ),
        )
    return _TUNED[key]


#: Timed rounds per candidate when autotuning (the fastest counts).
AUTOTUNE_ROUNDS = 3


def _call(fn: Callable, module: Module, spec: LayerSpec, name: str, tensors: dict):
    """One call of a candidate, synchronised with its CUDA device."""
    with torch.no_grad():
        fn(module, spec, name, **tensors)
    if tensors["x" if "x" in tensors else "mat"].is_cuda:
        torch.cuda.synchronize()
