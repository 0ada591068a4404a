"""A one-time measurement of how this host runs two per-sample weight-VJP routes.

The convolution kernel's weight gradient with the samples as groups (the ``kernel``
route) and the higher-order convolution (``higher_conv``, Rochette et al., 2019) both
run on oneDNN, and which of them is faster was not a property of the layer alone: on
two VMs of one kind (2 cores, AMD EPYC family 25 model 17, torch 2.14.1), the kernel
route of a 96x16x16 -> 192 3x3 layer at N = 4 took 0.98 ms on one and 1.9-2.0 ms on
the other, where the higher-order convolution took 1.8 ms and was the faster route
on every unstrided many-channel 3x3 layer of the benchmark networks from 2 samples
on. So the first ``auto`` decision between them times both routes once, on a probe
layer, and keeps the ratio for the process (about 40 ms on 2 cores, first calls
included).

A second probe times the kernel route against the lowered network (a strided view
of the input, one copy and one batched GEMM) for several vectors of one sample (GGN
diagonals, square-root GGN backpropagation). Their order also flips between hosts:
on the AVX-512 host of the earlier tables the kernel route of a 64x56x56 -> 64 3x3
layer (one sample, V = 10) took 8.2 ms against 12.8 ms for im2col and one GEMM; on
an AVX2-only EPYC (family 25 model 1, MKL's GEMM) the lowered network took
0.60-0.83x of the kernel route's time on every ungrouped many-channel 3x3 layer of
the benchmark networks from 512 output positions on, at N = 1-8 (about 60 ms, once).

A third probe times the same two routes on a depthwise layer (64x56x56, 3x3,
one sample, 10 vectors), whose order flips between hosts independently of the
second probe: on AMD EPYC hosts the kernel route was the faster from 3136 output
positions on (the lowered network 1.0-2.6x its time), while on an Intel Xeon with
AVX-512, where the second probe measured 1.05-1.3, the lowered network took
0.38-0.86x of the kernel route's time on those maps (about 40 ms, once). A fourth
times the network's view and one GEMM against the kernel route on a narrow 1x1 layer
(24 -> 144 channels, 56x56 maps, two samples, 10 vectors): the kernel route won by
2.8x on an AMD EPYC host and lost by 2x on that Xeon (about 0.15 s, once).

:func:`backpack_tn.set_host_probe`, or the environment variable
``BACKPACK_TN_HOST_PROBE=0``, turns the probes off (``auto`` then keeps the
``kernel`` route); :func:`backpack_tn.set_host_probe` can also pin their results.
"""

from __future__ import annotations

import os
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from backpack_tn._timing import fastest_times
from backpack_tn.derivatives.implementations import IMPLEMENTATIONS
from backpack_tn.expressions.layer_spec import LayerSpec, spec_of

#: The probe layer: ``Conv2d(C, C, 3, padding=1)`` on ``[N, C, S, S]`` inputs.
PROBE_CHANNELS = 64
PROBE_SIZE = 32
PROBE_SAMPLES = 4
#: Timed rounds per route (the fastest counts), after one untimed call each.
PROBE_ROUNDS = 5
#: The second probe: ``Conv2d(C, C, 3, padding=1)`` on one ``[1, C, S, S]`` sample
#: with this many vectors (1024 output positions, ``choice.MANY_POSITIONS`` on).
LOWERED_PROBE_VECTORS = 10
#: The third probe: the second's on a depthwise layer, ``Conv2d(C, C, 3, padding=1,
#: groups=C)``, on maps of this size (3136 output positions, where the routes'
#: order flipped between hosts).
DEPTHWISE_PROBE_SIZE = 56
#: The fourth probe's maps: ``Conv2d(24, 144, 1)`` on two ``[24, S, S]`` samples.
NARROW_PROBE_SIZE = 56


class Probe(NamedTuple):
    """A route timed against the kernel route on one probe layer.

    Attributes:
        route: The weight-VJP evaluation timed against ``'kernel'``.
        samples: Samples of the probe input.
        vectors: Vectors per sample.
        in_channels: Input channels of the probe layer.
        out_channels: Its output channels.
        kernel: Its square kernel's size (padding ``kernel // 2``).
        groups: Its groups.
        size: Its square input maps' size.
    """

    route: str
    samples: int
    vectors: int
    in_channels: int = PROBE_CHANNELS
    out_channels: int = PROBE_CHANNELS
    kernel: int = 3
    groups: int = 1
    size: int = PROBE_SIZE


#: probe name -> probe. The fourth probe times the network's GEMM view against the
#: kernel route on a narrow 1x1 layer (24 -> 144 channels on 56x56 maps, two
#: samples, ten vectors), whose order also flips between hosts.
PROBES: dict[str, Probe] = {
    "higher_conv": Probe("higher_conv", PROBE_SAMPLES, 1),
    "lowered": Probe("tn_lowered", 1, LOWERED_PROBE_VECTORS),
    "depthwise_lowered": Probe(
        "tn_lowered",
        1,
        LOWERED_PROBE_VECTORS,
        groups=PROBE_CHANNELS,
        size=DEPTHWISE_PROBE_SIZE,
    ),
    "narrow": Probe("tn", 2, LOWERED_PROBE_VECTORS, 24, 144, 1, size=NARROW_PROBE_SIZE),
}

#: Environment variable that turns the probe off when set to ``0``.
PROBE_VARIABLE = "BACKPACK_TN_HOST_PROBE"


#: probe name -> the argument of :func:`configure` that pins its result, in order.
_ARGUMENTS = {
    "higher_conv": "speedup",
    "lowered": "lowered_speedup",
    "depthwise_lowered": "depthwise_lowered_speedup",
    "narrow": "narrow_speedup",
}

_STATE: dict[str, float | bool | None] = {
    "enabled": os.environ.get(PROBE_VARIABLE, "1") != "0",
    **dict.fromkeys(PROBES),
}


def configure(
    enabled: bool,
    speedup: float | None = None,
    lowered_speedup: float | None = None,
    depthwise_lowered_speedup: float | None = None,
    narrow_speedup: float | None = None,
):
    """Turn the probes on or off, or pin their results (``choice.set_host_probe``).

    Args:
        enabled: Whether the probes may run.
        speedup: A result of the higher-order probe to use instead of measuring.
        lowered_speedup: A result of the lowered-network probe, likewise.
        depthwise_lowered_speedup: A result of the depthwise lowered-network
            probe, likewise.
        narrow_speedup: A result of the narrow 1x1 probe, likewise.
    """
    _STATE["enabled"] = bool(enabled)
    results = (speedup, lowered_speedup, depthwise_lowered_speedup, narrow_speedup)
    _STATE.update(zip(_ARGUMENTS, results, strict=True))


def configuration() -> dict[str, float | bool | None]:
    """The probes' setting and results so far, as :func:`configure` takes them.

    Lets another process (a benchmark's memory worker) take the routes this one
    took instead of probing again.

    Returns:
        ``{"enabled", "speedup", "lowered_speedup", "depthwise_lowered_speedup",
        "narrow_speedup"}``; results not measured yet are ``None``.
    """
    results = {argument: _STATE[name] for name, argument in _ARGUMENTS.items()}
    return {"enabled": _STATE["enabled"], **results}


def higher_conv_speedup() -> float:
    """How many times faster the higher-order convolution ran than the kernel route.

    Measured once per process on the probe layer with one vector of
    ``PROBE_SAMPLES`` samples (CPU, float32, the current number of threads), unless
    the probe is off or pinned.

    Returns:
        The kernel route's time divided by the higher-order convolution's.
    """
    return _speedup("higher_conv")


def lowered_speedup() -> float:
    """How many times faster the lowered network ran than the kernel route.

    Measured once per process on the probe layer with ``LOWERED_PROBE_VECTORS``
    vectors of one sample, unless the probe is off or pinned.

    Returns:
        The kernel route's time divided by the lowered network's.
    """
    return _speedup("lowered")


def depthwise_lowered_speedup() -> float:
    """How many times faster the lowered network ran than the kernel route, depthwise.

    Measured once per process on the depthwise probe layer
    (``DEPTHWISE_PROBE_SIZE``) with ``LOWERED_PROBE_VECTORS`` vectors of one
    sample, unless the probe is off or pinned.

    Returns:
        The kernel route's time divided by the lowered network's.
    """
    return _speedup("depthwise_lowered")


def narrow_speedup() -> float:
    """How many times faster the network's GEMM view ran than the kernel route.

    Measured once per process on the narrow 1x1 probe layer (``PROBES["narrow"]``)
    with several vectors of two samples, unless the probe is off or pinned.

    Returns:
        The kernel route's time divided by the network's.
    """
    return _speedup("narrow")


def _speedup(name: str) -> float:
    """The result of probe ``name`` (see ``PROBES``), measured on first use.

    Args:
        name: A key of ``PROBES``.

    Returns:
        The kernel route's time divided by the probed route's (1.0 when off).
    """
    if _STATE[name] is None:
        _STATE[name] = _measure(PROBES[name]) if _STATE["enabled"] else 1.0
    return float(_STATE[name])


def _measure(probe: Probe) -> float:
    """Time a route and the kernel route on a probe layer, interleaved.

    The global random state is left as it was (the probe runs inside the user's
    backward pass, and the layer's initialisation would draw from it).

    Args:
        probe: The route and the probe layer.

    Returns:
        The ratio of the fastest kernel-route time to the route's fastest.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        layer = nn.Conv2d(
            probe.in_channels,
            probe.out_channels,
            probe.kernel,
            padding=probe.kernel // 2,
            groups=probe.groups,
        )
        x = torch.randn(probe.samples, probe.in_channels, probe.size, probe.size)
        layer.input0, layer.output = x, layer(x)
        mat = torch.randn((probe.vectors, *layer.output.shape))
        return _fastest_ratio(layer, spec_of(layer), probe.route, x, mat)


def _fastest_ratio(
    layer: nn.Conv2d, spec: LayerSpec, route: str, x: Tensor, mat: Tensor
) -> float:
    """Interleaved timings of a route and the kernel route on the probe layer.

    Args:
        layer: The probe layer, with ``input0`` and ``output`` set.
        spec: Its description.
        route: The evaluation timed against ``'kernel'``.
        x: Its input of shape ``[N, C, S, S]``.
        mat: Vectors of shape ``[V, N, C, S, S]``.

    Returns:
        The fastest kernel-route time divided by the route's fastest.
    """
    routes = IMPLEMENTATIONS["weight_jac_t_mat_prod"]
    best = fastest_times(
        {
            name: partial(routes[name], layer, spec, name, x, mat, False)
            for name in ("kernel", route)
        },
        PROBE_ROUNDS,
    )
    return best["kernel"] / best[route]
